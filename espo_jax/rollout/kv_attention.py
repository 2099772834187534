"""Ragged attention over a slot KV cache (the rollout engine's decode and prefill).

The cache holds K slots of S positions, one sequence per slot, token j of a sequence at
position j (no left padding, so RoPE positions are cache indices). A query reads only
the kv blocks up to its live length (within a block, positions past it are masked), so a
step costs O(live tokens), not O(S); online (flash-style) softmax across blocks in
float32. ``packed_prefill_attention`` serves a step's packed prompt tokens, a run of
consecutive tokens of one slot at a time; ``ragged_decode_attention`` one query per row
(the decode steps), reading a short cache whole, in place (``DECODE_READ``).

Shapes: M query rows, T queries, H query heads, KVH kv heads (H = KVH * G),
hd head dim, K cache slots, S cache positions in blocks of B (the cache's kv block). The
cache is keys [K, KVH, S/B, hd, B] and values [K, KVH, S, hd]: heads before positions, so
a block slice is already in the batched dots' layout (no transpose copy per block, as a
[K, S, KVH, hd] cache needs), and the keys stored transposed in blocks of B positions, so
a decode query's scores are one [G, hd] x [hd, B] matmul per (row, kv head, block) over a
contiguous block, as the values' [G, B] x [B, hd]. (XLA:CPU gives a decode step's G = 2
queries against a [S, hd] key block a matmul with 2 columns, 3x slower; against one
[hd, S] matrix a strided read, about 2x slower than the blocks once the cache is out of
the processor's caches, as it is after every step's unembedding.) ``key_blocks`` makes
this layout from [K, KVH, S, hd] keys.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

# Finite "minus infinity" for masked scores (exp underflows to exactly 0).
_NEG = -1e30


def key_blocks(keys, block: int):
    """Keys [K, KVH, S, hd] -> the cache's layout [K, KVH, S/block, hd, block]."""
    k, kvh, s, hd = keys.shape
    if s % block:
        raise ValueError(f"cache length {s} must be a multiple of the kv block {block}")
    return keys.reshape(k, kvh, s // block, block, hd).swapaxes(3, 4)


def _check(k_cache, v_cache):
    """(S, B) of a cache: its positions and its key block."""
    nb, b = k_cache.shape[2], k_cache.shape[4]
    if v_cache.shape[2] != nb * b:
        raise ValueError(f"the key cache holds {nb} blocks of {b} positions but the value "
                         f"cache {v_cache.shape[2]} positions")
    return nb * b, b


def _take(x, slots):
    return x if slots is None else jnp.take(x, slots, axis=0, mode="clip")


def packed_prefill_attention(q, k_cache, v_cache, run_slot, run_start, run_len, run_pos, *,
                             rows: int, block: int):
    """Causal attention of a step's packed prompt tokens over their slots' caches, one run
    of a slot's consecutive tokens at a time.

    q [T, 1, H, hd]: the packed queries, run r at rows [run_start[r], run_start[r] +
    run_len[r]) (run_len 0: no run; runs with tokens come first), its tokens at cache
    positions run_pos[r] + [0, run_len[r]) of slot run_slot[r] (i32[R] each). The cache
    k_cache [K, KVH, S/B, hd, B], v_cache [K, KVH, S, hd] already holds the runs' own keys /
    values. ``rows``: a static bound on run_len (the queries one run reads: rows past its
    length are computed and dropped). Keys are summed in blocks of ``block`` positions (a
    divisor of the cache's B) up to the run's last token, online (flash-style) in float32.
    Rows of no run give zeros. Returns [T, 1, H, hd] in q.dtype.

    Every run's queries read their slot's key blocks in place as one [rows x G, hd] matrix
    per kv head (a dot per block and kv head, not per token): a long prompt's chunk costs
    O(chunk x prompt) flops and O(prompt) cache reads, not a copy of its blocks per token.
    A token's result depends neither on its run's length or rows, nor on its neighbours:
    blocks past its position add exactly zero, and the dots' rows are independent.
    """
    t, _, h, hd = q.shape
    kvh = v_cache.shape[1]
    _, cb = _check(k_cache, v_cache)
    if cb % block:
        raise ValueError(f"the attention block {block} must divide the cache's kv block {cb}")
    g, lq = h // kvh, int(rows)
    scale = 1.0 / math.sqrt(hd)
    # [KVH, T + rows, G, hd], padded so that every run's [rows] slice is in range.
    qk = jnp.pad(q[:, 0].reshape(t, kvh, g, hd).transpose(1, 0, 2, 3),
                 ((0, 0), (0, lq), (0, 0), (0, 0)))
    r = jnp.arange(lq, dtype=jnp.int32)

    def run(i, out):
        slot, st, n, p0 = run_slot[i], run_start[i], run_len[i], run_pos[i]
        qr = jax.lax.dynamic_slice_in_dim(qk, st, lq, axis=1).reshape(kvh, lq * g, hd)
        q_pos, kv_end = p0 + r, p0 + n

        def body(b, carry):
            mx, den, acc = carry
            start = b * block
            kb = jax.lax.dynamic_slice(k_cache, (slot, 0, start // cb, 0, start % cb),
                                       (1, kvh, 1, hd, block))[0, :, 0]      # [KVH,hd,blk]
            vb = jax.lax.dynamic_slice(v_cache, (slot, 0, start, 0), (1, kvh, block, hd))[0]
            sc = jnp.einsum("kqd,kds->kqs", qr, kb.astype(q.dtype),
                            preferred_element_type=jnp.float32)
            sc = sc.reshape(kvh, lq, g, block) * scale
            kpos = start + jnp.arange(block)
            ok = (kpos[None, :] <= q_pos[:, None]) & (kpos[None, :] < kv_end)
            ok = ok[None, :, None, :]                                        # [1,rows,1,blk]
            sc = jnp.where(ok, sc, _NEG)
            mx_new = jnp.maximum(mx, sc.max(-1))
            p = jnp.where(ok, jnp.exp(sc - mx_new[..., None]), 0.0)
            corr = jnp.exp(mx - mx_new)
            pv = jnp.einsum("kqs,ksd->kqd", p.reshape(kvh, lq * g, block).astype(q.dtype),
                            vb.astype(q.dtype), preferred_element_type=jnp.float32)
            return (mx_new, den * corr + p.sum(-1),
                    acc * corr[..., None] + pv.reshape(kvh, lq, g, hd))

        init = (jnp.full((kvh, lq, g), _NEG, jnp.float32), jnp.zeros((kvh, lq, g), jnp.float32),
                jnp.zeros((kvh, lq, g, hd), jnp.float32))
        n_blocks = jnp.where(n > 0, (kv_end + block - 1) // block, 0)
        _, den, acc = jax.lax.fori_loop(0, n_blocks, body, init)
        o = (acc / jnp.maximum(den, 1e-30)[..., None]).astype(q.dtype).transpose(1, 0, 2, 3)
        keep = jax.lax.dynamic_slice_in_dim(out, st, lq, axis=0)
        return jax.lax.dynamic_update_slice_in_dim(
            out, jnp.where((r < n)[:, None, None, None], o, keep), st, axis=0)

    n_runs = jnp.sum(run_len > 0).astype(jnp.int32)
    out = jax.lax.fori_loop(0, n_runs, run, jnp.zeros((t + lq, kvh, g, hd), q.dtype))
    return out[:t].reshape(t, 1, h, hd)


# A decode call reads a cache of at most this many positions whole, in place, whatever the
# live lengths; a longer one block by block up to the longest live row. (On XLA:CPU each
# ``dynamic_slice``d block is a copy that costs more than the attention on it: up to about
# 2k positions, reading everything in place is faster than copying the live blocks
# unless they are under a third of the cache.)
DECODE_READ = 2048


def ragged_decode_attention(q, k_cache, v_cache, slots, kv_len, *, read: int = DECODE_READ):
    """One new query per row over its slot's first kv_len[m] keys: a decode step.

    q [M, 1, H, hd]; k_cache [K, KVH, S/B, hd, B], v_cache [K, KVH, S, hd]; slots i32[M]
    or None (row m is slot m); kv_len i32[M] (>= 1 for a real row; 0 gives a zero row the
    caller drops).
    Returns [M, 1, H, hd] in q.dtype: ``packed_prefill_attention`` of runs of one token at
    position kv_len - 1, up to float rounding.

    A cache of S <= ``read`` positions is read whole, in place (one window); a longer one
    in windows of one block, stopping after the block holding max(kv_len): O(live
    tokens) (each block a copy on CPU). Inside a window every block of B keys is one
    batched dot with its own max, exp-sum and weighted values; the blocks are summed in
    order, rescaled to the window's max, and the windows combined online (flash-style).
    A block past a row's length adds exactly zero, so a row's result depends neither on
    which rows share its call nor on how many windows the call reads: the same tokens for
    every max_concurrent.
    """
    m, _, h, hd = q.shape
    kvh = v_cache.shape[1]
    s, block = _check(k_cache, v_cache)
    g = h // kvh
    win = s if s <= read else block
    nb, n_win = win // block, s // win
    # [M, KVH, nb, G, hd]: the window's blocks a batch dim of both dots.
    qg = jnp.broadcast_to(q.reshape(m, kvh, 1, g, hd), (m, kvh, nb, g, hd))
    scale = 1.0 / math.sqrt(hd)

    def window(w, carry):
        mx_run, den, acc = carry
        s0 = w * win
        kc = _take(jax.lax.dynamic_slice_in_dim(k_cache, w * nb, nb, axis=2), slots)
        vc = _take(jax.lax.dynamic_slice_in_dim(v_cache, s0, win, axis=2), slots)
        vc = vc.reshape(m, kvh, nb, block, hd).astype(q.dtype)
        sc = jnp.einsum("mkngd,mknds->mkngs", qg, kc.astype(q.dtype),
                        preferred_element_type=jnp.float32)                  # [M,KVH,nb,G,B]
        pos = s0 + jnp.arange(win)
        ok = (pos[None] < kv_len[:, None]).reshape(m, 1, nb, 1, block)
        sc = jnp.where(ok, sc * scale, _NEG)
        mx = sc.max(-1)                                                      # [M,KVH,nb,G]
        p = jnp.where(ok, jnp.exp(sc - mx[..., None]), 0.0)
        mx_w = mx.max(2)                                                     # [M,KVH,G]
        wgt = jnp.exp(mx - mx_w[:, :, None])  # exactly 0 for a block past the end
        den_b = p.sum(-1) * wgt
        pv = jnp.einsum("mkngs,mknsd->mkngd", p.astype(vc.dtype), vc,
                        preferred_element_type=jnp.float32) * wgt[..., None]

        def add(i, c):  # in block order: the sum does not depend on the blocks after
            return c[0] + den_b[:, :, i], c[1] + pv[:, :, i]
        den_w, acc_w = jax.lax.fori_loop(0, nb, add, (jnp.zeros_like(mx_w),
                                                      jnp.zeros(mx_w.shape + (hd,))))
        mx_new = jnp.maximum(mx_run, mx_w)
        a, b = jnp.exp(mx_run - mx_new), jnp.exp(mx_w - mx_new)
        return mx_new, den * a + den_w * b, acc * a[..., None] + acc_w * b[..., None]

    init = (jnp.full((m, kvh, g), _NEG, jnp.float32), jnp.zeros((m, kvh, g), jnp.float32),
            jnp.zeros((m, kvh, g, hd), jnp.float32))
    if n_win == 1:
        _, den, acc = window(0, init)
    else:
        live = jnp.clip((jnp.max(kv_len) + win - 1) // win, 1, n_win)
        _, den, acc = jax.lax.fori_loop(0, live, window, init)
    out = acc / jnp.maximum(den, 1e-30)[..., None]
    return out.reshape(m, 1, h, hd).astype(q.dtype)
