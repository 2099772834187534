"""The decoder-only transformer (Qwen3 / Qwen2 / Llama via `ModelConfig` flags).

Call convention (B sequences, T tokens, S cache slots, D width, V vocab):
  model(ids i32[B,T], positions=None, attention_mask=None) -> logits f32[B,T,V]
  model(ids, positions, attention_mask=kv_mask i32[B,S], cache=cache, cache_index=i)
      -> (logits f32[B,T,V], new_cache)
MoE models (config.is_moe, L = len(config.moe_layers) sparse layers, k experts per token):
  routed_experts=i32[B,T,L,k] replays the given experts in every sparse layer;
  return_routing=True appends routing {"experts": i32[B,T,L,k] (each router's own top-k),
  "probs": f32[B,T,L,E]} to the outputs: (out, routing) where out is what the call
  returns without it.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from espo_jax.models import cache as cache_lib
from espo_jax.models.config import ModelConfig
from espo_jax.models.dtypes import canonical_dtype as _as_dtype
from espo_jax.models.layers import Block, RMSNorm, param, rope_inv_freq


def positions_from_mask(mask):
  """Left padding: positions = cumsum(mask) - 1, clipped at 0. mask [B,T] -> i32[B,T]."""
  return jnp.maximum(jnp.cumsum(mask.astype(jnp.int32), axis=-1) - 1, 0)


class Decoder(nnx.Module):
  """Decoder-only LM. `dtype` is the compute dtype; logits are always float32."""

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs, dtype=jnp.float32,
               param_dtype=jnp.float32):
    dtype, param_dtype = _as_dtype(dtype), _as_dtype(param_dtype)
    self.config = config
    self.dtype = dtype
    v, d = config.vocab_size, config.hidden_size
    self.embed_tokens = param(
        jax.nn.initializers.normal(0.02)(rngs.params(), (v, d), param_dtype), ("vocab", "embed"))
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    # A real Python list of layers (nnx.data marks it as pytree data).
    sparse = set(config.moe_layers)
    self.layers = nnx.data([Block(config, sparse=i in sparse, **kw)
                            for i in range(config.num_layers)])
    self.norm = RMSNorm(d, eps=config.rms_norm_eps, dtype=dtype, param_dtype=param_dtype)
    if config.tie_word_embeddings:
      self.lm_head = None
    else:
      self.lm_head = param(
          jax.nn.initializers.normal(0.02)(rngs.params(), (d, v), param_dtype), ("embed", "vocab"))

  # -- public API -------------------------------------------------------------------------
  def unembedding(self):
    """The output projection W [D,V] (tied embedding transposed, or lm_head), param dtype."""
    if self.lm_head is None:
      return self.embed_tokens[...].T
    return self.lm_head[...]

  def init_cache(self, batch_size: int, max_len: int, dtype=None):
    """Zeroed KV cache: list over layers of {"k","v": [B,S,K,hd]} (S = max_len)."""
    return cache_lib.init_cache(self.config, batch_size, max_len,
                                _as_dtype(dtype) if dtype is not None else self.dtype)

  def hidden_states(self, input_ids, positions=None, attention_mask=None, cache=None,
                    cache_index=None, *, routed_experts=None, return_routing=False):
    """Final-norm hidden states f32[B,T,D] (plus the new cache when `cache` is given;
    plus routing with `return_routing`, see the module docstring)."""
    h, new_cache, routing = self._trunk(input_ids, positions, attention_mask, cache,
                                        cache_index, routed_experts)
    h = self.norm(h, out_dtype=jnp.float32)
    out = h if cache is None else (h, new_cache)
    return (out, routing) if return_routing else out

  def __call__(self, input_ids, positions=None, attention_mask=None, cache=None,
               cache_index=None, *, routed_experts=None, return_routing=False):
    """Logits f32[B,T,V]; with `cache`, returns (logits, new_cache)."""
    out, routing = self.hidden_states(input_ids, positions, attention_mask, cache, cache_index,
                                      routed_experts=routed_experts, return_routing=True)
    h, new_cache = (out, None) if cache is None else out
    w = self.unembedding().astype(jnp.float32)
    logits = jnp.einsum("btd,dv->btv", h, w, preferred_element_type=jnp.float32)
    out = logits if cache is None else (logits, new_cache)
    return (out, routing) if return_routing else out

  # -- internals --------------------------------------------------------------------------
  def _trunk(self, input_ids, positions, attention_mask, cache, cache_index, routed=None):
    b, t = input_ids.shape
    x = jnp.take(self.embed_tokens[...], input_ids, axis=0).astype(self.dtype)
    if cache is None:
      if attention_mask is None:
        attention_mask = jnp.ones((b, t), jnp.int32)
      valid = attention_mask.astype(bool)
      if positions is None:
        positions = positions_from_mask(attention_mask)
      causal = jnp.tril(jnp.ones((t, t), bool))
      # Every query may see itself, so padding rows have a key and stay finite (no NaN
      # that a later `loss * mask` would spread); real rows are unchanged.
      mask = (causal[None] & valid[:, None, :]) | jnp.eye(t, dtype=bool)[None]  # [B,T,T]
    else:
      s = cache[0]["k"].shape[1]
      if cache_index is None:
        raise ValueError("cache_index is required when a cache is given")
      kv = (jnp.ones((b, s), bool) if attention_mask is None
            else attention_mask.astype(bool))
      if kv.shape != (b, s):
        raise ValueError(f"attention_mask with a cache must be the kv mask [B,S]={(b, s)}, "
                         f"got {kv.shape}")
      q_slot = cache_index + jnp.arange(t)  # [T]
      if positions is None:
        pos_all = positions_from_mask(kv)  # [B,S]
        positions = jnp.take(pos_all, jnp.minimum(q_slot, s - 1), axis=1)
      causal = jnp.arange(s)[None, :] <= q_slot[:, None]  # [T,S]
      own = jnp.arange(s)[None, :] == q_slot[:, None]
      mask = (causal[None] & kv[:, None, :]) | own[None]  # [B,T,S]
    positions = positions.astype(jnp.int32)
    inv_freq = rope_inv_freq(self.config)

    new_cache = [] if cache is not None else None
    routings = []
    for i, layer in enumerate(self.layers):
      # Sparse layer j of the model replays routed[:, :, j].
      r = None if routed is None or not layer.sparse else routed[:, :, len(routings)]
      if cache is None:
        if self.config.remat:
          x, rt = _remat_layer(layer, x, positions, mask, inv_freq, r)
        else:
          x, _, rt = layer(x, positions, mask, inv_freq, routed=r)
      else:
        x, c, rt = layer(x, positions, mask, inv_freq, cache[i], cache_index, routed=r)
        new_cache.append(c)
      if rt is not None:
        routings.append(rt)
    routing = None
    if routings:  # stack the sparse layers on axis 2: [B,T,L,...]
      routing = {k: jnp.stack([r[k] for r in routings], axis=2) for k in routings[0]}
    return x, new_cache, routing


@nnx.remat
def _remat_layer(layer, x, positions, mask, inv_freq, routed):
  x, _, routing = layer(x, positions, mask, inv_freq, routed=routed)
  return x, routing
