"""Rollout engine: a jitted KV-cache sampler (prefill + ``lax.while_loop`` decode), one
static batch or continuous batching (``max_concurrent=K``, ``engine``).

    from espo_jax.rollout import generate, Rollout
    ro = generate(model, prompts, max_new_tokens=N, temperature=1.0, key=key, eos_id=eos,
                  max_concurrent=64)
"""
from espo_jax.rollout.sampler import (STATIC_ARGNUMS, DecodeOptions, Rollout, bucket_length,
                                      decode, decode_jit, generate)
from espo_jax.rollout.engine import EngineOptions, engine_decode, engine_jit, kv_cache_bytes
from espo_jax.rollout.engine_sharding import decode_model, sharded_engine_fn
from espo_jax.rollout.sampling import (apply_top_k, apply_top_p, process_logits, sample_rows,
                                       sample_step, token_keys)

__all__ = [
    "generate", "Rollout", "decode", "decode_jit", "DecodeOptions", "STATIC_ARGNUMS",
    "bucket_length", "sample_step", "process_logits", "apply_top_k", "apply_top_p",
    "sample_rows", "token_keys", "EngineOptions", "engine_decode", "engine_jit", "decode_model",
    "sharded_engine_fn", "kv_cache_bytes",
]
