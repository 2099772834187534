"""Aggregation of finished runs: metric series, per-variant summaries, the results table."""
from __future__ import annotations

import dataclasses
import json
import math
from typing import Iterable, Sequence

import numpy as np

from harness import stats
from harness.runner import is_finished, read_metrics
from harness.specs import Run, Variant

TRAIN_KEYS = ("clip_frac", "clip_frac_high", "clip_frac_low", "entropy_mean",
              "response_len_mean", "reward_mean")


def series(records: Sequence[dict], key: str, *, min_step: int = 0):
    """(steps int[n], values f64[n]) of the records that have a finite number under key."""
    xs, ys = [], []
    for r in records:
        v = r.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) \
                and r["step"] >= min_step:
            xs.append(int(r["step"]))
            ys.append(float(v))
    return np.asarray(xs, int), np.asarray(ys, float)


@dataclasses.dataclass
class VariantResult:
    variant: Variant
    records: list[list[dict]]       # per seed
    seeds: list[int]
    wall_s: list[float]

    def stack(self, key: str, *, min_step: int = 0):
        """(steps int[n], values f64[S, n]) over the steps every seed has (NaN-free)."""
        per = [dict(zip(*series(r, key, min_step=min_step))) for r in self.records]
        if not per:
            return np.zeros(0, int), np.zeros((0, 0))
        common = sorted(set.intersection(*(set(p) for p in per)))
        return np.asarray(common, int), np.asarray([[p[s] for s in common] for p in per])


def load_results(runs: Sequence[Run]) -> list[VariantResult]:
    """Finished runs grouped by variant (order of first appearance); unfinished skipped."""
    by: dict[str, VariantResult] = {}
    for r in runs:
        res = by.setdefault(r.variant.name, VariantResult(r.variant, [], [], []))
        if not is_finished(r):
            continue
        res.records.append(read_metrics(r.workdir / "metrics.jsonl"))
        res.seeds.append(r.seed)
        res.wall_s.append(float(json.loads((r.workdir / "done.json").read_text())["wall_s"]))
    return list(by.values())


def final_accuracy(records: Sequence[dict]) -> float:
    _, acc = series(records, "eval_accuracy")
    return float(acc[-1]) if len(acc) else float("nan")


def final_value(records: Sequence[dict], key: str) -> float:
    """The last finite value of ``key`` in a run (NaN if never logged)."""
    _, y = series(records, key)
    return float(y[-1]) if len(y) else float("nan")


def eval_auc(records: Sequence[dict], key: str = "eval_accuracy") -> float:
    """Area under the eval curve / step span (trapezoid mean over the evaluated steps,
    step 0 included when evaluated); NaN if never evaluated."""
    return stats.auc(*series(records, key))


def final_sampled_accuracy(records: Sequence[dict]) -> float:
    """Final T=1 sampled eval accuracy (``eval_sampled_accuracy``); NaN when not logged."""
    return final_value(records, "eval_sampled_accuracy")


# Per-run scalars compared between arms by paired seeds: label -> function of a run's records.
RUN_SCALARS = {"final greedy accuracy": final_accuracy, "eval AUC": eval_auc}


def per_seed(res: "VariantResult", fn) -> dict[int, float]:
    """seed -> fn(records) over a variant's finished runs."""
    return {s: fn(r) for s, r in zip(res.seeds, res.records)}


def initial_accuracy(records: Sequence[dict]) -> float:
    x, acc = series(records, "eval_accuracy")
    return float(acc[0]) if len(acc) and x[0] == 0 else float("nan")


def steps_to_target(records: Sequence[dict], target: float) -> int | None:
    """First evaluated step (>= 1) whose eval accuracy reaches ``target``; None if never."""
    for s, a in zip(*series(records, "eval_accuracy", min_step=1)):
        if a >= target - 1e-9:
            return int(s)
    return None


def train_mean(records: Sequence[dict], key: str) -> float:
    """Mean of a per-update metric over the training steps (step >= 1)."""
    _, y = series(records, key, min_step=1)
    return float(y.mean()) if len(y) else float("nan")


def _ms(vals: Iterable[float], fmt: str = "{:.3f}") -> str:
    v = np.asarray([x for x in vals if x is not None and math.isfinite(x)], float)
    if not len(v):
        return "n/a"
    if len(v) == 1:
        return fmt.format(v[0])
    return f"{fmt.format(v.mean())} ± {fmt.format(v.std(ddof=1))}"


def summarize(res: VariantResult, target: float) -> dict:
    """Per-variant numbers for the table (lists are per seed)."""
    recs = res.records
    reach = [steps_to_target(r, target) for r in recs]
    _, ent = res.stack("entropy_mean", min_step=1)
    return {
        "name": res.variant.name,
        "n": len(recs),
        "initial": [initial_accuracy(r) for r in recs],
        "final": [final_accuracy(r) for r in recs],
        "best": [float(series(r, "eval_accuracy")[1].max()) if len(series(r, "eval_accuracy")[1])
                 else float("nan") for r in recs],
        "avg": [float(series(r, "eval_accuracy", min_step=1)[1].mean())
                if len(series(r, "eval_accuracy", min_step=1)[1]) else float("nan") for r in recs],
        "auc": [eval_auc(r) for r in recs],
        "sampled": [final_sampled_accuracy(r) for r in recs],
        "reach": reach,
        **{k: [train_mean(r, k) for r in recs] for k in TRAIN_KEYS},
        "entropy_first": float(ent[:, 0].mean()) if ent.size else float("nan"),
        "entropy_last": float(ent[:, -1].mean()) if ent.size else float("nan"),
        "wall_s": res.wall_s,
    }


