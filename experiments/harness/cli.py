"""The sweep scripts' shared command line, report and finish step."""
from __future__ import annotations

import argparse
import hashlib
import json
import pathlib
import subprocess
from typing import Any, Sequence

from harness.plots import plot_accuracy, plot_clip, plot_entropy_clip, plot_groups, plot_length
from harness.results import (VariantResult, paired_comparisons, paired_table, results_table,
                             summarize)
from harness.runner import archive_finished, is_finished, restore_archived, run_all
from harness.specs import DEFAULT_CONFIG, DEFAULT_RUNS, REPO, Run, _fmt


# --------------------------------------------------------------------------- CLI --
def sweep_parser(description: str, *, default_out: str) -> argparse.ArgumentParser:
    """A sweep script's parser: its docstring as the help text, then the options every
    sweep shares (the script adds its own)."""
    p = argparse.ArgumentParser(description=description,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=default_out, help="report directory (report.md + PNGs)")
    p.add_argument("--runs_dir", default=str(DEFAULT_RUNS),
                   help="where run workdirs live (shared between sweeps; not committed)")
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="configs/*.py file to run")
    p.add_argument("--seeds", default="3", help="a count N (seeds 0..N-1) or a list '0,1,2'")
    p.add_argument("--jobs", type=int, default=1, help="runs in parallel (processes)")
    p.add_argument("--steps", type=int, default=None, help="override num_steps of every run")
    p.add_argument("--smoke", action="store_true",
                   help="the config's :smoke variant, 1 seed unless --seeds is given; for tests")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="extra --config.KEY=VALUE for every run (repeatable)")
    p.add_argument("--target", type=float, default=None,
                   help="accuracy target for 'steps to target' (default: mean step-0 accuracy "
                        "+ 0.10)")
    p.add_argument("--notes", default=None, help="markdown file appended to report.md")
    p.add_argument("--report_only", action="store_true", help="aggregate finished runs only")
    p.add_argument("--archive", default=None,
                   help="folder keeping the small files of finished runs (metrics, config), "
                        "e.g. committed with the report: restored into --runs_dir before the "
                        "sweep, updated after it")
    p.add_argument("--keep_checkpoints", action="store_true",
                   help="keep checkpoints/ and final_policy/ of finished runs")
    p.add_argument("--timeout", type=float, default=None, help="per-run wall limit (s)")
    p.add_argument("--no_compile_cache", action="store_true",
                   help="do not share JAX's persistent compilation cache (RUNS/.jax_cache)")
    return p


def parse_seeds(s: str, smoke: bool, given: bool) -> list[int]:
    if smoke and not given:
        return [0]
    if "," in s:
        return [int(x) for x in s.split(",") if x.strip()]
    return list(range(int(s)))


def parse_sets(items: Sequence[str]) -> list[tuple[str, str]]:
    out = []
    for it in items:
        if "=" not in it:
            raise SystemExit(f"--set expects KEY=VALUE (a config key without 'config.'), got {it!r}")
        k, v = it.split("=", 1)
        out.append((k.removeprefix("--").removeprefix("config."), v))
    return out


def seeds_given(argv: Sequence[str]) -> bool:
    return any(a == "--seeds" or a.startswith("--seeds=") for a in argv)


PAIRED_TEXT = (
    "Each arm minus {ref} on the same seed (same prompt order and eval set), over the seeds "
    "both arms finished (pairs; unmatched seeds are named and dropped). Eval AUC = the "
    "trapezoid mean of greedy eval accuracy over the evaluated steps (step 0 included), i.e. "
    "area / step span. 95% CI = t-interval of the mean difference; p = two-sided paired "
    "t-test; Holm p = Holm–Bonferroni over the comparisons against {ref} for that metric. "
    "n/a: fewer than 2 pairs.")


