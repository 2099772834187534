"""Device mesh and shardings: one mesh ("data", "fsdp", "tensor"), one rules table.

Model parameters carry *logical* axis names (nnx Variable metadata ``out_sharding``,
e.g. ``("embed", "mlp")`` for an MLP up-projection kernel [D, F]). A rules table maps
each logical name to a mesh axis (or None = replicated). Everything that places arrays
goes through this module, so a laptop (mesh 1x1x1) and a TPU pod run the same program.

Why the default rules look the way they do (``DEFAULT_RULES``):
  * "embed" -> "fsdp": FSDP / ZeRO-3. Every weight matrix has the model width D on one
    side, so sharding D over "fsdp" splits every parameter (and its Adam moments) into
    |fsdp| pieces. XLA all-gathers a layer's weights just before use and reduce-scatters
    its gradients, which costs bandwidth but scales memory with the number of chips.
  * "heads", "kv_heads", "mlp", "vocab" -> "tensor": Megatron-style tensor parallelism.
    These are the *inner* dims of attention / MLP / unembedding, so the matmuls are
    computed shard-locally and only one all-reduce per block is needed. Keep |tensor|
    within a fast interconnect domain (one host's chips / NVLink).
  * "norm" -> None: RMSNorm scales are tiny ([D] or [head_dim]); replicating them is
    cheaper than the communication sharding would cost.
  * The batch (leading dim of activations and rollouts) is split over ("data", "fsdp")
    (see ``batch_sharding``): FSDP ranks are also data-parallel ranks; "data" alone is
    pure replication of the weights (DDP) and only pays a gradient all-reduce.

A dim whose size does not divide its mesh axis size (e.g. 8 kv heads * 128 on a tensor
axis of 3) falls back to replication for that dim, with a logged note: correct, just
less memory-efficient.

Shapes: B sequences, T tokens, D model width, V vocabulary.
"""
from __future__ import annotations

import functools
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from espo_jax.models.sharding import BATCH_AXES
from espo_jax.models.sharding import DEFAULT_RULES as _MODEL_RULES
# One implementation, in the model package (every Block calls it); re-exported here.
from espo_jax.models.sharding import constrain_batch  # noqa: F401

log = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis name -> mesh axis (str, tuple of str, or None = replicated). The very
# table `from_pretrained(mesh=...)` uses by default, so loaded weights and the jitted
# train step agree on shardings without a reshard.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = _MODEL_RULES

# Variable metadata keys that may hold the logical names (flax renamed them over time).
_NAME_KEYS = ("out_sharding", "sharding_names", "sharding", "logical_axes")


# ----------------------------------------------------------------------------------
# Mesh
# ----------------------------------------------------------------------------------
def _cfg_get(cfg: Any, key: str, default: Any = None) -> Any:
    if cfg is None:
        return default
    if isinstance(cfg, Mapping):
        return cfg.get(key, default)
    return getattr(cfg, key, default)


def resolve_mesh_shape(sizes: Sequence[int], num_devices: int,
                       names: Sequence[str] = MESH_AXES) -> tuple[int, ...]:
    """Resolves at most one -1 to "the rest of the devices"; checks divisibility.

    The product may be smaller than ``num_devices`` (the first devices are used) but
    must divide it, so that a mesh never straddles devices unevenly.
    """
    sizes = [int(s) for s in sizes]
    desc = "config.mesh (" + ", ".join(f"{n}={s}" for n, s in zip(names, sizes)) + ")"
    bad = [n for n, s in zip(names, sizes) if s == 0 or s < -1]
    if bad:
        raise ValueError(f"mesh sizes must be >= 1 or -1 (= the rest); got {desc}")
    if sizes.count(-1) > 1:
        raise ValueError(f"at most one mesh axis may be -1 (= the rest); got {desc}")
    known = math.prod(s for s in sizes if s != -1)
    if known > num_devices:
        raise ValueError(f"{desc} needs {known} devices but only {num_devices} are "
                         "available")
    if num_devices % known:
        raise ValueError(
            f"{desc}: the product of the fixed sizes ({known}) does not divide the "
            f"{num_devices} available devices")
    if -1 in sizes:
        sizes[sizes.index(-1)] = num_devices // known
    return tuple(sizes)


