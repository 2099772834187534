"""Building blocks: Linear, RMSNorm, RoPE, grouped-query attention, SwiGLU.

Attention layers take `positions` and `segment_ids` (int32[B,T], 0 = padding, causal within
a segment), never a [B,T,S] mask; the kernels are in `espo_jax.models.attention`.

Parameters carry logical axis names (`out_sharding` metadata, not applied eagerly) from
{"vocab", "embed", "heads", "kv_heads", "mlp", "norm"}; kernels are [in, out].
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from espo_jax.models.attention import attend, dense_attention
from espo_jax.models.config import ModelConfig
from espo_jax.models.sharding import constrain_batch


def param(value, names) -> nnx.Param:
    """A parameter annotated with logical axis names (sharding applied later by the loader)."""
    return nnx.Param(value, out_sharding=tuple(names), eager_sharding=False)


class Linear(nnx.Module):
    """y = x @ kernel[in, out] (+ bias[out]), computed in `dtype`."""

    def __init__(self, din, dout, names, *, bias, rngs, dtype, param_dtype):
        init = jax.nn.initializers.normal(0.02)
        self.kernel = param(init(rngs.params(), (din, dout), param_dtype), names)
        self.bias = param(jnp.zeros((dout,), param_dtype), names[1:]) if bias else None
        self.dtype = dtype

    def __call__(self, x):
        y = jnp.dot(x.astype(self.dtype), self.kernel[...].astype(self.dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


class RMSNorm(nnx.Module):
    """HF semantics: normalise in float32, cast to `dtype`, then scale by the weight."""

    def __init__(self, dim, *, eps, dtype, param_dtype):
        self.weight = param(jnp.ones((dim,), param_dtype), ("norm",))
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x, out_dtype=None):
        out_dtype = out_dtype or self.dtype
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.weight[...].astype(out_dtype) * y.astype(out_dtype)


def rope_inv_freq(cfg: ModelConfig) -> jnp.ndarray:
    """Inverse frequencies f32[head_dim/2], with the configured scaling applied."""
    hd = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (jnp.arange(0, hd, 2, dtype=jnp.float32) / hd))
    r = cfg.rope
    if cfg.rope_type == "linear":
        inv = inv / r["factor"]
    elif cfg.rope_type == "llama3":
        factor, lo, hi = r["factor"], r["low_freq_factor"], r["high_freq_factor"]
        old = r["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        smooth = (old / wavelen - lo) / (hi - lo)
        mid = (1 - smooth) * inv / factor + smooth * inv
        inv = jnp.where(wavelen > old / lo, inv / factor, jnp.where(wavelen < old / hi, inv, mid))
    return inv


def rope_angles(positions, inv_freq):
    """(cos, sin) f32[B,T,hd/2] of RoPE at positions i32[B,T]."""
    ang = positions.astype(jnp.float32)[..., None] * inv_freq
    return jnp.cos(ang), jnp.sin(ang)


def apply_rope(x, positions, inv_freq, angles=None):
    """Rotate-half RoPE. x [B,T,N,hd]; positions i32[B,T]; computed in f32. ``angles``:
    ``rope_angles(positions, inv_freq)`` when the caller made them once for every layer."""
    cos, sin = angles if angles is not None else rope_angles(positions, inv_freq)
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    x32 = x.astype(jnp.float32)
    x1, x2 = jnp.split(x32, 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


class Attention(nnx.Module):

    def __init__(self, cfg: ModelConfig, *, rngs, dtype, param_dtype):
        d, hd = cfg.hidden_size, cfg.head_dim
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.q_proj = Linear(d, cfg.num_heads * hd, ("embed", "heads"), bias=cfg.qkv_bias, **kw)
        kv = cfg.num_kv_heads * hd
        self.k_proj = Linear(d, kv, ("embed", "kv_heads"), bias=cfg.qkv_bias, **kw)
        self.v_proj = Linear(d, kv, ("embed", "kv_heads"), bias=cfg.qkv_bias, **kw)
        self.o_proj = Linear(cfg.num_heads * hd, d, ("heads", "embed"), bias=cfg.o_bias, **kw)
        nkw = dict(eps=cfg.rms_norm_eps, dtype=dtype, param_dtype=param_dtype)
        self.q_norm = RMSNorm(hd, **nkw) if cfg.qk_norm else None
        self.k_norm = RMSNorm(hd, **nkw) if cfg.qk_norm else None
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, hd
        self.attention_chunk = cfg.attention_chunk

    def project_qkv(self, x, positions, inv_freq, angles=None):
        """(q [B,T,H,hd], k, v [B,T,K,hd]): projections, q/k norms (Qwen3) and RoPE
        (``apply_rope``). Also the rollout engine's decode step (``espo_jax.rollout.engine``)."""
        b, t, _ = x.shape
        q = self.q_proj(x).reshape(b, t, self.num_heads, self.head_dim)
        k = self.k_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        return (apply_rope(q, positions, inv_freq, angles),
                apply_rope(k, positions, inv_freq, angles), v)

    def __call__(self, x, positions, segment_ids, inv_freq, cache=None, cache_index=None,
                 kv_segment_ids=None, impl="dense"):
        """x [B,T,D]; positions, segment_ids i32[B,T]; impl: a resolved (non-auto) name.

        cache: {"k","v"} [B,K,S,hd] or None; with a cache, queries sit at slots
        cache_index + [0, T) and kv_segment_ids i32[B,S] says which slots are real.
        Returns (y, cache).
        """
        b, t, _ = x.shape
        q, k, v = self.project_qkv(x, positions, inv_freq)
        if cache is not None:
            idx = (0, 0, cache_index, 0)  # the new [B,T,K,hd] keys go in as [B,K,T,hd]
            ck = jax.lax.dynamic_update_slice(
                cache["k"], k.transpose(0, 2, 1, 3).astype(cache["k"].dtype), idx)
            cv = jax.lax.dynamic_update_slice(
                cache["v"], v.transpose(0, 2, 1, 3).astype(cache["v"].dtype), idx)
            cache = {"k": ck, "v": cv}
            o = dense_attention(q, ck.astype(q.dtype), cv.astype(q.dtype), segment_ids,
                                kv_segment_ids, q_offset=cache_index, heads_major=True)
        else:
            o = attend(q, k, v, segment_ids, segment_ids, impl=impl, block=self.attention_chunk)
        return self.o_proj(o.reshape(b, t, -1)), cache


