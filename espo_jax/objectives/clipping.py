"""The PPO-style pessimistic clipped surrogate shared by GRPO, DAPO, GSPO and ESPO."""
from __future__ import annotations

from typing import Optional

import jax.numpy as jnp


def clipped_surrogate(ratio, adv, lo, hi, dual_clip: Optional[float] = None):
    """l_t = -min(s A, clip(s, lo, hi) A), with optional dual clip (A < 0: min(l, -A c)).

    ratio, adv: f32[B, T]; lo, hi: scalars or f32[B, T].
    Returns (loss f32[B, T], clipped bool[B, T]): `clipped` marks tokens whose gradient the
    clip removed (the clipped term is strictly the active one, or the dual clip bound).
    Written with `where` on finite branches: when the clipped term wins the ratio is strictly
    outside [lo, hi], so its gradient is exactly 0.
    """
    unclipped = -adv * ratio
    clipped_loss = -adv * jnp.clip(ratio, lo, hi)
    clipped = clipped_loss > unclipped
    loss = jnp.where(clipped, clipped_loss, unclipped)
    if dual_clip is not None:
        bound = -adv * dual_clip
        dual = (adv < 0) & (bound < loss)
        loss = jnp.where(dual, bound, loss)
        clipped = clipped | dual
    return loss, clipped
