"""The samplers' static options and the engine's cache geometry: what ``sampler.decode``
(``DecodeOptions``) and ``engine.engine_decode`` (``EngineOptions``, the same plus the
engine's own) compile, both hashable; the prompt buckets, the engine's drain sizes, prompt
width and cache positions per slot, the one constructor of the options ``generate`` runs
and the dry run (``train.aot``) compiles, and the ``generate`` keywords of a ``rollout``
config block. No arrays, no jit."""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax.numpy as jnp

from espo_jax.rollout import paged_attention as paged_lib
from espo_jax.rollout.kv_attention import DECODE_READ


@dataclasses.dataclass(frozen=True)
class DecodeOptions:
    """The static (compile-time) options of ``sampler.decode`` (one static batch);
    ``EngineOptions`` extends them. Hashable.

    max_new_tokens N (the output width; per-row budgets may be smaller); top_k (0 = off);
    greedy (argmax, ignores temperature / filters); use_top_p (apply the sorting nucleus
    filter); pad_id written after a row finished; cache_dtype of the KV cache (None = the
    model's compute dtype); sampling: ``sampling.sample_rows``'s method.
    """
    max_new_tokens: int
    top_k: int = 0
    greedy: bool = False
    use_top_p: bool = False
    pad_id: int = 0
    cache_dtype: Any = None
    sampling: str = "gumbel"


@dataclasses.dataclass(frozen=True, kw_only=True)
class EngineOptions(DecodeOptions):
    """Static (compile-time) options of ``engine.engine_decode``: ``DecodeOptions``'s, then
    the engine's own (keyword-only); hashable.

    max_concurrent K slots; prefill_chunk C packed prompt tokens per prefill-heavy step
    (at most K x the prompt width are used); kv_block positions per attention block (the
    cache length is a multiple of it); decode_sizes: descending batch sizes of the decode step,
    the first = K; prefill_tokens: packed prompt tokens per mixed step while at least K/2 slots
    decode (0 or >= C: C, one mixed step size); routed_width: MoE models only, the
    left-padded prompt width P0 of the routed-experts output (``sampler.Rollout``'s layout
    [B, P0 + N, L, k]); attention: the cache layout and attention implementation,
    "xla" (``kv_attention``), "ragged_paged" (the TPU Pallas kernel) or "ragged_paged_xla"
    (its contract in XLA) (``paged_attention``; resolve "auto" with
    ``paged_attention.resolve_attention`` first); page_size: positions per page of the
    paged layouts (``paged_attention.page_size_for`` fits it to kv_block); decode_read:
    the XLA layout's decode steps read a cache of at most this many positions whole, in
    place, a longer one block by block (``kv_attention.ragged_decode_attention``).
    """
    max_concurrent: int
    prefill_chunk: int
    kv_block: int
    decode_sizes: tuple
    prefill_tokens: int = 0
    routed_width: int = 0
    attention: str = "xla"
    page_size: int = paged_lib.DEFAULT_PAGE_SIZE
    decode_read: int = DECODE_READ


# Prompt tokens a mixed step carries along with the K decode rows (``engine``'s doc).
DEFAULT_PREFILL_TOKENS = 32
# Key positions per block of the packed prefill's attention (``kv_attention.
# packed_prefill_attention``; capped to divide the kv block). One size for every mixed
# step, so a prompt token's attention sums its keys in the same blocks whichever step, K
# or run it lands in (the block size changes the rounding: in bf16 by up to 0.03 in a
# log-prob). 32, 64 and 128 ran alike on CPU (sampler.py's model: a 4096-token prompt,
# 16 x 32 and 64 ragged prompts).
PREFILL_BLOCK = 32
# Kv block of a cache short enough for the decode steps to read whole (at most
# ``decode_read`` positions, XLA layout): every position is read every step, so the cache
# is rounded up to this many positions, not to the kv block (sampler.py's toy model on
# CPU, 64 ragged prompts: 512 -> 320 positions, 9% faster).
SHORT_BLOCK = 64
# Rows of the smallest forward: a decode step of one busy slot runs as two rows (one idle).
# XLA's one-row dot (a matrix-vector product) rounds differently from the same row among
# others, so a lone row would get other log-probs (and, rarely, tokens) than with K > 1.
MIN_ROWS = 2


