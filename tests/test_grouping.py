"""entropy_groups / entropy_ranks against the reference ranking (entropy desc, position asc)."""
import functools
import math

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings

from espo_jax.objectives import GROUPINGS, entropy_groups, entropy_ranks

import _reference_objectives as ref

B, T = 4, 16
MODES = {
    "top_fraction": dict(top_fraction=0.2),
    "top_half": dict(top_fraction=0.5),
    "top_all": dict(top_fraction=1.0),
    "quantile1": dict(num_groups=1),
    "quantile3": dict(num_groups=3),
    "quantile5": dict(num_groups=5),
    "ranges": dict(entropy_edges=(2.0, 0.9, 0.3)),
    "token": {},
    "sequence": {},
}


def _mode(key):
    return {"top_half": "top_fraction", "top_all": "top_fraction", "quantile1": "quantile",
            "quantile3": "quantile", "quantile5": "quantile"}.get(key, key)


@functools.lru_cache(maxsize=None)
def _groups_fn(key):
    return jax.jit(functools.partial(entropy_groups, mode=_mode(key), **MODES[key]))


def _batch(seed, lengths=None, levels=ref.ENTROPY_LEVELS):
    rng = np.random.default_rng(seed)
    if lengths is None:
        lengths = [T, 0] + list(rng.integers(1, T + 1, size=B - 2))
    mask = np.arange(T)[None, :] < np.asarray(lengths)[:, None]
    mask[2, 0] = False  # holes are allowed
    entropy = rng.choice(levels, size=(B, T)).astype(np.float32)
    return np.where(mask, entropy, np.nan).astype(np.float32), mask


@pytest.mark.parametrize("key", sorted(MODES))
def test_matches_reference(key):
    for seed in range(4):
        entropy, mask = _batch(seed)
        got = np.asarray(_groups_fn(key)(entropy, mask))
        want = ref.group_ids(entropy, mask, _mode(key), **MODES[key])
        np.testing.assert_array_equal(got, want)


def test_negative_zero_ties_with_zero():
    entropy = np.array([[0.0, -0.0, 0.0, -0.0, 1.0, -0.0, 0.0, 0.0] * 2] * B, np.float32)
    mask = np.ones((B, T), bool)
    got = np.asarray(_groups_fn("top_half")(entropy, mask))
    # 8 highest = the 1.0s (positions 4, 12) and then the first 6 zeros by position
    assert list(np.nonzero(got[0] == 0)[0]) == [0, 1, 2, 3, 4, 5, 6, 12]
    np.testing.assert_array_equal(np.asarray(entropy_ranks(entropy, mask))[0],
                                  [2, 3, 4, 5, 0, 6, 7, 8, 9, 10, 11, 12, 1, 13, 14, 15])


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), lengths=st.lists(st.integers(0, T), min_size=B, max_size=B),
       key=st.sampled_from(["top_fraction", "top_half", "quantile3", "quantile5"]))
def test_partition_sizes_order_and_ties(seed, lengths, key):
    entropy, mask = _batch(seed, lengths, levels=np.array([0.0, 0.5, 1.0, 1.5]))  # heavy ties
    g = np.asarray(_groups_fn(key)(entropy, mask))
    assert np.all((g == -1) == ~mask)  # a partition of exactly the valid tokens
    for i in range(B):
        L = int(mask[i].sum())
        ids = g[i][mask[i]]
        if _mode(key) == "top_fraction":
            n = math.ceil(MODES[key]["top_fraction"] * L - 1e-6)
            assert np.sum(ids == 0) == n and np.sum(ids == 1) == L - n
        else:
            K = MODES[key]["num_groups"]
            for k in range(K):
                assert np.sum(ids == k) == sum(1 for r in range(L) if (r * K) // L == k)
        pos = np.nonzero(mask[i])[0]
        for a in pos:
            for b in pos:
                if g[i, a] < g[i, b]:  # lower group: higher entropy, or a tie earlier in position
                    assert entropy[i, a] > entropy[i, b] or (entropy[i, a] == entropy[i, b] and a < b)
    again = np.asarray(_groups_fn(key)(entropy.copy(), mask.copy()))
    np.testing.assert_array_equal(g, again)


def test_ranks_are_deterministic_under_ties():
    entropy, mask = _batch(7, levels=np.array([0.0, 1.0]))
    ranks = np.asarray(entropy_ranks(entropy, mask))
    for i in range(B):
        order = ref.ranks(entropy[i], mask[i])
        assert [ranks[i, t] for t in order] == list(range(len(order)))
    assert np.all(ranks[~mask] == -1)


def test_top_fraction_counts_are_exact_for_long_rows():
    """n = ceil(rho*L - 1e-6) evaluated in float64 for every L (f32 would round 0.3*L)."""
    Tl = 4096
    lengths = np.array([4095, 10, 4096, 1230, 3333, 20, 2730, 1])
    mask = np.arange(Tl)[None, :] < lengths[:, None]
    entropy = np.random.default_rng(0).random((8, Tl)).astype(np.float32)
    fn = jax.jit(functools.partial(entropy_groups, mode="top_fraction", top_fraction=0.3))
    g = np.asarray(fn(entropy, mask))
    for i, L in enumerate(lengths):
        assert np.sum(g[i] == 0) == math.ceil(0.3 * L - 1e-6)


def test_jit_and_vmap():
    entropy, mask = _batch(3)
    stacked = jax.jit(jax.vmap(functools.partial(entropy_groups, mode="quantile", num_groups=3)))(
        np.stack([entropy, entropy[::-1]]), np.stack([mask, mask[::-1]]))
    np.testing.assert_array_equal(stacked[0], ref.group_ids(entropy, mask, "quantile", num_groups=3))
    np.testing.assert_array_equal(stacked[1], ref.group_ids(entropy[::-1], mask[::-1], "quantile", num_groups=3))
    assert stacked.dtype == jnp.int32


def test_errors():
    entropy, mask = _batch(0)
    assert set(GROUPINGS) == {"top_fraction", "quantile", "ranges", "token", "sequence"}
    with pytest.raises(ValueError, match="unknown grouping 'kmeans'"):
        entropy_groups(entropy, mask, "kmeans")
    with pytest.raises(ValueError, match=r"unknown parameter\(s\) \['rho'\]"):
        entropy_groups(entropy, mask, "top_fraction", rho=0.2)
    with pytest.raises(ValueError, match="entropy_edges"):
        entropy_groups(entropy, mask, "ranges")
    with pytest.raises(ValueError, match="top_fraction"):
        entropy_groups(entropy, mask, "top_fraction", top_fraction=0.0)
    with pytest.raises(ValueError, match=r"\(4, 15\)"):
        entropy_groups(entropy[:, :15], mask, "sequence")
