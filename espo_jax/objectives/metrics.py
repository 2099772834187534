"""Diagnostics, all f32[] scalars over the valid tokens of the batch passed in.

Means are local to the (micro-)batch given; an empty batch gives 0 (ratios: 1), never NaN.
Metrics carry no gradient.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from espo_jax.objectives.aggregation import safe_inverse

sg = jax.lax.stop_gradient


def masked_mean(x, weight):
    """sum(w x) / sum(w), 0 when sum(w) == 0."""
    x = sg(jnp.asarray(x, jnp.float32))
    return jnp.sum(jnp.where(weight > 0, x * weight, 0.0)) * safe_inverse(jnp.sum(weight))


def clip_metrics(clipped, adv, valid, prefix=""):
    """clip_frac (all), clip_frac_high (A > 0), clip_frac_low (A < 0) over valid tokens."""
    c = clipped.astype(jnp.float32) * valid
    return {
        prefix + "clip_frac": masked_mean(c, valid),
        prefix + "clip_frac_high": masked_mean(c * (adv > 0), valid),
        prefix + "clip_frac_low": masked_mean(c * (adv < 0), valid),
    }


def ratio_metrics(ratio, batch):
    """ratio_mean/min/max over valid tokens (1.0 when the batch has none) and approx_kl."""
    ratio = sg(ratio)
    any_valid = jnp.any(batch.mask)
    rmin = jnp.min(jnp.where(batch.mask, ratio, jnp.inf))
    rmax = jnp.max(jnp.where(batch.mask, ratio, -jnp.inf))
    return {
        "ratio_mean": jnp.where(any_valid, masked_mean(ratio, batch.valid), 1.0),
        "ratio_min": jnp.where(any_valid, rmin, 1.0),
        "ratio_max": jnp.where(any_valid, rmax, 1.0),
        "approx_kl": masked_mean(batch.old - batch.logp, batch.valid),
    }


def base_metrics(ratio, clipped, batch):
    out = clip_metrics(clipped, batch.adv, batch.valid)
    out.update(ratio_metrics(ratio, batch))
    if batch.entropy is not None:
        out["entropy_mean"] = masked_mean(batch.entropy, batch.valid)
    return out
