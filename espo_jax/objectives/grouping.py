"""Entropy segmentation of each response into groups of similar old-policy entropy.

Ranks order the valid tokens of ONE sequence by entropy descending, ties by position
ascending. Everything is written for one row and vmapped over the batch, so tokens of
different responses never mix. Cost per row: one stable (key, position) sort; group
membership is then a threshold test against the n-th sorted element (no scatter, no
segment ops). Modes:
  top_fraction  group 0 = the n = ceil(rho*L - 1e-6) highest-entropy tokens, group 1 = rest
  quantile      rank k -> group floor(k*K / L)
  ranges        group = number of `entropy_edges` strictly greater than the entropy
  token         every token its own group (group id = its rank)
  sequence      one group per response (id 0)
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

GROUPINGS = ("top_fraction", "quantile", "ranges", "token", "sequence")
GROUPING_DEFAULTS = {"top_fraction": 0.2, "num_groups": 4, "entropy_edges": None}


def validate_grouping(mode: str, top_fraction=0.2, num_groups=4, entropy_edges=None, where="grouping"):
    """Check the static grouping parameters; returns them canonicalised."""
    if mode not in GROUPINGS:
        raise ValueError(f"{where}: unknown grouping {mode!r}; allowed: {list(GROUPINGS)}")
    if mode == "top_fraction" and not (isinstance(top_fraction, (int, float)) and 0 < top_fraction <= 1):
        raise ValueError(f"{where}: top_fraction must be a float in (0, 1], got {top_fraction!r}")
    if mode == "quantile" and not (isinstance(num_groups, int) and num_groups >= 1):
        raise ValueError(f"{where}: num_groups must be an int >= 1, got {num_groups!r}")
    if mode == "ranges":
        if entropy_edges is None or len(entropy_edges) == 0:
            raise ValueError(f"{where}: grouping='ranges' needs entropy_edges (a non-empty list of nats)")
        entropy_edges = tuple(float(e) for e in entropy_edges)
    return float(top_fraction), int(num_groups), entropy_edges


def num_group_ids(mode: str, num_groups: int, entropy_edges: Optional[Sequence[float]], T: int) -> int:
    """Static upper bound on group ids + 1 (token mode: T)."""
    return {"top_fraction": 2, "quantile": num_groups, "sequence": 1, "token": T}.get(
        mode, len(entropy_edges or ()) + 1)


def _row_sort(entropy, valid):
    """Sort key -entropy (masked -> +inf) with positions; stable => ties by position asc."""
    key = jnp.where(valid, -entropy, jnp.inf)
    key = jnp.where(key == 0, 0.0, key)  # -0.0 and +0.0 must tie in every comparison below
    pos = jax.lax.iota(jnp.int32, key.shape[0])
    skey, spos = jax.lax.sort((key, pos), num_keys=1, is_stable=True)
    return key, pos, skey, spos


def _row_in_top(key, pos, skey, spos, n):
    """bool[T]: token has rank < n (n int32 scalar, 0 <= n <= L)."""
    i = jnp.clip(n - 1, 0, key.shape[0] - 1)
    kth, pth = skey[i], spos[i]
    return (n > 0) & ((key < kth) | ((key == kth) & (pos <= pth)))


def _top_counts(top_fraction: float, T: int):
    """n(L) = ceil(rho*L - 1e-6) for L = 0..T, in float64 on the host (exact, no f32 rounding)."""
    return jnp.asarray(np.array([min(L, max(0, math.ceil(top_fraction * L - 1e-6)))
                                 for L in range(T + 1)], np.int32))


def _row_groups(entropy, valid, *, mode, top_fraction, num_groups, entropy_edges):
    T = entropy.shape[0]
    length = jnp.sum(valid, dtype=jnp.int32)
    if mode == "sequence":
        g = jnp.zeros((T,), jnp.int32)
    elif mode == "ranges":
        edges = jnp.asarray(entropy_edges, jnp.float32)
        g = jnp.sum(edges[None, :] > entropy[:, None], axis=-1, dtype=jnp.int32)
    else:
        key, pos, skey, spos = _row_sort(entropy, valid)
        if mode == "top_fraction":
            n = _top_counts(top_fraction, T)[length]
            g = jnp.where(_row_in_top(key, pos, skey, spos, n), 0, 1).astype(jnp.int32)
        elif mode == "quantile":
            # rank >= ceil(k L / K)  <=>  floor(rank K / L) >= k, so the group is a count.
            g = jnp.zeros((T,), jnp.int32)
            for k in range(1, num_groups):
                b = (k * length + num_groups - 1) // num_groups
                g = g + (~_row_in_top(key, pos, skey, spos, b)).astype(jnp.int32)
        else:  # token: the rank itself (inverse of the sort permutation)
            g = jnp.zeros((T,), jnp.int32).at[spos].set(pos, unique_indices=True)
    return jnp.where(valid, g, -1)


def group_ids(entropy, mask, mode, top_fraction=0.2, num_groups=4, entropy_edges=None):
    """int32[B, T] group ids (validated, static params). See module docstring."""
    entropy = jnp.asarray(entropy, jnp.float32)
    valid = jnp.asarray(mask) != 0
    row = lambda e, v: _row_groups(e, v, mode=mode, top_fraction=top_fraction,
                                   num_groups=num_groups, entropy_edges=entropy_edges)
    return jax.vmap(row)(entropy, valid)


def entropy_groups(entropy, mask, mode: str = "top_fraction", **params):
    """Entropy groups of each response.

    entropy: f32[B, T] old-policy token entropy (nats); mask: bool/f32[B, T].
    mode: one of GROUPINGS; params: top_fraction (0.2), num_groups (4), entropy_edges.
    Returns int32[B, T]: group id (0 = highest entropy), -1 where masked.
    """
    unknown = set(params) - set(GROUPING_DEFAULTS)
    if unknown:
        raise ValueError(f"entropy_groups: unknown parameter(s) {sorted(unknown)}; "
                         f"allowed: {sorted(GROUPING_DEFAULTS)}")
    p = {**GROUPING_DEFAULTS, **params}
    tf, k, edges = validate_grouping(mode, p["top_fraction"], p["num_groups"], p["entropy_edges"],
                                     where="entropy_groups")
    if jnp.shape(entropy) != jnp.shape(mask) or len(jnp.shape(entropy)) != 2:
        raise ValueError(f"entropy_groups: entropy {jnp.shape(entropy)} and mask {jnp.shape(mask)} "
                         "must both be [B, T]")
    return group_ids(entropy, mask, mode, tf, k, edges)


def entropy_ranks(entropy, mask):
    """int32[B, T]: rank of each valid token in its row (0 = highest entropy), -1 masked."""
    return entropy_groups(entropy, mask, "token")
