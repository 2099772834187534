"""Entropy segmentation of each response into groups of similar old-policy entropy.

Ranks order the valid tokens of ONE sequence by entropy descending, ties by position
ascending. Every operation works along one row (a vmapped row function, or batched ops
that reduce over T only), so tokens of different responses never mix. No sort is needed
for the loss: "rank < n" is a threshold
test against the n-th largest entropy, found exactly by a 32-step bisection on the
order-preserving uint32 image of the float (radix select: 32 fused compare+count passes,
O(32 T) per row, against O(T log^2 T) for a sorting network), with ties resolved by a
position cumsum. Only `token` mode's explicit ranks use a stable (key, position) sort. Modes:
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


def _row_order_keys(entropy, valid):
    """uint32[T] keys ordered like the entropies (masked -> 0, below every valid key)."""
    entropy = jnp.where(entropy == 0, 0.0, entropy)  # -0.0 and +0.0 must tie
    bits = jax.lax.bitcast_convert_type(entropy, jnp.uint32)
    negative = (bits >> 31) == 1
    key = jnp.where(negative, ~bits, bits | jnp.uint32(0x80000000))
    return jnp.where(valid, key, jnp.uint32(0))


def _unroll() -> bool:
    """Unroll the bisection loops on accelerators (a device while-loop reads its predicate
    back every iteration); keep them rolled on CPU, where that is as fast and compiles ~2x
    faster."""
    return jax.default_backend() != "cpu"


def _threshold(key, n):
    """uint32[B]: the n_b-th largest key of each row (any value when n_b == 0); key
    uint32[B, T], n int32[B].

    Bisection from the most significant bit: keep a bit when at least n keys of the row
    reach the candidate. 32 fused compare+count passes over [B, T] (row-wise only, so
    rows never mix); the result is always an existing key of the row."""
    def step(i, v):
        cand = v | (jnp.uint32(1) << (31 - i).astype(jnp.uint32))
        count = jnp.sum(key >= cand[:, None], axis=-1, dtype=jnp.int32)
        return jnp.where(count >= n, cand, v)

    return jax.lax.fori_loop(0, 32, step, jnp.zeros(n.shape, jnp.uint32), unroll=_unroll())


def _in_top(key, n):
    """bool[B, T]: token has rank < n[b] in its row (0 <= n <= L); key uint32[B, T].

    Tokens above the threshold are in; of those equal to it, the first (n - #above) by
    position. That tie-break only runs when some row of the batch splits a run of ties."""
    v = _threshold(key, n)[:, None]
    valid = key > 0
    above = valid & (key > v)
    tie = valid & (key == v)
    room = (n - jnp.sum(above, axis=-1, dtype=jnp.int32))[:, None]
    split = jnp.any(jnp.sum(tie, axis=-1, dtype=jnp.int32)[:, None] > room)
    take_ties = jax.lax.cond(split, lambda: _first_true(tie, room), lambda: tie)
    return (n[:, None] > 0) & (above | take_ties)


def _first_true(flags, count):
    """bool[B, T]: the first count[b] (>= 1) True entries of each row of flags bool[B, T].

    Bisection for the largest position q with #(flags before q) < count: the count-th True
    is at q. log2(T) compare+count passes (cheaper to compile than a cumsum)."""
    T = flags.shape[-1]
    pos = jax.lax.broadcasted_iota(jnp.int32, flags.shape, 1)

    def step(i, q):
        cand = q | (jnp.int32(1) << (T.bit_length() - 1 - i))
        before = jnp.sum(flags & (pos < cand), axis=-1, keepdims=True, dtype=jnp.int32)
        return jnp.where(before < count, cand, q)

    q = jax.lax.fori_loop(0, T.bit_length(), step, jnp.zeros(count.shape, jnp.int32), unroll=_unroll())
    return flags & (pos <= q)


def _top_counts(top_fraction: float, T: int):
    """n(L) = ceil(rho*L - 1e-6) for L = 0..T, in float64 on the host (exact, no f32 rounding)."""
    return jnp.asarray(np.array([min(L, max(0, math.ceil(top_fraction * L - 1e-6)))
                                 for L in range(T + 1)], np.int32))


def _row_groups(entropy, valid, *, mode, top_fraction, num_groups, entropy_edges):
    T = entropy.shape[0]
    if mode == "sequence":
        g = jnp.zeros((T,), jnp.int32)
    elif mode == "ranges":
        edges = jnp.asarray(entropy_edges, jnp.float32)
        g = jnp.sum(edges[None, :] > entropy[:, None], axis=-1, dtype=jnp.int32)
    else:  # token: the rank itself (inverse of a stable sort permutation)
        key, pos, skey, spos = _row_sort(entropy, valid)
        g = jnp.zeros((T,), jnp.int32).at[spos].set(pos, unique_indices=True)
    return jnp.where(valid, g, -1)


def group_ids(entropy, mask, mode, top_fraction=0.2, num_groups=4, entropy_edges=None):
    """int32[B, T] group ids (validated, static params). See module docstring."""
    entropy = jnp.asarray(entropy, jnp.float32)
    valid = jnp.asarray(mask) != 0
    if mode in ("top_fraction", "quantile"):
        # Threshold selection, written batched over rows (every op reduces along T only):
        # the tie-break cumsum can then be skipped when no row of the batch needs it.
        T = entropy.shape[-1]
        length = jnp.sum(valid, axis=-1, dtype=jnp.int32)
        key = jax.vmap(_row_order_keys)(entropy, valid)
        if mode == "top_fraction":
            g = jnp.where(_in_top(key, _top_counts(top_fraction, T)[length]), 0, 1)
        elif num_groups == 1:
            g = jnp.zeros(entropy.shape, jnp.int32)
        else:
            # rank >= ceil(k L / K)  <=>  floor(rank K / L) >= k: the group is the number of
            # boundaries the rank has passed.
            g = jnp.zeros(entropy.shape, jnp.int32)
            for k in range(1, num_groups):  # one [B, T] selection per boundary fuses best
                bound = (k * length + num_groups - 1) // num_groups
                g = g + (~_in_top(key, bound)).astype(jnp.int32)
        return jnp.where(valid, g, -1).astype(jnp.int32)
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
