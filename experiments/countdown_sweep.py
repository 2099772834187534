"""The Countdown sweep of issue 13: six objectives, ESPO ablations and 1-minibatch controls
over paired seeds, judged against pre-registered predictions.

Arms (``configs/countdown.py:<objective>``; same seed = same prompt order and eval set):
  main (config's 4 minibatches)  espo, gspo, grpo: 6 seeds; dapo, gmpo, cispo: 4 seeds
  ablations, 3 seeds each        espo α=0.01, α=0.05          objective.espo.alpha
                                 espo top 10%, top 40%        objective.espo.top_fraction
                                 espo token groups            objective.espo.grouping=token
                                 espo fixed clip (3e-4, 4e-4) objective.espo.clip_mode=fixed
                                 espo/gspo/grpo 1 minibatch   train.num_minibatches=1
57 runs. Queue order, so that a sweep cut short is still useful: (1) seeds 0-2 of the six
main arms, (2) seeds 0-2 of the ablations, (3) the extra seeds (3-5 of espo/gspo/grpo, 3 of
dapo/gmpo/cispo), seed-major within each phase.

    .venv/bin/python experiments/countdown_sweep.py --jobs 2          # the whole sweep
    .venv/bin/python experiments/countdown_sweep.py --report_only     # report of what finished
    .venv/bin/python experiments/countdown_sweep.py --smoke --config configs/default.py \
        --out /tmp/cd_smoke                                           # plumbing check

--seeds N or --seeds 0,1 gives every arm those seeds instead of the plan above (same queue
phases); --arms restricts the arms; --smoke runs the config's :smoke variant of espo, gspo,
grpo and espo 1 minibatch at seed 0.

Resumable and parallel-safe (the harness: done.json, per-run .lock; rerun the same command
to resume, or start it again in a second process). The small files of finished runs
(metrics.jsonl, config.json, spec.json, done.json) are kept in OUT/runs/ (``--archive``;
commit them with the report): a sweep started on a fresh machine restores them first and runs
only what is missing. Writes OUT/report.md (one row per arm
with its seed count, paired differences vs ESPO with Holm-corrected p, the pre-registered
predictions of results/countdown/predictions.md each marked holds / does not hold / not yet
testable) and PNG plots.
"""
from __future__ import annotations

import math
import pathlib
import sys
from typing import Sequence

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import harness as C  # noqa: E402  (experiments/harness/)
from harness.cli import describe_config, resolved_settings, write_report  # noqa: E402
from harness.plots import (plot_accuracy, plot_entropy, plot_group_clip_vs_entropy,  # noqa: E402
                           plot_groups, plot_minibatch_clip)
from harness.results import arm_table, series  # noqa: E402
import countdown_predictions as P  # noqa: E402

DEFAULT_OUT = C.REPO / "experiments" / "results" / "countdown"
DEFAULT_CONFIG = C.REPO / "configs" / "countdown.py"
PREDICTIONS_MD = DEFAULT_OUT / "predictions.md"
FIRST_SEEDS = 3                     # phases 1-2 run seeds 0..2; phase 3 the rest
_E = "objective.espo."

MAIN_SEEDS = {"espo": 6, "gspo": 6, "grpo": 6, "dapo": 4, "gmpo": 4, "cispo": 4}
ABLATION_SEEDS = 3
MAIN = [C.Variant(n, n, (), "ESPO.md defaults, config's minibatches") for n in MAIN_SEEDS]
ABLATIONS = [
    C.Variant("espo α=0.01", "espo", ((_E + "alpha", 0.01),), "adaptive clip scale"),
    C.Variant("espo α=0.05", "espo", ((_E + "alpha", 0.05),), "adaptive clip scale"),
    C.Variant("espo top 10%", "espo", ((_E + "top_fraction", 0.1),), "grouping proportion"),
    C.Variant("espo top 40%", "espo", ((_E + "top_fraction", 0.4),), "grouping proportion"),
    # Every token its own group: s_tau = r_t (token-level ratios), eps from the token's own
    # entropy, weights 1/(N L_i): the paper's "no entropy grouping" (ESPO.md, grouping=token).
    C.Variant("espo token groups", "espo", ((_E + "grouping", "token"),),
              "no entropy grouping: token-level ratios, adaptive clip"),
    C.Variant("espo fixed clip (3e-4, 4e-4)", "espo",
              ((_E + "clip_mode", "fixed"), (_E + "clip_low", 3e-4), (_E + "clip_high", 4e-4)),
              "fixed clip range, entropy groups"),
    *[C.Variant(f"{n} 1 minibatch", n, (("train.num_minibatches", 1),),
                "all updates on-policy") for n in ("espo", "gspo", "grpo")],
]
ARMS = {v.name: v for v in MAIN + ABLATIONS}
SMOKE_ARMS = ("espo", "gspo", "grpo", "espo 1 minibatch")
PLOT_MAIN = [v.name for v in MAIN]
PLOT_ABLATIONS = ["espo"] + [v.name for v in ABLATIONS]


