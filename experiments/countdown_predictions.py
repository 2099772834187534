"""The Countdown sweep's pre-registered predictions (results/countdown/predictions.md), each
judged from finished runs: holds / does not hold / not yet testable, with its numbers.

Pure functions of ``VariantResult`` lists (arm name -> per-seed metric records); the
decision rules are the ones written in predictions.md before the sweep ran.
"""
from __future__ import annotations

import dataclasses
import math
import pathlib
import sys
from typing import Sequence

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from harness import stats  # noqa: E402
from harness.claims import correlation, trend  # noqa: E402
from harness.results import (VariantResult, eval_auc, final_accuracy, per_seed,  # noqa: E402
                             series)

MIN_PAIRS = 3                       # a paired comparison needs this many seeds in both arms
ONE_MB = ("espo 1 minibatch", "gspo 1 minibatch", "grpo 1 minibatch")
MAIN = ("espo", "gspo", "grpo", "dapo", "gmpo", "cispo")
ALPHAS = (("espo α=0.01", 0.01), ("espo", 0.02), ("espo α=0.05", 0.05))
GSPO_MIN, TOKEN_MAX = 0.15, 0.02    # prediction 2 thresholds
ENTROPY_STEP, ENTROPY_MAX_DROP = 20, 0.40   # prediction 3
MIN_TREND_STEPS = 8                 # prediction 4: quarters need a few steps

HOLDS, FAILS, UNTESTED = "holds", "does not hold", "not yet testable"


@dataclasses.dataclass(frozen=True)
class Verdict:
    number: int
    claim: str
    status: str                     # HOLDS | FAILS | UNTESTED
    detail: str                     # the numbers and seed counts behind the status

    def line(self) -> str:
        return f"{self.number}. {self.claim}: **{self.status}** — {self.detail}"


def _by(results: Sequence[VariantResult]) -> dict[str, VariantResult]:
    return {r.variant.name: r for r in results if r.records}


def _diff_text(d: stats.PairedDiff) -> str:
    ci = f"[{d.ci_low:+.3f}, {d.ci_high:+.3f}]" if math.isfinite(d.ci_low) else "no CI"
    p = ("no p" if not math.isfinite(d.p) else "p < 0.001" if d.p < 1e-3 else f"p {d.p:.3f}")
    return f"{d.arm} − {d.ref} {d.mean:+.3f} {ci} {p} (n={d.n})"


def one_minibatch_agree(results) -> Verdict:
    claim = "With 1 minibatch all objectives agree within noise"
    by = _by(results)
    pairs = [(a, b) for i, b in enumerate(ONE_MB) for a in ONE_MB[i + 1:]]
    diffs = []
    for label, fn in (("final acc", final_accuracy), ("AUC", eval_auc)):
        for a, b in pairs:
            if a in by and b in by:
                diffs.append((label, stats.paired_diff(per_seed(by[a], fn), per_seed(by[b], fn),
                                                       arm=a, ref=b, metric=label)))
    have = {n: len(by[n].records) for n in ONE_MB if n in by}
    if len(diffs) < 2 * len(pairs) or min(d.n for _, d in diffs) < MIN_PAIRS:
        return Verdict(1, claim, UNTESTED, f"needs ≥ {MIN_PAIRS} paired seeds of each of "
                       f"{', '.join(ONE_MB)}; finished seeds: {have or 'none'}")
    ok = all(not d.ci_excludes_zero for _, d in diffs)
    return Verdict(1, claim, HOLDS if ok else FAILS, "; ".join(
        f"{lab}: {_diff_text(d)}" for lab, d in diffs) + ".")


def offpolicy_clip(res: VariantResult) -> tuple[float, list[int]]:
    """Mean over steps >= 1, seeds and off-policy updates u >= 1 of minibatch{u}/clip_frac;
    and the update indices found. NaN if no off-policy update was logged."""
    us = sorted({int(k.split("/")[0][len("minibatch"):]) for rec in res.records for r in rec
                 for k in r if k.startswith("minibatch") and k.endswith("/clip_frac")
                 and k.count("/") == 1})
    us = [u for u in us if u >= 1]
    vals = [y for rec in res.records for u in us
            for y in series(rec, f"minibatch{u}/clip_frac", min_step=1)[1]]
    return (float(np.mean(vals)) if vals else float("nan")), us


