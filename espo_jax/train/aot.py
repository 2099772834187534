"""Ahead-of-time compiles of an RL step's phases from abstract values (no weights, no data):
the shapes a config plans, the abstract train state and batches on a mesh, and XLA's
per-device memory of the compiled train step, scoring pass and rollout. Used by the dry
run (``espo_jax.train.dry_run``) and the AOT tests."""
from __future__ import annotations

import dataclasses
import math
import os
import time

PHASES = ("train_step", "score", "rollout")
FIELDS = ("argument", "temp", "output", "alias", "total")


# ------------------------------------------------------------------------------ plan --
@dataclasses.dataclass(frozen=True)
class Shapes:
    """Rows and lengths of the compiled computations."""
    rollout_rows: int      # prompts_per_step * group_size (rollout and scoring batch)
    minibatch_rows: int    # one train_step's batch
    micro_batch: int       # global micro-batch rows (0 = the whole (mini)batch at once)
    prompt_len: int        # bucketed prompt length P
    response_len: int      # N


def plan_shapes(config, batch_devices: int, max_positions: int | None = None) -> Shapes:
    from espo_jax.rollout import bucket_length  # noqa: PLC0415
    from espo_jax.train.validate import micro_batch_size  # noqa: PLC0415

    r = config.rollout
    rows = int(r.prompts_per_step) * int(r.group_size)
    p = bucket_length(int(config.plan.prompt_len))
    n = int(config.plan.response_len) or int(r.max_new_tokens)
    if max_positions is not None and p + n > max_positions:
        raise ValueError(
            f"plan.prompt_len={config.plan.prompt_len} (bucketed to {p}) + response length {n} "
            f"(plan.response_len or rollout.max_new_tokens) = {p + n} > the model's "
            f"max_position_embeddings={max_positions}; lower plan.prompt_len or the response "
            "length")
    return Shapes(rollout_rows=rows, minibatch_rows=rows // int(config.train.num_minibatches),
                  micro_batch=micro_batch_size(config, batch_devices), prompt_len=p,
                  response_len=n)


def model_config(config, num_layers: int | None = None):
    """ModelConfig from model.path/config.json with the config's model overrides (every
    ``model.*`` key that is a ModelConfig field, e.g. remat) and an optional depth."""
    from espo_jax.models import ModelConfig  # noqa: PLC0415

    fields = {f.name for f in dataclasses.fields(ModelConfig)} - {"hf_config"}
    kw = {k: v for k, v in config.model.items() if k in fields}
    if num_layers is not None:
        kw["num_layers"] = int(num_layers)
    return ModelConfig.from_hf(os.path.join(config.model.path, "config.json"), **kw)


def memory(compiled) -> dict:
    """Per-device bytes of a compiled computation (XLA's memory analysis)."""
    m = compiled.memory_analysis()
    if m is None:  # a backend without memory analysis
        return {k: 0 for k in FIELDS}
    out = dict(argument=int(m.argument_size_in_bytes), temp=int(m.temp_size_in_bytes),
               output=int(m.output_size_in_bytes), alias=int(m.alias_size_in_bytes))
    out["total"] = out["argument"] + out["output"] - out["alias"] + out["temp"]
    return out


def _bytes_per_device(tree) -> int:
    """Bytes one device holds of a pytree of ShapeDtypeStructs with NamedShardings."""
    import jax  # noqa: PLC0415

    total = 0
    for x in jax.tree.leaves(tree):
        shape = x.sharding.shard_shape(x.shape) if getattr(x, "sharding", None) else x.shape
        total += math.prod(shape) * x.dtype.itemsize
    return total


