"""The CLI end to end (subprocesses): smoke run outputs, resume equality, SIGTERM, config typo.

Runs ``python -m espo_jax.main`` on ``configs/default.py:smoke`` on one device
(``--config.mesh.fsdp=1``; the sharded runs are the sharding tests'). A persistent JAX
compilation cache shared by these subprocesses keeps the later runs fast.
"""
from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

from espo_jax.train.writers import read_metrics

REPO = pathlib.Path(__file__).resolve().parent.parent
CONFIG = os.environ.get("ESPO_TEST_MAIN_CONFIG", str(REPO / "configs" / "default.py") + ":smoke")
TIME_KEYS = ("time_",)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    e = dict(os.environ)
    e.update(JAX_COMPILATION_CACHE_DIR=str(tmp_path_factory.mktemp("jax_cache")),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1",
             XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu")
    return e


def cli(workdir, *overrides, env, config=CONFIG, check=True, timeout=300):
    cmd = [sys.executable, "-m", "espo_jax.main", f"--config={config}", f"--workdir={workdir}",
           "--config.mesh.fsdp=1", *overrides]
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"{cmd} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}")
    return p


def records(workdir):
    """Step records (resume events dropped)."""
    return read_metrics(pathlib.Path(workdir) / "metrics.jsonl", events=False)


def _strip(rec, drop_eval=False):
    return {k: v for k, v in rec.items()
            if not k.startswith(TIME_KEYS) and not (drop_eval and k.startswith("eval_"))}


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, env):
    wd = tmp_path_factory.mktemp("full")
    p = cli(wd, "--config.num_steps=3", env=env)
    return wd, p


def test_smoke_run_writes_everything(full_run):
    wd, p = full_run
    recs = records(wd)
    assert [r["step"] for r in recs] == [0, 1, 2, 3]
    assert "eval_accuracy" in recs[0] and "eval_accuracy" in recs[-1]
    for r in recs[1:]:
        for key in ("reward_mean", "loss", "clip_frac", "clip_frac_high", "clip_frac_low",
                    "entropy_mean", "response_len_mean", "time_rollout_s", "time_score_s",
                    "time_update_s", "rollout_slots"):
            assert key in r, (key, r)
        # float32 smoke run: the first update is on-policy and the sampler agrees with the
        # scoring pass (ratios 1, log-probs equal up to rounding).
        assert r["first_minibatch/ratio_dev_max"] < 1e-4, r
        assert r["first_minibatch/clip_frac"] == 0.0, r
        assert r["sampler_scorer/logp_abs_diff_max"] < 1e-4, r
        assert "minibatch0/clip_frac" in r, r
    assert (wd / "checkpoints" / "3").is_dir()
    for name in ("reward", "eval_accuracy", "clip_fraction", "entropy", "response_length"):
        assert (wd / f"{name}.png").stat().st_size > 1000
    assert "eval accuracy" in (wd / "summary.md").read_text()
    assert json.loads((wd / "config.json").read_text())["num_steps"] == 3
    assert list((wd / "tensorboard").iterdir())
    from espo_jax.data import load_tokenizer
    from espo_jax.models import from_pretrained
    model = from_pretrained(str(wd / "final_policy"), dtype="float32")
    assert model.config.vocab_size >= len(load_tokenizer(wd / "final_policy"))
    assert "Done: 3 steps" in p.stdout


def test_resume_gives_identical_metrics(full_run, tmp_path, env):
    wd_full, _ = full_run
    wd = tmp_path / "resumed"
    cli(wd, "--config.num_steps=1", env=env)
    p = cli(wd, "--config.num_steps=3", env=env)
    assert "Resuming from checkpoint at step 1" in p.stdout
    a, b = records(wd_full), records(wd)
    assert [r["step"] for r in b] == [0, 1, 2, 3]
    for ra, rb in zip(a, b):
        # The stopped run evaluated after its last step (1); the uninterrupted one did not.
        drop = ra["step"] == 1
        assert _strip(ra, drop) == pytest.approx(_strip(rb, drop), rel=1e-6, abs=1e-7), ra["step"]
    # The benign change (num_steps 1 -> 3) is recorded, and both launches' configs are kept.
    events = [r for r in read_metrics(wd / "metrics.jsonl") if "event" in r]
    assert events == [{"step": 1, "event": "resume", "config": "config.1.json",
                       "changes": {"num_steps": {"old": 1, "new": 3}}}]
    assert json.loads((wd / "config.json").read_text())["num_steps"] == 1
    assert json.loads((wd / "config.1.json").read_text())["num_steps"] == 3
    # A protected change is refused in one line before any work; allow_changes lets it in.
    before = (wd / "metrics.jsonl").read_text()
    p = cli(wd, "--config.num_steps=4", "--config.objective.name=gspo", env=env, check=False)
    assert p.returncode == 2 and p.stderr.count("\n") == 1, p.stderr
    assert "objective.name: 'espo' -> 'gspo'" in p.stderr and "allow_changes" in p.stderr
    assert (wd / "metrics.jsonl").read_text() == before
    assert not (wd / "checkpoints" / "4").exists()


def test_packed_run_matches_unpacked(full_run, tmp_path, env):
    """train.max_tokens_per_row > 0 (packed score + train step, micro-batches of 4 packed
    rows) gives the unpacked run's metrics (same rollouts, log-probs up to f32 rounding)."""
    wd_full, _ = full_run
    wd = tmp_path / "packed"
    cli(wd, "--config.num_steps=2", "--config.eval.every=0",
        "--config.train.max_tokens_per_row=64", "--config.train.micro_batch_size=4", env=env)
    a, b = records(wd_full)[1:3], records(wd)[1:3]
    assert [r["step"] for r in b] == [1, 2]
    for ra, rb in zip(a, b):
        assert _strip(rb, True) == pytest.approx(_strip(ra, True), rel=1e-4, abs=1e-5), ra["step"]
    p = cli(tmp_path / "bad", "--config.train.max_tokens_per_row=8", env=env, check=False,
            timeout=120)
    assert p.returncode != 0 and "train.max_tokens_per_row" in p.stderr


def test_sigterm_checkpoints_and_resumes(tmp_path, env):
    wd = tmp_path / "term"
    cmd = [sys.executable, "-m", "espo_jax.main", f"--config={CONFIG}", f"--workdir={wd}",
           "--config.mesh.fsdp=1", "--config.num_steps=500", "--config.eval.every=0"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline:
            if (wd / "metrics.jsonl").exists() and any(r["step"] >= 1 for r in records(wd)):
                break
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-3000:]
    assert "SIGTERM" in out
    last = records(wd)[-1]["step"]
    assert 1 <= last < 500
    assert (wd / "checkpoints" / str(last)).is_dir()
    p = cli(wd, f"--config.num_steps={last + 1}", "--config.eval.every=0", env=env)
    assert f"Resuming from checkpoint at step {last}" in p.stdout
    assert [r["step"] for r in records(wd)] == list(range(last + 2))


def test_config_typo_names_the_key(tmp_path, env):
    p = cli(tmp_path / "typo", "--config.train.lrr=1e-4", env=env, check=False, timeout=120)
    assert p.returncode != 0
    assert "lrr" in p.stderr
    assert not (tmp_path / "typo" / "metrics.jsonl").exists()
