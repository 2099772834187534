"""ESPO ablations on the embedded task: alpha, grouping proportion, no grouping, fixed clips.

Variants (each over the same seeds; the reference is ESPO with its defaults, alpha = 0.02,
top-20% grouping, adaptive clipping):
  alpha in {0.01, 0.02, 0.05, 0.1}          objective.espo.alpha
  top_fraction in {0.1, 0.2, 0.4}           objective.espo.top_fraction
  grouping = token (no entropy grouping)    objective.espo.grouping=token
  fixed clips (3e-4, 4e-4) and (0.2, 0.28)  objective.espo.clip_mode=fixed, clip_low/high

    .venv/bin/python experiments/ablations.py --jobs 2
    .venv/bin/python experiments/ablations.py --smoke                  # < 2 min plumbing check
    .venv/bin/python experiments/ablations.py --only alpha --seeds 2 --steps 12

Writes OUT/report.md (same table as compare_objectives.py, plus the paper's ablation claims)
and PNG plots. Resumable and parallel-safe like compare_objectives.py; the reference ESPO
runs are shared with it when both use the same --runs_dir, config and step count.
"""
from __future__ import annotations

import math
import pathlib
import sys

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import harness as C  # noqa: E402  (experiments/harness/)

DEFAULT_OUT = C.REPO / "experiments" / "results" / "ablations"
REF = "espo (α=0.02, top 20%)"
_E = "objective.espo."

# family -> variants; the reference appears once, first.
FAMILIES = {
    "alpha": [C.Variant(f"α={a}", "espo", ((_E + "alpha", a),), "adaptive clip scale")
              for a in (0.01, 0.05, 0.1)],
    "top_fraction": [C.Variant(f"top {int(f * 100)}%", "espo", ((_E + "top_fraction", f),),
                               "grouping proportion") for f in (0.1, 0.4)],
    "grouping": [C.Variant("no grouping (token)", "espo", ((_E + "grouping", "token"),),
                           "every token its own group, adaptive clip")],
    "fixed_clip": [C.Variant(f"fixed clip ({lo:g}, {hi:g})", "espo",
                             ((_E + "clip_mode", "fixed"), (_E + "clip_low", lo),
                              (_E + "clip_high", hi)), "fixed clip range, entropy groups")
                   for lo, hi in ((3e-4, 4e-4), (0.2, 0.28))],
}
SMOKE_FAMILIES = ("grouping",)


def variants(only=None) -> list[C.Variant]:
    fams = list(FAMILIES) if not only else only
    bad = [f for f in fams if f not in FAMILIES]
    if bad:
        raise SystemExit(f"--only: unknown {bad}; expected any of {list(FAMILIES)}")
    ref = C.Variant(REF, "espo", (), "ESPO defaults")
    return [ref] + [v for f in fams for v in FAMILIES[f]]


def _means(results) -> tuple[dict, float]:
    by = {r.variant.name: [C.final_accuracy(rec) for rec in r.records]
          for r in results if r.records}
    sds = [float(np.std(v, ddof=1)) for v in by.values() if len(v) > 1]
    return {n: float(np.nanmean(v)) for n, v in by.items()}, (float(np.mean(sds)) if sds
                                                             else float("nan"))


def _best_of(means: dict, names: list[str], want: str, noise: float, claim: str) -> str | None:
    have = [n for n in names if n in means]
    if want not in means or len(have) < 2:
        return None
    best = max(have, key=means.get)
    ok = None if sum(means[n] == means[best] for n in have) > 1 else best == want
    others = sorted((means[n] for n in have if n != want), reverse=True)
    margin = means[want] - others[0]
    qual = ("" if math.isnan(noise) else
            " (by more than the typical seed std)" if ok and margin > noise else
            " (within seed noise)" if abs(margin) <= noise else "")
    return (f"- {claim}: {C.verdict(ok)}{qual} — final accuracy "
            + ", ".join(f"{n} {means[n]:.3f}" for n in sorted(have, key=lambda n: -means[n]))
            + ".")


