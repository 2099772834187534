"""The rollout engine's paged KV layout and the ragged paged attention it feeds (TPU).

On TPU the engine's attention is JAX's Pallas kernel
``jax.experimental.pallas.ops.tpu.ragged_paged_attention`` (vLLM-style: one call for a
step's mixed prefill and decode queries, each sequence reading only its own pages up to
its own length). This module lays the engine's cache out as the kernel's pages and builds
its sequence table; ``engine.EngineOptions.attention`` picks the layout:

- "xla" (``kv_attention``): cache [K, KVH, S, hd] per k and v; runs everywhere.
- "ragged_paged": cache [K * S / page, page, 2 * KVH, hd] (k and v heads interleaved,
  as the kernel wants), slot s owning pages [s * S / page, (s + 1) * S / page): a fixed
  page table (a slot's pages are contiguous, so a write is one scatter and nothing is
  allocated per step). Runs the Pallas kernel; TPU only.
- "ragged_paged_xla": the same layout and sequence table, attended by
  ``ragged_paged_attention_xla``, an XLA implementation of the kernel's contract. It runs
  the paged plumbing anywhere, so CPU tests check it (and check each call against the
  kernel's own validator and reference, see tests/test_paged_attention.py).

The kernel's contract: queries q [Tq, H, hd] are the sequences' queries back to back
(sequence i owns rows [cu_q_lens[i], cu_q_lens[i + 1])); sequence i has kv_lens[i] keys
in pages page_indices[i] and its q_len queries are its LAST q_len positions (query j at
position kv_lens[i] - q_len + j), causal. Rows past cu_q_lens[num_seqs] are not computed.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

ATTENTION_IMPLS = ("auto", "xla", "ragged_paged", "ragged_paged_xla")
DEFAULT_PAGE_SIZE = 64
_NEG = -1e30


def resolve_attention(impl: str) -> str:
    """"auto" -> "ragged_paged" on TPU (the Pallas kernel), else "xla"; others as given
    ("ragged_paged" off TPU is refused: the kernel compiles for TPU only)."""
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"engine attention must be one of {ATTENTION_IMPLS}, got {impl!r}")
    tpu = jax.default_backend() == "tpu"
    if impl == "auto":
        return "ragged_paged" if tpu else "xla"
    if impl == "ragged_paged" and not tpu:
        raise ValueError(f"engine attention 'ragged_paged' is a TPU Pallas kernel; this "
                         f"backend is {jax.default_backend()} (use 'auto', 'xla' or "
                         "'ragged_paged_xla')")
    return impl


def page_size_for(kv_block: int, page_size: int = DEFAULT_PAGE_SIZE) -> int:
    """The page size used with a cache of a multiple of ``kv_block`` positions: the
    largest power of two <= page_size that divides kv_block (both powers of two)."""
    return math.gcd(int(kv_block), int(page_size))


def init_paged_cache(slots: int, length: int, kv_heads: int, head_dim: int, page: int,
                     dtype) -> jax.Array:
    """A layer's paged cache: zeros [slots * length / page, page, 2 * kv_heads, head_dim]
    (``length`` a multiple of ``page``; k head h at 2h, v head h at 2h + 1)."""
    if length % page:
        raise ValueError(f"cache length {length} must be a multiple of the page size {page}")
    return jnp.zeros((slots * length // page, page, 2 * kv_heads, head_dim), dtype)


def write_paged(kv: jax.Array, slots: jax.Array, pos: jax.Array, k: jax.Array,
                v: jax.Array, *, num_slots: int) -> jax.Array:
    """kv [K * S / page, page, 2 KVH, hd] with the new keys / values k, v [M, 1, KVH, hd]
    stored at (slots[m], pos[m]); slot ``num_slots`` (out of range) writes nowhere."""
    n_pages, page, two_kvh, hd = kv.shape
    view = kv.reshape(num_slots, n_pages * page // num_slots, two_kvh, hd)  # free: contiguous
    new = jnp.stack([k[:, 0], v[:, 0]], axis=2).reshape(k.shape[0], two_kvh, hd)
    return view.at[slots, pos].set(new.astype(kv.dtype), mode="drop").reshape(kv.shape)


def page_table(seq_slots: jax.Array, pages_per_slot: int) -> jax.Array:
    """page_indices i32[Nseq, pages_per_slot] of sequences living in slots seq_slots
    i32[Nseq] (clipped to a valid slot by the caller)."""
    return (seq_slots[:, None] * pages_per_slot
            + jnp.arange(pages_per_slot, dtype=jnp.int32)[None, :]).astype(jnp.int32)


def ragged_paged_attention_xla(q, kv_pages, kv_lens, page_indices, cu_q_lens, num_seqs, *,
                               sm_scale: float):
    """The kernel's contract in XLA (see the module doc): q [Tq, H, hd] -> [Tq, H, hd].

    Each query row gathers its sequence's pages (O(Tq x pages_per_seq x page) memory):
    a reference for the paged plumbing, not a fast path. Rows past cu_q_lens[num_seqs]
    are 0. Online-softmax-free: plain masked softmax in float32.
    """
    tq, h, hd = q.shape
    _, page, two_kvh, _ = kv_pages.shape
    kvh = two_kvh // 2
    nseq, pps = page_indices.shape
    j = jnp.arange(tq, dtype=jnp.int32)
    seq = jnp.clip(jnp.searchsorted(cu_q_lens[1:], j, side="right"), 0, nseq - 1)
    q_len = cu_q_lens[seq + 1] - cu_q_lens[seq]
    qpos = kv_lens[seq] - q_len + (j - cu_q_lens[seq])                      # [Tq]
    valid = j < cu_q_lens[num_seqs[0]]
    kv = kv_pages[page_indices[seq]].reshape(tq, pps * page, two_kvh, hd)
    k, v = kv[:, :, 0::2].astype(q.dtype), kv[:, :, 1::2].astype(q.dtype)
    qg = q.reshape(tq, kvh, h // kvh, hd)
    sc = jnp.einsum("tkgd,tskd->tkgs", qg, k, preferred_element_type=jnp.float32) * sm_scale
    kpos = jnp.arange(pps * page, dtype=jnp.int32)[None, :]
    ok = (kpos <= qpos[:, None]) & (kpos < kv_lens[seq][:, None])             # [Tq, S]
    sc = jnp.where(ok[:, None, None], sc, _NEG)
    p = jnp.where(ok[:, None, None], jnp.exp(sc - sc.max(-1, keepdims=True)), 0.0)
    p = p / jnp.maximum(p.sum(-1, keepdims=True), 1e-30)
    out = jnp.einsum("tkgs,tskd->tkgd", p.astype(v.dtype), v,
                     preferred_element_type=jnp.float32).reshape(tq, h, hd)
    return jnp.where(valid[:, None, None], out, 0.0).astype(q.dtype)


def _kernel():
    from jax.experimental.pallas.ops.tpu.ragged_paged_attention import (  # noqa: PLC0415
        ragged_paged_attention)
    return ragged_paged_attention


def paged_attend(impl: str, q: jax.Array, kv: jax.Array, seq_slots: jax.Array,
                 q_lens: jax.Array, kv_lens: jax.Array, *, num_slots: int) -> jax.Array:
    """Attention of a step's queries over the paged cache (already holding their keys).

    q [Tq, 1, H, hd]: the sequences' queries back to back (sequence i: q_lens[i] rows,
    its last positions); seq_slots, q_lens, kv_lens i32[Nseq] (q_lens[i] <= kv_lens[i];
    q_len 0 sequences allowed); rows past sum(q_lens) are garbage the caller drops.
    impl "ragged_paged" (the Pallas kernel) or "ragged_paged_xla". Returns [Tq, 1, H, hd].
    """
    pps = kv.shape[0] // num_slots
    tq, _, h, hd = q.shape
    pages = page_table(jnp.clip(seq_slots, 0, num_slots - 1), pps)
    cu = jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.cumsum(q_lens).astype(jnp.int32)])
    args = (q.reshape(tq, h, hd), kv, kv_lens.astype(jnp.int32), pages, cu,
            jnp.full((1,), seq_slots.shape[0], jnp.int32))
    fn = _kernel() if impl == "ragged_paged" else ragged_paged_attention_xla
    return fn(*args, sm_scale=1.0 / math.sqrt(hd)).reshape(tq, 1, h, hd)
