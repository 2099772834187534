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


def overlong_budget(max_len: int, buffer: int, buffer_frac: float,
                    max_new_tokens: int) -> tuple[int, int]:
    """(max_len, buffer) of the overlong shaping for a run's response budget.

    ``max_len <= 0`` follows the response budget ``max_new_tokens`` (so raising the budget
    moves the penalty with it); ``buffer <= 0`` is ``round(buffer_frac * max_len)`` (at
    least 1 when buffer_frac > 0). Errors name the ``dapo.overlong.*`` keys.
    """
    if not 0.0 <= buffer_frac <= 1.0:
        raise ValueError(f"dapo.overlong.buffer_frac must be in [0, 1], got {buffer_frac}")
    m = int(max_len) if max_len > 0 else int(max_new_tokens)
    if m <= 0:
        raise ValueError(f"dapo.overlong.max_len={max_len} and rollout.max_new_tokens="
                         f"{max_new_tokens}: need a positive response budget")
    b = int(buffer) if buffer > 0 else (max(1, round(buffer_frac * m)) if buffer_frac > 0 else 0)
    if b > m:
        raise ValueError(f"dapo.overlong.buffer={b} exceeds the max length {m}")
    return m, b
