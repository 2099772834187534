"""KV cache: a plain pytree, list over layers of {"k": [B,K,S,hd], "v": [B,K,S,hd]}.

The decoder writes a call's keys/values at slots [cache_index, cache_index+T) with
`lax.dynamic_update_slice`, so a sampler can thread it through `lax.while_loop`. Kv heads
come before slots: the attention's batched dots then read the cache in place (a [B,S,K,hd]
cache made XLA transpose-copy it, every layer, every decode step).
"""
from __future__ import annotations

import jax.numpy as jnp

from espo_jax.models.config import ModelConfig


def init_cache(cfg: ModelConfig, batch_size: int, max_len: int, dtype=jnp.float32) -> list:
    shape = (batch_size, cfg.num_kv_heads, max_len, cfg.head_dim)
    return [{"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
            for _ in range(cfg.num_layers)]


def cache_length(cache) -> int:
    """Number of slots S of a cache made by `init_cache`."""
    return cache[0]["k"].shape[2]