def write_report(out: pathlib.Path, *, title: str, intro: Sequence[str],
                 results: Sequence[VariantResult], target: float, claims: Sequence[str],
                 plots: Sequence[tuple[str, str]], setup: Sequence[str],
                 notes: str | None = None, ref_name: str | None = None,
                 table: Sequence[str] | None = None,
                 claims_title: str = "Claims of the paper at this scale") -> pathlib.Path:
    """report.md: setup, results table (``table`` replaces the default one), paired
    differences vs ``ref_name`` (when given), claims, plots, notes."""
    if table is None:
        table = [f"Final eval accuracy = greedy accuracy on the held-out split after the last "
                 f"step (mean ± sample std over seeds); mean eval acc = the mean of the "
                 f"evaluations after step 0 (less noisy than one evaluation); eval AUC = the "
                 f"trapezoid mean of the eval curve (step 0 included). Steps to target = first "
                 f"evaluated step with accuracy ≥ {target:.3f} (mean over the seeds that reached "
                 f"it). Clip fractions and entropy are per-update training metrics averaged "
                 f"over all steps.", "",
                 *results_table([summarize(r, target) for r in results])]
    lines = [f"# {title}", "", *intro, "", "## Setup", "", *setup, "",
             "## Results", "", *table, ""]
    if ref_name is not None:
        lines += [f"### Paired differences vs {ref_name}", "", PAIRED_TEXT.format(ref=ref_name),
                  "", *paired_table(paired_comparisons(results, ref_name)), ""]
    lines += [f"## {claims_title}", "", *claims, ""]
    lines += ["## Plots", ""]
    for fname, caption in plots:
        lines += [f"**{caption}**", "", f"![{caption}]({fname})", ""]
    if notes:
        lines += ["## Notes", "", notes.strip(), ""]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def describe_config(config: pathlib.Path, smoke: bool, steps: int | None,
                    extra: Sequence[tuple[str, Any]], seeds: Sequence[int],
                    results: Sequence[VariantResult]) -> list[str]:
    """Setup lines: the command pattern and the resolved key settings of one finished run."""
    lines = [f"- config: `{config.relative_to(REPO) if config.is_relative_to(REPO) else config}`"
             + (" (`:smoke`)" if smoke else "") + f"; seeds {list(seeds)}"
             + (f"; num_steps overridden to {steps}" if steps is not None else "")]
    if extra:
        lines.append("- extra overrides for every run: "
                     + ", ".join(f"`{k}={v}`" for k, v in extra))
    lines.append("- per-variant overrides: " + "; ".join(
        f"{r.variant.name}: " + (", ".join(f"`{k}={_fmt(v)}`" for k, v in r.variant.overrides)
                                 or "defaults") for r in results))
    lines.append(f"- total training wall time: "
                 f"{sum(sum(r.wall_s) for r in results) / 60:.1f} min over "
                 f"{sum(len(r.wall_s) for r in results)} runs")
    return lines


def resolved_settings(runs: Sequence[Run]) -> list[str]:
    """Key settings read from the first finished run's config.json."""
    for r in runs:
        p = r.workdir / "config.json"
        if is_finished(r) and p.is_file():
            c = json.loads(p.read_text())
            ro, tr, ev = c.get("rollout", {}), c.get("train", {}), c.get("eval", {})
            model = pathlib.Path(c.get("model", {}).get("path", ""))
            weights = sorted(model.glob("*.safetensors")) if model.is_dir() else []
            digest = hashlib.sha1(b"".join(w.read_bytes() for w in weights)).hexdigest()[:10]
            try:
                head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                                      capture_output=True, text=True).stdout.strip()
            except OSError:
                head = ""
            shown = model.relative_to(REPO) if model.is_relative_to(REPO) else model
            return [f"- code: git `{head or '?'}`; policy `{shown}` (safetensors sha1 "
                    f"`{digest}`)",
                    f"- resolved (from `{r.workdir.name}` of `{r.variant.name}`): "
                    f"task `{c.get('task', {}).get('name')}`, {c.get('num_steps')} steps, "
                    f"{ro.get('prompts_per_step')} prompts x G={ro.get('group_size')}, "
                    f"max {ro.get('max_new_tokens')} new tokens, T={ro.get('temperature')}, "
                    f"{tr.get('num_epochs')} epoch(s) x {tr.get('num_minibatches')} minibatches, "
                    f"lr {tr.get('lr')}, eval every {ev.get('every')} steps on "
                    f"{ev.get('num_examples')} held-out problems"]
    return []


