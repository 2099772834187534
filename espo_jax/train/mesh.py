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
  * "experts" -> "expert": the stacked [E, ...] MoE expert weights are split over the
    "expert" axis (expert parallelism); the batch is then split over it too.
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
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from espo_jax.models.sharding import batch_axes
# One implementation, in the model package (every Block calls it); re-exported here.
from espo_jax.models.sharding import constrain_batch  # noqa: F401
# The rules -> specs -> shardings half of this module (re-exported: import from here).
from espo_jax.train.sharding_rules import (  # noqa: F401
    _NAME_KEYS, DEFAULT_RULES, MESH_AXES, _axis_size, _is_var, _norm_path, _path_str,
    logical_to_spec, normalize_rules, opt_state_shardings, param_shardings,
    variable_logical_axes)

log = logging.getLogger(__name__)


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
    """Builds the ("data", "fsdp", "tensor", "expert") mesh.

    Args:
      mesh_cfg: anything with ``.data``, ``.fsdp``, ``.tensor`` (ConfigDict, dict,
        dataclass); -1 = the rest of the devices; missing keys default to 1, and
        ``None`` means fsdp over all devices.
      devices: defaults to ``jax.devices()`` (all processes' devices).
    """
    devices = list(jax.devices() if devices is None else devices)
    if mesh_cfg is None:
        sizes = (1, -1, 1, 1)
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


def batch_sharding(mesh: Mesh, ndim: int | None = None) -> NamedSharding:
    """Leading (batch) dim over ("data", "fsdp"); other dims replicated.

    ``ndim`` is accepted for readability only: a spec shorter than the array's rank
    leaves the remaining dims replicated.
    """
    del ndim
    return NamedSharding(mesh, P(batch_axes(mesh)))


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


def batch_divisor(mesh: Mesh | None) -> int:
    """How many ways the batch is split: |data| * |fsdp| (* |expert|); 1 without a mesh."""
    if mesh is None:
        return 1
    return math.prod(mesh.shape[a] for a in batch_axes(mesh) if a in mesh.shape)


def check_batch(batch_size: int, mesh: Mesh, what: str = "batch") -> None:
    """Raises a clear error if ``batch_size`` cannot be split over ("data", "fsdp")."""
    d = batch_divisor(mesh)
    if batch_size % d:
        raise ValueError(
            f"{what} size {batch_size} is not divisible by mesh.data*mesh.fsdp = "
            f"{mesh.shape['data']}*{mesh.shape['fsdp']}"
            + (f"*expert {mesh.shape['expert']}" if len(batch_axes(mesh)) > 2 else "")
            + f" = {d}; change the batch size "
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
                      in_shardings=(None, rows, rows, None, None, None, None, rows, rows),
                      out_shardings=rows)  # every output (3, or 4 for MoE) row-split
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