def dcn_split(shape: Sequence[int], num_slices: int):
    """(ici_shape, dcn_shape) for a multi-slice TPU, or None for one slice.

    Only "data" may cross slices (its traffic is one gradient all-reduce per update);
    FSDP and tensor collectives stay on the fast in-slice ICI.
    """
    if num_slices <= 1:
        return None
    if shape[0] % num_slices:
        log.warning("config.mesh.data=%d is not a multiple of the %d TPU slices: FSDP/tensor "
                    "traffic will cross the slow links between slices; prefer data=-1 with "
                    "fsdp = chips per slice", shape[0], num_slices)
        return None
    return (shape[0] // num_slices, *shape[1:]), (num_slices,) + (1,) * (len(shape) - 1)


def make_mesh(mesh_cfg: Any = None, *, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Builds the ("data", "fsdp", "tensor") mesh.

    Args:
      mesh_cfg: anything with ``.data``, ``.fsdp``, ``.tensor`` (ConfigDict, dict,
        dataclass); -1 = the rest of the devices; missing keys default to 1, and
        ``None`` means fsdp over all devices.
      devices: defaults to ``jax.devices()`` (all processes' devices).
    """
    devices = list(jax.devices() if devices is None else devices)
    if mesh_cfg is None:
        sizes = (1, -1, 1)
    else:
        sizes = tuple(_cfg_get(mesh_cfg, a, 1) for a in MESH_AXES)
    shape = resolve_mesh_shape(sizes, len(devices))
    n = math.prod(shape)
    if n < len(devices) and jax.process_count() > 1:
        raise ValueError(
            f"mesh {dict(zip(MESH_AXES, shape))} uses {n} of {len(devices)} devices; in a "
            f"multi-host run ({jax.process_count()} processes) the mesh must span all "
            "devices (use -1 on one axis)")
    if n < len(devices):
        log.info("mesh %s uses the first %d of %d devices", shape, n, len(devices))
    devs = devices[:n]
    arr = None
    if n == len(jax.devices()):  # topology-aware order (TPU ICI rings, GPU NVLink islands)
        from jax.experimental import mesh_utils
        on_tpu = devs[0].platform == "tpu"
        slices = dcn_split(shape, len({getattr(d, "slice_index", 0) for d in devs})) \
            if on_tpu else None
        try:
            if slices is not None:  # multi-slice TPU: "data" crosses the slow DCN links
                arr = mesh_utils.create_hybrid_device_mesh(slices[0], slices[1], devices=devs)
            else:
                arr = mesh_utils.create_device_mesh(shape, devices=devs)
        except Exception as e:  # noqa: BLE001 - odd topology: plain order is still correct
            log.info("mesh_utils device mesh failed (%s); using device order", e)
    if arr is None:
        arr = np.asarray(devs, dtype=object).reshape(shape)
    auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    return Mesh(arr, MESH_AXES, axis_types=auto)


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
    return P(*spec)


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


def batch_sharding(mesh: Mesh, ndim: int | None = None) -> NamedSharding:
    """Leading (batch) dim over ("data", "fsdp"); other dims replicated.

    ``ndim`` is accepted for readability only: a spec shorter than the array's rank
    leaves the remaining dims replicated.
    """
    del ndim
    return NamedSharding(mesh, P(BATCH_AXES))


def under_mesh(fn, mesh: Mesh | None):
    """Wraps a jitted ``fn`` so it is traced and called inside ``jax.set_mesh(mesh)`` (what
    ``constrain_batch`` needs); ``.lower`` is kept for AOT. ``mesh=None`` returns ``fn``.

    Scope the mesh to the jitted calls only: ``nnx.eval_shape`` (model loading) under a
    global mesh reads the logical axis names as mesh axes and fails.
        train_step = under_mesh(make_train_step(...), mesh)
    """
    if mesh is None:
        return fn

    @functools.wraps(fn)
    def call(*args, **kwargs):
        with jax.set_mesh(mesh):
            return fn(*args, **kwargs)

    if hasattr(fn, "lower"):
        def lower(*args, **kwargs):
            with jax.set_mesh(mesh):
                return fn.lower(*args, **kwargs)
        call.lower = lower
    return call


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_divisor(mesh: Mesh) -> int:
    """How many ways the batch is split: |data| * |fsdp|."""
    return mesh.shape["data"] * mesh.shape["fsdp"]


def check_batch(batch_size: int, mesh: Mesh, what: str = "batch") -> None:
    """Raises a clear error if ``batch_size`` cannot be split over ("data", "fsdp")."""
    d = batch_divisor(mesh)
    if batch_size % d:
        raise ValueError(
            f"{what} size {batch_size} is not divisible by mesh.data*mesh.fsdp = "
            f"{mesh.shape['data']}*{mesh.shape['fsdp']} = {d}; change the batch size "
            "(prompts per step x num_samples, or the minibatch size) or the mesh")


def shard_batch(tree: Any, mesh: Mesh) -> Any:
    """Places a single-host batch pytree with the leading dim over ("data","fsdp").

    0-d leaves are replicated. For multi-host input use
    ``distributed.host_local_to_global`` instead (each host passes only its rows).
    """
    bs, rep = batch_sharding(mesh), replicated(mesh)
    return jax.tree.map(lambda x: jax.device_put(x, bs if np.ndim(x) else rep), tree)


def sharded_decode_fn(mesh: Mesh):
    """A ``decode_fn`` for ``espo_jax.rollout.generate`` that splits the rollout batch.

    Rows (prompts x G samples) and the KV cache go over ("data", "fsdp"); parameters
    stay as they are placed. Batches that do not divide data*fsdp (e.g. a small eval
    set) fall back to the default jitted decode. With ``jax_threefry_partitionable``
    the sampled tokens are the same as on one device.
        ro = generate(model, prompts, ..., decode_fn=sharded_decode_fn(mesh))
    """
    from espo_jax.rollout import STATIC_ARGNUMS, decode  # noqa: PLC0415 (train uses rollout)
    from espo_jax.rollout import decode_jit  # noqa: PLC0415

    rows = batch_sharding(mesh)
    sharded = jax.jit(decode, static_argnums=STATIC_ARGNUMS,
                      in_shardings=(None, rows, rows, None, None, None, None),
                      out_shardings=(rows, rows, rows))
    div = batch_divisor(mesh)

    def decode_fn(graphdef, options, state, prompt_ids, *rest):
        fn = sharded if div > 1 and prompt_ids.shape[0] % div == 0 else decode_jit
        return fn(graphdef, options, state, prompt_ids, *rest)

    return decode_fn


# ----------------------------------------------------------------------------------
# Shape first, then shard, then initialise: no full copy on one device
# ----------------------------------------------------------------------------------
def abstract_state(state: Any, shardings: Any) -> Any:
    """Replaces every array in ``state`` by a ShapeDtypeStruct carrying its sharding
    (the input of ``jax.jit(...).lower`` for an AOT compile; works on eval_shape'd
    states)."""
    def one(x, s):
        if _is_var(x):
            v = x.get_value()
            return x.replace(jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s.get_value()))
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)
    return jax.tree.map(one, state, shardings, is_leaf=_is_var)


def init_sharded(init_fn, mesh: Mesh, rules: Any = None):
    """Creates an nnx module directly in its shardings.

    ``init_fn() -> nnx.Module`` (e.g. ``lambda: Decoder(cfg, rngs=nnx.Rngs(0))``) is first
    run abstractly (``nnx.eval_shape``) to read shapes and logical names, then jitted
    with ``out_shardings`` so that each device materialises only its own shards.
    Returns the module.
    """
    abstract = nnx.eval_shape(init_fn)
    graphdef, abs_state = nnx.split(abstract)
    shardings = param_shardings(abs_state, mesh, rules)

    def _init():
        return nnx.split(init_fn())[1]

    state = jax.jit(_init, out_shardings=shardings)()
    return nnx.merge(graphdef, state)


def shard_module(model: nnx.Module, mesh: Mesh, rules: Any = None) -> nnx.Module:
    """Moves an existing (host / single-device) module's state into its shardings, in place."""
    state = nnx.state(model)
    nnx.update(model, jax.device_put(state, param_shardings(state, mesh, rules)))
    return model


def describe_shardings(shardings: Any) -> str:
    """One line per array: path, spec (for logs and debugging)."""
    flat = jax.tree_util.tree_flatten_with_path(shardings)[0]
    return "\n".join(f"{'/'.join(_norm_path(p))}: {s.spec}" for p, s in flat
                     if isinstance(s, NamedSharding))


def per_device_bytes(tree: Any) -> int:
    """Bytes held by the most-loaded device for a pytree of placed jax.Arrays."""
    use: dict[Any, int] = {}
    for x in jax.tree.leaves(tree):
        for sh in getattr(x, "addressable_shards", ()):
            use[sh.device] = use.get(sh.device, 0) + sh.data.nbytes
    return max(use.values(), default=0)
