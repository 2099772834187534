"""Diagnostics over the valid tokens of the batch passed in, as additive ``Stat``s.

Every metric is a ``Stat``: a numerator and a denominator kept apart, plus how parts
combine (static). Micro-batch stats combine exactly (``combine_stats``): means are
sum(num) / sum(den), sums add (losses normalised by whole-minibatch counts), min/max take
the min/max. ``finalize`` turns them into f32[] values; an empty batch gives ``empty``
(0, or 1 for ratios), never NaN. Metrics carry no gradient.
"""
from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from espo_jax.objectives.aggregation import safe_inverse

sg = jax.lax.stop_gradient

KINDS = ("mean", "sum", "min", "max")


@flax.struct.dataclass
class Stat:
    """num, den: f32[] (or stacked f32[n] over micro-batches); kind: 'mean' (num / den),
    'sum' (num), 'min' / 'max' (num over parts with den > 0); empty: value when den == 0."""

    num: jax.Array
    den: jax.Array
    kind: str = flax.struct.field(pytree_node=False, default="mean")
    empty: float = flax.struct.field(pytree_node=False, default=0.0)


def value(s: Stat) -> jax.Array:
    """f32[] value of a (combined) Stat."""
    if s.kind == "sum":
        return s.num
    if s.kind == "mean":
        return jnp.where(s.den > 0, s.num * safe_inverse(s.den), s.empty)
    return jnp.where(s.den > 0, s.num, s.empty)


def finalize(stats: dict) -> dict:
    """dict[str, Stat] -> dict[str, f32[]]."""
    return {k: value(s) for k, s in stats.items()}


def combine_stats(stacked: dict) -> dict:
    """dict of Stats whose num/den are stacked f32[n] over parts -> dict of f32[] Stats."""
    out = {}
    for k, s in stacked.items():
        den = jnp.sum(s.den)
        if s.kind in ("mean", "sum"):
            num = jnp.sum(s.num)
        else:
            fill = jnp.inf if s.kind == "min" else -jnp.inf
            picked = jnp.where(s.den > 0, s.num, fill)
            num = jnp.min(picked) if s.kind == "min" else jnp.max(picked)
        out[k] = s.replace(num=num, den=den)
    return out


def total(x) -> Stat:
    """An additive quantity (e.g. a loss normalised by whole-batch counts)."""
    return Stat(sg(jnp.asarray(x, jnp.float32)), jnp.ones((), jnp.float32), "sum")


def ratio(num, den, empty: float = 0.0) -> Stat:
    """num / den with both parts additive over micro-batches."""
    return Stat(sg(jnp.asarray(num, jnp.float32)), sg(jnp.asarray(den, jnp.float32)), "mean",
                empty)


def masked_mean(x, weight, empty: float = 0.0) -> Stat:
    """sum(w x) / sum(w), ``empty`` when sum(w) == 0."""
    x = sg(jnp.asarray(x, jnp.float32))
    weight = jnp.asarray(weight, jnp.float32)
    return ratio(jnp.sum(jnp.where(weight > 0, x * weight, 0.0)), jnp.sum(weight), empty)


def masked_extreme(x, mask, kind: str, empty: float = 0.0) -> Stat:
    """min or max of x over mask (``empty`` when mask has no True)."""
    x = sg(jnp.asarray(x, jnp.float32))
    fill = jnp.inf if kind == "min" else -jnp.inf
    picked = jnp.where(mask, x, fill)
    num = jnp.min(picked) if kind == "min" else jnp.max(picked)
    return Stat(num, jnp.sum(mask, dtype=jnp.float32), kind, empty)


def clip_metrics(clipped, adv, valid, prefix=""):
    """clip_frac (all), clip_frac_high (A > 0), clip_frac_low (A < 0) over valid tokens."""
    c = clipped.astype(jnp.float32) * valid
    return {
        prefix + "clip_frac": masked_mean(c, valid),
        prefix + "clip_frac_high": masked_mean(c * (adv > 0), valid),
        prefix + "clip_frac_low": masked_mean(c * (adv < 0), valid),
    }


def ratio_metrics(ratio_, batch):
    """ratio_mean/min/max over valid tokens (1.0 when the batch has none) and approx_kl."""
    return {
        "ratio_mean": masked_mean(ratio_, batch.valid, empty=1.0),
        "ratio_min": masked_extreme(ratio_, batch.mask, "min", empty=1.0),
        "ratio_max": masked_extreme(ratio_, batch.mask, "max", empty=1.0),
        "approx_kl": masked_mean(batch.old - batch.logp, batch.valid),
    }


def base_metrics(ratio_, clipped, batch):
    out = clip_metrics(clipped, batch.adv, batch.valid)
    out.update(ratio_metrics(ratio_, batch))
    if batch.entropy is not None:
        out["entropy_mean"] = masked_mean(batch.entropy, batch.valid)
    return out