def offpolicy_clipping(results) -> Verdict:
    claim = (f"With 4 minibatches GSPO clips ≥ {GSPO_MIN:.0%} of tokens on off-policy "
             f"minibatches, ESPO in between, GRPO/DAPO < {TOKEN_MAX:.0%}")
    by = _by(results)
    need = ("gspo", "espo", "grpo", "dapo")
    clip = {n: offpolicy_clip(by[n]) for n in need if n in by}
    missing = [n for n in need if n not in clip or not math.isfinite(clip[n][0])]
    if missing:
        return Verdict(2, claim, UNTESTED, f"no off-policy minibatch clip fractions "
                       f"(minibatch{{u}}/clip_frac, u ≥ 1) for {', '.join(missing)}")
    c = {n: v for n, (v, _) in clip.items()}
    ok = (c["gspo"] >= GSPO_MIN and c["grpo"] < TOKEN_MAX and c["dapo"] < TOKEN_MAX
          and max(c["grpo"], c["dapo"]) < c["espo"] < c["gspo"])
    us = sorted({u for _, u_list in clip.values() for u in u_list})
    return Verdict(2, claim, HOLDS if ok else FAILS,
                   "off-policy clip fraction (updates u = " + ",".join(map(str, us)) + "): "
                   + ", ".join(f"{n} {c[n]:.4f} ({len(by[n].records)} seeds)" for n in need)
                   + ".")


def _seed_mean_at(res: VariantResult, key: str, step: int) -> tuple[float, int]:
    vals = [dict(zip(*series(rec, key))).get(step) for rec in res.records]
    vals = [v for v in vals if v is not None]
    return (float(np.mean(vals)) if vals else float("nan")), len(vals)


def entropy_drop(res: VariantResult, step: int = ENTROPY_STEP) -> tuple[float, int, int]:
    """(1 − e(step)/e(first), first logged step, seeds) of entropy_mean's seed mean."""
    firsts = [series(rec, "entropy_mean")[0] for rec in res.records]
    first = min((int(x[0]) for x in firsts if len(x)), default=None)
    if first is None:
        return float("nan"), -1, 0
    e0, _ = _seed_mean_at(res, "entropy_mean", first)
    e1, n = _seed_mean_at(res, "entropy_mean", step)
    return (1.0 - e1 / e0 if e0 > 0 and math.isfinite(e1) else float("nan")), first, n


def entropy_kept(results) -> Verdict:
    claim = f"Entropy falls by at most {ENTROPY_MAX_DROP:.0%} by step {ENTROPY_STEP}"
    by = _by(results)
    drops = {n: entropy_drop(by[n]) for n in MAIN if n in by}
    drops = {n: v for n, v in drops.items() if math.isfinite(v[0])}
    if not drops:
        return Verdict(3, claim, UNTESTED, f"no main arm has logged entropy_mean at step "
                       f"{ENTROPY_STEP} (runs too short or not finished)")
    ok = all(d <= ENTROPY_MAX_DROP for d, _, _ in drops.values())
    return Verdict(3, claim, HOLDS if ok else FAILS,
                   f"relative entropy drop to step {ENTROPY_STEP}: " + ", ".join(
                       f"{n} {d:+.1%} (from step {f}, {k} seeds)"
                       for n, (d, f, k) in drops.items())
                   + ("" if len(drops) == len(MAIN) else
                      f" (arms without data: {', '.join(n for n in MAIN if n not in drops)})")
                   + ".")


