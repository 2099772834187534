"""Every config file in configs/ loads (with its variants), is locked, and overrides work."""
from __future__ import annotations

import importlib.util
import pathlib

import pytest
from absl import flags
from ml_collections import config_flags

REPO = pathlib.Path(__file__).resolve().parent.parent
CONFIG_FILES = sorted(p for p in (REPO / "configs").glob("*.py") if not p.name.startswith("_"))
OBJECTIVES = ("espo", "grpo", "dapo", "gspo", "gmpo", "cispo")


def load(path: pathlib.Path):
    spec = importlib.util.spec_from_file_location(f"cfg_{path.stem}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_config_files_exist():
    assert {p.name for p in CONFIG_FILES} >= {"default.py", "qwen3_math.py"}


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.name)
@pytest.mark.parametrize("arg", [None, "smoke", *OBJECTIVES, "smoke,dapo"])
def test_every_config_loads(path, arg):
    c = load(path).get_config(arg)
    assert c.is_locked
    for key in ("seed", "num_steps", "model.path", "task.name", "rollout.group_size",
                "objective.name", "train.lr", "train.beta", "dapo.overlong.enable",
                "eval.every", "checkpoint.keep", "score.chunk_size", "mesh.fsdp",
                "distributed.initialize", "dump.every", "advantage.valid_only"):
        node = c
        for part in key.split("."):
            node = node[part]
    for name in OBJECTIVES:
        assert name in c.objective
    assert c.objective.name == (arg.split(",")[-1] if arg and arg != "smoke" else "espo")
    assert (c.rollout.prompts_per_step * c.rollout.group_size) % c.train.num_minibatches == 0
    if arg and "dapo" in arg:
        assert c.dapo.dynamic_sampling and c.dapo.overlong.enable
    with pytest.raises(AttributeError):
        c.train.lrr = 1.0  # locked: typos fail


def test_objective_defaults_come_from_the_registry():
    from espo_jax.objectives import OBJECTIVES as REG
    c = load(REPO / "configs" / "default.py").get_config()
    for name, spec in REG.items():
        for k, v in spec.defaults.items():
            if k in ("vocab_size", "beta"):
                continue
            got = c.objective[name][k]
            assert (list(v) if isinstance(v, tuple) else v) == got, (name, k)


def test_unknown_variant_is_an_error():
    with pytest.raises(ValueError, match="smok"):
        load(REPO / "configs" / "default.py").get_config("smok")


def test_flag_overrides_including_none_fields():
    argv = ["prog", f"--config={REPO / 'configs' / 'default.py'}:smoke,cispo",
            "--config.train.lr=0.5", "--config.objective.cispo.clip_low=0.2",
            "--config.objective.espo.alpha=0.05", "--config.dapo.overlong.enable=true"]
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True,
                                    sys_argv=argv)
    fv(argv)
    c = fv.config
    assert c.train.lr == 0.5 and c.objective.cispo.clip_low == 0.2
    assert c.objective.espo.alpha == 0.05 and c.dapo.overlong.enable is True
    assert c.objective.name == "cispo" and c.num_steps == 2


@pytest.mark.parametrize("devices, micro", [(8, 16), (32, 64)])
def test_paper_config_validates_on_8_and_32_devices(devices, micro):
    """configs/qwen3_math.py as the README runs it: the micro-batch is per device, so the
    same file validates on 8 and 32 chips (a fixed global micro-batch broke on 32); the
    rollout engine's slots follow the mesh too (8 per batch device)."""
    from espo_jax.rollout.engine_options import engine_kwargs
    from espo_jax.train.validate import micro_batch_size, validate
    c = load(REPO / "configs" / "qwen3_math.py").get_config(None)
    shape = validate(c, devices, check_files=False)
    assert shape["data"] * shape["fsdp"] * shape["tensor"] * shape.get("expert", 1) == devices
    assert micro_batch_size(c, shape["data"] * shape["fsdp"]) == micro
    slots = engine_kwargs(c.rollout, shape["data"] * shape["fsdp"])["max_concurrent"]
    assert slots == devices * 8
    # the global knob alone, and per device overriding it
    c.rollout.max_concurrent_per_device = 0
    assert engine_kwargs(c.rollout, devices)["max_concurrent"] is None  # static batch
    c.rollout.max_concurrent = 48
    assert engine_kwargs(c.rollout, devices)["max_concurrent"] == 48
    c.rollout.max_concurrent_per_device = 2
    assert engine_kwargs(c.rollout, devices)["max_concurrent"] == 2 * devices
    assert engine_kwargs(c.rollout, devices)["decode_read"] is None  # 0: the default
    c.rollout.decode_read = 16384
    assert engine_kwargs(c.rollout, devices)["decode_read"] == 16384


def test_url_workdirs_stay_urls(tmp_path, monkeypatch, capsys):
    """--workdir=gs://... is never turned into a local directory (pathlib.resolve() would
    make $PWD/gs:/...); a bad flag with a URL workdir fails in one line and creates nothing."""
    from espo_jax import main as cli
    from espo_jax.train.writers import is_local, workdir_path
    monkeypatch.chdir(tmp_path)
    assert str(workdir_path("gs://bucket/runs/a")) == "gs://bucket/runs/a"
    assert not is_local(workdir_path("gs://bucket/runs/a"))
    assert str(workdir_path("runs/a")) == str(tmp_path / "runs" / "a")
    argv = ["espo_jax.main", f"--config={REPO / 'configs' / 'default.py'}:smoke",
            "--workdir=gs://no-such-bucket/run", "--config.objective.espo.alpha=-1"]
    monkeypatch.setattr("sys.argv", argv)
    fv = flags.FlagValues()
    cli.define_flags(fv)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(cli.parse_flags(argv, fv), fv)
    code = exit_info.value.code
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and "alpha" in err
    assert list(tmp_path.iterdir()) == []