def seed_plan(seeds: Sequence[int] | None = None) -> dict[str, list[int]]:
    """arm -> its seeds (the issue's counts, or ``seeds`` for every arm when given)."""
    if seeds is not None:
        return {n: list(seeds) for n in ARMS}
    return {**{n: list(range(k)) for n, k in MAIN_SEEDS.items()},
            **{v.name: list(range(ABLATION_SEEDS)) for v in ABLATIONS}}


def queue(plan: dict[str, list[int]], *, runs_dir: pathlib.Path, config: pathlib.Path,
          smoke: bool = False, steps: int | None = None, extra=()) -> list[C.Run]:
    """The runs in queue order: main arms' first seeds, ablations' first seeds, then every
    arm's remaining seeds (seed-major within each phase)."""
    kw = dict(runs_dir=runs_dir, config=config, smoke=smoke, steps=steps, extra=extra)
    main = [v for v in MAIN if v.name in plan]
    abl = [v for v in ABLATIONS if v.name in plan]
    runs: list[C.Run] = []
    for group in (main, abl):
        for s in sorted({s for v in group for s in plan[v.name][:FIRST_SEEDS]}):
            runs += C.make_runs([v for v in group if s in plan[v.name][:FIRST_SEEDS]], [s], **kw)
    rest = sorted({s for v in main + abl for s in plan[v.name][FIRST_SEEDS:]})
    for s in rest:
        runs += C.make_runs([v for v in main + abl if s in plan[v.name][FIRST_SEEDS:]], [s],
                            **kw)
    return runs


# ---------------------------------------------------------------- per-run columns --
def offpolicy_clip_run(records) -> float:
    """Mean over steps >= 1 and updates u >= 1 of minibatch{u}/clip_frac (NaN if none)."""
    keys = sorted({k for r in records for k in r if k.startswith("minibatch")
                   and k.endswith("/clip_frac") and k.count("/") == 1
                   and k != "minibatch0/clip_frac"})
    vals = [y for k in keys for y in series(records, k, min_step=1)[1]]
    return float(np.mean(vals)) if vals else float("nan")


def _first(records, key) -> float:
    _, y = series(records, key, min_step=1)
    return float(y[0]) if len(y) else float("nan")


def _last(records, key) -> float:
    _, y = series(records, key, min_step=1)
    return float(y[-1]) if len(y) else float("nan")


EXTRA_COLUMNS = (
    ("clip frac mb 0 (on-policy)", lambda r: C.train_mean(r, "minibatch0/clip_frac")),
    ("clip frac mb ≥ 1 (off-policy)", offpolicy_clip_run),
    ("entropy first step", lambda r: _first(r, "entropy_mean")),
    ("entropy last step", lambda r: _last(r, "entropy_mean")),
)


def predictions_section(results) -> list[str]:
    lines = ["Pre-registered in `experiments/results/countdown/predictions.md` (dated, committed "
             "before the sweep ran; decision rules there), judged by "
             "`experiments/countdown_predictions.py` from the runs finished so far:", ""]
    return lines + [v.line() for v in P.judge(results)]


