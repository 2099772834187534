"""What the scoring pass adds to a rollout batch, once per rollout (host numpy in, out):

* the sampler-vs-scorer check: |sampler log-prob - scored old log-prob| over valid tokens
  (``sampler_scorer/logp_abs_diff_max`` and ``_mean``); ~1e-6 in float32, the real
  rollout/trainer mismatch in bf16;
* ESPO's entropy groups (they depend only on the old entropy and the mask, which the
  updates do not change), so ``train_step`` skips the grouping;
* the rollout-correction weights (``rollout_correction.mode``) and their metrics.
"""
from __future__ import annotations

import functools

import jax
import numpy as np

from espo_jax.objectives import entropy_groups, rollout_correction_weights


@functools.lru_cache(maxsize=8)
def _groups_fn(mode: str, top_fraction: float, num_groups: int, entropy_edges):
    return jax.jit(functools.partial(entropy_groups, mode=mode, top_fraction=top_fraction,
                                     num_groups=num_groups, entropy_edges=entropy_edges))


def espo_groups(hparams: dict, entropy: np.ndarray, mask: np.ndarray) -> np.ndarray | None:
    """int32[B, T] entropy groups for ESPO's hparams (None for token grouping, which needs
    no group ids)."""
    mode = hparams.get("grouping", "top_fraction")
    if mode == "token":
        return None
    edges = hparams.get("entropy_edges")
    edges = tuple(float(e) for e in edges) if edges is not None else None
    fn = _groups_fn(mode, float(hparams.get("top_fraction", 0.2)),
                    int(hparams.get("num_groups", 4)), edges)
    return np.asarray(jax.device_get(fn(entropy, mask)), np.int32)


def score_extras(config, hparams: dict, mask: np.ndarray, sampler_logp: np.ndarray,
                 old_logp: np.ndarray, entropy: np.ndarray) -> tuple[dict, dict]:
    """(extra batch arrays, metrics) for one rollout batch.

    mask f32[B, T] and sampler_logp f32[B, T]: the rollout's; old_logp, entropy: the
    scoring pass's f32[B, T]. Extra arrays: ``groups`` i32[B, T] (ESPO) and ``is_weights``
    f32[B, T] (rollout correction on).
    """
    mask = np.asarray(mask, np.float32)
    valid = mask > 0
    diff = np.abs(np.asarray(sampler_logp, np.float64) - old_logp)[valid]
    metrics = {"sampler_scorer/logp_abs_diff_max": float(diff.max()) if diff.size else 0.0,
               "sampler_scorer/logp_abs_diff_mean": float(diff.mean()) if diff.size else 0.0}
    extra = {}
    if config.objective.name == "espo":
        groups = espo_groups(hparams, entropy, mask)
        if groups is not None:
            extra["groups"] = groups
    rc = config.rollout_correction
    w, m = rollout_correction_weights(old_logp, sampler_logp, mask, str(rc.mode),
                                      float(rc.threshold))
    if w is not None:
        extra["is_weights"] = np.asarray(jax.device_get(w), np.float32)
        metrics.update({k: float(v) for k, v in m.items()})
    return extra, metrics
