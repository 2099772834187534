"""experiments/: run specs, resume/lock logic, aggregation + report on synthetic runs, and one
end-to-end --smoke of both sweeps (shared runs: the ablation's reference ESPO is reused)."""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import time

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "experiments"))

from harness import runner, specs  # noqa: E402
import ablations  # noqa: E402
import compare_objectives  # noqa: E402

PLOTS = ("accuracy.png", "clip_fraction.png", "espo_entropy_clip.png", "response_length.png")


def _fake_run(run: specs.Run, *, acc0: float, acc1: float, clip: float, steps: int = 6,
              clip_slope: float = 0.0) -> None:
    """A finished run as the harness would leave it (metrics.jsonl + done.json)."""
    wd = run.workdir
    wd.mkdir(parents=True, exist_ok=True)
    recs = [{"step": 0, "eval_accuracy": acc0}]
    for s in range(1, steps + 1):
        r = {"step": s, "clip_frac": clip + clip_slope * s, "clip_frac_high": clip * 0.7,
             "clip_frac_low": clip * 0.3, "entropy_mean": 1.0 - 0.05 * s,
             "response_len_mean": 20 + s, "reward_mean": 0.3 + 0.01 * s}
        if s % 3 == 0:
            r["eval_accuracy"] = acc0 + (acc1 - acc0) * s / steps
        recs.append(r)
    (wd / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    (wd / "config.json").write_text(json.dumps({"num_steps": steps}))
    (wd / "done.json").write_text(json.dumps({"argv": runner._identity(run.argv), "returncode": 0,
                                              "wall_s": 60.0}))


def test_run_specs_and_shared_slugs(tmp_path):
    vs = compare_objectives.variants(["espo", "gspo"])
    runs = specs.make_runs(vs, [0, 1], runs_dir=tmp_path, steps=7, extra=[("eval.num_examples", "32")],
                       dump_every=3, dump_variant="espo")
    assert len(runs) == 4
    a = runs[0].argv
    assert a[1:3] == ("-m", "espo_jax.main") and a[3].endswith("default.py:espo")
    assert "--config.seed=0" in a and "--config.num_steps=7" in a
    assert "--config.eval.num_examples=32" in a and "--config.dump.every=3" in a
    # Seed-major order (a sweep cut short has every variant at the first seeds).
    assert [(r.variant.name, r.seed) for r in runs] == [("espo", 0), ("gspo", 0), ("espo", 1),
                                                        ("gspo", 1)]
    assert not any("dump.every" in x for r in runs[1:] for x in r.argv)  # espo seed 0 only
    assert runs[0].workdir.parent != runs[1].workdir.parent       # espo vs gspo
    assert runs[0].workdir.parent == runs[2].workdir.parent       # seeds share the slug
    # The ablation reference is the comparison's ESPO run: same workdir.
    ref = specs.make_runs(ablations.variants(["alpha"])[:1], [0], runs_dir=tmp_path, steps=7,
                      extra=[("eval.num_examples", "32")])[0]
    assert ref.workdir == runs[0].workdir
    alpha = ablations.variants(["alpha"])[1]
    r = specs.make_runs([alpha], [0], runs_dir=tmp_path)[0]
    assert "--config.objective.espo.alpha=0.01" in r.argv and "alpha=0.01" in str(r.workdir)
    fixed = ablations.variants(["fixed_clip"])[1]
    r = specs.make_runs([fixed], [0], runs_dir=tmp_path, smoke=True)[0]
    assert r.argv[3].endswith("default.py:smoke,espo")
    assert {"--config.objective.espo.clip_mode=fixed", "--config.objective.espo.clip_low=0.0003",
            "--config.objective.espo.clip_high=0.0004"} <= set(r.argv)
    with pytest.raises(SystemExit, match="unknown"):
        compare_objectives.variants(["ppo"])
    with pytest.raises(SystemExit, match="unknown"):
        ablations.variants(["beta"])


def test_run_hash_does_not_depend_on_the_checkout_path(tmp_path, monkeypatch):
    """The configs point at checkpoints inside the repository by absolute path; a run's hash
    (and so its archived directory) must be the same wherever the repository is cloned, or a
    committed archive is orphaned in every other checkout."""
    hashes = []
    for name in ("a", "b"):
        repo = tmp_path / name
        (repo / "configs").mkdir(parents=True)
        (repo / "ckpt").mkdir()
        (repo / "ckpt" / "config.json").write_text("{}")
        cfg = repo / "configs" / "c.py"
        cfg.write_text("import os, ml_collections\n"
                       "def get_config(arg=None):\n"
                       "    c = ml_collections.ConfigDict()\n"
                       "    c.model = dict(path=os.path.join(os.path.dirname(os.path.dirname(\n"
                       "        os.path.abspath(__file__))), 'ckpt'), extra=['x'])\n"
                       "    c.lr = 1e-3\n"
                       "    return c\n")
        monkeypatch.setattr(specs, "REPO", repo)
        hashes.append(specs.config_hash(cfg, "", ()))
        # Still sensitive to what the config resolves to.
        hashes.append(specs.config_hash(cfg, "", (("lr", "2e-3"),)))
    assert hashes[0] == hashes[2] and hashes[1] == hashes[3] and hashes[0] != hashes[1]
    # ... and to a path outside the repository.
    monkeypatch.setattr(specs, "REPO", tmp_path / "elsewhere")
    specs.config_hash.cache_clear()
    assert specs.config_hash(tmp_path / "a" / "configs" / "c.py", "", ()) != hashes[0]


def test_resume_skips_finished_and_locks(tmp_path):
    run = specs.make_runs(compare_objectives.variants(["espo"]), [0], runs_dir=tmp_path)[0]
    assert not runner.is_finished(run)
    _fake_run(run, acc0=0.2, acc1=0.4, clip=0.01)
    assert runner.is_finished(run)
    assert runner.run_one(run)["status"] == "cached"
    assert runner.metrics_complete(run.workdir)
    seen = []  # run_all hands each finished run to on_finished (the sweeps archive it at once)
    assert [s["status"] for s in runner.run_all([run], on_finished=seen.append,
                                                log=lambda *_: None)] == ["cached"]
    assert seen == [run]
    lines = (run.workdir / "metrics.jsonl").read_text().splitlines()
    (run.workdir / "metrics.jsonl").write_text("\n".join(lines[:-2]) + "\n")
    assert not runner.metrics_complete(run.workdir)      # e.g. a run stopped by SIGTERM
    # Same workdir, different command (e.g. other steps): not finished, and refused clearly.
    other = specs.Run(run.variant, 0, run.workdir, run.argv + ("--config.num_steps=3",))
    assert not runner.is_finished(other)
    (run.workdir / "spec.json").write_text(json.dumps({"argv": runner._identity(run.argv)}))
    with pytest.raises(RuntimeError, match="different run"):
        runner.run_one(other)
    # A live lock means another process runs it; a stale one (dead pid) is taken over.
    lock = tmp_path / ".lock"
    lock.write_text(str(os.getpid()))
    assert not runner._acquire(lock)
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    lock.write_text(str(proc.pid))
    assert runner._acquire(lock) and lock.read_text() == str(os.getpid())


def test_report_and_claims_on_synthetic_runs(tmp_path):
    """--report_only over fake finished runs: table, verdicts and all four plots."""
    runs_dir, out = tmp_path / "runs", tmp_path / "out"
    names = ["espo", "grpo", "gspo"]
    runs = specs.make_runs(compare_objectives.variants(names), [0, 1, 2], runs_dir=runs_dir)
    spec = {"espo": (0.2, 0.5, 0.01, 0.002), "grpo": (0.2, 0.4, 0.001, 0.0),
            "gspo": (0.2, 0.3, 0.2, 0.0)}
    for r in runs:
        a0, a1, clip, slope = spec[r.variant.name]
        _fake_run(r, acc0=a0, acc1=a1 + 0.01 * r.seed, clip=clip, clip_slope=slope)
    rc = compare_objectives.main(["--report_only", "--runs_dir", str(runs_dir), "--out",
                                  str(out), "--objectives", ",".join(names)])
    assert rc == 0
    text = (out / "report.md").read_text()
    for f in PLOTS:
        assert (out / f).stat().st_size > 5000, f
        assert f"]({f})" in text
    assert "| espo | 3 | 0.200 ± 0.000 | **0.510 ± 0.010** | 0.432 ± 0.008 |" in text
    assert "steps to target" in text and "3.0 (3/3)" in text   # target 0.30, reached at step 3
    # Paired differences vs ESPO: by seed, final acc gspo − espo = 0.3 − 0.5 on every seed.
    paired = text.split("### Paired differences vs espo")[1].split("## Claims")[0]
    assert "| final greedy accuracy | gspo | 3 | -0.200 | [-0.200, -0.200] | <0.001 |" in paired
    assert "| eval AUC | grpo | 3 |" in paired
    assert "final sampled acc" not in text     # not logged by these runs
    claims = text.split("## Claims")[1].split("## Plots")[0]
    assert "GSPO clips the most tokens: **holds**" in claims
    assert "Token-level methods (grpo) clip the least: **holds**" in claims
    assert "ESPO keeps its clip fraction low (below GSPO's): **holds**" in claims
    assert "clip fraction rises as entropy falls: **holds**" in claims
    assert "ESPO reaches the best final accuracy: **holds** (by more than" in claims

    # Ablations: the token (no-grouping) variant worst, alpha 0.05 beats the reference.
    out2 = tmp_path / "abl"
    vs = ablations.variants(["alpha", "grouping"])
    aruns = specs.make_runs(vs, [0, 1], runs_dir=runs_dir)
    final = {ablations.REF: 0.5, "α=0.01": 0.45, "α=0.05": 0.55, "α=0.1": 0.4,
             "no grouping (token)": 0.3}
    for r in aruns:
        if not runner.is_finished(r):
            _fake_run(r, acc0=0.2, acc1=final[r.variant.name] + 0.01 * r.seed, clip=0.01)
    rc = ablations.main(["--report_only", "--runs_dir", str(runs_dir), "--out", str(out2),
                         "--only", "alpha,grouping", "--seeds", "2"])
    assert rc == 0
    text = (out2 / "report.md").read_text()
    assert "α = 0.02 is the best clip scale: **does not hold**" in text
    assert "Removing entropy grouping hurts most: **holds**" in text
    assert all((out2 / f).is_file() for f in PLOTS)


def _smoke_config() -> str:
    """configs/default.py (the embedded task) once its checkpoint exists, else the tiny
    random Qwen3 math smoke config (same code path, only plumbing is checked)."""
    from espo_jax.data import arith
    if (arith.ASSET_DIR / "config.json").is_file():
        return str(REPO / "configs" / "default.py")
    return str(REPO / "configs" / "qwen3_math.py")


@pytest.mark.slow
def test_smoke_sweeps_end_to_end(tmp_path):
    """compare --smoke (espo + gspo, 1 seed, 2 processes) then ablations --smoke, which reuses
    the ESPO run and adds the no-grouping run; a rerun is a no-op (resumable)."""
    runs_dir = tmp_path / "runs"
    common = ["--runs_dir", str(runs_dir), "--config", _smoke_config(), "--smoke"]
    # One host device per run (conftest forces 8 for the sharding tests).
    xla = " ".join(f for f in os.environ.get("XLA_FLAGS", "").split()
                   if "force_host_platform_device_count" not in f)
    env = {**os.environ, "PYTHONPATH": str(REPO), "XLA_FLAGS": xla}
    cmp_out = tmp_path / "cmp"
    t0 = time.time()
    p = subprocess.run([sys.executable, str(REPO / "experiments" / "compare_objectives.py"),
                        *common, "--out", str(cmp_out), "--jobs", "2"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    t_cmp = time.time() - t0
    text = (cmp_out / "report.md").read_text()
    assert "| espo | 1 |" in text and "| gspo | 1 |" in text
    assert all((cmp_out / f).stat().st_size > 5000 for f in PLOTS)
    for wd in runs_dir.glob("*/seed0"):
        assert (wd / "done.json").is_file() and not (wd / "checkpoints").exists()
    abl_out = tmp_path / "abl"
    p = subprocess.run([sys.executable, str(REPO / "experiments" / "ablations.py"), *common,
                        "--out", str(abl_out)], capture_output=True, text=True, env=env,
                       timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "1 already finished, 1 to run" in p.stdout
    text = (abl_out / "report.md").read_text()
    assert "| no grouping (token) | 1 |" in text and f"| {ablations.REF} | 1 |" in text
    t0 = time.time()
    p = subprocess.run([sys.executable, str(REPO / "experiments" / "compare_objectives.py"),
                        *common, "--out", str(cmp_out)], capture_output=True, text=True,
                       env=env, timeout=120)
    assert p.returncode == 0 and "2 already finished, 0 to run" in p.stdout, p.stdout
    assert time.time() - t0 < 30 and t_cmp < 240
