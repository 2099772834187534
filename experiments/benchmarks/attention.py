"""Attention: blockwise (flash-style XLA) vs dense, time and compiled memory at several T.

One process, one backend: for each T, each implementation is compiled for the forward and
for value-and-grad (wrt q, k, v) of sum(o * w); memory is XLA's compiled
`memory_analysis()` (temp + arguments + outputs = peak footprint of the executable),
time the median of --iters runs after one warm-up run. Causal, one segment per row with
10% left padding (so both masks are exercised). A variant whose compiled footprint
exceeds --max_run_gb is compiled but not run.

  .venv/bin/python experiments/benchmarks/attention.py                 # T = 1k/4k/8k on CPU
  .venv/bin/python experiments/benchmarks/attention.py --quick         # T = 512/1k, 1 iter
"""
from __future__ import annotations

import argparse
import time


def _median_time(fn, args, iters):
    import jax
    jax.block_until_ready(fn(*args))  # warm-up
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def measure(impl, t, a):
    import jax
    import jax.numpy as jnp
    from espo_jax.models import attention as attn

    dt = jnp.dtype(a.dtype)
    ks = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(ks[0], (a.B, t, a.H, a.hd), dt)
    k = jax.random.normal(ks[1], (a.B, t, a.K, a.hd), dt)
    v = jax.random.normal(ks[2], (a.B, t, a.K, a.hd), dt)
    w = jax.random.normal(ks[3], (a.B, t, a.H, a.hd), jnp.float32)
    seg = jnp.ones((a.B, t), jnp.int32).at[:, :t // 10].set(0)

    def fwd(q, k, v):
        return attn.attend(q, k, v, seg, seg, impl=impl, block=a.block)

    def loss(q, k, v):
        return jnp.sum(fwd(q, k, v).astype(jnp.float32) * w)

    out = {}
    for name, fn in (("fwd", fwd), ("grad", jax.value_and_grad(loss, (0, 1, 2)))):
        t0 = time.perf_counter()
        compiled = jax.jit(fn).lower(q, k, v).compile()
        ma = compiled.memory_analysis()
        total = ma.temp_size_in_bytes + ma.argument_size_in_bytes + ma.output_size_in_bytes
        row = {"compile_s": time.perf_counter() - t0, "temp": ma.temp_size_in_bytes, "total": total}
        if total <= a.max_run_gb * 2**30:
            row["time"] = _median_time(compiled, (q, k, v), a.iters)
        out[name] = row
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="T = 512/1024, one timed run")
    p.add_argument("--T", type=int, nargs="+", default=[1024, 4096, 8192])
    p.add_argument("--B", type=int, default=1)
    p.add_argument("--H", type=int, default=4, help="query heads")
    p.add_argument("--K", type=int, default=2, help="kv heads")
    p.add_argument("--hd", type=int, default=64, help="head dim")
    p.add_argument("--block", type=int, default=512)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--max_run_gb", type=float, default=6.0,
                   help="compile-only for variants whose compiled footprint exceeds this")
    a = p.parse_args()
    if a.quick:
        a.T, a.iters = [512, 1024], 1
    import jax
    print(f"backend={jax.default_backend()} B={a.B} H={a.H} K={a.K} hd={a.hd} "
          f"block={a.block} dtype={a.dtype} iters={a.iters} (median after warm-up)")
    hdr = (f"{'T':>6} {'pass':>5} {'impl':>9} {'temp MiB':>10} {'total MiB':>10} "
           f"{'time s':>8} {'compile s':>9} {'mem dense/blk':>13} {'time dense/blk':>14}")
    print(hdr)
    for t in a.T:
        res = {impl: measure(impl, t, a) for impl in ("dense", "blockwise")}
        for name in ("fwd", "grad"):
            d, b = res["dense"][name], res["blockwise"][name]
            for impl, r in (("dense", d), ("blockwise", b)):
                ratio_m = ratio_t = ""
                if impl == "blockwise":
                    ratio_m = f"{d['total'] / b['total']:.1f}x"
                    if "time" in d and "time" in b:
                        ratio_t = f"{d['time'] / b['time']:.2f}x"
                secs = f"{r['time']:8.3f}" if "time" in r else " not run"
                print(f"{t:>6} {name:>5} {impl:>9} {r['temp'] / 2**20:10.1f} {r['total'] / 2**20:10.1f} "
                      f"{secs} {r['compile_s']:9.1f} {ratio_m:>13} {ratio_t:>14}", flush=True)
    print("memory = XLA compiled temp + arguments + outputs; ratios > 1 favour blockwise")


if __name__ == "__main__":
    main()
