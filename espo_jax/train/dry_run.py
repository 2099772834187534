"""Dry run: will this config fit? Ahead-of-time compile of the run's jitted computations.

    python -m espo_jax.main --config=configs/qwen3_math.py --workdir=W --dry_run
    # plan a pod on a laptop: 8 simulated CPU devices (before JAX starts its backend)
    python -m espo_jax.main --config=... --workdir=W --dry_run --config.plan.devices=8

Needs only ``config.json`` in ``model.path`` (no weights, tokenizer or data). It validates
the config, builds the train state and the batches as abstract arrays
(``jax.ShapeDtypeStruct`` with their shardings, from ``nnx.eval_shape``) with the
configured shapes on the configured mesh, compiles (``jit(...).lower(...).compile()``)

* ``train_step``: one optimizer update on one minibatch (prompts_per_step * group_size /
  num_minibatches rows) with its micro-batches, the state donated;
* ``score``: the scoring pass (old log-probs + entropy) over the whole rollout batch;
* ``rollout``: the KV-cache sampler over the rollout batch (``espo_jax.rollout.decode``, or
  with ``rollout.max_concurrent`` > 0 each device's continuous-batching engine),
  with the compute-dtype copy of the params the loop samples with;

and prints XLA's per-device memory for each (arguments, temporaries, outputs, total =
arguments + outputs - donated/aliased + temporaries; compile time), the increment per
layer (a second compile at depth 1, or 2 with ``model.scan_layers``) and writes
``W/memory_plan.json``::

    {"devices": n, "mesh": {"data": .., "fsdp": .., "tensor": ..},
     "per_device": {"train_step": {"argument": b, "temp": b, "output": b, "alias": b,
                                   "total": b, "compile_s": s}, "score": {..},
                    "rollout": {..}},
     "per_layer": {"train_step": {..}, ..}, "state": b, "peak": b, ...}

All sizes are bytes per device; ``compile_s`` is the deepest compile's. ``state`` is
the train state resident on every device throughout (params + optimizer moments
[+ reference]); ``peak`` is the largest phase ``total`` plus the part of the state that
phase does not take as arguments.

Shapes: ``plan.prompt_len`` prompt tokens (default 512; bucketed like the sampler does) and
``plan.response_len`` response tokens (0 = ``rollout.max_new_tokens``). ``plan.layers`` > 0
compiles that many layers instead of the model's depth and extrapolates linearly per layer
(a deep model compiles in seconds; temporaries extrapolate only approximately).

The figures are XLA's for the backend it compiles on (CPU when simulating): a TPU/GPU
compile schedules and fuses differently; run the dry run on the target for its figures.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time

PHASES = ("train_step", "score", "rollout")
_FIELDS = ("argument", "temp", "output", "alias", "total")


# --------------------------------------------------------------------------- devices --
def simulate_devices(config) -> None:
    """``plan.devices`` > 0: run on that many simulated CPU devices. Must happen before the
    JAX backend starts; a backend already started with another device count is an error."""
    import jax  # noqa: PLC0415

    n = int(config.plan.get("devices", 0)) if "plan" in config else 0
    if n <= 0:
        return
    try:  # (a private JAX function: if it moves, assume the backend has not started)
        from jax._src import xla_bridge  # noqa: PLC0415
        started = xla_bridge.backends_are_initialized()
    except (ImportError, AttributeError):
        started = False
    if started:
        if jax.default_backend() == "cpu" and jax.device_count() == n:
            return
        raise ValueError(f"plan.devices={n}: the JAX backend already started with "
                         f"{jax.device_count()} {jax.default_backend()} devices; set "
                         f"XLA_FLAGS=--xla_force_host_platform_device_count={n} "
                         "JAX_PLATFORMS=cpu instead")
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", n)


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
        return {k: 0 for k in _FIELDS}
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
                         in_shardings=(None, rows, rows, None, None, None, None, rows),
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
_CPU_COMPILE_OPTIONS = {"xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED",
                        "xla_backend_optimization_level": 0,
                        "xla_llvm_disable_expensive_passes": True}


def _timed(lowerable, *args):
    import jax  # noqa: PLC0415

    opts = _CPU_COMPILE_OPTIONS if jax.default_backend() == "cpu" else None
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

    from espo_jax.rollout import DecodeOptions, bucket_length, engine  # noqa: PLC0415
    from espo_jax.rollout.engine import engine_kwargs  # noqa: PLC0415
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
        ek = engine_kwargs(r)
        if ek["max_concurrent"] is None:  # one static batch of all rollout rows
            opts = DecodeOptions(max_new_tokens=shapes.response_len, top_k=int(r.top_k),
                                 greedy=False, use_top_p=bool(float(r.top_p) < 1.0), pad_id=0)
            batch = abstract_batch(config, b, shapes.rollout_rows, shapes, train=False)
            budgets = jax.ShapeDtypeStruct((shapes.rollout_rows,), jnp.int32,
                                           sharding=b["rows"])
            c, s = _timed(b["decode"], graphdef, opts, sampler_state, batch["prompt_tokens"],
                          batch["prompt_mask"], key, scalar, scalar, eos, budgets)
        else:
            # Continuous batching: each device runs its own engine over its rows with
            # ceil(K / shards) slots (``engine.sharded_engine_fn``), weights replicated
            # (``engine.decode_model``): compile that per-device program.
            shards = mesh_lib.batch_divisor(mesh)
            k = -(-ek["max_concurrent"] // shards)
            rows = max(1, shapes.rollout_rows // shards)
            chunk = min(ek["prefill_chunk"], shapes.prompt_len)
            width = -(-shapes.prompt_len // chunk) * chunk
            opts = engine.EngineOptions(
                max_new_tokens=shapes.response_len, max_concurrent=k, prefill_chunk=chunk,
                kv_block=min(ek["kv_block"], bucket_length(width + shapes.response_len)),
                decode_sizes=engine.default_decode_sizes(k), top_k=int(r.top_k),
                use_top_p=bool(float(r.top_p) < 1.0), prefill_rows=max(1, k // 4))
            one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
            local = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=one),
                                 abs_state)
            out["_sampler"] = _bytes_per_device(local)
            i32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=one)  # noqa: E731
            dev = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=one)  # noqa: E731
            c, s = _timed(engine.engine_jit, graphdef, opts, local, i32(rows, width),
                          i32(rows), i32(rows), dev(key), dev(scalar), dev(scalar), dev(eos))
        out["rollout"] = dict(memory(c), compile_s=s)
    out["_cfg"] = b["cfg"]
    return out


# ------------------------------------------------------------------------------- run --
def _gib(x: float) -> str:
    """Bytes in GiB, or MiB / KiB for small figures (the tiny test model)."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(x) >= 0.1 * scale or unit == "KiB":
            return f"{x / scale:.2f} {unit}"
    return f"{x} B"


