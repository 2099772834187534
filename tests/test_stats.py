"""experiments/harness/stats.py against hand and NumPy/SciPy references."""
from __future__ import annotations

import math
import pathlib
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats as sst

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "experiments"))

from harness import stats  # noqa: E402


def test_auc_known_curves():
    # Linear 0 -> 1 over steps 0..10: mean 0.5 whatever the sampling.
    assert stats.auc([0, 10], [0.0, 1.0]) == pytest.approx(0.5)
    assert stats.auc([0, 2, 10], [0.0, 0.2, 1.0]) == pytest.approx(0.5)
    # Uneven steps weight by interval: 0.2 on [0,10], then 0.6 on [10,20] with a ramp.
    # area = 10*0.2 + 10*(0.2+0.6)/2 = 6; span 20 -> 0.3 (a plain mean would say 0.333).
    assert stats.auc([0, 10, 20], [0.2, 0.2, 0.6]) == pytest.approx(0.3)
    assert stats.auc([5], [0.7]) == 0.7
    assert math.isnan(stats.auc([], []))
    with pytest.raises(ValueError, match="increasing"):
        stats.auc([0, 5, 5], [0.1, 0.2, 0.3])
    x = np.array([0, 3, 9, 20.0])
    y = np.array([0.1, 0.5, 0.4, 0.9])
    assert stats.auc(x, y) == pytest.approx(np.trapezoid(y, x) / 20.0)


def test_pairing_drops_unmatched_and_nan_seeds():
    a = {0: 0.5, 1: 0.6, 2: 0.7, 5: 0.9}
    b = {0: 0.4, 1: 0.4, 2: float("nan"), 3: 0.1}
    pr = stats.pair_by_seed(a, b)
    assert pr.seeds == (0, 1) and pr.dropped == (2, 3, 5)
    d = stats.paired_diff(a, b, arm="x", ref="espo", metric="m")
    assert d.n == 2 and d.seeds == (0, 1) and d.dropped == (2, 3, 5)
    assert d.mean == pytest.approx(0.15)
    # No pair at all / a single pair: no interval, no test.
    one = stats.paired_diff({0: 1.0}, {0: 0.5})
    assert one.n == 1 and one.mean == 0.5 and math.isnan(one.p) and math.isnan(one.ci_low)
    assert stats.paired_diff({0: 1.0}, {1: 0.5}).n == 0


def test_t_interval_and_p_match_scipy():
    rng = np.random.default_rng(3)
    a, b = rng.normal(0.5, 0.1, 6), rng.normal(0.45, 0.1, 6)
    d = stats.paired_diff(dict(enumerate(a)), dict(enumerate(b)))
    diff = a - b
    lo, hi = sst.t.interval(0.95, len(diff) - 1, loc=diff.mean(), scale=sst.sem(diff))
    assert (d.ci_low, d.ci_high) == pytest.approx((lo, hi), rel=1e-10)
    assert d.p == pytest.approx(sst.ttest_1samp(diff, 0.0).pvalue, rel=1e-10)
    assert d.sd == pytest.approx(diff.std(ddof=1))
    assert d.ci_excludes_zero == (lo > 0 or hi < 0)
    # Constant differences: collapsed interval, p 0 (nonzero) or 1 (zero).
    c = stats.paired_diff({0: 0.3, 1: 0.4}, {0: 0.2, 1: 0.3})
    assert c.p == 0.0 and c.ci_low == pytest.approx(0.1) and c.ci_excludes_zero
    z = stats.paired_diff({0: 0.3, 1: 0.4}, {0: 0.3, 1: 0.4})
    assert z.p == 1.0 and not z.ci_excludes_zero


def test_holm_on_known_vectors():
    # Hand: m = 4, sorted 0.01, 0.02, 0.03, 0.04 -> 0.04, 0.06, 0.06 (monotone), 0.06.
    np.testing.assert_allclose(stats.holm([0.03, 0.01, 0.04, 0.02]), [0.06, 0.04, 0.06, 0.06])
    # NaN kept and not counted in m (m = 3): 3*0.01, min(1, 2*0.6), max(that, 0.7).
    out = stats.holm([0.6, float("nan"), 0.01, 0.7])
    assert math.isnan(out[1])
    np.testing.assert_allclose(out[[0, 2, 3]], [1.0, 0.03, 1.0])
    assert stats.holm([]).shape == (0,)


def test_compare_to_reference_applies_holm_over_arms():
    vals = {"espo": {0: 0.5, 1: 0.6, 2: 0.55},
            "gspo": {0: 0.4, 1: 0.52, 2: 0.43},
            "grpo": {0: 0.51, 1: 0.58, 2: 0.57, 3: 0.9}}
    out = stats.compare_to_reference(vals, "espo", "final")
    assert [d.arm for d in out] == ["gspo", "grpo"]
    assert out[1].n == 3 and out[1].dropped == (3,)
    np.testing.assert_allclose([d.p_holm for d in out], stats.holm([d.p for d in out]))
    assert stats.compare_to_reference(vals, "dapo", "final") == []


@settings(max_examples=60, deadline=None)
@given(st.lists(st.one_of(st.floats(0, 1), st.just(float("nan"))), min_size=1, max_size=12))
def test_holm_properties(ps):
    adj = stats.holm(ps)
    p = np.asarray(ps)
    fin = np.isfinite(p)
    assert np.array_equal(np.isnan(adj), ~fin)
    assert np.all(adj[fin] >= p[fin] - 1e-15) and np.all(adj[fin] <= 1.0)
    order = np.argsort(p[fin], kind="stable")
    assert np.all(np.diff(adj[fin][order]) >= -1e-15)     # monotone in sorted order
    # Bonferroni bounds Holm from above.
    assert np.all(adj[fin] <= np.minimum(1.0, fin.sum() * p[fin]) + 1e-12)
