"""Optional KL penalty to a reference policy (k3 estimator, Schulman 2020)."""
from __future__ import annotations

import jax.numpy as jnp

from espo_jax.objectives.ratios import clamp


def k3(logp, ref_logp, max_log_ratio: float):
    """k3_t = exp(x) - x - 1 with x = clamp(ref_t - logp_t); >= 0, unbiased for KL(pi||ref)."""
    x = clamp(ref_logp - logp, max_log_ratio)
    return jnp.exp(x) - x - 1.0