# --------------------------------------------------------------------------- compile --
def build(config, mesh, num_layers: int | None = None) -> dict:
    """Abstract model, optimizer, state shardings and the product's jitted functions
    (``make_train_step`` / ``make_score_fn`` / the sharded ``decode``), nothing allocated."""
    import jax  # noqa: PLC0415
    from flax import nnx  # noqa: PLC0415

    from espo_jax.models import Decoder  # noqa: PLC0415
    from espo_jax.models.dtypes import canonical_dtype  # noqa: PLC0415
    from espo_jax.train import mesh as mesh_lib  # noqa: PLC0415
    from espo_jax.train.optim import make_optimizer  # noqa: PLC0415
    from espo_jax.train.setup import objective_hparams  # noqa: PLC0415
    from espo_jax.train.state import state_shardings  # noqa: PLC0415
    from espo_jax.train.step import make_score_fn, make_train_step  # noqa: PLC0415
    from espo_jax.train.validate import micro_batch_size  # noqa: PLC0415

    cfg = model_config(config, num_layers)
    dtype = canonical_dtype(config.model.dtype)
    pdtype = canonical_dtype(config.model.param_dtype)
    model = nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0), dtype=dtype,
                                           param_dtype=pdtype))
    # What the rollout samples with: the params cast once to the compute dtype
    # (TrainState.compute_model).
    sampler = nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0), dtype=dtype,
                                             param_dtype=dtype))
    tx = make_optimizer(config.train)
    with_ref = float(config.train.beta) > 0
    sh = state_shardings(model, tx, mesh, with_ref=with_ref,
                         param_shardings_fn=mesh_lib.param_shardings,
                         opt_shardings_fn=mesh_lib.opt_state_shardings)
    rows = mesh_lib.batch_sharding(mesh)
    micro = micro_batch_size(config, mesh_lib.batch_divisor(mesh))
    chunk, temp = int(config.score.chunk_size), float(config.rollout.temperature)
    graphdef = sh.graphdef
    score = make_score_fn(graphdef, chunk_size=chunk, temperature=temp, micro_batch_size=micro,
                          param_shardings=sh.params, rest_shardings=sh.rest,
                          batch_sharding=rows)
    step = make_train_step(tx, config.objective.name,
                           objective_hparams(config, int(cfg.vocab_size)), chunk_size=chunk,
                           temperature=temp, micro_batch_size=micro, state_shardings=sh,
                           batch_sharding=rows)
    from espo_jax.rollout import STATIC_ARGNUMS, decode  # noqa: PLC0415

    decode_jit = jax.jit(decode, static_argnums=STATIC_ARGNUMS,
                         in_shardings=(None, rows, rows, None, None, None, None, rows, rows),
                         out_shardings=rows)  # 3 outputs, or 4 for MoE
    return dict(cfg=cfg, model=model, sampler=sampler, tx=tx, shardings=sh, rows=rows,
                score=mesh_lib.under_mesh(score, mesh), train_step=mesh_lib.under_mesh(step, mesh),
                decode=decode_jit, with_ref=with_ref)


def abstract_state(b: dict):
    """The TrainState as ShapeDtypeStructs carrying their shardings."""
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415
    from flax import nnx  # noqa: PLC0415

    from espo_jax.train.mesh import abstract_state as sds_state  # noqa: PLC0415
    from espo_jax.train.state import TrainState  # noqa: PLC0415

    sh = b["shardings"]
    _, params, rest = nnx.split(b["model"], nnx.Param, ...)
    sds = lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)  # noqa: E731
    params_sds = sds_state(params, sh.params)
    return TrainState(
        graphdef=sh.graphdef, params=params_sds, rest=sds_state(rest, sh.rest),
        opt_state=jax.tree.map(sds, jax.eval_shape(b["tx"].init, params), sh.opt_state),
        step=jax.ShapeDtypeStruct((), jnp.int32, sharding=sh.step),
        ref_params=sds_state(params, sh.ref_params) if b["with_ref"] else None)


def abstract_batch(config, b: dict, rows: int, shapes: Shapes, *, train: bool) -> dict:
    """The step.py batch layout as ShapeDtypeStructs (rows split over the batch axes)."""
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415

    p, n, s = shapes.prompt_len, shapes.response_len, b["rows"]
    spec = dict(prompt_tokens=((rows, p), jnp.int32), prompt_mask=((rows, p), jnp.int32),
                tokens=((rows, n), jnp.int32))
    if train:
        spec.update(mask=((rows, n), jnp.float32), old_logp=((rows, n), jnp.float32),
                    entropy=((rows, n), jnp.float32), advantages=((rows,), jnp.float32))
        if b["with_ref"]:
            spec["ref_logp"] = ((rows, n), jnp.float32)
        if (config.objective.name == "espo"
                and config.objective.espo.get("grouping", "top_fraction") != "token"):
            spec["groups"] = ((rows, n), jnp.int32)   # score_phase.espo_groups
        if config.rollout_correction.mode != "off":
            spec["is_weights"] = ((rows, n), jnp.float32)
    return {k: jax.ShapeDtypeStruct(shape, dt, sharding=s) for k, (shape, dt) in spec.items()}


# Nothing compiled here runs. On CPU: schedule for memory, as the TPU/GPU schedulers do
# (XLA:CPU's default schedule favours concurrency and keeps rematerialised activations
# alive: jax.checkpoint then saves nothing), and skip LLVM's optimisations (about 40% of
# the compile time; buffer assignment, so every memory figure, is decided before them).
CPU_COMPILE_OPTIONS = {"xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED",
                        "xla_backend_optimization_level": 0,
                        "xla_llvm_disable_expensive_passes": True}


def _timed(lowerable, *args):
    import jax  # noqa: PLC0415

    opts = CPU_COMPILE_OPTIONS if jax.default_backend() == "cpu" else None
    t0 = time.perf_counter()
    compiled = lowerable.lower(*args).compile(compiler_options=opts)
    return compiled, time.perf_counter() - t0


