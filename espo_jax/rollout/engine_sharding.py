"""The rollout engine on a device mesh: where its weights and rows live.

``decode_model`` makes the decode copy of the weights once per rollout (compute dtype,
FSDP / data / expert splits gathered, tensor-parallel splits kept); ``sharded_engine_fn``
runs one ``engine.engine_decode`` per batch shard (rows split over the batch axes: data,
fsdp, expert; each device with its own slots and loop, ``shard_options``); ``model_mesh``
finds the mesh from a model's weights, ``mesh_engine_fn`` the engine_fn for it.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from espo_jax.models.sharding import batch_axes
from espo_jax.rollout.engine import default_decode_sizes, engine_decode, engine_jit


def shard_options(options, shards: int):
    """The ``EngineOptions`` each of ``shards`` devices runs over its rows: ceil(K / shards)
    slots and their drain sizes (the dry run compiles these)."""
    k = -(-options.max_concurrent // int(shards))
    return dataclasses.replace(options, max_concurrent=k, decode_sizes=default_decode_sizes(k))


@functools.lru_cache(maxsize=8)
def sharded_engine_fn(mesh, axes: tuple[str, ...] | None = None):
    """An ``engine_fn`` for ``generate`` that runs one engine per batch shard: the rows
    split over ``axes`` of ``mesh`` (contiguous blocks; default the training batch's axes,
    ``models.sharding.batch_axes``: data, fsdp, and expert where it splits: every device
    holds all the decode weights, so no device repeats another's rows), each device
    decodes its rows with its own ceil(K / shards) slots and its own loop (no cross-device
    sync per token), keys from the global row indices (``row_ids``, default arange(B):
    the same tokens as on one device). Weights enter replicated (pass ``decode_model``'s
    copy; a TP split is gathered at entry). Batches that do not divide the shards use
    ``engine_jit``. Cached per (mesh, axes), so the training rollout and evaluation share
    one compiled program.
    """
    from jax.sharding import PartitionSpec as P  # noqa: PLC0415

    axes = batch_axes(mesh) if axes is None else axes
    axes = tuple(a for a in axes if a in mesh.shape and mesh.shape[a] > 1)
    shards = int(np.prod([mesh.shape[a] for a in axes])) if axes else 1
    rows = P(axes if len(axes) > 1 else (axes[0] if axes else None))

    @functools.partial(jax.jit, static_argnums=(0, 1))
    def run(graphdef, options, state, prompts, prompt_len, budgets, key, temperature, top_p,
            eos_ids, row_ids):
        body = functools.partial(engine_decode, graphdef, options)
        return jax.shard_map(
            body, mesh=mesh, check_vma=False,
            in_specs=(P(), rows, rows, rows, P(), P(), P(), P(), rows),
            out_specs=(rows,) * (5 if options.routed_width else 4))(
                state, prompts, prompt_len, budgets, key, temperature, top_p, eos_ids, row_ids)

    def fn(graphdef, options, state, prompts, prompt_len, budgets, key, temperature, top_p,
           eos_ids, row_ids=None):  # engine_decode's signature
        b = prompts.shape[0]
        rest = (prompt_len, budgets, key, temperature, top_p, eos_ids)
        if row_ids is None:
            row_ids = jnp.arange(b, dtype=jnp.int32)
        if shards == 1 or b % shards:
            return engine_jit(graphdef, options, state, prompts, *rest, row_ids)
        return run(graphdef, shard_options(options, shards), state, prompts, *rest, row_ids)

    return fn


def model_mesh(model: nnx.Module):
    """The mesh the model's weights are placed on (their ``NamedSharding``'s), or None."""
    for leaf in jax.tree.leaves(nnx.state(model)):
        sh = getattr(leaf, "sharding", None)
        if isinstance(sh, jax.sharding.NamedSharding):
            return sh.mesh
    return None


def mesh_engine_fn(mesh):
    """``sharded_engine_fn`` on a mesh of more than one device, else None (``engine_jit``):
    what the training rollout uses, for callers that only hold the model (evaluation,
    with ``model_mesh``)."""
    return sharded_engine_fn(mesh) if mesh is not None and mesh.size > 1 else None


def decode_model(model: nnx.Module, mesh=None) -> nnx.Module:
    """The decode copy of a model, made once per rollout: float params cast to the compute
    dtype (``model.dtype``), and params placed on a mesh (``NamedSharding``; ``mesh``
    overrides theirs) resharded so that only tensor-parallel ("tensor") splits remain:
    the FSDP / data splits of the training state are gathered ONCE here, not per decoded
    token. Free it (drop the reference) after the rollout. Returns ``model`` itself when
    nothing changes (compute-dtype params, no FSDP / data splits).
    """
    graphdef, state = nnx.split(model)
    dt = jnp.dtype(model.dtype)

    def tp_only(x):
        sh = getattr(x, "sharding", None)
        if not isinstance(sh, jax.sharding.NamedSharding):
            return None
        keep = []
        for axes in sh.spec:
            names = (axes,) if isinstance(axes, str) else tuple(axes or ())
            names = tuple(a for a in names if a == "tensor")
            keep.append(names[0] if names else None)
        return jax.sharding.NamedSharding(mesh if mesh is not None else sh.mesh,
                                          jax.sharding.PartitionSpec(*keep))

    changed = False

    def convert(x):
        nonlocal changed
        if not isinstance(x, jax.Array):
            return x
        y = x.astype(dt) if jnp.issubdtype(x.dtype, jnp.floating) and x.dtype != dt else x
        target = tp_only(x)
        if target is not None and not x.sharding.is_equivalent_to(target, x.ndim):
            y = jax.device_put(y, target)
        changed |= y is not x
        return y

    new = jax.tree.map(convert, state)
    return nnx.merge(graphdef, new) if changed else model
