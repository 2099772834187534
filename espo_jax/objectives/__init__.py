"""Policy-gradient objectives (ESPO and baselines), entropy grouping and advantages.

Pure JAX array functions: no model, no I/O. See ESPO.md-derived docstrings in each module.
"""
from espo_jax.objectives.advantages import compute_advantages
from espo_jax.objectives.batch import BatchCounts, batch_counts
from espo_jax.objectives.grouping import GROUPINGS, entropy_groups, entropy_ranks
from espo_jax.objectives.metrics import Stat, combine_stats, finalize
from espo_jax.objectives.registry import (OBJECTIVES, ObjectiveSpec, policy_loss, policy_loss_stats,
                                          resolve_hparams)
from espo_jax.objectives.rollout_correction import rollout_correction_weights

__all__ = [
    "BatchCounts", "GROUPINGS", "OBJECTIVES", "ObjectiveSpec", "batch_counts", "compute_advantages",
    "entropy_groups", "entropy_ranks", "policy_loss", "policy_loss_stats", "resolve_hparams",
    "rollout_correction_weights", "Stat", "combine_stats", "finalize",
]
