"""The decoder-only transformer (Qwen3 / Qwen2 / Llama via `ModelConfig` flags).

Call convention (B sequences, T tokens, S cache slots, D width, V vocab):
  model(ids i32[B,T], positions=None, attention_mask=None) -> logits f32[B,T,V]
  model(ids, positions, attention_mask=kv_mask i32[B,S], cache=cache, cache_index=i)
      -> (logits f32[B,T,V], new_cache)
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
    self.layers = nnx.data([Block(config, **kw) for _ in range(config.num_layers)])
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
                    cache_index=None):
    """Final-norm hidden states f32[B,T,D] (plus the new cache when `cache` is given)."""
    h, new_cache = self._trunk(input_ids, positions, attention_mask, cache, cache_index)
    h = self.norm(h, out_dtype=jnp.float32)
    return h if cache is None else (h, new_cache)

  def __call__(self, input_ids, positions=None, attention_mask=None, cache=None,
               cache_index=None):
    """Logits f32[B,T,V]; with `cache`, returns (logits, new_cache)."""
    out = self.hidden_states(input_ids, positions, attention_mask, cache, cache_index)
    h, new_cache = (out, None) if cache is None else out
    w = self.unembedding().astype(jnp.float32)
    logits = jnp.einsum("btd,dv->btv", h, w, preferred_element_type=jnp.float32)
    return logits if cache is None else (logits, new_cache)

  # -- internals --------------------------------------------------------------------------
  def _trunk(self, input_ids, positions, attention_mask, cache, cache_index):
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
    for i, layer in enumerate(self.layers):
      if cache is None:
        if self.config.remat:
          x = _remat_layer(layer, x, positions, mask, inv_freq)
        else:
          x, _ = layer(x, positions, mask, inv_freq)
      else:
        x, c = layer(x, positions, mask, inv_freq, cache[i], cache_index)
        new_cache.append(c)
    return x, new_cache


@nnx.remat
def _remat_layer(layer, x, positions, mask, inv_freq):
  return layer(x, positions, mask, inv_freq)[0]