def compile_phases(config, mesh, shapes: Shapes, *, num_layers: int | None = None,
                   phases=PHASES) -> dict:
    """{phase: memory dict + compile_s} for a model of ``num_layers`` (None: config.json's),
    plus "_state" (train-state bytes per device) and "_sampler" (sampler params bytes)."""
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415
    from flax import nnx  # noqa: PLC0415

    from espo_jax.rollout import DecodeOptions, engine  # noqa: PLC0415
    from espo_jax.rollout.engine import engine_kwargs  # noqa: PLC0415
    from espo_jax.rollout.engine_sharding import shard_options  # noqa: PLC0415
    from espo_jax.rollout.paged_attention import resolve_attention  # noqa: PLC0415
    from espo_jax.train import mesh as mesh_lib  # noqa: PLC0415

    b = build(config, mesh, num_layers)
    state = abstract_state(b)
    out = {"_state": _bytes_per_device((state.params, state.rest, state.opt_state,
                                        state.ref_params)),
           "_params": _bytes_per_device((state.params, state.rest)),
           "_n_params": sum(math.prod(x.shape) for x in jax.tree.leaves(state.params))}
    if "train_step" in phases:
        batch = abstract_batch(config, b, shapes.minibatch_rows, shapes, train=True)
        c, s = _timed(b["train_step"], state, batch)
        out["train_step"] = dict(memory(c), compile_s=s)
    if "score" in phases:
        batch = abstract_batch(config, b, shapes.rollout_rows, shapes, train=False)
        c, s = _timed(b["score"], state.params, state.rest, batch["prompt_tokens"],
                      batch["prompt_mask"], batch["tokens"], None)  # no routing replay
        out["score"] = dict(memory(c), compile_s=s)
    if "rollout" in phases:
        graphdef, abs_state = nnx.split(b["sampler"])
        sampler_state = mesh_lib.abstract_state(abs_state,
                                                mesh_lib.param_shardings(abs_state, mesh))
        out["_sampler"] = _bytes_per_device(sampler_state)
        r = config.rollout
        rep = mesh_lib.replicated(mesh)
        scalar = jax.ShapeDtypeStruct((), jnp.float32, sharding=rep)
        key = jax.eval_shape(lambda: jax.random.PRNGKey(0))
        key = jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=rep)
        eos = jax.ShapeDtypeStruct((2,), jnp.int32, sharding=rep)
        ek = engine_kwargs(r, mesh_lib.batch_divisor(mesh))
        opts = DecodeOptions(max_new_tokens=shapes.response_len, top_k=int(r.top_k),
                             greedy=False, use_top_p=bool(float(r.top_p) < 1.0), pad_id=0)
        if ek["max_concurrent"] is None:  # one static batch of all rollout rows
            batch = abstract_batch(config, b, shapes.rollout_rows, shapes, train=False)
            budgets = jax.ShapeDtypeStruct((shapes.rollout_rows,), jnp.int32,
                                           sharding=b["rows"])
            c, s = _timed(b["decode"], graphdef, opts, sampler_state, batch["prompt_tokens"],
                          batch["prompt_mask"], key, scalar, scalar, eos, budgets,
                          budgets)  # row_ids: i32[rows], as the budgets
        else:
            # Continuous batching: each device runs its own engine over its rows with
            # ceil(K / shards) slots (``engine_sharding.sharded_engine_fn``, its
            # ``shard_options``), weights replicated (``engine_sharding.decode_model``):
            # compile that per-device program.
            shards = mesh_lib.batch_divisor(mesh)
            rows = max(1, shapes.rollout_rows // shards)
            width = engine.prompt_width(shapes.prompt_len, shapes.prompt_len,
                                        ek["prefill_chunk"])  # the longest prompt's
            opts = engine.engine_options(  # generate's, then one device's share of them
                opts, prompt_bucket=shapes.prompt_len,
                max_concurrent=min(ek["max_concurrent"], shapes.rollout_rows),
                prefill_chunk=ek["prefill_chunk"], kv_block=ek["kv_block"],
                # The Pallas kernel compiles for TPU only; elsewhere the XLA layout (the
                # same cache bytes) stands in.
                attention=(resolve_attention(ek["attention"])
                           if jax.default_backend() == "tpu" else "xla"),
                is_moe=b["cfg"].is_moe, decode_read=ek["decode_read"])
            opts = shard_options(opts, shards)
            one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
            local = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=one),
                                 abs_state)
            out["_sampler"] = _bytes_per_device(local)
            i32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=one)  # noqa: E731
            dev = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=one)  # noqa: E731
            c, s = _timed(engine.engine_jit, graphdef, opts, local, i32(rows, width),
                          i32(rows), i32(rows), dev(key), dev(scalar), dev(scalar), dev(eos),
                          i32(rows))
        out["rollout"] = dict(memory(c), compile_s=s)
    out["_cfg"] = b["cfg"]
    return out
