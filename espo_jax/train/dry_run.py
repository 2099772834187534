"""Dry run: will this config fit? Ahead-of-time compile of the run's jitted computations.

    python -m espo_jax.main --config=configs/qwen3_math.py --workdir=W --dry_run
    # plan a pod on a laptop: 8 simulated CPU devices (before JAX starts its backend)
    python -m espo_jax.main --config=... --workdir=W --dry_run --config.plan.devices=8

Needs only ``config.json`` in ``model.path`` (no weights, tokenizer or data). It validates
the config, builds the train state and the batches as abstract arrays
(``jax.ShapeDtypeStruct`` with their shardings, from ``nnx.eval_shape``) with the
configured shapes on the configured mesh, compiles (``jit(...).lower(...).compile()``,
``espo_jax.train.aot``)

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
import time

from espo_jax.train.aot import FIELDS, PHASES, compile_phases, model_config, plan_shapes


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
        per[ph] = {k: (big[ph][k] - small[ph][k]) / (d_big - d_small) for k in FIELDS}
        at[ph] = {k: int(round(big[ph][k] + (depth - d_big) * per[ph][k])) for k in FIELDS}
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
