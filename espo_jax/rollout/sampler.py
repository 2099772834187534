"""Jitted KV-cache sampler: left-padded batched prefill + ``lax.while_loop`` decode.

Layout of one call (B rows, P bucketed prompt length, N = max_new_tokens):

    cache slots  [0, P)        the left-padded prompt (kv_mask = prompt_mask)
                 [P, P + N)    generated tokens (kv_mask = 1; causality hides the future)
    positions    cumsum(prompt_mask) - 1 for the prompt, prompt_len + t for new token t

Everything from prefill to the last token runs in ONE jitted function
(``decode``): no host round trip per token, the loop exits as soon as every row has
finished, and the KV cache is allocated inside it (so it only ever lives in XLA
buffers that the loop updates in place and frees on return; nothing to donate from
the caller). Compiles once per (model graph, B, P bucket, N, static sampling flags);
temperature, top_p, the stop tokens' values and the key are traced.

``generate(..., max_concurrent=K)`` runs the continuous-batching engine instead
(``espo_jax.rollout.engine``: K slots, a K x (P + N) cache, the same responses).
"""
from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from espo_jax.rollout import engine, paged_attention
from espo_jax.rollout.engine_options import DecodeOptions, bucket_length, engine_options
from espo_jax.rollout.sampling import SAMPLING_METHODS, sample_rows, token_keys


class Rollout(NamedTuple):
    """Sampled responses (a pytree; all jax arrays on device).

    prompt_tokens i32[B, P]  left-padded prompts (P bucketed), pad = pad_id
    prompt_mask   i32[B, P]  1 = real prompt token
    tokens        i32[B, N]  sampled tokens; pad_id after a row finished
    mask          f32[B, N]  1 up to and including the first stop token
    logprobs      f32[B, N]  log-prob of each token under the distribution it was
                             drawn from (see ``sampling``); 0 where mask is 0
    lengths       i32[B]     number of response tokens (= mask.sum(-1))
    routed_experts u8[B, P + N, L, k] or None: MoE models only, the experts each of the
                             L sparse layers picked for the token at each cache slot
                             (prompt, then response; the last response token is never fed
                             back, its slot stays 0); for routing replay. uint8 (int16
                             above 256 experts): Qwen3-30B-A3B records 384 ids per token

    Randomness: token t of row i (rows in output order: prompt-major, the G samples of a
    prompt consecutive) is drawn with ``fold_in(fold_in(key, first_row + i), t)``
    (``sampling.token_keys``; ``generate``'s ``first_row``, default 0), so the same key
    gives the same responses whatever the batch layout: static batch or continuous
    batching with any ``max_concurrent``, any prompt bucket, any mesh, and a rollout
    split into several calls, each passing its first row's index (up to float rounding
    of the logits across batch shapes, which can flip a near-tied draw). Before the
    rollout engine every row drew token t with ``fold_in(key, t)`` and one batched
    categorical, which tied a row's draws to the batch it ran in.
    """
    prompt_tokens: jax.Array
    prompt_mask: jax.Array
    tokens: jax.Array
    mask: jax.Array
    logprobs: jax.Array
    lengths: jax.Array
    routed_experts: jax.Array | None = None


# ----------------------------------------------------------------------------- core

def _last_logits(model, w, ids, positions, kv_mask, cache, cache_index):
    """Logits f32[B, V] of the LAST input position only, the updated cache, and the routed
    experts i32[B, T, L, k] of the T input tokens (None for a dense model). w f32[D, V]:
    the unembedding, made once per rollout outside the decode loop (a [D, V] array, as the
    engine's; inside the loop XLA fused the tied [V, D] embedding's transpose into each
    step's matmul).

    Unembeds only the last hidden state: a full prefill would otherwise materialise
    f32[B, P, V] logits (GBs for long prompts and 150k vocabularies).
    """
    (hidden, cache), routing = model.hidden_states(
        ids, positions, attention_mask=kv_mask, cache=cache, cache_index=cache_index,
        return_routing=True)
    logits = jnp.dot(hidden[:, -1].astype(jnp.float32), w, preferred_element_type=jnp.float32)
    return logits, cache, None if routing is None else routing["experts"]


