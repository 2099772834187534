"""Objective registry and the public `policy_loss` entry point.

Each objective declares its hyper-parameters and defaults once, here. Hyper-parameters are
static Python values: jit with them bound, e.g.
    jax.jit(functools.partial(policy_loss, "espo", vocab_size=151936))
"""
from __future__ import annotations

import dataclasses
import math
from types import MappingProxyType
from typing import Any, Callable, Mapping, Optional

import jax
import jax.numpy as jnp

from espo_jax.objectives import batch as batch_lib
from espo_jax.objectives.cispo import cispo
from espo_jax.objectives.espo import espo
from espo_jax.objectives.gmpo import gmpo
from espo_jax.objectives.grouping import validate_grouping
from espo_jax.objectives.grpo import dapo, grpo
from espo_jax.objectives.gspo import gspo
from espo_jax.objectives.kl import k3
from espo_jax.objectives import metrics as metrics_lib

COMMON = {"max_log_ratio": 20.0, "beta": 0.0}


@dataclasses.dataclass(frozen=True)
class ObjectiveSpec:
    """name, the loss function, its hyper-parameter defaults (incl. the common ones)."""

    name: str
    fn: Callable
    defaults: Mapping[str, Any]
    needs_entropy: bool = False


def _spec(name, fn, needs_entropy=False, **defaults):
    return ObjectiveSpec(name, fn, MappingProxyType({**defaults, **COMMON}), needs_entropy)


OBJECTIVES: Mapping[str, ObjectiveSpec] = MappingProxyType({
    "grpo": _spec("grpo", grpo, clip_low=0.2, clip_high=0.2, clip_ratio_c=None),
    "dapo": _spec("dapo", dapo, clip_low=0.2, clip_high=0.28, clip_ratio_c=None),
    "gspo": _spec("gspo", gspo, clip_low=3e-4, clip_high=4e-4),
    "gmpo": _spec("gmpo", gmpo, clip_low=0.4, clip_high=0.4),
    "cispo": _spec("cispo", cispo, clip_low=None, clip_high=4.0),
    "espo": _spec("espo", espo, needs_entropy=True, grouping="top_fraction", top_fraction=0.2,
                  num_groups=4, entropy_edges=None, token_ratio="group", clip_mode="adaptive",
                  alpha=0.02, vocab_size=None, eps_min=None, eps_max=None,
                  clip_low=3e-4, clip_high=4e-4),
})


def _nonneg(name, key, value, allow_none=False):
    if value is None and allow_none:
        return
    if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name}: {key} must be a finite number >= 0, got {value!r}")


def resolve_hparams(name: str, hparams: Mapping[str, Any]) -> dict:
    """Defaults merged with `hparams`; ValueError on unknown objective, key or value."""
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; allowed: {sorted(OBJECTIVES)}")
    spec = OBJECTIVES[name]
    unknown = sorted(set(hparams) - set(spec.defaults))
    if unknown:
        raise ValueError(f"objective {name!r}: unknown hyper-parameter(s) {unknown}; "
                         f"allowed: {sorted(spec.defaults)}")
    hp = {**spec.defaults, **hparams}
    _nonneg(name, "beta", hp["beta"])
    if not (isinstance(hp["max_log_ratio"], (int, float)) and hp["max_log_ratio"] > 0):
        raise ValueError(f"{name}: max_log_ratio must be > 0, got {hp['max_log_ratio']!r}")
    lows_optional = name == "cispo"
    _nonneg(name, "clip_low", hp["clip_low"], allow_none=lows_optional)
    _nonneg(name, "clip_high", hp["clip_high"], allow_none=lows_optional)
    if name in ("grpo", "dapo") and hp["clip_ratio_c"] is not None:
        if not (isinstance(hp["clip_ratio_c"], (int, float)) and hp["clip_ratio_c"] > 1):
            raise ValueError(f"{name}: clip_ratio_c must be > 1 (or None), got {hp['clip_ratio_c']!r}")
    if name == "espo":
        hp["top_fraction"], hp["num_groups"], hp["entropy_edges"] = validate_grouping(
            hp["grouping"], hp["top_fraction"], hp["num_groups"], hp["entropy_edges"], where="espo")
        if hp["token_ratio"] not in ("group", "group_times_token"):
            raise ValueError(f"espo: token_ratio must be 'group' or 'group_times_token', got {hp['token_ratio']!r}")
        if hp["clip_mode"] not in ("adaptive", "fixed"):
            raise ValueError(f"espo: clip_mode must be 'adaptive' or 'fixed', got {hp['clip_mode']!r}")
        if hp["vocab_size"] is None:
            raise ValueError(f"espo: vocab_size is required (adaptive clip eps = alpha * entropy / ln V); "
                             f"allowed keys: {sorted(spec.defaults)}")
        if not (isinstance(hp["vocab_size"], int) and hp["vocab_size"] > 1):
            raise ValueError(f"espo: vocab_size must be an int > 1, got {hp['vocab_size']!r}")
        _nonneg(name, "alpha", hp["alpha"])
        _nonneg(name, "eps_min", hp["eps_min"], allow_none=True)
        _nonneg(name, "eps_max", hp["eps_max"], allow_none=True)
    return hp


