"""Ragged attention over a slot KV cache (the rollout engine's decode and prefill).

The cache holds K slots of S positions, one sequence per slot, token j of a sequence at
position j (no left padding, so RoPE positions are cache indices). A query reads only
the kv blocks below the longest live length of the rows in its call: the loop over
blocks of ``block`` positions stops at ``ceil(max(kv_len) / block)``, so a step costs
O(live tokens), not O(S); within a block, positions past a row's own length are masked.
Online (flash-style) softmax across blocks in float32. ``ragged_attention`` serves any
number of queries per row (the packed prefill); ``ragged_decode_attention`` one query per
row (the decode steps), reading a short cache whole, in place (``DECODE_READ``).

Shapes: M query rows, T queries per row, H query heads, KVH kv heads (H = KVH * G),
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


def ragged_attention(q, k_cache, v_cache, slots, q_pos, kv_len, *, block: int):
    """Causal attention of new queries over their slots' cached keys / values.

    q [M, T, H, hd]; k_cache [K, KVH, S/B, hd, B], v_cache [K, KVH, S, hd] (already holding
    the queries' own keys); slots i32[M] (the slot of each query row; an out-of-range
    slot gives a garbage row the caller drops), or None when row m is slot m (M = K: no
    gather); q_pos i32[M, T] (each query's position); kv_len i32[M] (keys at positions
    >= kv_len are never read). A query at position p sees keys at positions
    <= min(p, kv_len - 1). Keys are summed in blocks of ``block`` positions (a divisor of
    the cache's B). Returns [M, T, H, hd] in q.dtype.
    """
    m, t, h, hd = q.shape
    kvh = v_cache.shape[1]
    s, cb = _check(k_cache, v_cache)
    if cb % block:
        raise ValueError(f"the attention block {block} must divide the cache's kv block {cb}")
    g = h // kvh
    # [M, KVH, G * T, hd]: both dots are plain batched matmuls over (row, kv head).
    qg = q.reshape(m, t, kvh, g, hd).transpose(0, 2, 3, 1, 4).reshape(m, kvh, g * t, hd)
    scale = 1.0 / math.sqrt(hd)
    n_blocks = (jnp.max(kv_len) + block - 1) // block
    n_blocks = jnp.clip(n_blocks, 1, s // block)

    def body(b, carry):
        mx, den, acc = carry
        start = b * block
        kb = jax.lax.dynamic_slice(k_cache, (0, 0, start // cb, 0, start % cb),
                                   k_cache.shape[:2] + (1, hd, block))
        kb = _take(kb[:, :, 0], slots)                                       # [M,KVH,hd,blk]
        vb = _take(jax.lax.dynamic_slice_in_dim(v_cache, start, block, axis=2), slots)
        kb, vb = kb.astype(q.dtype), vb.astype(q.dtype)
        sc = jnp.einsum("mkqd,mkds->mkqs", qg, kb, preferred_element_type=jnp.float32)
        sc = sc.reshape(m, kvh, g, t, block) * scale
        kpos = start + jnp.arange(block)
        ok = ((kpos[None, None, :] <= q_pos[:, :, None])
              & (kpos[None, None, :] < kv_len[:, None, None]))
        ok = ok[:, None, None]                                               # [M,1,1,T,blk]
        sc = jnp.where(ok, sc, _NEG)
        mx_new = jnp.maximum(mx, sc.max(-1))
        p = jnp.where(ok, jnp.exp(sc - mx_new[..., None]), 0.0)
        corr = jnp.exp(mx - mx_new)
        den = den * corr + p.sum(-1)
        pv = jnp.einsum("mkqs,mksd->mkqd", p.reshape(m, kvh, g * t, block).astype(vb.dtype),
                        vb, preferred_element_type=jnp.float32)
        acc = acc * corr[..., None] + pv.reshape(m, kvh, g, t, hd)
        return mx_new, den, acc

    init = (jnp.full((m, kvh, g, t), _NEG, jnp.float32), jnp.zeros((m, kvh, g, t), jnp.float32),
            jnp.zeros((m, kvh, g, t, hd), jnp.float32))
    _, den, acc = jax.lax.fori_loop(0, n_blocks, body, init)
    out = acc / jnp.maximum(den, 1e-30)[..., None]                           # [M,KVH,G,T,hd]
    return out.transpose(0, 3, 1, 2, 4).reshape(m, t, h, hd).astype(q.dtype)


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
    Returns [M, 1, H, hd] in q.dtype: ``ragged_attention`` with q_pos = kv_len - 1, up to
    float rounding.

    A cache of S <= ``read`` positions is read whole, in place (one window); a longer one
    in windows of one block, stopping after the block holding max(kv_len): O(live
    tokens), as ``ragged_attention`` (each block a copy on CPU). Inside a window
    every block of B keys is one batched dot with its own max, exp-sum and weighted
    values; the blocks are summed in order, rescaled to the window's max, and the
    windows combined online (flash-style). A block past a row's length adds exactly zero,
    so a row's result depends neither on which rows share its call nor on how many
    windows the call reads: the same tokens for every max_concurrent.
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
