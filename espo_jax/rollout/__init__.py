"""Rollout engine: a jitted KV-cache sampler (prefill + ``lax.while_loop`` decode).

    from espo_jax.rollout import generate, Rollout
    ro = generate(model, prompts, max_new_tokens=N, temperature=1.0, key=key, eos_id=eos)
"""
from espo_jax.rollout.sampler import (STATIC_ARGNUMS, DecodeOptions, Rollout, bucket_length,
                                      decode, decode_jit, generate)
from espo_jax.rollout.sampling import apply_top_k, apply_top_p, process_logits, sample_step

__all__ = [
    "generate", "Rollout", "decode", "decode_jit", "DecodeOptions", "STATIC_ARGNUMS",
    "bucket_length", "sample_step", "process_logits", "apply_top_k", "apply_top_p",
]