def policy_loss(name: str, logp, old_logp, advantages, mask, entropy=None, *, ref_logp=None,
                counts: Optional[batch_lib.BatchCounts] = None, groups=None, token_weights=None,
                **hparams):
    """Policy-gradient loss of objective `name` (see OBJECTIVES for hparams and defaults).

    logp: f32[B, T] current log-probs (differentiable); old_logp: f32[B, T] the scoring
    pass's (pi_old); advantages: f32[B] or f32[B, T]; mask: bool/f32[B, T]; entropy:
    f32[B, T] old-policy entropy in nats (required by espo); ref_logp: f32[B, T] for the k3
    KL term (beta > 0); counts: BatchCounts of the full batch when `logp` is a micro-batch
    (sum of micro-batch losses and gradients == full-batch loss and gradient).
    groups: int32[B, T] ESPO entropy groups (``entropy_groups`` of the same entropy, mask
    and grouping hparams), computed once per rollout; None = computed here. espo only.
    token_weights: f32[B, T] stop-gradient per-token weights multiplying every objective's
    per-token loss (rollout correction, ``rollout_correction_weights``); None = 1.
    Returns (loss f32[], metrics dict[str, f32[]]). bf16 inputs are computed in float32.
    """
    loss, stats = policy_loss_stats(name, logp, old_logp, advantages, mask, entropy,
                                    ref_logp=ref_logp, counts=counts, groups=groups,
                                    token_weights=token_weights, **hparams)
    return loss, metrics_lib.finalize(stats)


def policy_loss_stats(name: str, logp, old_logp, advantages, mask, entropy=None, *,
                      ref_logp=None, counts: Optional[batch_lib.BatchCounts] = None,
                      groups=None, token_weights=None, **hparams):
    """``policy_loss`` with its metrics as additive ``metrics.Stat``s (numerator and
    denominator apart), for exact accumulation over micro-batches (``metrics.combine_stats``
    of the stacked parts, then ``metrics.finalize``)."""
    hp = resolve_hparams(name, hparams)
    spec = OBJECTIVES[name]
    if spec.needs_entropy and entropy is None:
        raise ValueError(f"objective {name!r} needs entropy (f32[B, T], old-policy token entropy in nats)")
    beta = hp.pop("beta")
    if beta > 0 and ref_logp is None:
        raise ValueError(f"objective {name!r}: beta={beta} > 0 needs ref_logp (f32[B, T])")
    batch_lib.check_shapes(name, logp, old_logp, advantages, mask, entropy, ref_logp)
    for key, arr in (("groups", groups), ("token_weights", token_weights)):
        if arr is not None and jnp.shape(arr) != jnp.shape(logp):
            raise ValueError(f"{name}: {key} has shape {jnp.shape(arr)} but logp has shape "
                             f"{jnp.shape(logp)}; expected both [B, T]")
    if groups is not None:
        if name != "espo":
            raise ValueError(f"objective {name!r}: groups= is only used by 'espo'")
        hp["groups"] = groups
    batch = batch_lib.prepare(logp, old_logp, advantages, mask, entropy, ref_logp, counts)
    token_loss, weights, stats = spec.fn(batch, **hp)
    pg_weights = weights
    if token_weights is not None:
        # Per-token loss weights (stop-gradient). For sequence-level objectives whose token
        # loss repeats the sequence's term (GMPO), sum_t w_t/(N L_i) * l_i applies the mean
        # of the sequence's weights (exactly the sequence weight in 'sequence' mode).
        tw = jax.lax.stop_gradient(jnp.where(batch.mask, jnp.asarray(token_weights, jnp.float32), 0.0))
        pg_weights = weights * tw
    pg_loss = jnp.sum(pg_weights * token_loss)
    loss = pg_loss
    if batch.ref is not None:
        kl = k3(batch.logp, batch.ref, hp["max_log_ratio"])
        kl_loss = jnp.sum(weights * kl)
        stats["kl"] = metrics_lib.masked_mean(kl, batch.valid)
        stats["kl_loss"] = metrics_lib.total(kl_loss)
        if beta > 0:
            loss = loss + beta * kl_loss
    stats["pg_loss"] = metrics_lib.total(pg_loss)
    return loss, stats
