"""The first training step is the same on any mesh, driven through the CLI.

`python -m espo_jax.main --config=configs/default.py:smoke --config.num_steps=1
--config.mesh.*=...` on 8 simulated CPU devices: reward, loss (rel 1e-3), clip fractions
and entropy of step 1 on meshes (data=8), (fsdp=8), (data=2, fsdp=2, tensor=2) equal the
single-device run (data=fsdp=tensor=1), and so does (data=2, fsdp=2, tensor=2) with the
continuous-batching engine (rollout.max_concurrent_per_device=2: one engine per device).
Sampling uses per-row keys and jax_threefry_partitionable, so the rollout (and hence the
reward) is independent of the mesh and of the sampler; the rest only differs by float
summation order.
"""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
MESHES = {"1x1x1": (1, 1, 1), "data8": (8, 1, 1), "fsdp8": (1, 8, 1), "2x2x2": (2, 2, 2),
          "2x2x2-engine": (2, 2, 2)}
EXTRA = {"2x2x2-engine": ["--config.rollout.max_concurrent_per_device=2"]}
# metric key suffix -> relative tolerance
KEYS = {"reward_mean": 1e-6, "loss": 1e-3, "clip_frac": 1e-6, "clip_frac_high": 1e-6,
        "clip_frac_low": 1e-6, "entropy_mean": 1e-3}


def _run(workdir: pathlib.Path, mesh: tuple[int, int, int], extra=()) -> dict:
    env = dict(os.environ)
    env.update(JAX_PLATFORMS="cpu", JAX_DEFAULT_MATMUL_PRECISION="highest",
               XLA_FLAGS="--xla_force_host_platform_device_count=8",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    d, f, t = mesh
    cmd = [sys.executable, "-m", "espo_jax.main", "--config=configs/default.py:smoke",
           f"--workdir={workdir}", "--config.num_steps=1", "--config.log.tensorboard=False",
           # room for the scratchpad: some answers are right, so advantages, loss and
           # clipping are non-zero (with :smoke's 16 tokens every reward is 0)
           "--config.rollout.max_new_tokens=40",
           f"--config.mesh.data={d}", f"--config.mesh.fsdp={f}", f"--config.mesh.tensor={t}",
           *extra]
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, f"{' '.join(cmd)}\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}"
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()
               if line.strip()]
    step1 = [r for r in records if r.get("step") == 1 and any(k.endswith("loss") for k in r)]
    assert step1, f"no step-1 training record in {workdir / 'metrics.jsonl'}: {records}"
    merged = {}
    for r in step1:
        merged.update(r)
    return merged


def _pick(rec: dict, suffix: str):
    """The value of the key ending in ``suffix`` (e.g. 'train/loss' or 'loss')."""
    hits = {k: v for k, v in rec.items()
            if (k == suffix or k.endswith("/" + suffix) or k.endswith("_" + suffix))
            and isinstance(v, (int, float))}
    exact = [k for k in hits if k.split("/")[-1] == suffix]
    keys = exact or sorted(hits, key=len)
    assert keys, f"no metric ending in {suffix!r} in {sorted(rec)}"
    return keys[0], hits[keys[0]]


def _asset_dir() -> pathlib.Path:
    try:
        from espo_jax.data import arith
        return pathlib.Path(arith.ASSET_DIR)
    except Exception:  # noqa: BLE001
        return REPO / "espo_jax" / "assets" / "arith"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    if not (_asset_dir() / "config.json").is_file():
        pytest.xfail(f"the embedded arith policy ({_asset_dir()}) is not built yet: "
                     "configs/default.py:smoke cannot run")
    root = tmp_path_factory.mktemp("mesh_runs")
    out = {name: _run(root / name, mesh, EXTRA.get(name, ())) for name, mesh in MESHES.items()}
    for name, rec in out.items():  # shown with -s: the numbers being compared
        print(f"[mesh {name}] " + ", ".join(f"{k}={_pick(rec, k)[1]:.6g}" for k in KEYS))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in MESHES if n != "1x1x1"])
def test_first_step_is_mesh_independent(runs, name):
    ref, got = runs["1x1x1"], runs[name]
    # the sampler that ran: 2 engine slots on each of the 4 batch devices, else static
    assert ref["rollout_slots"] == 0 and got["rollout_slots"] == (8 if name in EXTRA else 0)
    for suffix, rtol in KEYS.items():
        key, want = _pick(ref, suffix)
        _, value = _pick(got, suffix)
        assert value == pytest.approx(want, rel=rtol, abs=1e-6), (
            f"mesh {name}: {key} = {value}, single device = {want}")