def _extrapolate(small: dict, big: dict, d_small: int, d_big: int, depth: int):
    """(figures at ``depth``, per-layer increment) from compiles at two depths."""
    per, at = {}, {}
    for ph in PHASES:
        if ph not in big:
            continue
        per[ph] = {k: (big[ph][k] - small[ph][k]) / (d_big - d_small) for k in _FIELDS}
        at[ph] = {k: int(round(big[ph][k] + (depth - d_big) * per[ph][k])) for k in _FIELDS}
        at[ph]["compile_s"] = big[ph]["compile_s"]
        per[ph] = {k: int(round(v)) for k, v in per[ph].items()}
    for k in ("_state", "_params", "_sampler", "_n_params"):
        if k in big:
            at[k] = int(round(big[k] + (depth - d_big) * (big[k] - small[k]) / (d_big - d_small)))
    return at, per


def plan(config, *, phases=PHASES, log=print) -> dict:
    """Compiles the phases (at two depths) and returns the memory plan (the JSON dict)."""
    import jax  # noqa: PLC0415

    from espo_jax.train import mesh as mesh_lib  # noqa: PLC0415

    mesh = mesh_lib.make_mesh(config.mesh)
    depth = int(model_config(config).num_layers)
    shapes = plan_shapes(config, mesh_lib.batch_divisor(mesh),
                         model_config(config).max_position_embeddings)
    want = int(config.plan.get("layers", 0)) or depth
    # Scanned layers take the scan path from two layers on (one layer runs unscanned), so
    # both compiles must be scanned for the increment to be the scanned layer's cost.
    d_small = 2 if model_config(config).scan_layers else 1
    d_big = max(min(want, depth), d_small + 1)
    t0 = time.perf_counter()
    runs = {d: compile_phases(config, mesh, shapes, num_layers=d, phases=phases)
            for d in sorted({d_small, d_big})}
    lo, hi = min(runs), max(runs)
    at, per = _extrapolate(runs[lo], runs[hi], lo, hi, depth)
    if depth in runs:  # exact figures at the real depth
        at = {k: v for k, v in runs[depth].items() if k != "_cfg"}
    cfg = runs[hi]["_cfg"]
    n_dev = int(mesh.devices.size)
    state = int(at["_state"])
    peak = {}
    for ph in phases:
        if ph == "train_step":
            extra = 0                                    # the state is its argument
        elif ph == "score":
            extra = state - int(at["_params"])           # optimizer moments (+ reference)
        else:
            extra = state if int(at.get("_sampler", 0)) != int(at["_params"]) else \
                state - int(at["_params"])               # a compute-dtype copy samples
        peak[ph] = int(at[ph]["total"]) + extra
    result = {
        "devices": n_dev, "mesh": {k: int(v) for k, v in mesh.shape.items()},
        "backend": jax.default_backend(),
        "model": {"path": str(config.model.path), "layers": depth,
                  "params": int(at["_n_params"]),
                  "hidden_size": cfg.hidden_size, "vocab_size": cfg.vocab_size,
                  "dtype": str(config.model.dtype), "param_dtype": str(config.model.param_dtype),
                  "remat": bool(config.model.remat)},
        "shapes": dataclasses.asdict(shapes),
        "compiled_layers": sorted(runs), "extrapolated": depth not in runs,
        "per_device": {ph: at[ph] for ph in phases},
        "per_layer": per,
        "state": state, "peak_with_state": peak, "peak": max(peak.values()),
        "wall_s": time.perf_counter() - t0,
    }
    _table(result, log)
    return result