def decode(
    graphdef: nnx.GraphDef, options: DecodeOptions, state: nnx.State, prompt_ids: jax.Array,
    prompt_mask: jax.Array, key: jax.Array, temperature: jax.Array, top_p: jax.Array,
    eos_ids: jax.Array, budgets: jax.Array, row_ids: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Prefill + decode loop; pure. Jit it with ``static_argnums=STATIC_ARGNUMS``
    (``decode_jit``), adding in/out shardings for the 9 array arguments if wanted
    (``generate`` passes all of them).

    state: the model's nnx.State; prompt_ids i32[B, P] left-padded, prompt_mask i32[B, P]
    (each row ends in a real token), key a PRNG key, temperature / top_p f32 scalars,
    eos_ids i32[E] (E may be 0), budgets i32[B] in [1, N] (max new tokens of each row),
    row_ids i32[B]: each row's index for its keys (default arange(B))
    -> (tokens i32[B, N], mask f32[B, N], logprobs f32[B, N]), plus routed_experts
    u8[B, P + N, L, k] for an MoE model (``Rollout``).
    Token t of row i is drawn with ``token_keys``: ``fold_in(fold_in(key, row_ids[i]), t)``.
    """
    model = nnx.merge(graphdef, state)
    batch, plen = prompt_ids.shape
    n, pad_id = options.max_new_tokens, options.pad_id
    prompt_mask = prompt_mask.astype(jnp.int32)
    prompt_len = prompt_mask.sum(axis=1)                                  # [B]
    kv_mask = jnp.concatenate([prompt_mask, jnp.ones((batch, n), jnp.int32)], axis=1)
    rows = (jnp.arange(batch, dtype=jnp.int32) if row_ids is None
            else row_ids.astype(jnp.int32))
    sample_ = functools.partial(sample_rows, temperature=temperature, top_p=top_p,
                                top_k=options.top_k, greedy=options.greedy,
                                use_top_p=options.use_top_p, method=options.sampling)

    def sample(logits, step):
        return sample_(logits, token_keys(key, rows, jnp.full((batch,), step, jnp.int32)))

    def is_stop(tok):                                                     # [B] -> bool[B]
        return jnp.any(tok[:, None] == eos_ids[None, :], axis=-1)

    # Prefill: all prompt tokens at slots [0, P); the last slot is a real token.
    cache = model.init_cache(batch, plen + n, dtype=options.cache_dtype)
    positions = jnp.maximum(jnp.cumsum(prompt_mask, axis=1) - 1, 0)
    w = model.unembedding().astype(jnp.float32)  # once per rollout, not per token
    logits, cache, rx = _last_logits(model, w, prompt_ids.astype(jnp.int32), positions,
                                     kv_mask, cache, jnp.asarray(0, jnp.int32))
    moe = rx is not None
    rdt = jnp.uint8 if moe and model.config.num_experts <= 256 else jnp.int16
    routed = (jnp.zeros((batch, plen + n) + rx.shape[2:], rdt).at[:, :plen].set(rx.astype(rdt))
              if moe else jnp.zeros((), jnp.int32))
    tok, logp = sample(logits, 0)

    tokens = jnp.full((batch, n), pad_id, jnp.int32).at[:, 0].set(tok)
    logps = jnp.zeros((batch, n), jnp.float32).at[:, 0].set(logp)
    mask = jnp.zeros((batch, n), jnp.float32).at[:, 0].set(1.0)
    budgets = budgets.astype(jnp.int32)
    done = is_stop(tok) | (budgets <= 1)

    def cond(carry):
        step, _, done, *_ = carry
        return (step < n) & ~jnp.all(done)

    def body(carry):
        step, prev, done, tokens, logps, mask, cache, routed = carry
        # Feed token step-1 (slot P+step-1) to get the distribution of token `step`.
        pos = (prompt_len + step - 1)[:, None]
        logits, cache, rx = _last_logits(model, w, prev[:, None], pos, kv_mask, cache,
                                         plen + step - 1)
        if moe:
            routed = jax.lax.dynamic_update_slice(routed, rx.astype(rdt),
                                                  (0, plen + step - 1, 0, 0))
        tok, logp = sample(logits, step)
        live = ~done
        tok = jnp.where(live, tok, pad_id)
        logp = jnp.where(live, logp, 0.0)
        tokens = jax.lax.dynamic_update_slice(tokens, tok[:, None], (0, step))
        logps = jax.lax.dynamic_update_slice(logps, logp[:, None], (0, step))
        mask = jax.lax.dynamic_update_slice(mask, live.astype(jnp.float32)[:, None], (0, step))
        done = done | is_stop(tok) | (step + 1 >= budgets)
        return step + 1, tok, done, tokens, logps, mask, cache, routed

    carry = (jnp.asarray(1, jnp.int32), tok, done, tokens, logps, mask, cache, routed)
    _, _, _, tokens, logps, mask, _, routed = jax.lax.while_loop(cond, body, carry)
    return (tokens, mask, logps, routed) if moe else (tokens, mask, logps)


STATIC_ARGNUMS = (0, 1)  # graphdef, options
decode_jit = jax.jit(decode, static_argnums=STATIC_ARGNUMS)
"""``decode`` jitted with its static arguments; the compile cache is keyed on them and
on the array shapes, so repeated calls with the same bucket do not retrace."""


# ----------------------------------------------------------------------------- host side

def _normalise_prompts(prompts, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """list[list[int]] or (ids [B, P], mask [B, P]) -> left-padded int32 numpy (ids, mask)."""
    if isinstance(prompts, tuple) and len(prompts) == 2 and np.ndim(prompts[0]) == 2:
        ids = np.asarray(prompts[0]).astype(np.int32)
        mask = np.asarray(prompts[1]).astype(np.int32)
        if ids.shape != mask.shape:
            raise ValueError(f"prompt ids {ids.shape} and mask {mask.shape} must have the "
                             "same shape [B, P]")
        if ids.shape[0] == 0:
            raise ValueError("no prompts given (B = 0)")
        if not np.isin(mask, (0, 1)).all():
            raise ValueError("prompt mask must contain only 0 and 1")
        lens = mask.sum(1)
        empty = np.flatnonzero(lens == 0)
        if empty.size:
            raise ValueError(f"empty prompt(s) at row(s) {empty.tolist()}: every prompt "
                             "needs >= 1 token")
        # Left padding: zeros then ones in every row.
        if (np.diff(mask, axis=1) < 0).any():
            bad = np.flatnonzero((np.diff(mask, axis=1) < 0).any(1)).tolist()
            raise ValueError(f"prompts must be LEFT-padded (mask 0...0 1...1); rows {bad} are not")
        return np.where(mask == 1, ids, pad_id).astype(np.int32), mask
    prompts = [list(p) for p in prompts]
    if not prompts:
        raise ValueError("no prompts given (empty list)")
    empty = [i for i, p in enumerate(prompts) if len(p) == 0]
    if empty:
        raise ValueError(f"empty prompt(s) at index {empty}: every prompt needs >= 1 token")
    width = max(len(p) for p in prompts)
    ids = np.full((len(prompts), width), pad_id, np.int32)
    mask = np.zeros((len(prompts), width), np.int32)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = p
        mask[i, width - len(p):] = 1
    return ids, mask


def _eos_array(eos_id) -> np.ndarray:
    """Stop tokens as i32[E]: E = 0 for None, else padded (by repeating an id) to a
    multiple of 8 so that stop lists of different sizes share one compile."""
    if eos_id is None:
        return np.zeros((0,), np.int32)
    if isinstance(eos_id, (int, np.integer)):
        ids = [int(eos_id)]
    else:
        ids = sorted({int(e) for e in eos_id})
    if not ids:
        return np.zeros((0,), np.int32)
    return np.asarray(ids + ids[:1] * (-len(ids) % 8), np.int32)


def _max_positions(config) -> int | None:
    for name in ("max_position_embeddings", "max_positions", "max_seq_len"):
        value = getattr(config, name, None)
        if value:
            return int(value)
    return None


def _budgets(max_new_tokens, n_prompts: int) -> np.ndarray:
    """max_new_tokens (an int, or one int per prompt) -> i32[n_prompts], each >= 1."""
    if isinstance(max_new_tokens, (int, np.integer)):
        budgets = np.full((n_prompts,), int(max_new_tokens), np.int64)
    else:
        budgets = np.asarray(max_new_tokens)
        if budgets.shape != (n_prompts,) or not np.issubdtype(budgets.dtype, np.integer):
            raise ValueError(f"max_new_tokens must be an int or {n_prompts} ints (one per "
                             f"prompt), got shape {budgets.shape} of {budgets.dtype}")
    if budgets.min() < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {int(budgets.min())}")
    return budgets.astype(np.int32)


def generate(
    model: nnx.Module, prompts: Sequence[Sequence[int]] | tuple[Any, Any], *,
    max_new_tokens: int | Sequence[int], temperature: float, key: jax.Array,
    top_p: float = 1.0, top_k: int = 0, eos_id: int | Sequence[int] | None,
    num_samples: int = 1, pad_id: int = 0, max_len: int | None = None,
    cache_dtype: Any = None, decode_fn: Callable | None = None,
    max_concurrent: int | None = None, prefill_chunk: int = 512, kv_block: int = 256,
    engine_fn: Callable | None = None, sampling: str = "gumbel",
    prefill_tokens: int | None = None, attention: str = "auto", first_row: int = 0,
    decode_read: int | None = None,
) -> Rollout:
    """Sample ``num_samples`` responses per prompt with a KV cache, in one jitted call.

    prompts: list of token-id lists (any lengths >= 1) or (ids [B0, P0], mask [B0, P0])
      left-padded arrays. Prompts are left-padded to a bucketed length P
      (``bucket_length``) so shapes, and compiles, are shared across calls.
    max_new_tokens: N, or one budget per prompt (B0 ints >= 1; N = their max): row i
      stops after its budget (for curricula and benchmarks with controlled lengths).
    num_samples: G; the batch is B = B0 * G with the G samples of a prompt consecutive.
    temperature: 0 -> greedy (argmax); > 0 samples from softmax(filtered logits / T).
    top_p (1.0 = off), top_k (0 = off): truncation, applied after temperature, top-k
      first. Keep both off for RL (see ``espo_jax.rollout.sampling``).
    eos_id: a stop token, a list of stop tokens, or None (always N tokens).
    max_len: cap on prompt + response length; defaults to the model's max positions.
    cache_dtype: KV cache dtype (default: the model's compute dtype).
    max_concurrent: None -> one static batch of all B rows (``decode``: a B x (P + N)
      cache, every row runs until the last one ends). K -> continuous batching
      (``espo_jax.rollout.engine``): K rows in flight, a finished row's slot is refilled
      with the next prompt, a K x (P + N) cache, ragged attention; the same responses.
    prefill_chunk, kv_block: the engine's packed prompt tokens per prefill-bound step
      (several short prompts share one step) and kv positions per attention block
      (clipped to the bucket for short inputs).
    prefill_tokens: packed prompt tokens the engine adds to each decode step while
      prompts are being prefilled and at least K/2 slots decode (None: the engine's
      default; a prefill-bound step, e.g. the start, takes prefill_chunk tokens).
    attention: the engine's KV layout and attention (``paged_attention``): "auto" (the
      Pallas ragged paged attention kernel on TPU, else "xla"), "xla", "ragged_paged",
      "ragged_paged_xla" (the kernel's contract in XLA, for checking the paged plumbing).
    decode_read: the "xla" engine's decode steps read a cache of at most this many
      positions whole, in place, a longer one block by block up to the longest live row
      (None: ``kv_attention.DECODE_READ``, tuned on CPU; see ``ragged_decode_attention``).
    decode_fn: a jitted variant of ``decode`` with the same signature, e.g.
      ``jax.jit(decode, static_argnums=STATIC_ARGNUMS, in_shardings=..., out_shardings=...)``;
      defaults to ``decode_jit`` (static batch only).
    engine_fn: the same for ``engine.engine_decode`` (default ``engine.engine_jit``).
    sampling: "gumbel" (reproducible across batch layouts) or "inverse_cdf" (cheaper on
      CPU; see ``sampling.sample_rows``).
    first_row: the index of this call's first row in a bigger rollout (>= 0): row i
      draws as row first_row + i, so calls over consecutive slices of the prompts
      (first_row = the slice's start x num_samples) give the responses of one call.
    Returns a ``Rollout`` (rows in input order); arrays stay on device (no host sync).
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 = off), got {top_k}")
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if isinstance(first_row, bool) or not isinstance(first_row, (int, np.integer)) \
            or not 0 <= first_row < 2**30:  # row ids are int32
        raise ValueError(f"first_row must be an int in [0, 2**30), got {first_row!r}")
    if sampling not in SAMPLING_METHODS:
        raise ValueError(f"sampling must be one of {SAMPLING_METHODS}, got {sampling!r}")
    for name, v, none in (("max_concurrent", max_concurrent, "one static batch"),
                          ("decode_read", decode_read, "the default")):
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, np.integer))
                              or v < 1):
            raise ValueError(f"{name} must be None ({none}) or an int >= 1, got {v!r}")
    attention = paged_attention.resolve_attention(attention)
    for name, v in (("prefill_chunk", prefill_chunk), ("kv_block", kv_block)):
        if not isinstance(v, (int, np.integer)) or v < 1 or v & (v - 1):
            raise ValueError(f"{name} must be a power of two >= 1, got {v!r}")

    ids, mask = _normalise_prompts(prompts, pad_id)
    budgets = _budgets(max_new_tokens, ids.shape[0])
    n_max = int(budgets.max())
    config = model.config
    vocab = int(config.vocab_size)
    lens = mask.sum(1)
    if ids.size and (ids.min() < 0 or ids.max() >= vocab):
        raise ValueError(f"prompt token ids must be in [0, {vocab}); got range "
                         f"[{ids.min()}, {ids.max()}]")
    limit = max_len if max_len is not None else _max_positions(config)
    total = lens + budgets
    if limit is not None and total.max() > limit:
        row = int(np.argmax(total))
        raise ValueError(
            f"prompt {row} has {lens[row]} tokens + max_new_tokens={budgets[row]} = "
            f"{total[row]} > {limit} (the cache / max position length: "
            f"{'max_len' if max_len is not None else 'model.config.max_position_embeddings'})"
            "; shorten the prompt or lower max_new_tokens")

    longest = int(lens.max())
    plen = bucket_length(longest)
    if ids.shape[1] > plen:  # over-padded array input: drop all-pad columns on the left
        ids, mask = ids[:, -plen:], mask[:, -plen:]
    elif ids.shape[1] < plen:
        extra = plen - ids.shape[1]
        ids = np.pad(ids, ((0, 0), (extra, 0)), constant_values=pad_id)
        mask = np.pad(mask, ((0, 0), (extra, 0)))
    if num_samples > 1:
        ids, mask = np.repeat(ids, num_samples, axis=0), np.repeat(mask, num_samples, axis=0)
        budgets = np.repeat(budgets, num_samples)

    greedy = temperature == 0
    graphdef, state = nnx.split(model)
    traced = (key, jnp.asarray(1.0 if greedy else temperature, jnp.float32),
              jnp.asarray(top_p, jnp.float32), jnp.asarray(_eos_array(eos_id)))
    row_ids = jnp.asarray(np.arange(first_row, first_row + ids.shape[0], dtype=np.int32))
    options = DecodeOptions(max_new_tokens=n_max, top_k=int(top_k), greedy=bool(greedy),
                            use_top_p=bool(top_p < 1.0), pad_id=int(pad_id),
                            cache_dtype=cache_dtype, sampling=sampling)
    if max_concurrent is None:
        out = (decode_fn or decode_jit)(
            graphdef, options, state, jnp.asarray(ids), jnp.asarray(mask), *traced,
            jnp.asarray(budgets), row_ids)
        tokens, out_mask, logprobs = out[:3]
        routed = out[3] if len(out) > 3 else None
        lengths = out_mask.sum(-1).astype(jnp.int32)
    else:
        options = engine_options(
            options, prompt_bucket=plen, max_concurrent=min(int(max_concurrent), ids.shape[0]),
            prefill_chunk=prefill_chunk, kv_block=kv_block, attention=attention,
            is_moe=model.config.is_moe, prefill_tokens=prefill_tokens, decode_read=decode_read)
        right, plens = engine.right_align(ids, mask, prefill_chunk, pad_id)
        out = (engine_fn or engine.engine_jit)(
            graphdef, options, state, jnp.asarray(right), jnp.asarray(plens),
            jnp.asarray(budgets), *traced, row_ids)
        tokens, lengths, logprobs = out[:3]
        routed = out[4] if len(out) > 4 else None
        out_mask = (jnp.arange(n_max)[None, :] < lengths[:, None]).astype(jnp.float32)
    return Rollout(prompt_tokens=jnp.asarray(ids), prompt_mask=jnp.asarray(mask),
                   tokens=tokens, mask=out_mask, logprobs=logprobs, lengths=lengths,
                   routed_experts=routed)
