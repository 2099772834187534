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
hd head dim, K cache slots, S cache positions (a multiple of ``block``). The cache is
keys [K, KVH, hd, S] and values [K, KVH, S, hd], heads before positions, so a block slice
is already in the batched dots' layout (batch m, kv head; no transpose copy per block,
as a [K, S, KVH, hd] cache needs). The keys are stored transposed so that a query's
scores are a plain [G, hd] x [hd, S] matmul, as the values' [G, S] x [S, hd]: XLA:CPU
gives a decode step's G = 2 queries against a [S, hd] key block a matmul with 2 columns,
3x slower than these alone and 1.5x inside a decode step.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

# Finite "minus infinity" for masked scores (exp underflows to exactly 0).
_NEG = -1e30


def _read(k_cache, v_cache, start, size, slots):
    """Positions [start, start + size) of the cache: keys [M, KVH, hd, size] and values
    [M, KVH, size, hd] of slots[m] (or of every slot when slots is None)."""
    kb = jax.lax.dynamic_slice_in_dim(k_cache, start, size, axis=3)
    vb = jax.lax.dynamic_slice_in_dim(v_cache, start, size, axis=2)
    if slots is not None:
        kb = jnp.take(kb, slots, axis=0, mode="clip")
        vb = jnp.take(vb, slots, axis=0, mode="clip")
    return kb, vb


def ragged_attention(q, k_cache, v_cache, slots, q_pos, kv_len, *, block: int):
    """Causal attention of new queries over their slots' cached keys / values.

    q [M, T, H, hd]; k_cache [K, KVH, hd, S], v_cache [K, KVH, S, hd] (already holding
    the queries' own keys); slots i32[M] (the slot of each query row; an out-of-range
    slot gives a garbage row the caller drops), or None when row m is slot m (M = K: no
    gather); q_pos i32[M, T] (each query's position); kv_len i32[M] (keys at positions
    >= kv_len are never read). A query at position p sees keys at positions
    <= min(p, kv_len - 1). Returns [M, T, H, hd] in q.dtype.
    """
    m, t, h, hd = q.shape
    kvh, s = v_cache.shape[1], v_cache.shape[2]
    if s % block:
        raise ValueError(f"cache length {s} must be a multiple of the kv block {block}")
    g = h // kvh
    # [M, KVH, G * T, hd]: both dots are plain batched matmuls over (row, kv head).
    qg = q.reshape(m, t, kvh, g, hd).transpose(0, 2, 3, 1, 4).reshape(m, kvh, g * t, hd)
    scale = 1.0 / math.sqrt(hd)
    n_blocks = (jnp.max(kv_len) + block - 1) // block
    n_blocks = jnp.clip(n_blocks, 1, s // block)

    def body(b, carry):
        mx, den, acc = carry
        start = b * block
        kb, vb = _read(k_cache, v_cache, start, block, slots)      # [M,KVH,hd,blk], [..blk,hd]
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


def ragged_decode_attention(q, k_cache, v_cache, slots, kv_len, *, block: int,
                            read: int = DECODE_READ):
    """One new query per row over its slot's first kv_len[m] keys: a decode step.

    q [M, 1, H, hd]; k_cache [K, KVH, hd, S], v_cache [K, KVH, S, hd]; slots i32[M] or
    None (row m is slot m); kv_len i32[M] (>= 1 for a real row; 0 gives a zero row the
    caller drops).
    Returns [M, 1, H, hd] in q.dtype: ``ragged_attention`` with q_pos = kv_len - 1, up to
    float rounding.

    A cache of S <= ``read`` positions is read whole, in place (one window); a longer one
    in windows of one block, stopping after the block holding max(kv_len): O(live
    tokens), as ``ragged_attention`` (each block a copy on CPU). Inside a window
    every block of ``block`` keys is one batched dot with its own max, exp-sum and
    weighted values; the blocks are summed in order, rescaled to the window's max, and the
    windows combined online (flash-style). A block past a row's length adds exactly zero,
    so a row's result depends neither on which rows share its call nor on how many
    windows the call reads: the same tokens for every max_concurrent.
    """
    m, _, h, hd = q.shape
    kvh, s = v_cache.shape[1], v_cache.shape[2]
    if s % block:
        raise ValueError(f"cache length {s} must be a multiple of the kv block {block}")
    g = h // kvh
    win = s if s <= read else block
    nb, n_win = win // block, s // win
    qg = q.reshape(m, kvh, g, hd)
    scale = 1.0 / math.sqrt(hd)

    def window(w, carry):
        mx_run, den, acc = carry
        s0 = w * win
        kc, vc = _read(k_cache, v_cache, s0, win, slots)
        # Scores [M, KVH, G, nb, block]: one [G, hd] x [hd, win] matmul per (row, kv
        # head); the values' blocks are a batch dim of the second dot.
        vc = vc.reshape(m, kvh, nb, block, hd).astype(q.dtype)
        sc = jnp.einsum("mkgd,mkds->mkgs", qg, kc.astype(q.dtype),
                        preferred_element_type=jnp.float32).reshape(m, kvh, g, nb, block)
        pos = s0 + jnp.arange(win)
        ok = (pos[None] < kv_len[:, None]).reshape(m, 1, 1, nb, block)
        sc = jnp.where(ok, sc * scale, _NEG)
        mx = sc.max(-1)                                                      # [M,KVH,G,nb]
        p = jnp.where(ok, jnp.exp(sc - mx[..., None]), 0.0)
        mx_w = mx.max(-1)                                                    # [M,KVH,G]
        wgt = jnp.exp(mx - mx_w[..., None])  # exactly 0 for a block past the end
        den_b = p.sum(-1) * wgt
        # [M, KVH, nb, G, block]: the blocks a batch dim (a small transpose of p).
        pv = jnp.einsum("mkngs,mknsd->mkngd", p.transpose(0, 1, 3, 2, 4).astype(vc.dtype),
                        vc, preferred_element_type=jnp.float32)
        pv = pv * wgt.transpose(0, 1, 3, 2)[..., None]

        def add(i, c):  # in block order: the sum does not depend on the blocks after
            return c[0] + den_b[:, :, :, i], c[1] + pv[:, :, i]
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
