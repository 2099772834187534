"""Compare ESPO with GRPO, DAPO, GSPO, GMPO and CISPO on the embedded task over seeds.

Runs ``python -m espo_jax.main`` once per (objective, seed) with each objective's ESPO.md
defaults (``configs/default.py:<objective>``), then writes ``OUT/report.md`` (final eval
accuracy mean ± std, steps to a target accuracy, mean clip fraction high/low, and which of
the paper's claims hold here) and PNG plots: eval accuracy with seed bands, clip fraction
high and low per objective, ESPO's entropy and clip fraction on twin axes, response length.

    .venv/bin/python experiments/compare_objectives.py --jobs 2          # 6 objectives x 3 seeds
    .venv/bin/python experiments/compare_objectives.py --smoke           # < 2 min: espo, gspo, 2 steps
    .venv/bin/python experiments/compare_objectives.py --objectives espo,grpo --seeds 0,1 \
        --steps 12 --out /tmp/cmp --set eval.num_examples=64

Resumable (finished runs are skipped; interrupted ones resume from their checkpoint) and safe
to start in several processes at once (per-run lock files). Run workdirs go to --runs_dir
(default runs/experiments, git-ignored); only the report and plots go to --out.
"""
from __future__ import annotations

import math
import pathlib
import sys

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import harness as C  # noqa: E402  (experiments/harness/)

OBJECTIVES = ("espo", "grpo", "dapo", "gspo", "gmpo", "cispo")
TOKEN_LEVEL = ("grpo", "dapo", "cispo", "gmpo")   # clip per token (GMPO: in log space)
SMOKE_OBJECTIVES = ("espo", "gspo")
DEFAULT_OUT = C.REPO / "experiments" / "results" / "compare"


def variants(names) -> list[C.Variant]:
    bad = [n for n in names if n not in OBJECTIVES]
    if bad:
        raise SystemExit(f"--objectives: unknown {bad}; expected a subset of {OBJECTIVES}")
    return [C.Variant(n, n, (), "ESPO.md defaults") for n in names]