def claims(results) -> list[str]:
    means, noise = _means(results)
    names = [r.variant.name for r in results]
    out = []
    alpha = [REF] + [v.name for v in FAMILIES["alpha"]]
    top = [REF] + [v.name for v in FAMILIES["top_fraction"]]
    for line in (_best_of(means, [n for n in alpha if n in names], REF, noise,
                          "α = 0.02 is the best clip scale"),
                 _best_of(means, [n for n in top if n in names], REF, noise,
                          "top-20% grouping is the best proportion")):
        if line:
            out.append(line)
    tok = FAMILIES["grouping"][0].name
    if tok in means and len(means) > 2:
        worst = min(means, key=means.get)
        tied = sum(v == means[worst] for v in means.values()) > 1
        drops = {n: means[REF] - means[n] for n in means if n != REF} if REF in means else {}
        ok = None if tied else worst == tok
        out.append(f"- Removing entropy grouping hurts most: {C.verdict(ok)} — "
                   f"{tok} {means[tok]:.3f} vs worst {worst} {means[worst]:.3f}"
                   + (f"; drop vs reference {drops[tok]:+.3f} (largest drop "
                      f"{max(drops.values()):+.3f})" if drops else "")
                   + (f"; seed std ≈ {noise:.3f}" if not math.isnan(noise) else "") + ".")
    fixed = [v.name for v in FAMILIES["fixed_clip"] if v.name in means]
    if fixed and REF in means:
        ok = all(means[REF] > means[n] for n in fixed)
        out.append(f"- Adaptive (entropy) clipping beats fixed clip ranges: {C.verdict(ok)} — "
                   + ", ".join(f"{n} {means[n]:.3f}" for n in [REF] + fixed) + ".")
    clip = {r.variant.name: float(np.mean([C.train_mean(x, "clip_frac") for x in r.records]))
            for r in results if r.records}
    if clip:
        out.append("- Mean clip fraction per variant (for reference): " + ", ".join(
            f"{n} {v:.4f}" for n, v in sorted(clip.items(), key=lambda kv: -kv[1])) + ".")
    return out or ["- (no finished runs to judge)"]


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = C.sweep_parser(__doc__, default_out=str(DEFAULT_OUT))
    p.add_argument("--only", default=None,
                   help=f"comma list of families (default all: {','.join(FAMILIES)}; "
                        f"--smoke: {','.join(SMOKE_FAMILIES)}); the reference always runs")
    args = p.parse_args(argv)
    only = (args.only.split(",") if args.only else SMOKE_FAMILIES if args.smoke else None)
    vs = variants(only)
    seeds = C.parse_seeds(args.seeds, args.smoke, C.seeds_given(argv))
    extra = C.parse_sets(args.set)
    config = pathlib.Path(args.config).resolve()
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = C.make_runs(vs, seeds, runs_dir=pathlib.Path(args.runs_dir), config=config,
                       smoke=args.smoke, steps=args.steps, extra=extra)
    statuses = C.run_sweep(runs, args)

    results = C.load_results(runs)
    target = args.target if args.target is not None else C.default_target(results)
    return C.finish(
        args, out=out, config=config, runs=runs, statuses=statuses, results=results,
        seeds=seeds, extra=extra, ref_name=REF, claims=claims(results), target=target,
        title="ESPO ablations on the embedded task", script="experiments/ablations.py",
        intro=". The reference is ESPO with its ESPO.md defaults; each other row changes "
              "one thing (see per-variant overrides).",
        ref_caption="Reference ESPO: entropy and clip fraction (twin axes)",
        acc_title="ESPO ablations: eval accuracy (mean over seeds; band = min..max)",
        clip_title="ESPO ablations: clip fractions")


if __name__ == "__main__":
    sys.exit(main())
