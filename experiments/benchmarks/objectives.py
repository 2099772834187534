"""Value-and-grad (wrt logp) time of every objective, jitted, median of several runs.

    .venv/bin/python experiments/benchmarks/objectives.py            # B=64, T=4096
    .venv/bin/python experiments/benchmarks/objectives.py --quick    # B=16, T=1024
Prints a markdown table with each time's ratio to GSPO's (median and min: on a shared
machine the min is the steadier figure).

What ESPO adds over GSPO is the per-row top-n selection (grouping.py): an exact radix
select by 32 compare+count passes over [B, T] (plus a position bisection only when a run
of equal entropies straddles the boundary), then K small per-group reductions. No sort is
run for top_fraction/quantile; a stable (key, position) sort of 64 x 4096 costs ~100x more
on CPU. Each pass costs about what one reduction in GSPO costs, so on CPU the selection
alone is ~1.5-2x a whole GSPO step.
"""
from __future__ import annotations

import argparse
import functools
import statistics
import time

import jax
import jax.numpy as jnp

from espo_jax.objectives import entropy_groups, policy_loss

VOCAB = 151_936  # Qwen3
GIVEN = "given"  # placeholder: replaced by the batch's precomputed entropy groups


def variants():
    espo = functools.partial(dict, vocab_size=VOCAB)
    return [
        ("gspo", "gspo", {}),
        ("grpo", "grpo", {}),
        ("dapo", "dapo", {}),
        ("gmpo", "gmpo", {}),
        ("cispo", "cispo", {}),
        ("espo (top_fraction, default)", "espo", espo()),
        # As the trainer runs it: groups computed once per rollout in the scoring phase.
        ("espo, groups given (training)", "espo", espo(groups=GIVEN)),
        ("espo quantile K=4", "espo", espo(grouping="quantile", num_groups=4)),
        ("espo ranges (3 edges)", "espo", espo(grouping="ranges", entropy_edges=(2.0, 1.0, 0.5))),
        ("espo token", "espo", espo(grouping="token")),
        ("espo sequence", "espo", espo(grouping="sequence")),
        ("espo group_times_token", "espo", espo(token_ratio="group_times_token")),
    ]


def make_batch(B, T, key):
    k1, k2, k3, k4, k5 = jax.random.split(key, 5)
    logp = -jax.random.uniform(k1, (B, T), minval=0.01, maxval=3.0)
    old = logp - 0.05 * jax.random.normal(k2, (B, T))
    adv = jax.random.normal(k3, (B,))
    lengths = jax.random.randint(k4, (B,), T // 4, T + 1)
    mask = jnp.arange(T)[None, :] < lengths[:, None]
    entropy = jax.random.exponential(k5, (B, T))
    return logp, old, adv, mask, entropy


def compile_step(name, hp, batch):
    if hp.get("groups") is GIVEN:
        _, _, _, mask, entropy = batch
        hp = dict(hp, groups=jax.block_until_ready(jax.jit(entropy_groups)(entropy, mask)))
    fn = functools.partial(policy_loss, name, **hp)
    step = jax.jit(jax.value_and_grad(lambda lp, *rest: fn(lp, *rest), has_aux=True))
    jax.block_until_ready(step(*batch))  # compile + warm-up
    jax.block_until_ready(step(*batch))
    return step


def time_all(steps, batch, runs):
    """Round-robin over the objectives, so that load on a shared machine hits all alike.
    Returns {label: (median s, min s)}."""
    times = {label: [] for label in steps}
    for _ in range(runs):
        for label, step in steps.items():
            start = time.perf_counter()
            jax.block_until_ready(step(*batch))
            times[label].append(time.perf_counter() - start)
    return {label: (statistics.median(t), min(t)) for label, t in times.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="B=16, T=1024, 5 runs")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--length", type=int, default=None)
    parser.add_argument("--runs", type=int, default=None)
    args = parser.parse_args()
    B = args.batch or (16 if args.quick else 64)
    T = args.length or (1024 if args.quick else 4096)
    runs = args.runs or (5 if args.quick else 20)
    batch = make_batch(B, T, jax.random.PRNGKey(0))
    device = jax.devices()[0]
    print(f"value_and_grad wrt logp, B={B}, T={T}, median of {runs} runs, "
          f"device: {device.platform} ({device.device_kind}), jax {jax.__version__}\n")
    steps = {label: compile_step(name, hp, batch) for label, name, hp in variants()}
    results = [(label, *t) for label, t in time_all(steps, batch, runs).items()]
    base_med, base_min = results[0][1:]
    print("| objective | median ms | x GSPO | min ms | x GSPO (min) |\n|---|---:|---:|---:|---:|")
    for label, med, best in results:
        print(f"| {label} | {med * 1e3:.2f} | {med / base_med:.2f} | {best * 1e3:.2f} | {best / base_min:.2f} |")


if __name__ == "__main__":
    main()
