"""TrainState: the policy's parameters, optimizer state, update counter, frozen reference.

The model's structure (an ``nnx.GraphDef``) is static; the arrays are pytree leaves, so a
``TrainState`` passes through ``jax.jit`` (and is donated by ``train_step``).
"""
from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx


@flax.struct.dataclass
class TrainState:
    """params: nnx.State of the trainable ``nnx.Param``s; rest: the model's other state
    (usually empty); opt_state: optax state; step: i32[] applied optimizer updates;
    ref_params: frozen copy of the initial params (only when the KL term is on) or None."""

    graphdef: Any = flax.struct.field(pytree_node=False)
    params: Any
    rest: Any
    opt_state: Any
    step: jax.Array
    ref_params: Any = None

    def model(self, params=None):
        """The policy as an nnx module (``params`` overrides, e.g. the reference)."""
        return nnx.merge(self.graphdef, self.params if params is None else params, self.rest)

    def compute_model(self):
        """The policy with its float params cast ONCE to the compute dtype (``model.dtype``),
        for the rollout and evaluation: the sampler then reads bf16 weights at every decode
        step instead of casting the f32 masters per token. The state's own arrays when the
        dtypes already agree (e.g. float32 compute)."""
        model = self.model()
        dt = jnp.dtype(model.dtype)

        def cast(x):
            if jnp.issubdtype(x.dtype, jnp.floating) and x.dtype != dt:
                return x.astype(dt)
            return x

        if all(x.dtype == dt or not jnp.issubdtype(x.dtype, jnp.floating)
               for x in jax.tree.leaves(self.params)):
            return model
        return nnx.merge(self.graphdef, jax.tree.map(cast, self.params), self.rest)


def split_model(model: nnx.Module):
    """(graphdef, params, rest) with params = the ``nnx.Param`` state."""
    return nnx.split(model, nnx.Param, ...)


def create_state(model: nnx.Module, tx: optax.GradientTransformation, *, with_ref: bool = False,
                 shardings: "TrainState | None" = None) -> TrainState:
    """A fresh TrainState; with ``shardings`` (see ``state_shardings``) every array is
    created directly in its sharding (the optimizer state under jit with out_shardings)."""
    graphdef, params, rest = split_model(model)

    def init(params, rest):
        ref = jax.tree.map(jnp.copy, params) if with_ref else None
        return TrainState(graphdef=graphdef, params=params, rest=rest,
                          opt_state=tx.init(params), step=jnp.zeros((), jnp.int32),
                          ref_params=ref)

    if shardings is None:  # eager (no compile); copies, since train_step donates the state
        return init(jax.tree.map(jnp.copy, params), rest)
    return jax.jit(init, in_shardings=(shardings.params, shardings.rest),
                   out_shardings=shardings)(params, rest)


def state_shardings(model: nnx.Module, tx: optax.GradientTransformation, mesh, *,
                    with_ref: bool = False, param_shardings_fn=None,
                    opt_shardings_fn=None) -> TrainState:
    """A TrainState-shaped pytree of shardings: params (and the reference) as the mesh rules
    say, optimizer moments like their parameters, scalars replicated.

    ``param_shardings_fn(params_state, mesh)`` maps an nnx.State with logical-axis metadata
    to NamedShardings (``espo_jax.train.mesh.param_shardings``); None replicates everything.
    ``opt_shardings_fn(abstract_opt_state, param_shardings, mesh)``
    (``espo_jax.train.mesh.opt_state_shardings``); None: optax.tree_map_params.
    """
    from jax.sharding import NamedSharding, PartitionSpec  # noqa: PLC0415

    replicated = NamedSharding(mesh, PartitionSpec())
    graphdef, params, rest = split_model(model)
    if param_shardings_fn is None:
        p_sh = jax.tree.map(lambda _: replicated, params)
    else:
        p_sh = param_shardings_fn(params, mesh)
    r_sh = jax.tree.map(lambda _: replicated, rest)
    abstract_opt = jax.eval_shape(tx.init, params)
    if opt_shardings_fn is not None:
        o_sh = opt_shardings_fn(abstract_opt, p_sh, mesh)
    else:
        o_sh = optax.tree_map_params(tx, lambda _, s: s, abstract_opt, p_sh,
                                     transform_non_params=lambda _: replicated)
    return TrainState(graphdef=graphdef, params=p_sh, rest=r_sh, opt_state=o_sh,
                      step=replicated, ref_params=p_sh if with_ref else None)
