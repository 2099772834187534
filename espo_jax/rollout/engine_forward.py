"""The decoder trunk over the rollout engine's slot KV cache (``engine.engine_decode``).

``forward`` runs the model's own modules (projections, norms, MLP or routed experts,
RoPE) and weights on M rows x T tokens at given positions: the decode steps (T = 1) and
the packed prefill (one row per packed token). Only the cache write and the attention
are the caller's (``write_kv`` for the XLA layout, or the paged cache's writer; the
attention of ``kv_attention`` or ``paged_attention``). ``unembed`` gives the logits.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def forward(model, ids, positions, cache, write, attend, rope):
    """The decoder trunk with the engine's cache: ids, positions i32[M, T] ->
    final-norm hidden f32[M, T, D], new cache, and the experts i32[M, T, L, k] the L
    sparse layers' routers picked (None for a dense model). ``rope``: the rollout's RoPE
    table (cos, sin) f32[S, hd/2], looked up once per forward for every layer (XLA would
    otherwise evaluate cos / sin inside each layer's q and k fusions, once per element of
    every head). ``write(c, k, v)`` stores a layer's new keys / values [M, T, KVH, hd]
    and returns the layer's new cache {"k", "v"}; ``attend(q, c)`` is the attention over
    it."""
    angles = (rope[0][positions], rope[1][positions])
    m, t = ids.shape
    x = jnp.take(model.embed_tokens[...], ids, axis=0).astype(model.dtype)
    new_cache, experts = [], []
    for layer, c in zip(model.layers, cache):
        a = layer.self_attn
        h = layer.input_layernorm(x)
        q, k, v = a.project_qkv(h, positions, None, angles)
        c = write(c, k, v)
        o = attend(q, c)
        x = x + a.o_proj(o.reshape(m, t, -1))
        h = layer.post_attention_layernorm(x)
        if getattr(layer, "sparse", False):  # routed experts (Qwen3-MoE)
            h, routing = layer.mlp(h)
            experts.append(routing["experts"])
        else:
            h = layer.mlp(h)
        x = x + h
        new_cache.append(c)
    routed = jnp.stack(experts, axis=2) if experts else None
    return model.norm(x, out_dtype=jnp.float32), new_cache, routed


def write_kv(cache, slots, pos, k, v):
    """A layer's cache {"k" [K, KVH, S/blk, hd, blk], "v" [K, KVH, S, hd]} with the new keys /
    values k, v [M, 1, KVH, hd] stored at (slots[m], pos[m]); slot K (out of range)
    writes nowhere."""
    dt, blk = cache["k"].dtype, cache["k"].shape[-1]
    return {"k": cache["k"].at[slots, :, pos // blk, :, pos % blk].set(k[:, 0].astype(dt),
                                                                       mode="drop"),
            "v": cache["v"].at[slots, :, pos].set(v[:, 0].astype(dt), mode="drop")}


def unembed(model, w, hidden):
    """Logits f32[M, V] of hidden f32[M, D]: compute-dtype operands, f32 accumulation
    (the scoring pass's precision, ``espo_jax.ops.logprobs``)."""
    dt = jnp.dtype(model.dtype)
    prec = jax.lax.Precision.HIGHEST if dt == jnp.float32 else jax.lax.Precision.DEFAULT
    if hidden.shape[0] == 1:  # a lone row goes in a pair: see engine_options.MIN_ROWS
        return unembed(model, w, jnp.concatenate([hidden, hidden]))[:1]
    return jnp.dot(hidden.astype(dt), w, preferred_element_type=jnp.float32, precision=prec)
