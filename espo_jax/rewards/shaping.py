"""DAPO's overlong reward shaping (ESPO.md: baselines, DAPO)."""
from __future__ import annotations

import numpy as np


def overlong_penalty(lengths, max_len: int, buffer: int, penalty: float = 1.0) -> np.ndarray:
    """Soft length penalty f32[B], added to the reward; 0 for short responses.

    ``min(-(L - (max_len - buffer)) / buffer * penalty, 0)`` for response length L in
    tokens: 0 up to ``max_len - buffer``, then linear down to ``-penalty`` at ``max_len``.
    Lengths past ``max_len`` (not produced by a sampler that truncates) are held at
    ``-penalty``, DAPO's hard penalty. ``buffer=0`` gives the hard penalty alone.
    """
    if max_len <= 0 or buffer < 0 or buffer > max_len:
        raise ValueError(
            f"overlong_penalty: need 0 <= buffer <= max_len and max_len > 0, "
            f"got max_len={max_len}, buffer={buffer}"
        )
    L = np.asarray(lengths, dtype=np.float32)
    if buffer == 0:
        return np.where(L > max_len, -penalty, 0.0).astype(np.float32)
    pen = -(L - (max_len - buffer)) / buffer * penalty
    return np.clip(pen, -penalty, 0.0).astype(np.float32)
