"""Aggregation of finished runs: metric series, per-variant summaries, the results table."""
from __future__ import annotations

import dataclasses
import json
import math
from typing import Iterable, Sequence

import numpy as np

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
    head = ("| config | seeds | eval acc step 0 | final eval acc | mean eval acc (steps ≥ 1) | "
            "best eval acc | steps to target "
            "(reached) | clip frac high | clip frac low | clip frac | entropy first→last | "
            "resp. len | min / run |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for s in summaries:
        if not s["n"]:
            lines.append(f"| {s['name']} | 0 | (no finished runs) |" + " |" * 10)
            continue
        lines.append(
            f"| {s['name']} | {s['n']} | {_ms(s['initial'])} | **{_ms(s['final'])}** | "
            f"{_ms(s['avg'])} | {_ms(s['best'])} | {_reach_cell(s['reach'])} | {_ms(s['clip_frac_high'], '{:.4f}')} | "
            f"{_ms(s['clip_frac_low'], '{:.4f}')} | {_ms(s['clip_frac'], '{:.4f}')} | "
            f"{s['entropy_first']:.3f}→{s['entropy_last']:.3f} | "
            f"{_ms(s['response_len_mean'], '{:.1f}')} | {np.mean(s['wall_s']) / 60:.1f} |")
    return lines


def default_target(results: Sequence[VariantResult], delta: float = 0.10) -> float:
    """Initial (step 0) eval accuracy averaged over all runs + ``delta`` (absolute)."""
    init = [initial_accuracy(r) for res in results for r in res.records]
    init = [a for a in init if math.isfinite(a)]
    return round(float(np.mean(init)) + delta, 3) if init else 0.5
