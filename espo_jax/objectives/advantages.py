"""Group-relative advantages. B = prompts x G, the G responses of a prompt consecutive."""
from __future__ import annotations

import jax.numpy as jnp

from espo_jax.objectives.aggregation import safe_inverse

ESTIMATORS = ("grpo", "drgrpo")


def compute_advantages(rewards, group_size: int, *, estimator: str = "grpo", gradable=None,
                       valid_only: bool = False, eps: float = 1e-6):
    """Per-response advantages f32[B] from rewards f32[B].

    grpo:   (R - mean) / (std + eps), std unbiased (N-1) over the prompt's group; a group
            with fewer than 2 counted responses gets 0.
    drgrpo: R - mean.
    valid_only (ESPO Eq. 11 as we read it): responses with gradable == False get 0 and are
            left out of the mean and std. Requires `gradable` bool[B]; ignored otherwise.
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"compute_advantages: unknown estimator {estimator!r}; allowed: {list(ESTIMATORS)}")
    if not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"compute_advantages: group_size must be an int >= 1, got {group_size!r}")
    rewards = jnp.asarray(rewards, jnp.float32)
    if rewards.ndim != 1 or rewards.shape[0] % group_size != 0:
        raise ValueError(f"compute_advantages: rewards shape {rewards.shape} must be [B] with B a "
                         f"multiple of group_size={group_size}")
    if valid_only and gradable is None:
        raise ValueError("compute_advantages: valid_only=True needs gradable (bool[B])")
    if gradable is not None and jnp.shape(gradable) != rewards.shape:
        raise ValueError(f"compute_advantages: gradable shape {jnp.shape(gradable)} != rewards shape {rewards.shape}")
    r = rewards.reshape(-1, group_size)
    if valid_only:
        valid = (jnp.asarray(gradable) != 0).reshape(r.shape).astype(jnp.float32)
    else:
        valid = jnp.ones_like(r)
    n = jnp.sum(valid, axis=-1, keepdims=True)
    r = jnp.where(valid > 0, r, 0.0)
    mean = jnp.sum(r, axis=-1, keepdims=True) * safe_inverse(n)
    centred = (r - mean) * valid
    if estimator == "grpo":
        var = jnp.sum(centred**2, axis=-1, keepdims=True) * safe_inverse(n - 1.0)
        std = jnp.where(var > 0, jnp.sqrt(jnp.where(var > 0, var, 1.0)), 0.0)  # NaN-free grad
        adv = jnp.where(n > 1, centred / (std + eps), 0.0)
    else:
        adv = centred
    return adv.reshape(-1)
