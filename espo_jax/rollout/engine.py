"""Continuous-batching rollout engine: K sequences in flight, refilled from a queue.

One jitted program (``engine_decode``) runs the whole rollout of B prompts:

    while a prompt is pending or a slot is busy:
        if a slot is mid-prefill, or a slot is free and a prompt pending:
            a mixed step: free slots take the next pending rows at once; one forward
            over the K decode tokens plus a budget of PACKED prompt tokens (the
            prefilling slots' next tokens, back to back, each with its own slot and
            position: no padding); a slot whose prompt ends samples its first token
        else:
            one decode step for the busy slots (K rows, or fewer: see ``decode_sizes``)
        a slot whose row hit a stop token or its budget is freed (its row is done)

The prompt-token budget of a mixed step is C (``prefill_chunk``) while under K/2 slots
decode or at least C prompt tokens wait (the start: prefill-bound), else
``prefill_tokens`` (a few tokens riding along with the K decode rows, as vLLM's chunked
prefill), so a freed slot is refilled the step after it frees, without stalling the other
rows for a whole prefill call.

KV cache: per layer {"k" [K, KVH, S/blk, hd, blk], "v" [K, KVH, S, hd]} (blk: the kv
block; ``kv_attention``'s layout), S = P + N rounded up to the kv block (P: the prompt
array's width; N: the largest budget; ``cache_geometry``) -- sized by what is in flight
(K), never by B. On TPU (``EngineOptions.attention``) it is {"kv"} in the pages of JAX's
ragged paged attention kernel instead, one fixed run of pages per slot
(``paged_attention``). A sequence sits at positions [0, len) of its slot
(no left padding: positions are cache indices). Attention (``kv_attention``) reads only
the kv blocks below the longest live length of the rows in the call (a decode step reads
a cache of at most ``kv_attention.DECODE_READ`` positions whole, in place: cheaper on CPU
than copying blocks); prefill attends only over the prompt's own positions.

Drain: once fewer than K slots are busy, the decode step gathers the busy slots into the
smallest of ``decode_sizes`` that holds them (one inner loop per static size), so the
long tail of a ragged rollout runs on a small batch instead of K mostly-empty rows.

Randomness: token t of row i is drawn with ``fold_in(fold_in(key, i), t)``
(``sampling.token_keys``), whatever slot or step it runs in, so the responses do not
depend on K (nor on the static sampler vs this engine). Nor does a row's arithmetic,
beyond the backend's own shape-dependent kernels: a prompt token's attention sums its
keys in blocks of one size (``PREFILL_BLOCK``) whichever step packs it, each run of a
slot's packed tokens reads its key blocks as one matrix (``kv_attention.
packed_prefill_attention``: rows independent), and no forward runs a lone row
(``MIN_ROWS``).

The decode forward (``engine_forward``) reuses the model's own modules (projections,
norms, MLP or routed experts, RoPE) and weights; only the attention and cache layout are
the engine's. For an MoE model the engine records the experts of every token it feeds
in, in the static sampler's ``routed_experts`` layout (``EngineOptions.routed_width``),
for routing replay.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from espo_jax.models.layers import rope_angles, rope_inv_freq
from espo_jax.rollout import paged_attention as paged_lib
from espo_jax.rollout.engine_forward import forward, unembed, write_kv
# The options and cache geometry live in engine_options; re-exported as engine.<name>.
from espo_jax.rollout.engine_options import (  # noqa: F401
    DEFAULT_PREFILL_TOKENS, MIN_ROWS, PREFILL_BLOCK, SHORT_BLOCK, EngineOptions,
    cache_geometry, default_decode_sizes, engine_kwargs, engine_options, kv_cache_bytes,
    prompt_width)
from espo_jax.rollout.kv_attention import packed_prefill_attention, ragged_decode_attention
from espo_jax.rollout.sampling import sample_rows


# ----------------------------------------------------------------------------- engine

def engine_decode(
    graphdef: nnx.GraphDef, options: EngineOptions, state: nnx.State, prompts: jax.Array,
    prompt_len: jax.Array, budgets: jax.Array, key: jax.Array, temperature: jax.Array,
    top_p: jax.Array, eos_ids: jax.Array, row_ids: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """The whole continuous-batching rollout; pure. Jit with ``static_argnums=(0, 1)``.

    prompts i32[B, P] RIGHT-padded (row i's tokens at [0, prompt_len[i])); prompt_len
    i32[B] (>= 1); budgets i32[B] in [1, N] (max new tokens per row); key a PRNG key;
    temperature, top_p f32 scalars; eos_ids i32[E]; row_ids i32[B]: each row's index for
    its keys (default arange(B); a shard of a bigger rollout passes its global rows).
    Rows are started in index order. Returns (tokens i32[B, N] (pad_id after the end),
    lengths i32[B], logprobs f32[B, N] (0 after the end), stats i32[1 + len(decode_sizes)]:
    the number of prefill steps, then of decode steps at each size), plus, for an MoE
    model, routed_experts u8[B, routed_width + N, L, k] (``sampler.Rollout``).
    """
    model = nnx.merge(graphdef, state)
    cfg = model.config
    o = options
    b, p = prompts.shape
    n, k = o.max_new_tokens, o.max_concurrent
    # A prefill-heavy step packs up to C prompt tokens, whatever the prompts' lengths:
    # never more than K whole prompts hold (they would be padding rows).
    c = max(1, min(o.prefill_chunk, k * p))
    paged = o.attention != "xla"
    blk, s = cache_geometry(p, o)
    if getattr(cfg, "is_moe", False) and o.routed_width < 1:
        raise ValueError("EngineOptions.routed_width must be the left-padded prompt width "
                         "(>= 1) for an MoE model (the routed-experts output layout)")
    cdt = jnp.dtype(o.cache_dtype) if o.cache_dtype is not None else jnp.dtype(model.dtype)
    if o.attention not in paged_lib.ATTENTION_IMPLS[1:]:
        raise ValueError(f"EngineOptions.attention must be one of "
                         f"{paged_lib.ATTENTION_IMPLS[1:]} (resolve 'auto' first), "
                         f"got {o.attention!r}")
    if paged:
        page = paged_lib.page_size_for(blk, o.page_size)
        cache = [{"kv": paged_lib.init_paged_cache(k, s, cfg.num_kv_heads, cfg.head_dim,
                                                   page, cdt)}
                 for _ in range(cfg.num_layers)]
    else:
        kv_heads, hd = cfg.num_kv_heads, cfg.head_dim  # the layouts of kv_attention
        cache = [{"k": jnp.zeros((k, kv_heads, s // blk, hd, blk), cdt),
                  "v": jnp.zeros((k, kv_heads, s, hd), cdt)} for _ in range(cfg.num_layers)]

    def writer(at, pos):
        """The ``forward`` write of new keys / values to slots ``at`` (k: nowhere), ``pos``."""
        if paged:
            return lambda cc, kk, vv: {"kv": paged_lib.write_paged(cc["kv"], at, pos, kk, vv,
                                                                   num_slots=k)}
        return lambda cc, kk, vv: write_kv(cc, at, pos, kk, vv)

    def paged_attender(seq_slots, q_lens, kv_lens):
        return lambda q, cc: paged_lib.paged_attend(o.attention, q, cc["kv"], seq_slots,
                                                     q_lens, kv_lens, num_slots=k)
    w = model.unembedding().astype(model.dtype)  # once per rollout, not per token
    rope = tuple(a[0] for a in rope_angles(jnp.arange(s)[None], rope_inv_freq(cfg)))
    sample = functools.partial(sample_rows, temperature=temperature, top_p=top_p,
                               top_k=o.top_k, greedy=o.greedy, use_top_p=o.use_top_p,
                               method=o.sampling)
    prompts = prompts.astype(jnp.int32)
    # fold_in(key, row) once per row; token t then folds in t (= sampling.token_keys).
    if row_ids is None:
        row_ids = jnp.arange(b, dtype=jnp.int32)
    row_keys = jax.vmap(lambda r: jax.random.fold_in(key, r))(row_ids.astype(jnp.int32))

    def keys_of(rows, steps):
        return jax.vmap(jax.random.fold_in)(row_keys[jnp.clip(rows, 0, b - 1)], steps)

    def is_stop(tok):
        return jnp.any(tok[:, None] == eos_ids[None, :], axis=-1)

    # Slot state: row (-1 free), phase (0 free, 1 prefilling, 2 decoding), len (tokens in
    # the cache), step (tokens generated), prev (the last token, next decode input).
    slots = dict(row=jnp.full((k,), -1, jnp.int32), phase=jnp.zeros((k,), jnp.int32),
                 len=jnp.zeros((k,), jnp.int32), step=jnp.zeros((k,), jnp.int32),
                 prev=jnp.zeros((k,), jnp.int32))
    out = dict(tokens=jnp.full((b, n), o.pad_id, jnp.int32),
               logps=jnp.zeros((b, n), jnp.float32), lengths=jnp.zeros((b,), jnp.int32),
               stats=jnp.zeros((1 + len(o.decode_sizes),), jnp.int32))
    moe = bool(getattr(cfg, "is_moe", False))
    if moe:  # the experts of every token fed in, in the static sampler's layout
        rdt = jnp.uint8 if cfg.num_experts <= 256 else jnp.int16
        nl, top = len(cfg.moe_layers), cfg.num_experts_per_tok
        out["routed"] = jnp.zeros((b, o.routed_width + n, nl, top), rdt)

    def record(out, rows, pos, rx, ok):
        """Store the experts rx [M, T, L, k] of the tokens at cache positions pos [M, T]
        of rows [M] where ok [M, T]: prompt token j of a row of length l goes to slot
        P0 - l + j of the left-padded layout, response token t to P0 + t (= pos + P0 - l)."""
        if not moe:
            return out
        rr = jnp.clip(rows, 0, b - 1)
        dst = pos + o.routed_width - prompt_len[rr][:, None]
        r = jnp.where(ok, rr[:, None], b)
        out = dict(out)
        out["routed"] = out["routed"].at[r, dst].set(rx.astype(out["routed"].dtype),
                                                     mode="drop")
        return out

    def emit(out, rows, steps, tok, logp, live):
        """Write token `steps` of `rows` (dropped where not live) and finish rows."""
        r = jnp.where(live, rows, b)  # out of range -> dropped
        out = dict(out)
        out["tokens"] = out["tokens"].at[r, steps].set(tok, mode="drop")
        out["logps"] = out["logps"].at[r, steps].set(logp, mode="drop")
        done = live & (is_stop(tok) | (steps + 1 >= budgets[jnp.clip(rows, 0, b - 1)]))
        out["lengths"] = out["lengths"].at[jnp.where(done, rows, b)].set(steps + 1, mode="drop")
        return out, done

    def mixed_with(tp):
        """One step of K decode tokens plus tp PACKED prompt tokens (no padding): free
        slots first take the next pending rows (in slot order, rows in index order);
        the prefilling slots' remaining prompt tokens, earliest row first, fill the tp
        token budget, each with its own slot and position. A slot whose prompt ends in
        this step samples its first token; decoding slots sample their next one."""
        pblk = math.gcd(blk, PREFILL_BLOCK)  # divides the cache length

        def step(carry):
            slots, out, nxt, cache = carry
            ph = slots["phase"]
            ar = jnp.arange(k, dtype=jnp.int32)
            free = ph == 0
            new_row = nxt + jnp.cumsum(free.astype(jnp.int32)) - 1
            take = free & (new_row < b)
            row = jnp.where(take, new_row, slots["row"])
            ph = jnp.where(take, 1, ph)
            ln = jnp.where(take, 0, slots["len"])
            nxt = nxt + jnp.sum(take).astype(jnp.int32)
            rr = jnp.clip(row, 0, b - 1)
            plen = prompt_len[rr]
            pre, dec = ph == 1, ph == 2
            # Pack: prefilling slots ordered by row, each takes its remaining tokens.
            order = jnp.argsort(jnp.where(pre, row, b + ar)).astype(jnp.int32)
            rem_o = jnp.where(pre, plen - ln, 0)[order]
            end_o = jnp.cumsum(rem_o)
            start_o = end_o - rem_o
            j = jnp.arange(tp, dtype=jnp.int32)
            qi = jnp.clip(jnp.searchsorted(end_o, j, side="right"), 0, k - 1)
            tvalid = j < end_o[-1]
            tslot = order[qi]
            tpos = ln[tslot] + j - start_o[qi]
            trow = rr[tslot]
            tids = prompts[trow, jnp.clip(tpos, 0, p - 1)]
            taken_o = jnp.clip(tp - start_o, 0, rem_o)
            taken = jnp.zeros((k,), jnp.int32).at[order].set(taken_o)
            last = jnp.zeros((k,), jnp.int32).at[order].set(end_o - 1)
            fin = pre & (taken >= plen - ln)
            at = jnp.concatenate([jnp.where(dec, ar, k), jnp.where(tvalid, tslot, k)])
            pos = jnp.concatenate([ln, tpos])
            write = writer(at, pos)
            if paged:  # sequences: the K decode rows (1 query each), then each prefilling
                # slot's packed tokens (its last `taken` positions; 0 for the others)
                attend = paged_attender(jnp.concatenate([ar, order]),
                                        jnp.concatenate([jnp.ones((k,), jnp.int32), taken_o]),
                                        jnp.concatenate([jnp.where(dec, ln + 1, 1),
                                                         ln[order] + taken_o]))
            else:
                def attend(q, cc):
                    od = ragged_decode_attention(q[:k], cc["k"], cc["v"], None,
                                                 jnp.where(dec, ln + 1, 0),
                                                 read=o.decode_read)
                    op = packed_prefill_attention(q[k:], cc["k"], cc["v"], order, start_o,
                                                  taken_o, ln[order], rows=min(tp, p),
                                                  block=pblk)
                    return jnp.concatenate([od, op])

            ids = jnp.concatenate([slots["prev"], tids])[:, None]
            hidden, cache, rx = forward(model, ids, pos[:, None], cache, write, attend, rope)
            out = record(out, jnp.concatenate([rr, trow]), pos[:, None], rx,
                         jnp.concatenate([dec, tvalid])[:, None])
            live = dec | fin
            src = jnp.where(dec, ar, jnp.where(fin, k + last, 0))
            logits = unembed(model, w, hidden[src, 0])
            steps = jnp.where(dec, slots["step"], 0)
            tok, logp = sample(logits, keys_of(rr, steps))
            out, done = emit(out, rr, steps, tok, logp, live)
            slots = dict(row=jnp.where(done, -1, row),
                         phase=jnp.where(done, 0, jnp.where(live, 2, ph)),
                         len=jnp.where(dec, ln + 1, jnp.where(pre, ln + taken, ln)),
                         step=jnp.where(live, steps + 1, slots["step"]),
                         prev=jnp.where(live, tok, slots["prev"]))
            out["stats"] = out["stats"].at[0].add(1)
            return slots, out, nxt, cache
        return step

    def decode_with(i, size):
        rows_in = max(size, MIN_ROWS)
        every_slot = rows_in == size == k  # row m is slot m: no gather

        def step(carry):
            slots, out, nxt, cache = carry
            busy = slots["phase"] == 2
            idx = (jnp.arange(k, dtype=jnp.int32) if every_slot
                   else jnp.nonzero(busy, size=rows_in, fill_value=k)[0].astype(jnp.int32))
            safe = jnp.clip(idx, 0, k - 1)
            live = (idx < k) & busy[safe]
            rows, pos = slots["row"][safe], slots["len"][safe]
            steps = slots["step"][safe]

            write = writer(jnp.where(live, idx, k), pos)  # idle rows write nowhere
            if paged:  # one query per row; idle rows read their slot's first key
                attend = paged_attender(safe, jnp.ones((rows_in,), jnp.int32),
                                        jnp.where(live, pos + 1, 1))
            else:
                def attend(q, cc):
                    return ragged_decode_attention(q, cc["k"], cc["v"],
                                                   None if every_slot else safe,
                                                   jnp.where(live, pos + 1, 0),
                                                   read=o.decode_read)

            hidden, cache, rx = forward(model, slots["prev"][safe][:, None], pos[:, None],
                                        cache, write, attend, rope)
            out = record(out, rows, pos[:, None], rx, live[:, None])
            logits = unembed(model, w, hidden[:, 0])
            tok, logp = sample(logits, keys_of(rows, steps))
            out, done = emit(out, rows, steps, tok, logp, live)
            at = jnp.where(live, idx, k)
            upd = dict(row=jnp.where(done, -1, rows), phase=jnp.where(done, 0, 2),
                       len=pos + 1, step=steps + 1, prev=tok)
            slots = {name: v.at[at].set(upd[name], mode="drop") for name, v in slots.items()}
            out["stats"] = out["stats"].at[1 + i].add(1)
            return slots, out, nxt, cache
        return step

    sizes = tuple(o.decode_sizes)
    steps_by_size = [decode_with(i, z) for i, z in enumerate(sizes)]

    def need_prefill(carry):
        # A slot is mid-prefill, or a slot is free and a prompt pending: refill at once.
        slots, _, nxt, _ = carry
        ph = slots["phase"]
        return jnp.any(ph == 1) | (jnp.any(ph == 0) & (nxt < b))

    tp_small = max(1, min(o.prefill_tokens or c, c))
    mixed = [(c, mixed_with(c))] + ([(tp_small, mixed_with(tp_small))] if tp_small < c else [])

    def cond(carry):
        slots, _, nxt, _ = carry
        return (nxt < b) | jnp.any(slots["phase"] > 0)

    # Nested while loops, not lax.cond / switch: a conditional over the carry makes XLA
    # (CPU at least) copy the whole KV cache every iteration; loops update it in place.
    cum_plen = jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.cumsum(prompt_len)])

    def prefill_heavy(carry):
        # Under K/2 slots decode, or at least C prompt tokens to prefill (the prefilling
        # slots' rest plus the prompts the free slots take next): a full C-token step.
        slots, _, nxt, _ = carry
        ph = slots["phase"]
        rest = jnp.sum(jnp.where(ph == 1, prompt_len[jnp.clip(slots["row"], 0, b - 1)]
                                 - slots["len"], 0))
        nxt_end = jnp.minimum(nxt + jnp.sum(ph == 0), b)
        rest = rest + cum_plen[nxt_end] - cum_plen[nxt]
        return (2 * jnp.sum(ph == 2) < k) | (rest >= c)

    def body(carry):
        for i, (tp, fn) in enumerate(mixed):
            def run(cy, big=(i == 0)):
                go = need_prefill(cy)
                if len(mixed) == 1:
                    return go
                heavy = prefill_heavy(cy)
                return go & (heavy if big else ~heavy)
            carry = jax.lax.while_loop(run, fn, carry)
        for i, step in enumerate(steps_by_size):
            lo = sizes[i + 1] if i + 1 < len(sizes) else 0

            def run(c, lo=lo, hi=sizes[i]):
                n_busy = jnp.sum(c[0]["phase"] == 2)
                return ~need_prefill(c) & (n_busy > lo) & (n_busy <= hi)

            carry = jax.lax.while_loop(run, step, carry)
        return carry

    carry = (slots, out, jnp.asarray(0, jnp.int32), cache)
    _, out, _, _ = jax.lax.while_loop(cond, body, carry)
    res = (out["tokens"], out["lengths"], out["logps"], out["stats"])
    return res + (out["routed"],) if moe else res


STATIC_ARGNUMS = (0, 1)
engine_jit = jax.jit(engine_decode, static_argnums=STATIC_ARGNUMS)


def right_align(ids: np.ndarray, mask: np.ndarray, prefill_chunk: int, pad_id: int):
    """Left-padded (ids, mask) [B, P0] -> prompts i32[B, P] with each row's tokens at
    [0, len) (P: ``prompt_width`` of the longest row, P0 and prefill_chunk), lengths i32[B]."""
    lens = mask.sum(1).astype(np.int32)
    width = prompt_width(int(lens.max()), ids.shape[1], prefill_chunk)
    out = np.full((ids.shape[0], width), pad_id, np.int32)
    for i, (row, n) in enumerate(zip(ids, lens)):
        out[i, :n] = row[ids.shape[1] - n:]
    return out, lens