def _table(r: dict, log) -> None:
    s = r["shapes"]
    micro = s["micro_batch"] or s["minibatch_rows"]
    log(f"Dry run on {r['devices']} {r['backend']} devices, mesh {r['mesh']}; model "
        f"{r['model']['params'] / 1e6:.1f}M params, {r['model']['layers']} layers "
        f"(compiled {r['compiled_layers']}"
        f"{', extrapolated per layer' if r['extrapolated'] else ''}), "
        f"{r['model']['dtype']} compute / {r['model']['param_dtype']} params, remat="
        f"{r['model']['remat']}")
    log(f"  rollout + scoring: {s['rollout_rows']} rows x ({s['prompt_len']} + "
        f"{s['response_len']}) tokens; train_step: {s['minibatch_rows']} rows in micro-batches "
        f"of {min(micro, s['minibatch_rows'])}")
    log(f"  {'per device':<12}{'arguments':>13}{'temporaries':>13}{'outputs':>13}"
        f"{'total':>13}{'compile':>10}{'+ per layer':>14}")
    for ph, m in r["per_device"].items():
        per = r["per_layer"].get(ph, {}).get("total")
        log(f"  {ph:<12}{_gib(m['argument']):>13}{_gib(m['temp']):>13}{_gib(m['output']):>13}"
            f"{_gib(m['total']):>13}{m['compile_s']:>9.1f}s"
            f"{_gib(per) if per is not None else '':>14}")
    log(f"  train state resident on each device (params + optimizer [+ reference]): "
        f"{_gib(r['state']).strip()}; peak with it: "
        + ", ".join(f"{ph} {_gib(v).strip()}" for ph, v in r["peak_with_state"].items())
        + f" -> {_gib(r['peak']).strip()}")
    log("  (total = arguments + outputs - donated + temporaries; XLA's figures for this "
        "backend)")


def run(config, workdir) -> dict:
    """The ``--dry_run`` entry point: validate, compile, print, write W/memory_plan.json."""
    simulate_devices(config)
    import jax  # noqa: PLC0415

    from espo_jax.train import validate as validate_lib  # noqa: PLC0415
    from espo_jax.train import writers  # noqa: PLC0415

    workdir = writers.workdir_path(workdir)
    validate_lib.validate(config, num_devices=jax.device_count(), workdir=workdir,
                          check_data=False)
    result = plan(config)
    if jax.process_index() == 0:
        workdir.mkdir(parents=True, exist_ok=True)
        out = workdir / "memory_plan.json"
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {out}", flush=True)
    return result
