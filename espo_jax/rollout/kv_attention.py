"""Ragged attention over a slot KV cache (the rollout engine's decode and prefill).

The cache holds K slots of S positions, one sequence per slot, token j of a sequence at
position j (no left padding, so RoPE positions are cache indices). A query reads only
the kv blocks below the longest live length of the rows in its call: the loop over
blocks of ``block`` positions stops at ``ceil(max(kv_len) / block)``, so a step costs
O(live tokens), not O(S); within a block, positions past a row's own length are masked.
Online (flash-style) softmax across blocks in float32.

Shapes: M query rows, T queries per row, H query heads, KVH kv heads (H = KVH * G),
hd head dim, K cache slots, S cache positions (a multiple of ``block``). The cache is
[K, KVH, S, hd]: a block slice is then already in the batched dot's layout (batch m, kv
head; no transpose copy per block, as a [K, S, KVH, hd] cache needs).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

# Finite "minus infinity" for masked scores (exp underflows to exactly 0).
_NEG = -1e30


def ragged_attention(q, k_cache, v_cache, slots, q_pos, kv_len, *, block: int):
    """Causal attention of new queries over their slots' cached keys / values.

    q [M, T, H, hd]; k_cache, v_cache [K, KVH, S, hd] (already holding the queries' own
    keys); slots i32[M] (the slot of each query row; an out-of-range slot gives a
    garbage row the caller drops), or None when row m is slot m (M = K: no gather);
    q_pos i32[M, T] (each query's position); kv_len
    i32[M] (keys at positions >= kv_len are never read). A query at position p sees
    keys at positions <= min(p, kv_len - 1). Returns [M, T, H, hd] in q.dtype.
    """
    m, t, h, hd = q.shape
    kvh, s = k_cache.shape[1], k_cache.shape[2]
    if s % block:
        raise ValueError(f"cache length {s} must be a multiple of the kv block {block}")
    qg = q.reshape(m, t, kvh, h // kvh, hd)
    scale = 1.0 / math.sqrt(hd)
    n_blocks = (jnp.max(kv_len) + block - 1) // block
    n_blocks = jnp.clip(n_blocks, 1, s // block)

    def body(b, carry):
        mx, den, acc = carry
        start = b * block
        kb = jax.lax.dynamic_slice_in_dim(k_cache, start, block, axis=2)
        vb = jax.lax.dynamic_slice_in_dim(v_cache, start, block, axis=2)
        if slots is not None:
            kb = jnp.take(kb, slots, axis=0, mode="clip")                    # [M,KVH,blk,hd]
            vb = jnp.take(vb, slots, axis=0, mode="clip")
        kb, vb = kb.astype(q.dtype), vb.astype(q.dtype)
        sc = jnp.einsum("mtkgd,mksd->mkgts", qg, kb, preferred_element_type=jnp.float32)
        sc = sc * scale
        kpos = start + jnp.arange(block)
        ok = ((kpos[None, None, :] <= q_pos[:, :, None])
              & (kpos[None, None, :] < kv_len[:, None, None]))
        ok = ok[:, None, None]                                               # [M,1,1,T,blk]
        sc = jnp.where(ok, sc, _NEG)
        mx_new = jnp.maximum(mx, sc.max(-1))
        p = jnp.where(ok, jnp.exp(sc - mx_new[..., None]), 0.0)
        corr = jnp.exp(mx - mx_new)
        den = den * corr + p.sum(-1)
        pv = jnp.einsum("mkgts,mksd->mkgtd", p.astype(vb.dtype), vb,
                        preferred_element_type=jnp.float32)
        acc = acc * corr[..., None] + pv
        return mx_new, den, acc

    g = h // kvh
    init = (jnp.full((m, kvh, g, t), _NEG, jnp.float32), jnp.zeros((m, kvh, g, t), jnp.float32),
            jnp.zeros((m, kvh, g, t, hd), jnp.float32))
    _, den, acc = jax.lax.fori_loop(0, n_blocks, body, init)
    out = acc / jnp.maximum(den, 1e-30)[..., None]                           # [M,KVH,G,T,hd]
    return out.transpose(0, 3, 1, 2, 4).reshape(m, t, h, hd).astype(q.dtype)
