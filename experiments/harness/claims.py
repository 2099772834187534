"""Checks of the paper's claims at this scale: trends, correlations, verdicts."""
from __future__ import annotations

import numpy as np

from harness.results import VariantResult


def trend(res: VariantResult, key: str) -> tuple[float, float]:
    """(slope per step of the seed-mean series over training, its first->last change)."""
    x, ys = res.stack(key, min_step=1)
    if len(x) < 2:
        return float("nan"), float("nan")
    m = ys.mean(0)
    slope = float(np.polyfit(x.astype(float), m, 1)[0])
    k = max(1, len(m) // 4)  # first / last quarter means: robust to one noisy step
    return slope, float(m[-k:].mean() - m[:k].mean())


def correlation(res: VariantResult, a: str, b: str) -> float:
    """Pearson correlation over (seed, step) pairs of two per-update metrics."""
    xa, ya = res.stack(a, min_step=1)
    xb, yb = res.stack(b, min_step=1)
    common = np.intersect1d(xa, xb)
    if len(common) < 3:
        return float("nan")
    va = ya[:, np.searchsorted(xa, common)].ravel()
    vb = yb[:, np.searchsorted(xb, common)].ravel()
    if va.std() == 0 or vb.std() == 0:
        return float("nan")
    return float(np.corrcoef(va, vb)[0, 1])


def verdict(ok: bool | None) -> str:
    return {True: "**holds**", False: "**does not hold**", None: "**inconclusive**"}[ok]
