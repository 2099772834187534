"""The sampler benchmark (experiments/benchmarks/sampler.py) runs its --quick sizes: the
ragged workload's static batches draw the engine's very responses (``first_row``), and
both of our samplers decode HF's greedy tokens. The decode_read benchmark runs its --tiny
shape, every setting giving the same attention."""
import importlib.util
import pathlib
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
    out = _main(monkeypatch, capsys, "--quick")
    assert "greedy tokens identical to HF: static True, engine True" in out, out


def test_decode_read_tiny_same_attention_every_setting(monkeypatch, capsys):
    out = _main(monkeypatch, capsys, "--tiny", script="decode_read.py")
    assert "read 64     read 1024     read 2048" in out, out
    for regime in ("all short", "uniform in", "one at S/2", "all near S"):
        assert regime in out, out
    assert "outputs differ" not in out, out
