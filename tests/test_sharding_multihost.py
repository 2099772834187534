"""A real 2-process (2 "hosts" x 4 CPU devices) run of the multi-host helpers.

The test launches this file twice as a worker (``python tests/test_sharding_multihost.py``)
with the multi-node-GPU style environment (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES,
JAX_PROCESS_ID; gloo CPU collectives), so ``setup_distributed`` detects the launch and
calls ``jax.distributed.initialize``. Each worker writes what it saw as JSON.

ESPO_MULTIHOST_CLI=1 additionally runs the whole CLI (configs/default.py:smoke, one step)
as two processes with fsdp spanning both and compares step 1 with the single-process
numbers of tests/test_sharding_cli.py (slow; opt-in).
"""
from __future__ import annotations

import json
import os
import pathlib
import socket
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _env(port: int, pid: int) -> dict:
    env = dict(os.environ)
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4",
               JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo",
               JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES="2",
               JAX_PROCESS_ID=str(pid), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return env


def _launch(cmd_for, timeout: int):
    port = _free_port()
    procs = [subprocess.Popen(cmd_for(pid), cwd=REPO, env=_env(port, pid),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for pid in range(2)]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=timeout)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return procs, outs


# ------------------------------------------------------------------------------- worker --
def worker(out_path: str) -> None:
    import jax
    import numpy as np
    from flax import nnx

    from espo_jax.models import Decoder, ModelConfig
    from espo_jax.train import distributed as dist
    from espo_jax.train.mesh import batch_sharding, init_sharded, make_mesh

    assert dist.setup_distributed(None) is True          # detected from the environment
    pi, pc = jax.process_index(), jax.process_count()
    mesh = make_mesh({"data": 1, "fsdp": -1, "tensor": 1})   # fsdp spans both hosts
    full = {"ids": np.arange(32, dtype=np.float32).reshape(8, 4)}
    g = dist.device_put_global(full, mesh)
    rows = dist.process_rows(8, mesh)
    loc = dist.host_local_to_global({"ids": full["ids"][dist.host_slice(8)]}, mesh)
    f = jax.jit(lambda t: t["ids"] * 2.0, out_shardings=batch_sharding(mesh))
    doubled = dist.to_host(f(g))
    same = bool(np.array_equal(dist.to_host(loc["ids"]), full["ids"]))
    cfg = ModelConfig(family="qwen3", vocab_size=96, hidden_size=32, intermediate_size=64,
                      num_layers=1, num_heads=4, num_kv_heads=2, head_dim=8, qk_norm=True,
                      tie_word_embeddings=True)
    model = init_sharded(lambda: Decoder(cfg, rngs=nnx.Rngs(0)), mesh)
    emb = model.embed_tokens[...]
    host_params = dist.to_host(nnx.state(model, nnx.Param))   # what an export must do
    emb_host = np.asarray(host_params["embed_tokens"].get_value())
    ref = np.asarray(Decoder(cfg, rngs=nnx.Rngs(0)).embed_tokens[...])
    res = dict(process_index=pi, process_count=pc, devices=jax.device_count(),
               local_devices=jax.local_device_count(), main=dist.is_main_process(),
               rows=[rows.start, rows.stop], host_slice=[dist.host_slice(8).start,
                                                         dist.host_slice(8).stop],
               doubled_sum=float(doubled.sum()), local_to_global_ok=same,
               emb_fully_addressable=bool(emb.is_fully_addressable),
               emb_local_shard=list(emb.addressable_shards[0].data.shape),
               emb_host_shape=list(emb_host.shape),
               emb_max_err=float(np.abs(emb_host - ref).max()))
    pathlib.Path(out_path).write_text(json.dumps(res))


def preempt_worker(out_path: str, ckpt_dir: str) -> None:
    """The loop's preemption protocol on 2 processes: a step loop that calls
    ``StopSignal.agree`` every step and, when it says stop, saves one (collective, async)
    checkpoint of a state sharded over both processes, waits for it and exits."""
    import time
    import types

    import jax
    import numpy as np

    from espo_jax.train import distributed as dist
    from espo_jax.train.checkpoint import Checkpointer
    from espo_jax.train.mesh import make_mesh
    from espo_jax.train.preemption import StopSignal

    assert dist.setup_distributed(None) is True
    mesh = make_mesh({"data": 1, "fsdp": -1, "tensor": 1})
    w = dist.device_put_global({"w": np.zeros((16, 2), np.float32)}, mesh)["w"]
    inc = jax.jit(lambda x: x + 1.0)
    ck = Checkpointer(ckpt_dir, keep=3)
    ready = pathlib.Path(out_path + ".ready")
    stopped, requested = None, False
    with StopSignal() as stop:
        for step in range(1, 600):
            w = inc(w)
            if step == 2:
                ready.write_text("1")
            time.sleep(0.05)
            if stop.agree(step):
                step_arr = dist.device_put_global({"s": np.asarray(step, np.int32)}, mesh)["s"]
                state = types.SimpleNamespace(params={"w": w}, opt_state={}, rest={},
                                              step=step_arr, ref_params=None)
                ck.save(step, state, {"stopped": step})
                ck.close()  # waits for the async write
                stopped, requested = step, stop.requested
                break
    pathlib.Path(out_path).write_text(json.dumps(dict(stopped=stopped, requested=requested)))


