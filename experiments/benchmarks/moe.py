"""MoE experts: grouped matmul (`jax.lax.ragged_dot`, tokens sorted by expert) vs a dense
all-experts reference, in one run: time, XLA memory and FLOPs, and their ratios.

Both compute value-and-grad of sum(y) wrt (x, gate, up, down) for one Qwen3-MoE expert
block (router fixed: random top-k), jitted. Reported per variant: median step time,
XLA's compiled temp-buffer bytes (memory_analysis) and cost-analysis FLOPs. On CPU, XLA
lowers ragged_dot densely (its FLOPs grow with E), so the CPU time ratio is a
correctness-of-plumbing figure; run it on a GPU/TPU for the grouped-kernel figure.

--ep additionally compiles the same block under a simulated 8-device mesh
(expert=4 x fsdp=2; expert weights [E,D,F] on ("expert","fsdp"), tokens over all 8) and
counts the collectives in the optimized HLO: "ragged" / "dense" = what the compiler does
from shardings alone (GSPMD), "shard_map" = the model's expert-parallel path
(`espo_jax.models.moe.expert_parallel_swiglu`).

  .venv/bin/python experiments/benchmarks/moe.py                 # N=4096 D=256 F=128 E=32 k=4
  .venv/bin/python experiments/benchmarks/moe.py --quick --ep    # small, < 1 min on CPU
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import time


def _args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--d", type=int, default=256)
    p.add_argument("--f", type=int, default=128)
    p.add_argument("--experts", type=int, default=32)
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--quick", action="store_true", help="N=1024 D=64 F=32 E=16 k=2")
    p.add_argument("--ep", action="store_true", help="also count collectives of an "
                   "expert-parallel compile on 8 simulated CPU devices")
    a = p.parse_args(argv)
    if a.quick:
        a.tokens, a.d, a.f, a.experts, a.k = 1024, 64, 32, 16, 2
    return a


def _inputs(a):
    import jax
    import jax.numpy as jnp
    from espo_jax.models.moe import route
    ks = jax.random.split(jax.random.key(0), 6)
    dt = jnp.dtype(a.dtype)
    x = jax.random.normal(ks[0], (a.tokens, a.d), dt)
    logits = jax.random.normal(ks[1], (a.tokens, a.experts), jnp.float32)
    w, ex, _, _ = route(logits, a.k, True)
    gate = (jax.random.normal(ks[2], (a.experts, a.d, a.f)) * 0.05).astype(dt)
    up = (jax.random.normal(ks[3], (a.experts, a.d, a.f)) * 0.05).astype(dt)
    down = (jax.random.normal(ks[4], (a.experts, a.f, a.d)) * 0.05).astype(dt)
    return x, ex, w, gate, up, down


def _loss_fn(impl, dtype, mesh=None):
    import jax
    import jax.numpy as jnp
    from espo_jax.models.moe import (_ep_axes, dense_swiglu, expert_parallel_swiglu,
                                     grouped_swiglu)
    fn = grouped_swiglu if impl == "ragged" else dense_swiglu
    if impl == "shard_map":
        def fn(x, ex, w, gate, up, down, dtype):
            axes = _ep_axes(mesh, x.shape[0], x.shape[1], gate.shape[2], gate.shape[0])
            return expert_parallel_swiglu(x, ex, w, gate, up, down, dtype, mesh, axes)

    def loss(x, gate, up, down, ex, w):
        return jnp.sum(fn(x, ex, w, gate, up, down, dtype).astype(jnp.float32))
    return jax.value_and_grad(loss, argnums=(0, 1, 2, 3))


def _measure(compiled, args, iters):
    import jax
    jax.block_until_ready(compiled(*args))
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - t0)
    times.sort()
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return dict(time_ms=1e3 * times[len(times) // 2],
                temp_mib=getattr(mem, "temp_size_in_bytes", 0) / 2**20,
                flops_g=float((cost or {}).get("flops", 0.0)) / 1e9)


def run(a) -> dict:
    import jax
    import jax.numpy as jnp
    x, ex, w, gate, up, down = _inputs(a)
    args = (x, gate, up, down, ex, w)
    res = {}
    for impl in ("ragged", "dense"):
        compiled = jax.jit(_loss_fn(impl, jnp.dtype(a.dtype))).lower(*args).compile()
        res[impl] = _measure(compiled, args, a.iters)
    # Same numbers? (value and the down-projection gradient)
    v1, g1 = jax.jit(_loss_fn("ragged", jnp.dtype(a.dtype)))(*args)
    v2, g2 = jax.jit(_loss_fn("dense", jnp.dtype(a.dtype)))(*args)
    res["max_rel_diff"] = float(jnp.max(jnp.abs(g1[3] - g2[3])) / jnp.max(jnp.abs(g2[3])))
    return res


_COLLECTIVES = ("all-gather", "all-to-all", "reduce-scatter", "all-reduce",
                "collective-permute", "ragged-all-to-all")


def run_ep(a) -> dict:
    """Collective ops (count, result MiB) in the optimized HLO of the expert-parallel compile."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P
    from espo_jax.train import mesh as mesh_lib
    mesh = mesh_lib.make_mesh(dict(data=1, fsdp=2, tensor=1, expert=4))
    x, ex, w, gate, up, down = _inputs(a)
    rows = NamedSharding(mesh, P(("data", "fsdp", "expert")))
    wsh = NamedSharding(mesh, P("expert", "fsdp", None))
    dsh = NamedSharding(mesh, P("expert", None, "fsdp"))
    args = (jax.device_put(x, rows), jax.device_put(gate, wsh), jax.device_put(up, wsh),
            jax.device_put(down, dsh), jax.device_put(ex, rows), jax.device_put(w, rows))
    out = {}
    for impl in ("ragged", "dense", "shard_map"):
        with jax.set_mesh(mesh):
            compiled = jax.jit(_loss_fn(impl, jnp.dtype(a.dtype), mesh.abstract_mesh)).lower(
                *args).compile()
        hlo = compiled.as_text()
        counts = {}
        for op in _COLLECTIVES:
            # "%name = f32[a,b]{...} all-gather(" -> result shape bytes
            pat = re.compile(r"= ([a-z0-9]+)\[([0-9,]*)\][^=]*? " + re.escape(op) + r"(?:-start)?\(")
            n, mib = 0, 0.0
            for dt, dims in pat.findall(hlo):
                size = 1
                for d in filter(None, dims.split(",")):
                    size *= int(d)
                n += 1
                mib += size * {"f32": 4, "bf16": 2, "s32": 4, "f16": 2, "pred": 1}.get(dt, 4) / 2**20
            if n:
                counts[op] = (n, mib)
        out[impl] = counts
    return out


