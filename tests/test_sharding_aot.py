"""Ahead-of-time compile of an ESPO train step for a Qwen3-1.7B-shaped model on a simulated
8-device mesh (fsdp=4, tensor=2): abstract shapes only, no weights; prints per-device memory.

The step is the product's ``espo_jax.train.step.make_train_step`` (forward over prompt +
response -> chunked token log-probs -> policy_loss("espo") -> grads -> clip -> AdamW),
jitted with ``state_shardings`` from ``espo_jax.train.mesh`` and the state donated
(``experiments/benchmarks/gpu_check.py:build`` assembles it). Compiling all 28 (unrolled) layers takes ~90 s on 2 CPU cores, so the test
compiles 1 and 2 layers and extrapolates linearly per layer to 28; set ESPO_AOT_FULL=1
to compile all 28 layers instead. Arguments extrapolate exactly; temporaries only
approximately (XLA schedules weight all-gathers differently with more layers): on jax 0.10.2
CPU the 1+2-layer estimate was 3.85 GiB vs 3.58 GiB from a full 28-layer compile.
"""
from __future__ import annotations

import importlib.util
import os
import time

import jax
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAYERS = 28
B, P_LEN, N_LEN = 8, 64, 192   # global batch of 8 sequences, 256 tokens each


def _gpu_check():
    spec = importlib.util.spec_from_file_location(
        "gpu_check", os.path.join(REPO, "experiments/benchmarks/gpu_check.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _compile(g, layers: int):
    args = g.parse(["--model=1.7b", f"--layers={layers}", f"--batch={B}",
                    f"--prompt-len={P_LEN}", f"--response-len={N_LEN}", "--chunk-size=512",
                    "--data=1", "--fsdp=4", "--tensor=2", "--remat=1", "--force"])
    b = g.build(args)
    t0 = time.perf_counter()
    with jax.set_mesh(b["mesh"]):
        compiled = b["jstep"].lower(*g.abstract_inputs(b, B, P_LEN, N_LEN)).compile()
    mem = compiled.memory_analysis()
    n_params = g.count_params(b["abs_params"])
    return dict(args=mem.argument_size_in_bytes, temp=mem.temp_size_in_bytes,
                out=mem.output_size_in_bytes, alias=mem.alias_size_in_bytes,
                params=n_params, compile_s=time.perf_counter() - t0, b=b, compiled=compiled)


def _gib(x):
    return x / 2**30


@pytest.mark.slow
def test_aot_train_step_qwen3_1p7b_fsdp4_tensor2(capsys):
    assert jax.device_count() == 8
    g = _gpu_check()
    if os.environ.get("ESPO_AOT_FULL"):
        full = _compile(g, LAYERS)
        est = {k: full[k] for k in ("args", "temp", "params")}
        how = f"compiled all {LAYERS} layers in {full['compile_s']:.0f} s"
        small = full
    else:
        small, big = _compile(g, 1), _compile(g, 2)
        per = {k: big[k] - small[k] for k in ("args", "temp", "params")}
        est = {k: small[k] + (LAYERS - 1) * per[k] for k in ("args", "temp", "params")}
        how = (f"compiled 1 and 2 layers ({small['compile_s']:.0f} s + {big['compile_s']:.0f} s) "
               f"and EXTRAPOLATED linearly to {LAYERS} layers: per layer "
               f"+{per['args'] / 2**20:.1f} MiB arguments, +{per['temp'] / 2**20:.1f} MiB temporaries "
               "(temporaries approximate; ESPO_AOT_FULL=1 compiles all layers)")

    # the step's shardings really are used: params + 2 Adam moments (f32) split 8 ways
    state_bytes = 3 * 4 * est["params"]
    assert est["params"] == pytest.approx(1.72e9, rel=0.01)   # Qwen3-1.7B: 1.72B incl. tied embedding
    assert est["args"] == pytest.approx(state_bytes / 8, rel=0.02), (est["args"], state_bytes / 8)
    # donation: the new params / moments reuse the input buffers
    assert small["alias"] >= 0.95 * small["args"]

    with capsys.disabled():
        print(f"\n[AOT] Qwen3-1.7B-shaped ESPO train step, mesh data=1 fsdp=4 tensor=2 "
              f"(8 simulated CPU devices), batch {B} x {P_LEN + N_LEN} tokens, bf16 compute, "
              f"f32 master weights + AdamW, remat per layer")
        print(f"[AOT] {how}")
        print(f"[AOT] params {est['params'] / 1e9:.3f} B; per device: arguments (params + "
              f"Adam state, donated) {_gib(est['args']):.2f} GiB, temporaries (grads, "
              f"activations) {_gib(est['temp']):.2f} GiB, total "
              f"{_gib(est['args'] + est['temp']):.2f} GiB "
              f"(unsharded state would be {_gib(state_bytes):.1f} GiB)")
