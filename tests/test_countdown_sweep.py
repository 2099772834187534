"""experiments/countdown_sweep.py: queue order and seed plan, the pre-registered prediction
verdicts on synthetic runs (each one seen holding, failing and untestable), and
--report_only over fake finished runs of configs/default.py."""
from __future__ import annotations

import json
import pathlib
import sys

import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "experiments"))

from harness import runner  # noqa: E402
from harness.results import VariantResult  # noqa: E402
from harness.specs import Variant  # noqa: E402
import countdown_predictions as P  # noqa: E402
import countdown_sweep as S  # noqa: E402

DEFAULT = REPO / "configs" / "default.py"


def _records(*, steps=24, acc0=0.3, acc1=0.5, ent0=1.0, ent_slope=-0.01, clip=(0.0, 0.0),
             g0=(0.05, 0.0), sampled=None, seed=0) -> list[dict]:
    """A run's metrics: eval at 0, 8, 16, ..., steps; clip=(on-policy, off-policy) per
    update; g0=(group0 clip at step 1, per-step slope)."""
    recs = [{"step": 0, "eval_accuracy": acc0}]
    for s in range(1, steps + 1):
        r = {"step": s, "entropy_mean": ent0 + ent_slope * (s - 1),
             "group0/clip_frac": g0[0] + g0[1] * s, "clip_frac": clip[1],
             "minibatch0/clip_frac": clip[0],
             **{f"minibatch{u}/clip_frac": clip[1] + 0.001 * seed for u in (1, 2, 3)}}
        if s % 8 == 0 or s == steps:
            r["eval_accuracy"] = acc0 + (acc1 - acc0) * s / steps
            if sampled is not None:
                r["eval_sampled_accuracy"] = sampled
        recs.append(r)
    return recs


def _arm(name: str, seeds=(0, 1, 2), **kw) -> VariantResult:
    kw_seed = {k: v for k, v in kw.items() if k not in ("noise",)}
    noise = kw.get("noise", 0.01)
    recs = [_records(seed=s, **{**kw_seed, "acc1": kw_seed.get("acc1", 0.5) + noise * s})
            for s in seeds]
    return VariantResult(Variant(name, name.split()[0]), recs, list(seeds), [60.0] * len(seeds))


def _status(results, n):
    return P.judge(results)[n - 1]


def test_queue_order_and_plan(tmp_path):
    plan = S.seed_plan()
    assert sum(len(v) for v in plan.values()) == 57
    assert plan["espo"] == list(range(6)) and plan["dapo"] == list(range(4))
    assert plan["espo token groups"] == [0, 1, 2]
    runs = S.queue(plan, runs_dir=tmp_path, config=DEFAULT)
    assert len(runs) == 57 and len({r.workdir for r in runs}) == 57
    key = [(r.variant.name, r.seed) for r in runs]
    main = {v.name for v in S.MAIN}
    # Phase 1: seeds 0-2 of the six main arms, seed-major.
    assert key[:18] == [(n, s) for s in range(3) for n in S.MAIN_SEEDS]
    # Phase 2: ablations seeds 0-2; phase 3: the extra seeds of the main arms only.
    assert all(n not in main and s < 3 for n, s in key[18:45])
    assert key[45:] == ([(n, 3) for n in S.MAIN_SEEDS] + [(n, s) for s in (4, 5)
                                                           for n in ("espo", "gspo", "grpo")])
    tok = next(r for r in runs if r.variant.name == "espo token groups")
    assert "--config.objective.espo.grouping=token" in tok.argv
    one = next(r for r in runs if r.variant.name == "gspo 1 minibatch")
    assert "--config.train.num_minibatches=1" in one.argv and one.argv[3].endswith(":gspo")
    # --seeds overrides every arm; the main arms' first seeds still come first.
    small = S.queue(S.seed_plan([0, 1]), runs_dir=tmp_path, config=DEFAULT)
    assert len(small) == 30 and [r.variant.name for r in small[:6]] == list(S.MAIN_SEEDS)