def run_sweep(runs: Sequence[Run], args) -> list[dict]:
    """run_all with the CLI options of sweep_parser (nothing when --report_only). With
    --archive, finished runs are restored from the archive first and each archived as it
    finishes."""
    runs_dir = pathlib.Path(args.runs_dir)
    archive = pathlib.Path(args.archive) if args.archive else None
    if archive is not None:
        restore_archived(runs, runs_dir, archive)
    if args.report_only:
        statuses = []
    else:
        cache = None if args.no_compile_cache else runs_dir / ".jax_cache"
        statuses = run_all(runs, jobs=args.jobs, keep_checkpoints=args.keep_checkpoints,
                           timeout_s=args.timeout, compile_cache=cache,
                           on_finished=None if archive is None else
                           (lambda r: archive_finished([r], runs_dir, archive)))
    if archive is not None:
        print(f"archived {archive_finished(runs, runs_dir, archive)} finished runs in {archive}")
    return statuses


def finish(args, *, out: pathlib.Path, config: pathlib.Path, runs: Sequence[Run],
           statuses: Sequence[dict], results: Sequence[VariantResult], seeds: Sequence[int],
           extra: Sequence[tuple[str, Any]], ref_name: str, title: str, script: str,
           intro: str, claims: Sequence[str], target: float, ref_caption: str,
           acc_title: str = "", clip_title: str = "", ref_title: str = "",
           paired: bool = True) -> int:
    """Plots + report.md for a finished sweep; prints failed runs; returns the exit code.

    ``ref_name`` is the variant whose entropy/clip and per-group curves are plotted, and
    (``paired``) the reference of the paired-difference table;
    the report opens with "Generated by `script`" and ``intro``.
    """
    done = [r for r in results if r.records]
    plots = [
        ("accuracy.png", "Greedy eval accuracy vs step (mean over seeds, band = min..max)"),
        ("clip_fraction.png", "Clip fraction high (A > 0) and low (A < 0) per update"),
        ("espo_entropy_clip.png", ref_caption),
        ("response_length.png", "Sampled response length vs step"),
    ]
    plot_accuracy(done, out / "accuracy.png", target=target, title=acc_title)
    plot_clip(done, out / "clip_fraction.png", title=clip_title)
    ref = next((r for r in done if r.variant.name == ref_name), None)
    if ref is not None:
        plot_entropy_clip(ref, out / "espo_entropy_clip.png", title=ref_title)
    else:
        plots = [pl for pl in plots if pl[0] != "espo_entropy_clip.png"]
    plot_length(done, out / "response_length.png")
    if ref is not None and plot_groups(ref, out / "espo_groups.png"):
        plots.append(("espo_groups.png", "ESPO: clip fraction and ε per entropy group"))
    notes = pathlib.Path(args.notes).read_text() if args.notes else None
    report = write_report(
        out, title=title,
        intro=[f"Generated by `{script}`"
               + (" --smoke (a plumbing check, not a result)" if args.smoke else "") + intro],
        results=results, target=target, claims=claims, plots=plots,
        setup=describe_config(config, args.smoke, args.steps, extra, seeds, results)
        + resolved_settings(runs), notes=notes, ref_name=ref_name if paired else None)
    failed = [s for s in statuses if s["status"] == "failed"]
    print(f"report: {report}")
    for s in failed:
        print(f"FAILED: {s['run']} (rc {s['returncode']}): " + " | ".join(s["log_tail"]))
    return 1 if failed else 0
