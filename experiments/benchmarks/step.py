"""Time per phase (rollout, scoring, update, eval) of an RL step, as a table with shares.

    python experiments/benchmarks/step.py [--quick] [--config=configs/default.py] \
        [--steps=6] [--set train.num_minibatches=4 ...]

Runs the real loop (``espo_jax.train.loop.run``) for a few steps in a temporary workdir
and reads the per-phase timings of metrics.jsonl. Step 1 (compilation) is reported
separately; the steady-state rows average steps 2..N. Eval runs at step 0 and after the
last step, so its row is the mean eval time, shown relative to a steady-state step.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import pathlib
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[2]
PHASES = ("rollout", "score", "update")


def load_config(path: str, arg: str | None):
    spec = importlib.util.spec_from_file_location("bench_cfg", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config(arg)


def _set(c, assignment: str):
    key, value = assignment.split("=", 1)
    node = c
    *parents, last = key.split(".")
    for p in parents:
        node = node[p]
    old = node[last]
    node[last] = type(old)(value) if old is not None and not isinstance(old, bool) else (
        value.lower() in ("1", "true") if isinstance(old, bool) else value)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(REPO / "configs" / "default.py"))
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--quick", action="store_true", help="3 steps, 32 eval problems")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    a = ap.parse_args(argv)
    path, _, arg = a.config.partition(":")
    c = load_config(path, arg or None)
    c.num_steps = 3 if a.quick else a.steps
    c.eval.every = 0
    c.checkpoint.every = 10**6
    c.log.progress = False
    c.log.tensorboard = False
    if a.quick:
        c.eval.num_examples = min(c.eval.num_examples, 32)
    for s in a.set:
        _set(c, s)

    from espo_jax.train import loop  # noqa: PLC0415

    import jax  # noqa: PLC0415
    with tempfile.TemporaryDirectory() as wd:
        t0 = time.perf_counter()
        loop.run(c, wd)
        total = time.perf_counter() - t0
        recs = [json.loads(x) for x in (pathlib.Path(wd) / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in recs if r["step"] >= 1]
    steady = steps[1:] or steps
    evals = [r["time_eval_s"] for r in recs if "time_eval_s" in r]
    mean = {p: sum(r[f"time_{p}_s"] for r in steady) / len(steady) for p in PHASES}
    step_t = sum(r["time_step_s"] - r.get("time_eval_s", 0.0) for r in steady) / len(steady)
    other = max(0.0, step_t - sum(mean.values()))
    b = c.rollout.prompts_per_step * c.rollout.group_size
    print(f"\n{c.objective.name} on {c.task.name}: {c.rollout.prompts_per_step} prompts x G="
          f"{c.rollout.group_size} = {b} sequences, max {c.rollout.max_new_tokens} new tokens, "
          f"{c.train.num_epochs}x{c.train.num_minibatches} updates/step; "
          f"{jax.device_count()} x {jax.devices()[0].platform}; steady steps 2..{len(steps)}")
    print(f"| phase | s / step | share of step |\n|---|---:|---:|")
    for p in PHASES:
        print(f"| {p} | {mean[p]:.3f} | {mean[p] / step_t:.1%} |")
    print(f"| other (rewards, host) | {other:.3f} | {other / step_t:.1%} |")
    print(f"| **step** | {step_t:.3f} | 100% |")
    if evals:
        ev = sum(evals[1:] or evals) / len(evals[1:] or evals)
        print(f"| eval ({c.eval.num_examples} x {c.eval.num_samples}, per eval) | {ev:.3f} | "
              f"{ev / step_t:.0%} of a step |")
    print(f"first step (incl. compilation): {steps[0]['time_step_s']:.1f} s; "
          f"total incl. set-up: {total:.1f} s")


if __name__ == "__main__":
    sys.exit(main())