def group_clip_rises(results) -> Verdict:
    claim = "ESPO's high-entropy group clip fraction rises as its entropy falls"
    res = _by(results).get("espo")
    if res is None:
        return Verdict(4, claim, UNTESTED, "no finished ESPO run")
    x, _ = res.stack("group0/clip_frac", min_step=1)
    if len(x) < MIN_TREND_STEPS:
        return Verdict(4, claim, UNTESTED, f"group0/clip_frac logged at {len(x)} common "
                       f"training steps (needs ≥ {MIN_TREND_STEPS})")
    _, de = trend(res, "entropy_mean")
    _, dc = trend(res, "group0/clip_frac")
    rho = correlation(res, "entropy_mean", "group0/clip_frac")
    ok = de < 0 and dc > 0
    return Verdict(4, claim, HOLDS if ok else FAILS,
                   f"ESPO ({len(res.records)} seeds, {len(x)} steps): entropy change "
                   f"first→last quarter {de:+.4f} nats, group0/clip_frac change {dc:+.4f}; "
                   f"Pearson r(entropy, group0 clip) over steps x seeds = {rho:+.2f}.")


def _noise(d: stats.PairedDiff) -> str:
    return "outside noise" if d.ci_excludes_zero else "within noise"


def auc_order(results) -> Verdict:
    claim = "ESPO ≥ GSPO > GRPO in area under the eval curve"
    by = _by(results)
    if not all(n in by for n in ("espo", "gspo", "grpo")):
        return Verdict(5, claim, UNTESTED, "needs finished espo, gspo and grpo runs; have "
                       + (", ".join(f"{n} {len(by[n].records)}" for n in ("espo", "gspo", "grpo")
                                    if n in by) or "none"))
    auc = {n: per_seed(by[n], eval_auc) for n in ("espo", "gspo", "grpo")}
    eg = stats.paired_diff(auc["espo"], auc["gspo"], arm="espo", ref="gspo", metric="AUC")
    gr = stats.paired_diff(auc["gspo"], auc["grpo"], arm="gspo", ref="grpo", metric="AUC")
    if min(eg.n, gr.n) < MIN_PAIRS:
        return Verdict(5, claim, UNTESTED, f"needs ≥ {MIN_PAIRS} paired seeds; have "
                       f"{eg.n} (espo, gspo) and {gr.n} (gspo, grpo)")
    ok = eg.mean >= 0 and gr.mean > 0
    return Verdict(5, claim, HOLDS if ok else FAILS,
                   f"paired AUC: {_diff_text(eg)}, {_noise(eg)}; {_diff_text(gr)}, "
                   f"{_noise(gr)}.")


def alpha_inside(results) -> Verdict:
    claim = "The best α lies strictly inside the sweep (0.02 best of 0.01 / 0.02 / 0.05)"
    by = _by(results)
    names = [n for n, _ in ALPHAS]
    if not all(n in by for n in names):
        return Verdict(6, claim, UNTESTED, "needs finished runs of " + ", ".join(names))
    auc = {n: per_seed(by[n], eval_auc) for n in names}
    fin = {n: per_seed(by[n], final_accuracy) for n in names}
    common = sorted(set.intersection(*(
        {s for s, v in auc[n].items() if math.isfinite(v)} for n in names)))
    if len(common) < MIN_PAIRS:
        return Verdict(6, claim, UNTESTED, f"needs ≥ {MIN_PAIRS} seeds finished by all three "
                       f"α arms; have {len(common)}")
    m = {n: float(np.mean([auc[n][s] for s in common])) for n in names}
    f = {n: float(np.mean([fin[n][s] for s in common])) for n in names}
    ok = all(m["espo"] > m[n] for n in names if n != "espo")
    diffs = [stats.paired_diff({s: auc["espo"][s] for s in common},
                               {s: auc[n][s] for s in common}, arm="espo", ref=n, metric="AUC")
             for n in names if n != "espo"]
    return Verdict(6, claim, HOLDS if ok else FAILS,
                   f"mean AUC over seeds {common}: " + ", ".join(
                       f"α={a} {m[n]:.3f} (final acc {f[n]:.3f})" for n, a in ALPHAS)
                   + "; " + "; ".join(_diff_text(d) for d in diffs) + ".")


PREDICTIONS = (one_minibatch_agree, offpolicy_clipping, entropy_kept, group_clip_rises,
               auc_order, alpha_inside)


def judge(results: Sequence[VariantResult]) -> list[Verdict]:
    return [p(results) for p in PREDICTIONS]