def test_prediction_one_minibatch():
    same = [_arm(n) for n in P.ONE_MB]
    assert _status(same, 1).status == P.HOLDS
    apart = [_arm(P.ONE_MB[0]), _arm(P.ONE_MB[1], acc1=0.8), _arm(P.ONE_MB[2])]
    v = _status(apart, 1)
    assert v.status == P.FAILS and "gspo 1 minibatch − espo 1 minibatch +0.300" in v.detail
    assert _status([_arm(n, seeds=(0, 1)) for n in P.ONE_MB], 1).status == P.UNTESTED
    assert _status(same[:2], 1).status == P.UNTESTED


def test_prediction_offpolicy_clipping():
    arms = {"gspo": 0.2, "espo": 0.05, "grpo": 0.001, "dapo": 0.002}
    res = [_arm(n, clip=(0.0, c)) for n, c in arms.items()]
    v = _status(res, 2)
    assert v.status == P.HOLDS and "gspo 0.2010 (3 seeds)" in v.detail
    res = [_arm(n, clip=(0.0, c)) for n, c in {**arms, "gspo": 0.10}.items()]
    assert _status(res, 2).status == P.FAILS             # GSPO below 15%
    res = [_arm(n, clip=(0.0, c)) for n, c in {**arms, "espo": 0.0}.items()]
    assert _status(res, 2).status == P.FAILS             # ESPO not in between
    assert _status(res[:3], 2).status == P.UNTESTED      # no DAPO
    # Only on-policy updates logged (1 minibatch): untestable, not "holds".
    one = [VariantResult(r.variant, [[{k: v for k, v in x.items()
                                       if not k.startswith(("minibatch1", "minibatch2",
                                                            "minibatch3"))} for x in rec]
                                     for rec in r.records], r.seeds, r.wall_s) for r in res]
    assert _status(one, 2).status == P.UNTESTED


def test_prediction_entropy_drop():
    # 1.0 -> 1.0 - 0.01*19 = 0.81 at step 20: a 19% drop.
    v = _status([_arm("espo"), _arm("gspo")], 3)
    assert v.status == P.HOLDS and "espo +19.0% (from step 1, 3 seeds)" in v.detail
    assert _status([_arm("espo"), _arm("gspo", ent_slope=-0.03)], 3).status == P.FAILS
    assert _status([_arm("espo", steps=10)], 3).status == P.UNTESTED


def test_prediction_group_clip_rises():
    assert _status([_arm("espo", g0=(0.05, 0.002))], 4).status == P.HOLDS
    assert _status([_arm("espo", g0=(0.05, -0.001))], 4).status == P.FAILS
    assert _status([_arm("espo", g0=(0.05, 0.002), ent_slope=0.01)], 4).status == P.FAILS
    assert _status([_arm("espo", steps=4)], 4).status == P.UNTESTED
    assert _status([_arm("gspo")], 4).status == P.UNTESTED


def test_prediction_auc_order():
    ok = [_arm("espo", acc1=0.6), _arm("gspo", acc1=0.55), _arm("grpo", acc1=0.45)]
    v = _status(ok, 5)
    assert v.status == P.HOLDS and "outside noise" in v.detail
    bad = [_arm("espo", acc1=0.5), _arm("gspo", acc1=0.55), _arm("grpo", acc1=0.45)]
    assert _status(bad, 5).status == P.FAILS
    # Pairing: espo has seeds 3-5 only -> no pairs with gspo's 0-2 -> untestable.
    shifted = [_arm("espo", seeds=(3, 4, 5)), _arm("gspo"), _arm("grpo")]
    assert _status(shifted, 5).status == P.UNTESTED


def test_prediction_alpha_inside():
    def arms(a01, a02, a05):
        return [_arm("espo α=0.01", acc1=a01), _arm("espo", acc1=a02),
                _arm("espo α=0.05", acc1=a05)]
    v = _status(arms(0.5, 0.6, 0.55), 6)
    assert v.status == P.HOLDS and "mean AUC over seeds [0, 1, 2]" in v.detail
    assert _status(arms(0.5, 0.6, 0.65), 6).status == P.FAILS
    assert _status(arms(0.5, 0.6, 0.6), 6).status == P.FAILS    # a tie is not "strictly"
    assert _status(arms(0.5, 0.6, 0.55)[:2], 6).status == P.UNTESTED


