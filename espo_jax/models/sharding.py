"""Logical axis names -> mesh `PartitionSpec` / `NamedSharding`.

`rules` maps a logical name ("vocab", "embed", "heads", "kv_heads", "mlp", "norm",
"experts") to a
mesh axis name, a tuple of names, or None. Either a mapping or a sequence of
(logical, mesh_axes) pairs (first match wins, as in flax's logical rules). A mesh axis
is used at most once per spec, axes absent from the mesh are dropped, and a dimension
the mesh axes do not divide is replicated rather than failing.
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

# The mesh axes a batch (leading) dim is split over; "expert" joins them when the mesh has
# it with size > 1 (`batch_axes`): expert-parallel ranks are data-parallel for every
# non-expert weight.
BATCH_AXES = ("data", "fsdp")


def batch_axes(mesh) -> tuple:
    """("data", "fsdp"), then "expert" when the mesh splits experts (mesh device order)."""
    if "expert" in mesh.axis_names and mesh.shape["expert"] > 1:
        return ("data", "fsdp", "expert")
    return BATCH_AXES

# Used by `from_pretrained(mesh=...)` when no rules are given: FSDP on the model width,
# tensor parallelism on heads / mlp / vocab.
DEFAULT_RULES = (
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("norm", None),
    ("experts", "expert"),  # stacked MoE expert weights [E, ...]: expert parallelism
)


def _lookup(rules, name):
    if isinstance(rules, Mapping):
        return rules.get(name)
    for key, axes in rules:
        if key == name:
            return axes
    return None


def logical_to_spec(names: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
                    rules=DEFAULT_RULES) -> PartitionSpec:
    """PartitionSpec for an array of `shape` whose dims carry logical `names`."""
    if len(names) != len(shape):
        raise ValueError(f"logical names {tuple(names)} do not match shape {tuple(shape)}")
    used: set[str] = set()
    out = []
    for name, dim in zip(names, shape):
        axes = _lookup(rules, name) if name is not None else None
        if axes is None:
            out.append(None)
            continue
        axes = (axes,) if isinstance(axes, str) else tuple(axes)
        axes = tuple(a for a in axes if a in mesh.shape and a not in used)
        size = math.prod(mesh.shape[a] for a in axes)
        if not axes or size == 1 or dim % size:
            out.append(None)
            continue
        used.update(axes)
        out.append(axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*extend_fsdp_over_expert(out, shape, mesh))


def extend_fsdp_over_expert(entries: list, shape, mesh) -> list:
    """Spec entries (None | axis | tuple per dim) with "expert" added to the "fsdp" dim when
    the mesh has an "expert" axis > 1 and no dim of this array uses it yet (every weight but
    the stacked experts), if the size divides: ZeRO-3 over fsdp x expert rather than one
    copy per expert rank (the expert axis is data-parallel for these weights)."""
    if (mesh is None or shape is None or "expert" not in mesh.shape
        or mesh.shape["expert"] <= 1):
        return list(entries)
    as_tuple = lambda e: () if e is None else (e,) if isinstance(e, str) else tuple(e)  # noqa: E731
    if any("expert" in as_tuple(e) for e in entries):
        return list(entries)
    out = list(entries)
    for i, e in enumerate(out):
        axes = as_tuple(e)
        if "fsdp" in axes:
            new = axes + ("expert",)
            if shape[i] % math.prod(mesh.shape[a] for a in new) == 0:
                out[i] = new
            break
    return out


def logical_to_sharding(names, shape, mesh: Mesh, rules=DEFAULT_RULES) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(names, shape, mesh, rules))


def constrain_batch(x: jax.Array) -> jax.Array:
    """Pins an activation's leading (batch) dim to ("data", "fsdp") inside jit.

    Without it GSPMD may resolve FSDP-sharded weights by all-gathering the *activations*
    over the batch and all-reducing partial matmuls (weight-stationary), which keeps a
    full-batch copy of every activation on every device. With it, weights are all-gathered
    per layer and activations stay split (FSDP as intended). A no-op unless a mesh with
    these axes is active (``with jax.set_mesh(mesh):`` around tracing) and the batch
    divides evenly, so model code (every ``Block``) calls it unconditionally.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    axes = tuple(a for a in batch_axes(mesh) if a in mesh.axis_names and mesh.shape[a] > 1)
    if not axes or x.ndim == 0 or x.shape[0] % math.prod(mesh.shape[a] for a in axes):
        return x
    return jax.lax.with_sharding_constraint(x, PartitionSpec(axes if len(axes) > 1 else axes[0]))
