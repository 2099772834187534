"""Logical axis rules -> PartitionSpecs, and pytrees of shardings for parameters and the
optimizer state (re-exported by ``espo_jax.train.mesh``, the module to import).

Shapes: D model width, V vocabulary.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from espo_jax.models.sharding import DEFAULT_RULES as _MODEL_RULES
from espo_jax.models.sharding import extend_fsdp_over_expert

log = logging.getLogger("espo_jax.train.mesh")

# "expert" is last so that configs and code written for three axes keep their meaning;
# expert-parallel groups are then the mesh's innermost (closest) devices.
MESH_AXES = ("data", "fsdp", "tensor", "expert")

# logical axis name -> mesh axis (str, tuple of str, or None = replicated). The very
# table `from_pretrained(mesh=...)` uses by default, so loaded weights and the jitted
# train step agree on shardings without a reshard.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = _MODEL_RULES

# Variable metadata keys that may hold the logical names (flax renamed them over time).
_NAME_KEYS = ("out_sharding", "sharding_names", "sharding", "logical_axes")


# ----------------------------------------------------------------------------------
# Rules -> PartitionSpec
# ----------------------------------------------------------------------------------
def normalize_rules(rules: Any) -> dict[str, Any]:
    """Rules as a dict logical -> mesh axis / tuple / None.

    Accepts a mapping, a sequence of (logical, mesh) pairs (first match wins, like
    flax's logical axis rules) or a ConfigDict. Mesh axes must be in ``MESH_AXES``.
    """
    if rules is None:
        rules = DEFAULT_RULES
    if hasattr(rules, "to_dict"):
        rules = rules.to_dict()
    items = rules.items() if isinstance(rules, Mapping) else rules
    out: dict[str, Any] = {}
    for pair in items:
        try:
            name, axis = pair
        except (TypeError, ValueError):
            raise ValueError(f"sharding rule {pair!r}: expected (logical_name, mesh_axis)") from None
        if isinstance(axis, list):
            axis = tuple(axis)
        if axis in ("", "none", "None"):
            axis = None
        for a in (axis if isinstance(axis, tuple) else (axis,)):
            if a is not None and a not in MESH_AXES:
                raise ValueError(
                    f"sharding rule {name!r} -> {axis!r}: unknown mesh axis {a!r}; "
                    f"expected one of {MESH_AXES} or None")
        out.setdefault(str(name), axis)
    return out


def _axis_size(mesh: Mesh | None, axis: Any) -> int:
    if mesh is None or axis is None:
        return 1
    axes = axis if isinstance(axis, tuple) else (axis,)
    return math.prod(mesh.shape[a] for a in axes)


def logical_to_spec(names: Sequence[str | None] | None, rules: Any = None, *,
                    shape: Sequence[int] | None = None, mesh: Mesh | None = None,
                    where: str = "") -> P:
    """Maps logical axis names to a PartitionSpec.

    ``shape`` + ``mesh`` enable the safety checks: a dim whose size does not divide its
    mesh axis size is replicated (logged), size-1 mesh axes are dropped (a cleaner spec),
    and a mesh axis already used by an earlier dim is not used twice.
    Unknown logical names are replicated with a warning.
    """
    if not names:
        return P()
    rules = normalize_rules(rules)
    if shape is not None and len(shape) != len(names):
        raise ValueError(f"{where or 'array'}: logical axes {tuple(names)} do not match "
                         f"shape {tuple(shape)} (rank {len(shape)})")
    used: set[str] = set()
    spec: list[Any] = []
    for i, name in enumerate(names):
        if name is None:
            spec.append(None)
            continue
        if name not in rules:
            log.warning("%s: logical axis %r has no sharding rule; replicated", where or "array",
                        name)
            spec.append(None)
            continue
        axis = rules[name]
        axes = tuple(a for a in (axis if isinstance(axis, tuple) else (axis,)) if a is not None)
        if mesh is not None:  # size-1 axes shard nothing; keep the spec minimal
            axes = tuple(a for a in axes if mesh.shape.get(a, 1) > 1)
        if any(a in used for a in axes):
            log.info("%s: mesh axis of %r already used by another dim; dim %d replicated",
                     where or "array", name, i)
            axes = ()
        if axes and shape is not None and mesh is not None:
            size = _axis_size(mesh, axes)
            if shape[i] % size:
                log.info("%s: dim %d (%r, size %d) does not divide mesh %s (size %d); "
                         "replicated", where or "array", i, name, shape[i], axes, size)
                axes = ()
        used.update(axes)
        spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return P(*extend_fsdp_over_expert(spec, shape, mesh))


def variable_logical_axes(v: Any) -> tuple[str | None, ...] | None:
    """The logical axis names of an nnx Variable (None when it has none)."""
    if not isinstance(v, nnx.Variable):
        return None
    md = v.get_metadata()
    for key in _NAME_KEYS:
        names = md.get(key)
        if names:
            if isinstance(names, P):
                names = tuple(names)
            return tuple(names)
    return None


def _path_str(path: Iterable[Any]) -> str:
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


def _is_var(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


# ----------------------------------------------------------------------------------
# Pytrees of shardings
# ----------------------------------------------------------------------------------
def param_shardings(state: Any, mesh: Mesh, rules: Any = None) -> Any:
    """NamedSharding pytree with the same structure as ``state``.

    ``state``: an nnx.State (from ``nnx.split`` / ``nnx.state`` / ``nnx.eval_shape``),
    or any pytree containing nnx Variables. Each Variable is replaced by a copy whose
    value is its NamedSharding (exactly what ``jax.jit(in_shardings=...)``,
    ``jax.device_put`` and orbax restore args expect for such a state). Variables
    without logical names and plain array leaves (e.g. optimizer step counts) are
    replicated. Works for optimizer state from ``nnx.Optimizer`` too: its moments are
    ``OptVariable``s that carry the parameters' logical names.
    """
    rules = normalize_rules(rules)
    replicated = NamedSharding(mesh, P())

    def one(path, x):
        if _is_var(x):
            value = x.get_value()
            shape = getattr(value, "shape", None)
            names = variable_logical_axes(x)
            if names is None or shape is None:
                spec = P()
            elif len(names) != len(shape):
                raise ValueError(f"{_path_str(path)}: logical axes {names} do not match "
                                 f"shape {tuple(shape)}")
            else:
                spec = logical_to_spec(names, rules, shape=shape, mesh=mesh,
                                       where=_path_str(path))
            return x.replace(NamedSharding(mesh, spec))
        return replicated

    return jax.tree_util.tree_map_with_path(one, state, is_leaf=_is_var)


def _norm_path(path: Iterable[Any]) -> tuple[str, ...]:
    parts = _path_str(path).split("/") if path else []
    while parts and parts[-1] in ("value", "raw_value", "_value"):
        parts.pop()
    return tuple(parts)


def opt_state_shardings(opt_state: Any, params_shardings: Any, mesh: Mesh | None = None) -> Any:
    """Shardings for optimizer state: moments mirror the params, scalars replicated.

    Works for a raw optax state (tuples of ScaleByAdamState(count, mu, nu) whose mu/nu
    are pytrees shaped like the params) and for ``nnx.state(nnx.Optimizer)``. Each
    array leaf whose key path *ends with* a parameter's key path and whose shape fits
    that parameter's spec gets the parameter's sharding; everything else (step counts,
    schedule state, factored moments) is replicated.

    Args:
      opt_state: pytree of arrays / ShapeDtypeStructs / Variables (abstract is fine).
      params_shardings: the output of ``param_shardings`` (or any pytree of
        NamedSharding keyed like the params).
    """
    flat = jax.tree_util.tree_flatten_with_path(params_shardings)[0]
    by_path = {_norm_path(p): s for p, s in flat if isinstance(s, NamedSharding)}
    if mesh is None:
        if not by_path:
            raise ValueError("opt_state_shardings: params_shardings holds no NamedSharding "
                             "and no mesh was given")
        mesh = next(iter(by_path.values())).mesh
    replicated = NamedSharding(mesh, P())
    max_len = max((len(k) for k in by_path), default=0)

    def fits(spec: P, shape: Sequence[int]) -> bool:
        if len(spec) > len(shape):
            return False
        return all(shape[i] % _axis_size(mesh, a) == 0 for i, a in enumerate(spec))

    def one(path, x):
        if _is_var(x):
            return x.replace(one(path, x.get_value()))
        shape = getattr(x, "shape", None)
        if shape is None or len(shape) == 0:
            return replicated
        key = _norm_path(path)
        for n in range(min(len(key), max_len), 0, -1):
            s = by_path.get(key[-n:])
            if s is not None and fits(s.spec, shape):
                return s
        return replicated

    return jax.tree_util.tree_map_with_path(one, opt_state, is_leaf=_is_var)
