"""CISPO: clipped, stop-gradient importance weight times the REINFORCE term."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from espo_jax.objectives import aggregation, metrics
from espo_jax.objectives.ratios import token_ratio

sg = jax.lax.stop_gradient


def cispo(batch, *, clip_low, clip_high, max_log_ratio):
    """l_t = -sg(clip(r, 1-clip_low, 1+clip_high)) A_t logp_t, token-mean; a None bound is open.

    No gradient is ever removed; clip_frac = share of tokens whose weight was capped
    (clip_frac_high: above, clip_frac_low: below), whatever the sign of A.
    """
    ratio = token_ratio(batch.logp - batch.old, max_log_ratio)
    weight = ratio
    high = jnp.zeros_like(batch.mask)
    low = jnp.zeros_like(batch.mask)
    if clip_high is not None:
        high = ratio > 1.0 + clip_high
        weight = jnp.minimum(weight, 1.0 + clip_high)
    if clip_low is not None:
        low = ratio < 1.0 - clip_low
        weight = jnp.maximum(weight, 1.0 - clip_low)
    loss = -sg(weight) * batch.adv * batch.logp
    out = metrics.ratio_metrics(ratio, batch)
    out["clip_frac"] = metrics.masked_mean(high | low, batch.valid)
    out["clip_frac_high"] = metrics.masked_mean(high, batch.valid)
    out["clip_frac_low"] = metrics.masked_mean(low, batch.valid)
    if batch.entropy is not None:
        out["entropy_mean"] = metrics.masked_mean(batch.entropy, batch.valid)
    return loss, aggregation.token_mean(batch), out
