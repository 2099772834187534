"""Paired statistics of sweep arms by seed: per-run scalars, paired differences, Holm.

Every arm of a sweep runs the same seeds, and a seed fixes the prompt order and the eval
set, so arm A's seed s and arm B's seed s differ only in the arm: the per-seed difference
cancels the seed's own luck (which eval problems, which prompts), and a paired t-test on
those differences is the right test. Only seeds present in BOTH arms are paired (the rest
are listed in ``PairedDiff.dropped``, never silently folded into an unpaired test).

Pure functions on plain numbers (seed -> value mappings); no harness or jax imports.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Mapping, Sequence

import numpy as np
from scipy import stats as _st


def auc(steps: Sequence[float], values: Sequence[float]) -> float:
    """Area under a curve sampled at ``steps`` (ascending), divided by the step span: the
    trapezoid mean of the curve (a value on the curve's own scale, e.g. an accuracy).

    One point: that value; none: NaN. Include step 0 when the run evaluated it (the caller
    passes what was logged)."""
    x = np.asarray(steps, float)
    y = np.asarray(values, float)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"auc: steps and values must be 1-D of one length, got {x.shape}, "
                         f"{y.shape}")
    if not len(x):
        return float("nan")
    if len(x) == 1 or x[-1] == x[0]:
        return float(y.mean())
    if np.any(np.diff(x) <= 0):
        raise ValueError("auc: steps must be strictly increasing")
    area = float(np.sum(0.5 * (y[1:] + y[:-1]) * np.diff(x)))
    return area / float(x[-1] - x[0])


@dataclasses.dataclass(frozen=True)
class Pairing:
    seeds: tuple[int, ...]          # seeds with a finite value in both arms (ascending)
    a: np.ndarray                   # f64[n] arm values at those seeds
    b: np.ndarray                   # f64[n] reference values at those seeds
    dropped: tuple[int, ...]        # seeds present (finite) in one arm only


def pair_by_seed(a: Mapping[int, float], b: Mapping[int, float]) -> Pairing:
    """Match two arms' per-seed values; NaN / missing values count as absent."""
    fa = {s: float(v) for s, v in a.items() if v is not None and math.isfinite(v)}
    fb = {s: float(v) for s, v in b.items() if v is not None and math.isfinite(v)}
    both = sorted(set(fa) & set(fb))
    return Pairing(tuple(both), np.asarray([fa[s] for s in both], float),
                   np.asarray([fb[s] for s in both], float),
                   tuple(sorted(set(fa) ^ set(fb))))


@dataclasses.dataclass(frozen=True)
class PairedDiff:
    """arm − reference on one per-run metric, over the paired seeds."""
    arm: str
    ref: str
    metric: str
    n: int                          # number of pairs
    seeds: tuple[int, ...]
    dropped: tuple[int, ...]        # seeds in only one of the two arms (not used)
    mean: float                     # mean of the per-seed differences (NaN if n = 0)
    sd: float                       # their sample std (NaN if n < 2)
    ci_low: float                   # 95% t-interval of the mean difference (NaN if n < 2)
    ci_high: float
    p: float                        # two-sided paired t-test (NaN if n < 2)
    p_holm: float = float("nan")    # Holm-adjusted over the family it was compared in

    @property
    def ci_excludes_zero(self) -> bool:
        return bool(self.ci_low > 0 or self.ci_high < 0)


def paired_diff(a: Mapping[int, float], b: Mapping[int, float], *, arm: str = "a",
                ref: str = "b", metric: str = "", conf: float = 0.95) -> PairedDiff:
    """Paired difference a − b by seed: mean, ``conf`` t-interval, two-sided t-test p.

    Zero spread (all differences equal up to rounding, n >= 2): the interval collapses to
    the mean and p is 1 when the mean is 0, else 0 (the t-test's limit; scipy gives NaN)."""
    pr = pair_by_seed(a, b)
    d = pr.a - pr.b
    n = len(d)
    nan = float("nan")
    mean = float(d.mean()) if n else nan
    if n < 2:
        return PairedDiff(arm, ref, metric, n, pr.seeds, pr.dropped, mean, nan, nan, nan, nan)
    sd = float(d.std(ddof=1))
    if sd <= 1e-12 * max(1.0, abs(mean)):  # equal up to rounding (0.3-0.2 vs 0.4-0.3)
        return PairedDiff(arm, ref, metric, n, pr.seeds, pr.dropped, mean, 0.0, mean, mean,
                          1.0 if abs(mean) <= 1e-12 else 0.0)
    half = float(_st.t.ppf(0.5 + conf / 2, n - 1)) * sd / math.sqrt(n)
    p = float(_st.ttest_rel(pr.a, pr.b).pvalue)
    return PairedDiff(arm, ref, metric, n, pr.seeds, pr.dropped, mean, sd, mean - half,
                      mean + half, p)


def holm(pvalues: Sequence[float]) -> np.ndarray:
    """Holm–Bonferroni step-down adjusted p-values (same order as given).

    Sorted ascending p_(1..m): adj_(i) = max_{j <= i} min(1, (m − j + 1) p_(j)). NaN entries
    (untestable comparisons) stay NaN and do not count in m."""
    p = np.asarray(pvalues, float)
    out = np.full(p.shape, np.nan)
    ok = np.flatnonzero(np.isfinite(p))
    m = len(ok)
    if not m:
        return out
    order = ok[np.argsort(p[ok], kind="stable")]
    adj = np.minimum(1.0, (m - np.arange(m)) * p[order])
    out[order] = np.maximum.accumulate(adj)
    return out


def compare_to_reference(values: Mapping[str, Mapping[int, float]], ref: str, metric: str,
                         *, conf: float = 0.95) -> list[PairedDiff]:
    """Every arm (in the mapping's order) minus ``ref`` on one metric, Holm-corrected over
    these comparisons. values: arm -> seed -> value. Empty if ``ref`` is absent."""
    if ref not in values:
        return []
    diffs = [paired_diff(v, values[ref], arm=name, ref=ref, metric=metric, conf=conf)
             for name, v in values.items() if name != ref]
    adj = holm([d.p for d in diffs])
    return [dataclasses.replace(d, p_holm=float(q)) for d, q in zip(diffs, adj)]


@dataclasses.dataclass(frozen=True)
class Summary:
    n: int
    mean: float
    sd: float                       # sample std (NaN if n < 2)


def summary(values: Mapping[int, float] | Sequence[float]) -> Summary:
    """n, mean and sample std of the finite values (seed mapping or plain sequence)."""
    vals = values.values() if isinstance(values, Mapping) else values
    v = np.asarray([x for x in vals if x is not None and math.isfinite(x)], float)
    return Summary(len(v), float(v.mean()) if len(v) else float("nan"),
                   float(v.std(ddof=1)) if len(v) > 1 else float("nan"))
