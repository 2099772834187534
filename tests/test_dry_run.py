"""``python -m espo_jax.main --dry_run``: compiles the train step, the scoring pass and the
rollout from ``config.json`` alone (no weights, tokenizer or data) on the 8 simulated CPU
devices and writes ``memory_plan.json``; figures checked against parameter counts computed
here from config.json."""
from __future__ import annotations

import json
import pathlib
import shutil
import sys

import jax
import pytest
from absl import flags

from espo_jax import main as cli

REPO = pathlib.Path(__file__).resolve().parent.parent
SMOKE = f"--config={REPO / 'configs' / 'default.py'}:smoke"
TINY = REPO / "espo_jax" / "assets" / "arith" / "config.json"


def run_cli(capsys, *args) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of ``python -m espo_jax.main``, in-process."""
    argv = ["espo_jax.main", SMOKE, *args]
    code, old_argv = 0, sys.argv
    sys.argv = argv  # config_flags finds the --config.* overrides in sys.argv
    fv = flags.FlagValues()
    cli.define_flags(fv)
    try:
        code = cli.main(cli.parse_flags(argv, fv), fv) or 0
    except SystemExit as e:
        code = e.code
    finally:
        sys.argv = old_argv
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture()
def model_dir(tmp_path):
    """A model directory holding config.json only: loading weights or a tokenizer fails."""
    d = tmp_path / "model"
    d.mkdir()
    shutil.copy(TINY, d / "config.json")
    return d


def _param_counts(hf: dict) -> tuple[int, int]:
    """(all parameters, parameters per layer) of a tied Qwen3 config.json."""
    d, f, hd = hf["hidden_size"], hf["intermediate_size"], hf["head_dim"]
    h, kv = hf["num_attention_heads"], hf["num_key_value_heads"]
    layer = d * h * hd * 2 + 2 * d * kv * hd + 3 * d * f + 2 * d + 2 * hd  # + norms
    assert hf["tie_word_embeddings"]
    return hf["vocab_size"] * d + hf["num_hidden_layers"] * layer + d, layer


def test_dry_run_writes_a_memory_plan_from_config_json_alone(capsys, tmp_path, model_dir):
    wd = tmp_path / "wd"
    code, out, err = run_cli(capsys, f"--workdir={wd}", "--dry_run",
                             f"--config.model.path={model_dir}", "--config.plan.prompt_len=20",
                             "--config.log.tensorboard=False")
    assert code == 0, err
    assert sorted(p.name for p in model_dir.iterdir()) == ["config.json"]
    assert sorted(p.name for p in wd.iterdir()) == ["memory_plan.json"]  # no run started
    plan = json.loads((wd / "memory_plan.json").read_text())
    assert plan["devices"] == 8 and plan["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1,
                                                         "expert": 1}
    # smoke: 4 prompts x 4 samples, 2 minibatches; prompt 20 -> bucket 32; 16 new tokens
    assert plan["shapes"] == dict(rollout_rows=16, minibatch_rows=8, micro_batch=0,
                                  prompt_len=32, response_len=16)
    assert plan["compiled_layers"] == [1, 2] and not plan["extrapolated"]
    for phase in ("train_step", "score", "rollout"):
        m = plan["per_device"][phase]
        for k in ("argument", "temp", "output", "total"):
            assert isinstance(m[k], int) and m[k] > 0, (phase, k, m)
        assert m["total"] == m["argument"] + m["output"] - m["alias"] + m["temp"]
        assert phase in out and set(plan["per_layer"][phase]) >= {"argument", "temp", "total"}
    assert "per layer" in out and "memory_plan.json" in out

    # float32 params + two Adam moments, every matrix split 8 ways (norms replicated)
    hf = json.loads(TINY.read_text())
    n_params, per_layer = _param_counts(hf)
    assert plan["model"]["params"] == n_params
    assert plan["state"] == pytest.approx(3 * 4 * n_params / 8, rel=0.05)
    assert plan["per_device"]["train_step"]["argument"] >= plan["state"]  # + the minibatch
    assert plan["per_device"]["train_step"]["alias"] >= 0.95 * plan["state"]  # donated
    assert plan["per_layer"]["train_step"]["argument"] == pytest.approx(
        3 * 4 * per_layer / 8, rel=0.05)
    # the sampler holds the (float32 compute) params; scoring the params only
    assert plan["per_device"]["score"]["argument"] == pytest.approx(4 * n_params / 8, rel=0.1)
    assert plan["peak"] == max(plan["peak_with_state"].values()) > plan["state"]


def test_dry_run_rejects_a_plan_longer_than_the_model(capsys, tmp_path, model_dir):
    code, _, err = run_cli(capsys, f"--workdir={tmp_path / 'wd'}", "--dry_run",
                           f"--config.model.path={model_dir}")  # 512 + 16 > 128 positions
    assert code == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    assert "plan.prompt_len" in err and "max_position_embeddings=128" in err
    code, _, err = run_cli(capsys, f"--workdir={tmp_path / 'wd'}", "--dry_run",
                           f"--config.model.path={model_dir}", "--config.plan.layers=-1")
    assert code == 2 and "plan.layers" in err, err
    # plan.devices simulates CPU devices only before JAX starts (here it has 8 already)
    code, _, err = run_cli(capsys, f"--workdir={tmp_path / 'wd'}", "--dry_run",
                           f"--config.model.path={model_dir}", "--config.plan.devices=4")
    assert code == 2 and "plan.devices=4" in err and "xla_force_host_platform" in err, err


class _Recorder:
    """Stands in for ``engine.engine_jit``: records (options, prompt array shape) of each
    compile (``lower``) or call, then compiles as the real one does (a call stops there)."""

    def __init__(self, real):
        self.real, self.seen = real, []

    def lower(self, graphdef, options, state, prompts, *rest):
        self.seen.append((options, tuple(prompts.shape)))
        return self.real.lower(graphdef, options, state, prompts, *rest)

    def __call__(self, graphdef, options, state, prompts, *rest):
        self.seen.append((options, tuple(prompts.shape)))
        raise _Recorded


class _Recorded(Exception):
    pass


def test_dry_run_rollout_entry_follows_max_concurrent(capsys, tmp_path, model_dir, monkeypatch):
    """With rollout.max_concurrent the rollout entry is each device's continuous-batching
    engine: its KV cache is sized by the slots in flight, not by the rollout batch. Per
    device (rollout.max_concurrent_per_device) the slots follow the mesh: 2 per device on
    the 8 batch devices is K = 16. And the dry run compiles the very engine (options and
    prompt width) that ``generate`` runs on one device's rows of plan.prompt_len tokens."""
    from espo_jax.models import from_pretrained
    from espo_jax.rollout import engine, generate

    temps, recorder = {}, _Recorder(engine.engine_jit)
    monkeypatch.setattr(engine, "engine_jit", recorder)
    for k in ("max_concurrent=0", "max_concurrent=16", "max_concurrent_per_device=2"):
        wd = tmp_path / f"wd{k.replace('=', '')}"
        code, _, err = run_cli(capsys, f"--workdir={wd}", "--dry_run",
                               f"--config.model.path={model_dir}", "--config.plan.prompt_len=20",
                               "--config.plan.response_len=64", "--config.log.tensorboard=False",
                               "--config.rollout.prompts_per_step=8", f"--config.rollout.{k}")
        assert code == 0, err
        plan = json.loads((wd / "memory_plan.json").read_text())
        temps[k] = plan["per_device"]["rollout"]["temp"]
    assert 0 < temps["max_concurrent=16"] < temps["max_concurrent=0"], temps
    # The two K = 16 runs, each compiled at two depths (the per-layer extrapolation).
    assert len(recorder.seen) == 4 and len(set(recorder.seen)) == 1, recorder.seen
    planned, (rows, width) = recorder.seen[0]
    assert (planned.max_concurrent, rows) == (2, 4)  # 16 slots, 32 rows over 8 devices
    with pytest.raises(_Recorded):  # the default config's rollout keywords
        generate(from_pretrained(TINY.parent), [[1] * 20] * rows, max_new_tokens=64,
                 temperature=1.0, key=jax.random.key(0), eos_id=None, max_concurrent=2)
    assert recorder.seen[-1] == (planned, (rows, width)), (recorder.seen[-1], planned)
    assert temps["max_concurrent_per_device=2"] == temps["max_concurrent=16"], temps
