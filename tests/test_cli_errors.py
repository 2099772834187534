"""The bad-input battery through the CLI: every mistake exits 2 with one line
``error: ...`` naming the culprit, no traceback, and before any rollout (no metrics.jsonl,
no checkpoint). Most cases run ``espo_jax.main``'s flag parser and ``main`` in-process
(seconds); two real subprocesses check the exit code, stderr and ``ESPO_DEBUG``.
"""
from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest
from absl import flags

from espo_jax import main as cli

REPO = pathlib.Path(__file__).resolve().parent.parent
DATA = REPO / "tests" / "data"
SMOKE = f"--config={REPO / 'configs' / 'default.py'}:smoke"
MATH = f"--config={REPO / 'configs' / 'qwen3_math.py'}:smoke"


def run_cli(capsys, *args, config=SMOKE) -> tuple[int, str]:
    """(exit code, stderr) of ``python -m espo_jax.main <config> <args>``, in-process."""
    argv = ["espo_jax.main", config, "--config.mesh.fsdp=1", "--config.log.tensorboard=False",
            *args]
    code, old_argv = 0, sys.argv
    sys.argv = argv  # config_flags finds the --config.* overrides in sys.argv
    fv = flags.FlagValues()  # fresh flags per call (config overrides are defined once)
    cli.define_flags(fv)
    try:
        rest = cli.parse_flags(argv, fv)
        code = cli.main(rest, fv) or 0
    except SystemExit as e:
        code = e.code
    finally:
        sys.argv = old_argv
    return code, capsys.readouterr().err


def check_one_line(code, err, *needles):
    assert code == 2, err
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], (n, lines[0])


@pytest.mark.parametrize("args, needles", [
    (["--config.train.lrr=1e-4"], ["--config.train.lrr", "'lrr'", "'lr'"]),
    (["--config.trai.lr=1e-4"], ["'trai'", "'train'"]),
    (["--config.train.lr=abc"], ["--config.train.lr=abc"]),
    (["--config.num_steps=1.5"], ["--config.num_steps"]),
    (["--config.objective.espo.grouping=bogus"], ["objective.espo", "'bogus'", "top_fraction"]),
    (["--config.objective.espo.alpha=-1"], ["objective.espo", "alpha", ">= 0"]),
    (["--config.objective.espo.top_fraction=1.5"], ["objective.espo", "top_fraction", "(0, 1]"]),
    (["--config.objective.name=ppo"], ["objective.name", "'ppo'", "espo"]),
    (["--config.advantage.estimator=rloo"], ["advantage.estimator", "'rloo'"]),
    (["--config.num_steps=-3"], ["num_steps", ">= 0", "-3"]),
    (["--config.mesh.tensor=64"], ["config.mesh", "64 devices", "available"]),
    (["--config.rollout.group_size=1"], ["rollout.group_size"]),
    (["--config.rollout.max_concurrent=-1"], ["rollout.max_concurrent", ">= 0", "-1"]),
    (["--config.rollout.max_concurrent_per_device=-2"],
     ["rollout.max_concurrent_per_device", ">= 0", "-2"]),
    (["--config.rollout.kv_block=100"], ["rollout.kv_block", "power of two", "100"]),
    (["--config.rollout.decode_read=-5"], ["rollout.decode_read", ">= 0", "-5"]),
    (["--config.rollout.engine_attention=paged"], ["rollout.engine_attention", "paged"]),
    (["--config.train.num_minibatches=3"], ["num_minibatches=3"]),
    (["--config.model.dtype=float8"], ["model.dtype", "float8"]),
    (["--config.model.attention_impl=flash"], ["model.attention_impl", "'flash'", "blockwise"]),
    (["--config.model.remat_policy=all"], ["model.remat_policy", "'all'", "matmuls"]),
    (["--config.eval.num_samples=0"], ["eval.num_samples"]),
    (["--config.resume.allow_changes=objective.nope"], ["resume.allow_changes", "objective.nope"]),
    (["--config.model.path=/no/such/model"], ["model.path", "/no/such/model"]),
    (["positional"], ["unexpected arguments"]),
])
def test_bad_flags_one_line(capsys, tmp_path, args, needles):
    code, err = run_cli(capsys, f"--workdir={tmp_path / 'wd'}", *args)
    check_one_line(code, err, *needles)
    assert not (tmp_path / "wd" / "metrics.jsonl").exists()
    assert not (tmp_path / "wd" / "checkpoints").exists()


def test_bad_config_variant_and_missing_workdir(capsys, tmp_path):
    code, err = run_cli(capsys, f"--workdir={tmp_path}", config=SMOKE + "x")
    check_one_line(code, err, "unknown config variant", "'smokex'")
    code, err = run_cli(capsys)
    check_one_line(code, err, "--workdir")


def test_workdir_is_a_file(capsys, tmp_path):
    f = tmp_path / "afile"
    f.write_text("x")
    code, err = run_cli(capsys, f"--workdir={f}")
    check_one_line(code, err, str(f), "not a directory")


def test_missing_and_malformed_data_files(capsys, tmp_path):
    code, err = run_cli(capsys, f"--workdir={tmp_path / 'a'}",
                        f"--config.task.train_file={tmp_path / 'nope.jsonl'}", config=MATH)
    check_one_line(code, err, "task.train_file", "nope.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"problem": "1+1", "answer": "2"}\n{"problem": \n')
    code, err = run_cli(capsys, f"--workdir={tmp_path / 'b'}", f"--config.task.train_file={bad}",
                        config=MATH)
    check_one_line(code, err, "bad.jsonl:2", "malformed JSON")
    assert not (tmp_path / "b" / "metrics.jsonl").exists()


def test_corrupt_checkpoint(capsys, tmp_path):
    (tmp_path / "checkpoints" / "1").mkdir(parents=True)
    (tmp_path / "checkpoints" / "1" / "junk").write_text("not a checkpoint")
    code, err = run_cli(capsys, f"--workdir={tmp_path}", config=MATH)
    check_one_line(code, err, "checkpoint", "[1]", "none could be restored")
    assert not (tmp_path / "metrics.jsonl").exists()


# Real processes: the exit status, stderr as a user sees it, and the --debug escape hatch.
def _proc(args, env_extra=None):
    env = dict(os.environ, JAX_PLATFORMS="cpu", **(env_extra or {}))
    return subprocess.run([sys.executable, "-m", "espo_jax.main", SMOKE, *args], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=120)


def test_cli_subprocess_exit_codes(tmp_path):
    p = _proc([f"--workdir={tmp_path}", "--config.objective.espo.alpha=-1"])
    check_one_line(p.returncode, p.stderr, "objective.espo", "alpha")
    p = _proc([f"--workdir={tmp_path}", "--config.train.lrr=1"], {"ESPO_DEBUG": "1"})
    assert p.returncode != 0 and "Traceback" in p.stderr and "lrr" in p.stderr
