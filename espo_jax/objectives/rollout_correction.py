"""Rollout/trainer mismatch correction: truncated importance weights between the sampler's
log-probs and the scoring pass's (pi_old as the trainer computes it).

The sampler (bf16 KV-cache decode, other kernels) and the trainer's scoring pass never
agree exactly, so the responses come from pi_sampler while the objectives' ratios are
taken against pi_old. The weights, computed once per rollout and stop-gradient, multiply
every objective's per-token loss (``policy_loss(..., token_weights=w)``):

  token     w_t = min(exp(old_t - sampler_t), C)
  sequence  w_i = min(exp(sum_t (old_t - sampler_t)), C)   (one weight per response)

C = ``threshold``; masked positions get weight 0. Log-ratios are clamped to [-20, 20]
before exp (as every ratio is).
"""
from __future__ import annotations

import jax.numpy as jnp

MODES = ("off", "token", "sequence")
_MAX_LOG = 20.0


def rollout_correction_weights(old_logp, sampler_logp, mask, mode: str, threshold: float):
    """Truncated IS weights and their metrics.

    old_logp, sampler_logp: f32[B, T]; mask: bool/f32[B, T]; mode in MODES; threshold > 0.
    Returns (w f32[B, T] or None for mode 'off', metrics dict of f32[]: weight_mean,
    weight_max (before truncation, over valid tokens) and clipped_frac (share of valid
    tokens whose weight was truncated)).
    """
    if mode not in MODES:
        raise ValueError(f"rollout_correction.mode must be one of {MODES}, got {mode!r}")
    if mode == "off":
        return None, {}
    if not threshold > 0:
        raise ValueError(f"rollout_correction.threshold must be > 0, got {threshold!r}")
    valid = jnp.asarray(mask) != 0
    diff = jnp.where(valid, jnp.asarray(old_logp, jnp.float32)
                     - jnp.asarray(sampler_logp, jnp.float32), 0.0)
    if mode == "sequence":
        diff = jnp.broadcast_to(jnp.sum(diff, axis=-1, keepdims=True), diff.shape)
    raw = jnp.exp(jnp.clip(diff, -_MAX_LOG, _MAX_LOG))
    w = jnp.where(valid, jnp.minimum(raw, threshold), 0.0)
    n = jnp.maximum(jnp.sum(valid, dtype=jnp.float32), 1.0)
    any_valid = jnp.any(valid)
    metrics = {
        "rollout_correction/weight_mean": jnp.sum(w) / n,
        "rollout_correction/weight_max": jnp.where(
            any_valid, jnp.max(jnp.where(valid, raw, -jnp.inf)), 1.0),
        "rollout_correction/clipped_frac": jnp.sum(valid & (raw > threshold)) / n,
    }
    return w, metrics
