"""Importance ratios. Every log-ratio is clamped to [-m, m] before exp (m = max_log_ratio)."""
from __future__ import annotations

import jax
import jax.numpy as jnp

sg = jax.lax.stop_gradient


def clamp(log_ratio, max_log_ratio: float):
    return jnp.clip(log_ratio, -max_log_ratio, max_log_ratio)


def token_ratio(log_ratio, max_log_ratio: float):
    """r_t = exp(clamp(logp_t - old_t)); gradient r_t inside the clamp, 0 outside."""
    return jnp.exp(clamp(log_ratio, max_log_ratio))


def group_ratio_token_form(logp, group_log_ratio, max_log_ratio: float):
    """GSPO-token construction: value s_tau = exp(clamp(mean_tau Delta)), gradient s_tau * d logp_t.

    s_t = exp(logp_t - sg(logp_t) + sg(clamp(group_log_ratio_t))), all f32[B, T].
    """
    return jnp.exp(logp - sg(logp) + sg(clamp(group_log_ratio, max_log_ratio)))


def group_times_token_ratio(log_ratio, group_log_ratio, max_log_ratio: float):
    """ESPO Eq. 9 as printed: sg(s_tau) * r_t (value and gradient)."""
    return sg(jnp.exp(clamp(group_log_ratio, max_log_ratio))) * token_ratio(log_ratio, max_log_ratio)