def bucket_length(n: int, minimum: int = 16) -> int:
    """Padded prompt length for n tokens: the next power of two >= max(n, minimum)
    up to 1024, then the next multiple of 512 (bounded padding waste, few buckets)."""
    if n <= 1024:
        return max(minimum, 1 << max(0, math.ceil(math.log2(max(n, 1)))))
    return -(-n // 512) * 512


def default_decode_sizes(k: int) -> tuple:
    """(K, K/2, K/4, ..., 2) (halving, rounded up) for K >= 8, else (K,): drain sizes
    where they pay (each size is one more compiled decode step; a step costs a fixed
    weight read plus a per-row part, so a drain of m rows runs on at most 2m). No size 1:
    a step has at least ``MIN_ROWS`` rows."""
    if k < 8:
        return (k,)
    sizes = [k]
    while sizes[-1] > MIN_ROWS:
        sizes.append(-(-sizes[-1] // 2))
    return tuple(sizes)


def cache_geometry(prompt_width: int, options: EngineOptions) -> tuple[int, int]:
    """(kv block, cache positions S per slot) of the engine for prompts of width P and
    ``options.max_new_tokens`` N: S is P + N rounded up to the kv block, or, for an XLA
    cache the decode steps read whole (at most ``decode_read`` positions), to
    ``SHORT_BLOCK``."""
    need, blk = prompt_width + options.max_new_tokens, options.kv_block
    short = math.gcd(blk, SHORT_BLOCK)
    if options.attention == "xla" and -(-need // short) * short <= options.decode_read:
        blk = short
    return blk, -(-need // blk) * blk


def prompt_width(longest: int, prompt_bucket: int, prefill_chunk: int) -> int:
    """The engine's right-aligned prompt array width P for a longest prompt of ``longest``
    tokens in left-padded prompts of bucketed width ``prompt_bucket``: a multiple of the
    chunk min(prefill_chunk, prompt_bucket) (``engine.right_align``)."""
    chunk = min(int(prefill_chunk), int(prompt_bucket))
    return max(chunk, -(-int(longest) // chunk) * chunk)


def engine_options(base: DecodeOptions, *, prompt_bucket: int, max_concurrent: int,
                   prefill_chunk: int, kv_block: int, attention: str, is_moe: bool,
                   prefill_tokens: int | None = None,
                   decode_read: int | None = None) -> EngineOptions:
    """The ``EngineOptions`` of ``generate`` for left-padded prompts of bucketed width
    ``prompt_bucket`` (``bucket_length``) and ``base``'s options (N = its max_new_tokens),
    K = ``max_concurrent`` slots: the kv block clipped to the bucket of prompt + N, the
    default drain sizes, ``DEFAULT_PREFILL_TOKENS`` and ``DECODE_READ`` where None, and for
    an MoE model the routed-experts width (the prompt bucket). The dry run compiles the
    engine with these very options, so its memory figure is that of the rollout."""
    return EngineOptions(
        **vars(base), max_concurrent=int(max_concurrent), prefill_chunk=int(prefill_chunk),
        kv_block=min(int(kv_block), bucket_length(int(prompt_bucket) + base.max_new_tokens)),
        decode_sizes=default_decode_sizes(int(max_concurrent)),
        prefill_tokens=(DEFAULT_PREFILL_TOKENS if prefill_tokens is None
                        else int(prefill_tokens)),
        routed_width=int(prompt_bucket) if is_moe else 0, attention=attention,
        decode_read=DECODE_READ if decode_read is None else int(decode_read))


def kv_cache_bytes(config, max_concurrent: int, max_len: int, dtype="bfloat16") -> int:
    """Bytes of the engine's KV cache: K slots x max_len positions (prompt + response,
    rounded up as ``cache_geometry`` does) x layers x 2 (k, v) x kv heads x head_dim.
    Divide by the devices that split the slots or the kv heads for a per-device figure."""
    per_token = 2 * config.num_layers * config.num_kv_heads * config.head_dim
    return int(max_concurrent) * int(max_len) * per_token * jnp.dtype(dtype).itemsize


def engine_kwargs(rollout_config, batch_devices: int = 1) -> dict:
    """generate() keywords from a ``rollout`` config block: max_concurrent (0 -> None,
    the static batch), prefill_chunk, kv_block, attention (``rollout.engine_attention``),
    decode_read (0 -> None, the default) (their defaults where the block lacks them).
    ``rollout.max_concurrent_per_device`` > 0 overrides max_concurrent with that many
    slots on each of the ``batch_devices`` devices that split the rows (the mesh's data x
    fsdp (x expert)), so one config fits 8 or 256 chips."""
    get = rollout_config.get
    per_device = int(get("max_concurrent_per_device", 0) or 0)
    k = (per_device * int(batch_devices) if per_device > 0
         else int(get("max_concurrent", 0) or 0))
    return dict(max_concurrent=k if k > 0 else None,
                prefill_chunk=int(get("prefill_chunk", 512)), kv_block=int(get("kv_block", 256)),
                attention=str(get("engine_attention", "auto")),
                decode_read=int(get("decode_read", 0) or 0) or None)