def _fake_finished(run, recs) -> None:
    wd = run.workdir
    wd.mkdir(parents=True, exist_ok=True)
    (wd / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    (wd / "config.json").write_text(json.dumps({"num_steps": recs[-1]["step"]}))
    (wd / "done.json").write_text(json.dumps({"argv": runner._identity(run.argv),
                                              "returncode": 0, "wall_s": 90.0}))


def test_report_only_on_fake_runs(tmp_path):
    """The report: arm rows with seed counts, sampled accuracy, paired table, verdicts."""
    runs_dir, out = tmp_path / "runs", tmp_path / "out"
    names = ["espo", "gspo", "grpo", "dapo"]
    plan = {n: s for n, s in S.seed_plan().items() if n in names}
    acc = {"espo": 0.6, "gspo": 0.55, "grpo": 0.45, "dapo": 0.4}
    clip = {"espo": 0.05, "gspo": 0.2, "grpo": 0.001, "dapo": 0.002}
    for r in S.queue(plan, runs_dir=runs_dir, config=DEFAULT):
        if r.seed < 5:    # espo/gspo/grpo miss seed 5: unfinished runs are not rows
            _fake_finished(r, _records(acc1=acc[r.variant.name] + 0.01 * r.seed,
                                       clip=(0.0, clip[r.variant.name]), sampled=0.4,
                                       g0=(0.05, 0.002), seed=r.seed))
    archive = tmp_path / "archive"
    rc = S.main(["--report_only", "--config", str(DEFAULT), "--runs_dir", str(runs_dir),
                 "--out", str(out), "--arms", ",".join(names), "--archive", str(archive)])
    assert rc == 0
    text = (out / "report.md").read_text()
    # The archive keeps the finished runs' metrics: from a fresh runs dir (another machine)
    # the report has the same rows.
    assert sorted(p.name for p in next(archive.rglob("seed0")).iterdir()) == [
        "config.json", "done.json", "metrics.jsonl"]
    assert S.main(["--report_only", "--config", str(DEFAULT), "--runs_dir",
                   str(tmp_path / "fresh"), "--out", str(tmp_path / "out2"), "--arms",
                   ",".join(names), "--archive", str(archive)]) == 0
    again = (tmp_path / "out2" / "report.md").read_text()
    assert again.split("## Plots")[0] == text.split("## Plots")[0]
    assert "| espo | 5 | 0.620 ± 0.016 |" in text and "| dapo | 4 |" in text
    assert "final sampled acc (T=1)" in text and "| 0.400 ± 0.000 |" in text
    assert "| final greedy accuracy | gspo | 5 | -0.050 | [-0.050, -0.050] |" in text
    assert "| eval AUC | dapo | 4 (unpaired seeds dropped: [4]) | -0.100 |" in text
    preds = text.split("## Pre-registered predictions")[1].split("## Plots")[0]
    assert "2. With 4 minibatches" in preds and preds.count("**holds**") == 4
    assert preds.count("**not yet testable**") == 2                # 1 minibatch, alpha
    for f in ("accuracy.png", "minibatch_clip.png", "entropy.png",
              "espo_group_clip_vs_entropy.png", "espo_groups.png"):
        assert (out / f).stat().st_size > 5000 and f"]({f})" in text, f
    with pytest.raises(SystemExit, match="unknown"):
        S.main(["--report_only", "--config", str(DEFAULT), "--arms", "ppo",
                "--archive", str(archive)])


def test_committed_archive_belongs_to_the_queue(tmp_path):
    """Every archived Countdown run is a run of today's queue (same config hash and seed),
    so a resumed sweep restores it instead of running it again. A config edit that changes
    what the runs resolve to orphans them: then this fails, on purpose (delete the archive
    if the change is meant to invalidate them, or list a new key in specs.ADDED_KEYS)."""
    archive = S.DEFAULT_OUT / "runs"
    done = sorted(p.parent.relative_to(archive) for p in archive.glob("*/seed*/done.json"))
    if not done:
        pytest.skip("no archived Countdown runs")
    runs = S.queue(S.seed_plan(), runs_dir=tmp_path, config=S.DEFAULT_CONFIG)
    queued = {r.workdir.relative_to(tmp_path) for r in runs}
    orphans = [str(d) for d in done if d not in queued]
    assert not orphans, f"archived runs no longer in the sweep's queue: {orphans}"