def _reach_cell(reach: Sequence[int | None]) -> str:
    hit = [r for r in reach if r is not None]
    if not reach:
        return "n/a"
    if not hit:
        return f"never (0/{len(reach)})"
    return f"{np.mean(hit):.1f} ({len(hit)}/{len(reach)})"


def results_table(summaries: Sequence[dict]) -> list[str]:
    """One row per config (seeds in the second column); the final sampled T=1 accuracy
    column appears only when some run logs ``eval_sampled_accuracy``."""
    sampled = any(math.isfinite(x) for s in summaries for x in s.get("sampled", ()))
    head = ("| config | seeds | eval acc step 0 | final eval acc | mean eval acc (steps ≥ 1) | "
            "eval AUC | " + ("final sampled acc (T=1) | " if sampled else "") +
            "best eval acc | steps to target "
            "(reached) | clip frac high | clip frac low | clip frac | entropy first→last | "
            "resp. len | min / run |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for s in summaries:
        if not s["n"]:
            lines.append(f"| {s['name']} | 0 | (no finished runs) |" + " |" * (11 + sampled))
            continue
        lines.append(
            f"| {s['name']} | {s['n']} | {_ms(s['initial'])} | **{_ms(s['final'])}** | "
            f"{_ms(s['avg'])} | {_ms(s['auc'])} | "
            + (f"{_ms(s['sampled'])} | " if sampled else "") +
            f"{_ms(s['best'])} | {_reach_cell(s['reach'])} | "
            f"{_ms(s['clip_frac_high'], '{:.4f}')} | "
            f"{_ms(s['clip_frac_low'], '{:.4f}')} | {_ms(s['clip_frac'], '{:.4f}')} | "
            f"{s['entropy_first']:.3f}→{s['entropy_last']:.3f} | "
            f"{_ms(s['response_len_mean'], '{:.1f}')} | {np.mean(s['wall_s']) / 60:.1f} |")
    return lines


def default_target(results: Sequence[VariantResult], delta: float = 0.10) -> float:
    """Initial (step 0) eval accuracy averaged over all runs + ``delta`` (absolute)."""
    init = [initial_accuracy(r) for res in results for r in res.records]
    init = [a for a in init if math.isfinite(a)]
    return round(float(np.mean(init)) + delta, 3) if init else 0.5


def _cell(xs: dict[int, float], fmt: str = "{:.3f}") -> str:
    sm = stats.summary(xs)
    if not sm.n:
        return "n/a"
    return fmt.format(sm.mean) if sm.n == 1 else f"{fmt.format(sm.mean)} ± {fmt.format(sm.sd)}"


def arm_table(results: Sequence[VariantResult], extra: Sequence[tuple[str, object]] = ()
              ) -> list[str]:
    """One row per arm: name, seeds (finished), final greedy accuracy, eval AUC, final
    sampled T=1 accuracy (column only when some run logs ``eval_sampled_accuracy``), then
    ``extra`` columns (header, fn(records) -> float, formatted "{:.4f}")."""
    sampled = any(math.isfinite(final_sampled_accuracy(r)) for res in results
                  for r in res.records)
    cols = [("final greedy acc", final_accuracy, "{:.3f}"), ("eval AUC", eval_auc, "{:.3f}")]
    if sampled:
        cols.append(("final sampled acc (T=1)", final_sampled_accuracy, "{:.3f}"))
    cols += [(h, fn, "{:.4f}") for h, fn in extra]
    head = "| arm | seeds | " + " | ".join(c[0] for c in cols) + " | min / run |"
    lines = [head, "|" + "---|" * (len(cols) + 3)]
    for res in results:
        if not res.records:
            lines.append(f"| {res.variant.name} | 0 |" + " — |" * (len(cols) + 1))
            continue
        cells = [_cell(per_seed(res, fn), fmt) for _, fn, fmt in cols]
        lines.append(f"| {res.variant.name} | {len(res.records)} | " + " | ".join(cells)
                     + f" | {np.mean(res.wall_s) / 60:.1f} |")
    return lines


def paired_comparisons(results: Sequence[VariantResult], ref: str,
                       scalars=None) -> dict[str, list[stats.PairedDiff]]:
    """metric label -> every arm minus ``ref`` by paired seeds (Holm over the arms)."""
    scalars = RUN_SCALARS if scalars is None else scalars
    done = [r for r in results if r.records]
    return {label: stats.compare_to_reference({r.variant.name: per_seed(r, fn) for r in done},
                                              ref, label)
            for label, fn in scalars.items()}


def _p(p: float) -> str:
    if not math.isfinite(p):
        return "n/a"
    return "<0.001" if p < 1e-3 else f"{p:.3f}"


def paired_table(comparisons: dict[str, list[stats.PairedDiff]]) -> list[str]:
    """Markdown table of paired differences vs the reference (one row per arm x metric)."""
    rows = [d for ds in comparisons.values() for d in ds]
    if not rows:
        return ["(no reference arm with finished runs: no paired comparisons)"]
    lines = ["| metric | arm − " + rows[0].ref + " | pairs | mean diff | 95% CI | p (paired t) "
             "| Holm p |", "|---|---|---|---|---|---|---|"]
    for d in rows:
        ci = (f"[{d.ci_low:+.3f}, {d.ci_high:+.3f}]" if math.isfinite(d.ci_low) else "n/a")
        mean = f"{d.mean:+.3f}" if math.isfinite(d.mean) else "n/a"
        drop = f" (unpaired seeds dropped: {list(d.dropped)})" if d.dropped else ""
        lines.append(f"| {d.metric} | {d.arm} | {d.n}{drop} | {mean} | {ci} | {_p(d.p)} | "
                     f"{_p(d.p_holm)} |")
    return lines
