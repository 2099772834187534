"""The runner on the math path (configs/qwen3_math.py:smoke, in-process): a full smoke run
with rollout dumps and avg@k eval, bad inputs failing fast with clear errors, and the
non-finite stop."""
from __future__ import annotations

import importlib.util
import json
import pathlib
import shutil

import jax.numpy as jnp
import numpy as np
import pytest

from espo_jax.train import loop

REPO = pathlib.Path(__file__).resolve().parent.parent
DATA = REPO / "tests" / "data"


def math_config(**overrides):
    spec = importlib.util.spec_from_file_location("cfg_qwen3_math", REPO / "configs" / "qwen3_math.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    c = mod.get_config("smoke")
    c.mesh.fsdp = 1
    c.log.tensorboard = False
    for key, value in overrides.items():
        node = c
        *parents, last = key.split(".")
        for p in parents:
            node = node[p]
        node[last] = value
    return c


@pytest.mark.slow
def test_qwen3_math_smoke_run(tmp_path):
    # remat + micro-batches (score and train_step scan over micro-batches of 2).
    out = loop.run(math_config(**{"dump.every": 1, "model.remat": True}), tmp_path)
    assert out["step"] == 2
    recs = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [0, 1, 2]
    assert recs[0]["eval_num"] == 8          # 4 problems x avg@2
    assert (tmp_path / "checkpoints" / "2").is_dir()
    assert (tmp_path / "final_policy" / "tokenizer.json").is_file()
    dump = np.load(tmp_path / "dumps" / "step_000002.npz")
    for key in ("response_tokens", "mask", "entropy", "group_ids", "ratios", "rewards"):
        assert key in dump.files
    assert dump["response_tokens"].shape[0] == 8 and np.all(np.isfinite(dump["ratios"]))
    rows = [json.loads(x) for x in (tmp_path / "dumps" / "step_000002.jsonl").read_text().splitlines()]
    assert len(rows) == 8 and "response" in rows[0]


@pytest.mark.slow
def test_nonfinite_updates_stop_the_run(tmp_path, monkeypatch):
    monkeypatch.setattr(loop, "compute_advantages",
                        lambda rewards, *a, **k: jnp.full(rewards.shape, jnp.nan))
    cfg = math_config(**{"train.max_nonfinite_in_a_row": 2, "num_steps": 5})
    with pytest.raises(loop.NonFiniteError, match="2 non-finite updates in a row"):
        loop.run(cfg, tmp_path)
    recs = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert recs[-1]["step"] == 1 and recs[-1]["nonfinite_updates"] == 2
    assert (tmp_path / "checkpoints" / "1").is_dir()


def _write(path, text):
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("case", ["missing_model", "vocab", "empty", "malformed", "overlap",
                                  "minibatches", "group_size", "micro", "task"])
def test_bad_inputs_fail_with_clear_errors(case, tmp_path):
    ov, err, match = {}, ValueError, None
    if case == "missing_model":
        ov, err, match = {"model.path": str(tmp_path / "nope")}, FileNotFoundError, "model.path"
    elif case == "vocab":
        d = tmp_path / "small_vocab"
        shutil.copytree(DATA / "tiny_qwen3", d)
        cfg = json.loads((d / "config.json").read_text())
        cfg["vocab_size"] = 50
        (d / "config.json").write_text(json.dumps(cfg))
        ov, match = {"model.path": str(d)}, "vocab mismatch"
    elif case == "empty":
        ov, match = {"task.train_file": _write(tmp_path / "t.jsonl", "\n")}, "empty dataset"
    elif case == "malformed":
        f = _write(tmp_path / "bad.jsonl", '{"problem": "1+1", "answer": "2"}\n{"problem": \n')
        ov, match = {"task.train_file": f}, "bad.jsonl:2"
    elif case == "overlap":
        ov, match = {"task.train_file": str(DATA / "math_eval.jsonl")}, "overlaps"
    elif case == "minibatches":
        ov, match = {"train.num_minibatches": 3}, "num_minibatches=3"
    elif case == "group_size":
        ov, match = {"rollout.group_size": 1}, "group_size"
    elif case == "micro":
        ov, match = {"train.micro_batch_size": 3}, "micro_batch_size=3"
    elif case == "task":
        ov, match = {"task.name": "chess"}, "task.name"
    with pytest.raises(err, match=match):
        loop.run(math_config(**ov), tmp_path / "wd")