def claims(results: list[C.VariantResult]) -> list[str]:
    """The paper's mechanism claims, checked on these runs (verdict + the numbers)."""
    by = {r.variant.name: r for r in results if r.records}
    clip = {n: float(np.mean([C.train_mean(rec, "clip_frac") for rec in r.records]))
            for n, r in by.items()}
    final = {n: [C.final_accuracy(rec) for rec in r.records] for n, r in by.items()}
    out = []
    fmt = ", ".join(f"{n} {v:.4f}" for n, v in sorted(clip.items(), key=lambda kv: -kv[1]))
    if "gspo" in clip and len(clip) > 1:
        top = max(clip.values())
        ok = None if sum(v == top for v in clip.values()) > 1 else max(clip, key=clip.get) == "gspo"
        out.append(f"- GSPO clips the most tokens: {C.verdict(ok)} (mean clip fraction, "
                   f"highest first: {fmt}).")
    tok = [n for n in TOKEN_LEVEL if n in clip]
    rest = [n for n in clip if n not in TOKEN_LEVEL]
    if tok and rest:
        ok = max(clip[n] for n in tok) <= min(clip[n] for n in rest)
        part = min(clip[n] for n in tok) <= min(clip[n] for n in rest)
        out.append(f"- Token-level methods ({', '.join(tok)}) clip the least: "
                   f"{C.verdict(ok if ok or not part else None)}"
                   + ("" if ok else " (only partly: some but not all token-level methods clip "
                      "less than every sequence/group-level one)" if part else "") + ".")
    if "espo" in clip and "gspo" in clip:
        ok = None if clip["espo"] == clip["gspo"] else clip["espo"] < clip["gspo"]
        out.append(f"- ESPO keeps its clip fraction low (below GSPO's): {C.verdict(ok)} "
                   f"(ESPO {clip['espo']:.4f} vs GSPO {clip['gspo']:.4f}).")
    if "espo" in by:
        e_slope, e_change = C.trend(by["espo"], "entropy_mean")
        c_slope, c_change = C.trend(by["espo"], "clip_frac")
        rho = C.correlation(by["espo"], "entropy_mean", "clip_frac")
        if math.isnan(e_slope) or math.isnan(c_slope) or c_change == 0 or e_change == 0:
            ok = None
        else:
            ok = bool(e_change < 0 and c_change > 0)
        out.append(f"- ESPO's clip fraction rises as entropy falls: {C.verdict(ok)} (entropy "
                   f"change first→last quarter {e_change:+.4f} nats, clip fraction change "
                   f"{c_change:+.5f}; Pearson r(entropy, clip frac) over steps x seeds = "
                   f"{rho:+.2f}).")
    if "espo" in final and len(final) > 1:
        means = {n: float(np.nanmean(v)) for n, v in final.items()}
        best = max(means, key=means.get)
        second = sorted(means.values())[-2]
        sd = [float(np.nanstd(v, ddof=1)) for v in final.values() if len(v) > 1]
        noise = float(np.mean(sd)) if sd else float("nan")
        ok = None if sum(v == means[best] for v in means.values()) > 1 else best == "espo"
        clear = ok and not math.isnan(noise) and means["espo"] - second > noise
        out.append(f"- ESPO reaches the best final accuracy: {C.verdict(ok)}"
                   + (" (by more than the typical seed std)" if clear else
                      " (within seed noise)" if ok else "")
                   + " — final accuracy: " + ", ".join(
                       f"{n} {v:.3f}" for n, v in sorted(means.items(), key=lambda kv: -kv[1]))
                   + (f"; mean seed std {noise:.3f}." if not math.isnan(noise) else "."))
    if not out:
        out.append("- (no finished runs to judge)")
    return out


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = C.sweep_parser(__doc__, default_out=str(DEFAULT_OUT))
    p.add_argument("--objectives", default=None,
                   help=f"comma list (default all: {','.join(OBJECTIVES)}; "
                        f"--smoke: {','.join(SMOKE_OBJECTIVES)})")
    p.add_argument("--dump_every", type=int, default=0,
                   help="rollout dumps every N steps for ESPO's first seed (workdir/dumps/)")
    args = p.parse_args(argv)

    names = (args.objectives.split(",") if args.objectives else
             SMOKE_OBJECTIVES if args.smoke else OBJECTIVES)
    vs = variants([n.strip() for n in names if n.strip()])
    seeds = C.parse_seeds(args.seeds, args.smoke, C.seeds_given(argv))
    extra = C.parse_sets(args.set)
    config = pathlib.Path(args.config).resolve()
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = C.make_runs(vs, seeds, runs_dir=pathlib.Path(args.runs_dir), config=config,
                       smoke=args.smoke, steps=args.steps, extra=extra,
                       dump_every=args.dump_every, dump_variant="espo")
    statuses = C.run_sweep(runs, args)

    results = C.load_results(runs)
    target = args.target if args.target is not None else C.default_target(results)
    return C.finish(
        args, out=out, config=config, runs=runs, statuses=statuses, results=results,
        seeds=seeds, extra=extra, ref_name="espo", claims=claims(results), target=target,
        title="ESPO vs GRPO / DAPO / GSPO / GMPO / CISPO on the embedded task",
        script="experiments/compare_objectives.py",
        intro=". Every objective runs with its ESPO.md defaults (GRPO 0.2/0.2, DAPO "
              "0.2/0.28 + dynamic sampling + overlong shaping, GSPO 3e-4/4e-4, GMPO 0.4/0.4 "
              "in log space, CISPO cap 5.0, ESPO α=0.02 top-20% grouping).",
        ref_caption="ESPO: entropy and clip fraction over training (twin axes)",
        ref_title="ESPO: old-policy entropy and clip fraction")


if __name__ == "__main__":
    sys.exit(main())
