"""Per-device memory of the ESPO train step at long context, by ahead-of-time compile only.

Qwen3-shaped model on 8 simulated CPU devices (fsdp=8, one 512+N-token sequence per
device, bf16 compute, remat per layer), built by `gpu_check.build` (the product's train
step and shardings), with a chosen attention implementation and scanned / looped layers.
Nothing runs; XLA's memory_analysis() is printed. Compare depths to get the cost per layer.

  .venv/bin/python experiments/benchmarks/attention_aot.py --impl blockwise --scan \\
      --response-len 16384 --layers 2 4
"""
from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import importlib.util  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402


def _gpu_check():
    here = os.path.dirname(os.path.abspath(__file__))
    spec = importlib.util.spec_from_file_location("gpu_check", os.path.join(here, "gpu_check.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="1.7b")
    p.add_argument("--impl", default="blockwise")
    p.add_argument("--scan", action="store_true", help="model.scan_layers=True")
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--response-len", type=int, default=16384)
    p.add_argument("--layers", type=int, nargs="+", default=[2, 4])
    a = p.parse_args()
    g = _gpu_check()
    orig = g.model_config
    g.model_config = lambda *x, **k: orig(*x, **k).replace(attention_impl=a.impl,
                                                           scan_layers=a.scan)
    print(f"{'layers':>6} {'temp GiB':>9} {'args GiB':>9} {'out GiB':>8} {'compile s':>9}")
    for n in a.layers:
        args = g.parse([f"--model={a.model}", f"--layers={n}", "--batch=8",
                        f"--prompt-len={a.prompt_len}", f"--response-len={a.response_len}",
                        "--chunk-size=1024", "--data=1", "--fsdp=8", "--tensor=1", "--remat=1",
                        "--force"])
        b = g.build(args)
        t0 = time.perf_counter()
        with jax.set_mesh(b["mesh"]):
            c = b["jstep"].lower(*g.abstract_inputs(b, 8, a.prompt_len, a.response_len)).compile()
        m = c.memory_analysis()
        print(f"{n:>6} {m.temp_size_in_bytes / 2**30:9.2f} {m.argument_size_in_bytes / 2**30:9.2f} "
              f"{m.output_size_in_bytes / 2**30:8.2f} {time.perf_counter() - t0:9.0f}", flush=True)


if __name__ == "__main__":
    main()