class MLP(nnx.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelConfig, *, rngs, dtype, param_dtype):
        d, f = cfg.hidden_size, cfg.intermediate_size
        kw = dict(bias=cfg.mlp_bias, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.gate_proj = Linear(d, f, ("embed", "mlp"), **kw)
        self.up_proj = Linear(d, f, ("embed", "mlp"), **kw)
        self.down_proj = Linear(f, d, ("mlp", "embed"), **kw)

    def __call__(self, x):
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nnx.Module):
    """Pre-norm decoder layer: x + attn(norm(x)); x + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig, *, rngs, dtype, param_dtype, sparse=False):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        nkw = dict(eps=cfg.rms_norm_eps, dtype=dtype, param_dtype=param_dtype)
        self.input_layernorm = RMSNorm(cfg.hidden_size, **nkw)
        self.self_attn = Attention(cfg, **kw)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, **nkw)
        if sparse:  # routed experts (Qwen3-MoE); imported here: moe.py builds on this module
            from espo_jax.models.moe import MoE  # noqa: PLC0415
            self.mlp = MoE(cfg, **kw)
        else:
            self.mlp = MLP(cfg, **kw)
        self.sparse = sparse

    def __call__(self, x, positions, segment_ids, inv_freq, cache=None, cache_index=None,
                 kv_segment_ids=None, impl="dense", routed=None):
        """See `Attention.__call__`; impl is resolved by the decoder (static per call).
        Returns (x, cache, routing); routing is None for a dense layer, else the MoE's
        {"experts" i32[B,T,k], "probs" f32[B,T,E]}; `routed` i32[B,T,k] replays experts."""
        x = constrain_batch(x)  # keep activations batch-split under FSDP (no-op without a mesh)
        h, cache = self.self_attn(self.input_layernorm(x), positions, segment_ids, inv_freq,
                                  cache, cache_index, kv_segment_ids, impl=impl)
        x = x + h
        h = self.post_attention_layernorm(x)
        if self.sparse:
            h, routing = self.mlp(h, routed)
        else:
            h, routing = self.mlp(h), None
        return x + h, cache, routing
