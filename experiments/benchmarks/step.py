"""Time per phase (rollout, scoring, update, eval) of an RL step, as a table with shares.

    python experiments/benchmarks/step.py [--quick] [--config=configs/default.py] \
        [--steps=6] [--set train.num_minibatches=4 ...] [--compare=gspo,espo]

Runs the real loop (``espo_jax.train.loop.run``) for a few steps in a temporary workdir
and reads the per-phase timings of metrics.jsonl. Step 1 (compilation) is reported
separately; the steady-state rows average steps 2..N. Eval runs at step 0 and after the
last step, so its row is the mean eval time, shown relative to a steady-state step.
``--compare=a,b,...`` instead times the jitted train step (one minibatch, as the loop runs
it: ESPO with the groups the scoring phase computes once per rollout) of each objective on
the same scored batch, round-robin so machine load hits all alike, and prints medians and
ratios to the first objective.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import pathlib
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


def compare_updates(c, names, *, runs: int) -> int:
    """Median time of one train step per objective (same model, batch and minibatch size)."""
    import statistics  # noqa: PLC0415

    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415

    from espo_jax.models import from_pretrained  # noqa: PLC0415
    from espo_jax.train.optim import make_optimizer  # noqa: PLC0415
    from espo_jax.train.score_phase import espo_groups  # noqa: PLC0415
    from espo_jax.train.setup import objective_hparams  # noqa: PLC0415
    from espo_jax.train.state import create_state  # noqa: PLC0415
    from espo_jax.train.step import make_score_fn, make_train_step  # noqa: PLC0415
    from espo_jax.train.validate import micro_batch_size  # noqa: PLC0415

    def validate_micro(c):
        return micro_batch_size(c, 1)  # one device

    model = from_pretrained(c.model.path, dtype=c.model.dtype)
    rows = c.rollout.prompts_per_step * c.rollout.group_size // c.train.num_minibatches
    p, t, v = 32, int(c.rollout.max_new_tokens), model.config.vocab_size
    rng = np.random.default_rng(0)
    batch = dict(prompt_tokens=rng.integers(3, v, (rows, p)).astype(np.int32),
                 prompt_mask=np.ones((rows, p), np.int32),
                 tokens=rng.integers(3, v, (rows, t)).astype(np.int32),
                 advantages=rng.normal(size=rows).astype(np.float32))
    lengths = rng.integers(t // 4, t + 1, rows)
    batch["mask"] = (np.arange(t)[None] < lengths[:, None]).astype(np.float32)
    temp = float(c.rollout.temperature)
    tx = make_optimizer(c.train)
    state = create_state(model, tx)
    logp, ent = make_score_fn(state.graphdef, chunk_size=int(c.score.chunk_size),
                              temperature=temp)(state.params, state.rest, batch["prompt_tokens"],
                                                batch["prompt_mask"], batch["tokens"])
    batch.update(old_logp=np.asarray(logp) * batch["mask"], entropy=np.asarray(ent))
    steps, batches = {}, {}
    for name in names:
        hp = objective_hparams(_with(c, name), v)
        b = dict(batch)
        if name == "espo":
            g = espo_groups(hp, b["entropy"], b["mask"])
            if g is not None:
                b["groups"] = g
        batches[name] = {k: jnp.asarray(x) for k, x in b.items()}
        steps[name] = make_train_step(tx, name, hp, chunk_size=int(c.score.chunk_size),
                                      temperature=temp,
                                      micro_batch_size=validate_micro(c))
    states = {n: create_state(model, tx) for n in names}
    times = {n: [] for n in names}
    for i in range(runs + 2):  # two warm-up rounds (compile, caches)
        for n in names:
            t0 = time.perf_counter()
            states[n], m, _ = steps[n](states[n], batches[n])
            jax.block_until_ready(m)
            if i >= 2:
                times[n].append(time.perf_counter() - t0)
    base = statistics.median(times[names[0]])
    print(f"\ntrain step (one minibatch of {rows} rows x {p}+{t} tokens, {c.model.dtype}), "
          f"median of {runs}, round-robin; {jax.devices()[0].platform}")
    print(f"| objective | median ms | x {names[0]} | min ms |\n|---|---:|---:|---:|")
    for n in names:
        med = statistics.median(times[n])
        print(f"| {n} | {med * 1e3:.1f} | {med / base:.3f} | {min(times[n]) * 1e3:.1f} |")
    return 0


def _with(c, name: str):
    c = c.copy_and_resolve_references()
    c.objective.name = name
    return c


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(REPO / "configs" / "default.py"))
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--quick", action="store_true", help="3 steps, 32 eval problems")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--compare", default="", metavar="OBJ1,OBJ2",
                    help="time each objective's train step, round-robin; ratios to the first")
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
    if a.compare:
        return compare_updates(c, a.compare.split(","), runs=5 if a.quick else 15)

    from espo_jax.train import loop  # noqa: PLC0415

    import jax  # noqa: PLC0415
    with tempfile.TemporaryDirectory() as wd:
        t0 = time.perf_counter()
        loop.run(c, wd)
        total = time.perf_counter() - t0
        recs = [json.loads(x) for x in (pathlib.Path(wd) / "metrics.jsonl").read_text().splitlines()
                if '"event"' not in x]
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
    print("| phase | s / step | share of step |\n|---|---:|---:|")
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
    return {**mean, "step": step_t}


if __name__ == "__main__":
    main()
