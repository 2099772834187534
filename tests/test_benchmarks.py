"""The sampler benchmark (experiments/benchmarks/sampler.py) runs its --quick sizes: the
ragged workload's static batches draw the engine's very responses (``first_row``), and
both of our samplers decode HF's greedy tokens, and the decode-step breakdown prints
every part. The decode_read benchmark runs its --tiny shape, every setting giving the
same attention. The GPU machine's one prepared script (device_check.sh) runs its quick
sizes on CPU, so it works the day a GPU is lent."""
import importlib.util
import json
import os
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parent.parent


def _main(monkeypatch, capsys, *argv, script="sampler.py") -> str:
    bench = REPO / "experiments" / "benchmarks"
    monkeypatch.syspath_prepend(str(bench))  # the scripts import their neighbours
    spec = importlib.util.spec_from_file_location(f"bench_{script[:-3]}", bench / script)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    monkeypatch.setattr(sys, "argv", [script, *argv])
    mod.main()
    return capsys.readouterr().out


def test_ragged_quick_static_batches_draw_the_engine_responses(monkeypatch, capsys):
    out = _main(monkeypatch, capsys, "--ragged", "--quick", "--seeds", "2")
    assert out.count("the same responses in 8 of 8 rows") == 2, out
    assert "pooled over keys 0..1: continuous / static useful tokens/s" in out
    assert "fewest possible with 4 slots" in out


def test_uniform_quick_matches_hf_greedy(monkeypatch, capsys):
    out = _main(monkeypatch, capsys, "--quick", "--breakdown")
    assert "greedy tokens identical to HF: static True, engine True" in out, out
    for part in ("unembed [B,D]x[D,V]", "+ T=1 draw + log-prob", "unembed in cache 8xV/8",
                 "read D x V f32 (NumPy)", "HF decode step", "unembed / (in cache + read)"):
        assert part in out, out


def test_decode_read_tiny_same_attention_every_setting(monkeypatch, capsys):
    out = _main(monkeypatch, capsys, "--tiny", script="decode_read.py")
    assert "read 64     read 1024     read 2048" in out, out
    for regime in ("all short", "uniform in", "one at S/2", "all near S"):
        assert regime in out, out
    assert "outputs differ" not in out, out


def test_device_check_script_quick(tmp_path):
    """Every part of device_check.sh runs (tiny sizes, this CPU), each leaving its log."""
    env = {**os.environ, "DEVICE_CHECK_QUICK": "1", "PYTHON": sys.executable}
    env.pop("XLA_FLAGS", None)  # one CPU device, as a user has (conftest asks for 8)
    run = subprocess.run(["bash", str(REPO / "experiments/benchmarks/device_check.sh"),
                          str(tmp_path)], env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "device_check: all parts passed" in run.stdout, run.stdout[-3000:]
    for part in ("tests", "gpu_check", "decode_read", "sampler_ragged"):
        assert (tmp_path / f"{part}.log").stat().st_size > 0, part
    assert json.loads((tmp_path / "gpu_check.json").read_text())["step_time_s"] > 0
