"""Policy-gradient objectives (ESPO and baselines), entropy grouping and advantages.

Pure JAX array functions: no model, no I/O. See ESPO.md-derived docstrings in each module.
"""
from espo_jax.objectives.advantages import compute_advantages
from espo_jax.objectives.batch import BatchCounts, batch_counts
from espo_jax.objectives.grouping import GROUPINGS, entropy_groups, entropy_ranks
from espo_jax.objectives.registry import OBJECTIVES, ObjectiveSpec, policy_loss, resolve_hparams

__all__ = [
    "BatchCounts", "GROUPINGS", "OBJECTIVES", "ObjectiveSpec", "batch_counts", "compute_advantages",
    "entropy_groups", "entropy_ranks", "policy_loss", "resolve_hparams",
]