# -------------------------------------------------------------------------------- tests --
def test_two_processes_share_one_mesh(tmp_path):
    procs, outs = _launch(lambda pid: [sys.executable, __file__, str(tmp_path / f"r{pid}.json")],
                          timeout=240)
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-4000:]
    r0, r1 = (json.loads((tmp_path / f"r{i}.json").read_text()) for i in range(2))
    for i, r in enumerate((r0, r1)):
        assert (r["process_index"], r["process_count"]) == (i, 2)
        assert (r["devices"], r["local_devices"]) == (8, 4)
        assert r["main"] == (i == 0)
        assert r["rows"] == r["host_slice"] == [4 * i, 4 * i + 4]   # GPU-style device order
        assert r["doubled_sum"] == 2 * sum(range(32))
        assert r["local_to_global_ok"]
        # the embedding [96, 32] is split over 8 devices on 2 hosts; to_host gathers it
        assert not r["emb_fully_addressable"] and r["emb_local_shard"] == [96, 4]
        assert r["emb_host_shape"] == [96, 32] and r["emb_max_err"] < 1e-6


def test_sigterm_to_one_process_stops_both_at_the_same_step(tmp_path):
    """SIGTERM reaches only process 1: both agree on the stop step, one checkpoint of that
    step is written (collectively), both exit 0."""
    import signal
    import time

    port = _free_port()
    ck = tmp_path / "ck"
    procs = [subprocess.Popen([sys.executable, __file__, "preempt", str(tmp_path / f"r{pid}.json"),
                               str(ck)], cwd=REPO, env=_env(port, pid), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for pid in range(2)]
    try:
        deadline = time.time() + 180
        while not all((tmp_path / f"r{i}.json.ready").exists() for i in range(2)):
            assert time.time() < deadline and all(p.poll() is None for p in procs), \
                [p.communicate()[0][-3000:] for p in procs if p.poll() is not None]
            time.sleep(0.2)
        procs[1].send_signal(signal.SIGTERM)
        outs = [p.communicate(timeout=180)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-4000:]
    r0, r1 = (json.loads((tmp_path / f"r{i}.json").read_text()) for i in range(2))
    assert r0["stopped"] == r1["stopped"] and r0["stopped"] >= 2
    assert (r0["requested"], r1["requested"]) == (False, True)
    assert "another process is stopping" in outs[0]
    steps = sorted(int(d.name) for d in ck.iterdir() if d.name.isdigit())
    assert steps == [r0["stopped"]]
    assert (ck / str(r0["stopped"]) / "state").is_dir()


@pytest.mark.slow
def test_cli_two_processes(tmp_path):
    if not os.environ.get("ESPO_MULTIHOST_CLI"):
        pytest.skip("opt-in (ESPO_MULTIHOST_CLI=1): the whole CLI as 2 processes, ~2 min")
    from test_sharding_cli import KEYS, _pick, _run  # the single-process reference run
    ref = _run(tmp_path / "ref", (1, 1, 1))
    wd = tmp_path / "run"
    cmd = lambda pid: [sys.executable, "-m", "espo_jax.main",  # noqa: E731
                       "--config=configs/default.py:smoke", f"--workdir={wd}",
                       "--config.num_steps=1", "--config.log.tensorboard=False",
                       "--config.rollout.max_new_tokens=40", "--config.mesh.data=1",
                       "--config.mesh.fsdp=4", "--config.mesh.tensor=2"]
    procs, outs = _launch(cmd, timeout=600)
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-4000:]
    recs = [json.loads(x) for x in (wd / "metrics.jsonl").read_text().splitlines() if x.strip()]
    got = {k: v for r in recs if r.get("step") == 1 for k, v in r.items()}
    for suffix, rtol in KEYS.items():
        assert _pick(got, suffix)[1] == pytest.approx(_pick(ref, suffix)[1], rel=rtol, abs=1e-6)


if __name__ == "__main__":
    if sys.argv[1] == "preempt":
        preempt_worker(sys.argv[2], sys.argv[3])
    else:
        worker(sys.argv[1])