def main(argv=None) -> dict:
    a = _args(argv)
    if a.ep and "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        if "jax" in sys.modules:
            raise SystemExit("--ep: set XLA_FLAGS=--xla_force_host_platform_device_count=8 "
                             "before jax is imported")
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                                   + " --xla_force_host_platform_device_count=8").strip()
    import jax
    jax.config.update("jax_default_matmul_precision", "highest")
    res = run(a)
    r, d = res["ragged"], res["dense"]
    print(f"MoE expert block fwd+bwd on {jax.devices()[0].platform}: N={a.tokens} D={a.d} "
          f"F={a.f} E={a.experts} k={a.k} {a.dtype}")
    print(f"{'variant':<10}{'time ms':>12}{'XLA temp MiB':>16}{'GFLOP':>12}")
    for name, v in (("ragged", r), ("dense", d)):
        print(f"{name:<10}{v['time_ms']:>12.2f}{v['temp_mib']:>16.2f}{v['flops_g']:>12.3f}")

    def ratio(x, y):
        return x / y if y else float("nan")
    print(f"{'dense/ragged':<10}{ratio(d['time_ms'], r['time_ms']):>12.2f}"
          f"{ratio(d['temp_mib'], r['temp_mib']):>16.2f}{ratio(d['flops_g'], r['flops_g']):>12.2f}")
    print(f"max rel diff of d(down) between variants: {res['max_rel_diff']:.2e}")
    if a.ep:
        ep = run_ep(a)
        res["ep"] = ep
        print("expert-parallel compile (expert=4 x fsdp=2, 8 simulated devices): collectives "
              "in the optimized HLO, count (result MiB)")
        for impl, counts in ep.items():
            desc = ", ".join(f"{op} {n} ({mib:.2f})" for op, (n, mib) in counts.items()) or "none"
            print(f"  {impl:<11}{desc}")
    return res


if __name__ == "__main__":
    main()