def make_plots(results, out: pathlib.Path) -> list[tuple[str, str]]:
    by = {r.variant.name: r for r in results if r.records}
    main = [by[n] for n in PLOT_MAIN if n in by]
    abl = [by[n] for n in PLOT_ABLATIONS if n in by]
    plots = []
    if main:
        plot_accuracy(main, out / "accuracy.png",
                      title="Main arms: greedy eval accuracy (mean over seeds; band = min..max)")
        plots.append(("accuracy.png", "Main arms: greedy eval accuracy vs step"))
        plot_minibatch_clip(main, out / "minibatch_clip.png")
        plots.append(("minibatch_clip.png", "Clip fraction per minibatch update u (u = 0 "
                      "on-policy, u ≥ 1 off-policy)"))
        plot_entropy(main, out / "entropy.png")
        plots.append(("entropy.png", "Old-policy token entropy vs step"))
    if len(abl) > 1:
        plot_accuracy(abl, out / "accuracy_ablations.png",
                      title="ESPO ablations and 1-minibatch arms: greedy eval accuracy")
        plots.append(("accuracy_ablations.png", "Ablations: greedy eval accuracy vs step"))
    if "espo" in by:
        if plot_group_clip_vs_entropy(by["espo"], out / "espo_group_clip_vs_entropy.png"):
            plots.append(("espo_group_clip_vs_entropy.png",
                          "ESPO: clip fraction of each entropy group vs mean entropy"))
        if plot_groups(by["espo"], out / "espo_groups.png"):
            plots.append(("espo_groups.png", "ESPO: clip fraction and ε per entropy group "
                          "over training"))
    return plots


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = C.sweep_parser(__doc__, default_out=str(DEFAULT_OUT))
    # Finished runs' metrics are committed under OUT/runs, so the sweep resumes on any machine.
    p.set_defaults(config=str(DEFAULT_CONFIG), archive=str(DEFAULT_OUT / "runs"))
    p.add_argument("--arms", default=None,
                   help=f"comma list of arms (default all {len(ARMS)}; --smoke: "
                        f"{','.join(SMOKE_ARMS)})")
    args = p.parse_args(argv)
    names = ([a.strip() for a in args.arms.split(",") if a.strip()] if args.arms else
             list(SMOKE_ARMS) if args.smoke else list(ARMS))
    bad = [n for n in names if n not in ARMS]
    if bad:
        raise SystemExit(f"--arms: unknown {bad}; expected any of {list(ARMS)}")
    given = C.seeds_given(argv)
    seeds = C.parse_seeds(args.seeds, args.smoke, given) if (given or args.smoke) else None
    plan = {n: s for n, s in seed_plan(seeds).items() if n in names}
    config = pathlib.Path(args.config).resolve()
    if not config.is_file():
        raise SystemExit(f"--config: {config} does not exist (configs/countdown.py comes with "
                         "the Countdown task)")
    extra = C.parse_sets(args.set)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = queue(plan, runs_dir=pathlib.Path(args.runs_dir), config=config, smoke=args.smoke,
                 steps=args.steps, extra=extra)
    statuses = C.run_sweep(runs, args)

    results = C.load_results(runs)
    order = {n: i for i, n in enumerate(ARMS)}
    results.sort(key=lambda r: order[r.variant.name])
    plots = make_plots(results, out)
    all_seeds = sorted({s for v in plan.values() for s in v})
    intro = ("Generated by `experiments/countdown_sweep.py`"
             + (" --smoke (a plumbing check, not a result)" if args.smoke else "")
             + ". Seeds per arm: " + "; ".join(f"{n} {len(s)}" for n, s in plan.items())
             + f" ({len(runs)} runs; queue: seeds 0-{FIRST_SEEDS - 1} of the main arms, then "
             "of the ablations, then the extra seeds). Rows show the seeds finished so far.")
    report = write_report(
        out, title="Countdown: ESPO vs GSPO / GRPO / DAPO / GMPO / CISPO, ablations, paired "
                   "seeds", intro=[intro], results=results, target=float("nan"),
        claims=predictions_section(results), plots=plots,
        setup=describe_config(config, args.smoke, args.steps, extra, all_seeds, results)
        + resolved_settings(runs),
        notes=pathlib.Path(args.notes).read_text() if args.notes else None,
        ref_name="espo", claims_title="Pre-registered predictions",
        table=["One row per arm; seeds = finished runs. Final greedy acc = greedy eval accuracy "
               "after the last step; eval AUC = trapezoid mean of greedy eval accuracy over the "
               "evaluated steps (step 0 included); final sampled acc (T=1) = pass@1 at T=1 "
               "after the last step (when logged). Clip fractions per minibatch update are "
               "means over training steps (u = 0 on-policy, u ≥ 1 off-policy). Mean ± sample "
               "std over seeds.", "", *arm_table(results, EXTRA_COLUMNS)])
    failed = [s for s in statuses if s["status"] == "failed"]
    print(f"report: {report}")
    for s in failed:
        print(f"FAILED: {s['run']} (rc {s['returncode']}): " + " | ".join(s["log_tail"]))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
