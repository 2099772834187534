"""Peak memory and time: chunked `token_logprobs_and_entropy` vs autodiff through full logits.

Each variant runs in its own subprocess (so peak memory is not polluted by the others):
value-and-grad wrt (hidden, unembedding) of sum(logp) + sum(entropy). Peak memory is the
accelerator's `peak_bytes_in_use` when the backend reports it, else the child's peak RSS
growth (resource.getrusage) over its baseline after the inputs exist; XLA's compiled
temp-buffer size is printed too. A variant whose compiled footprint exceeds --max_run_gb
is compiled but not run (shared machines), and reported as such.
Also reports forward tokens/s of a small random Qwen3 (full forward, and cached decode).

  .venv/bin/python experiments/benchmarks/logprobs.py            # B=2 T=2048 D=256, V=32768/151936
  .venv/bin/python experiments/benchmarks/logprobs.py --quick    # small, ~1 minute on CPU
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def _timeit(fn, iters):
    out = fn()
    _block(out)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        _block(fn())
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def _block(tree):
    import jax
    jax.block_until_ready(tree)


def child_op(a) -> dict:
    import jax
    import jax.numpy as jnp
    from espo_jax.ops import reference, token_logprobs_and_entropy

    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    h = jax.random.normal(k1, (a.B, a.T, a.D), jnp.float32)
    w = jax.random.normal(k2, (a.D, a.V), jnp.float32) * 0.05
    y = jax.random.randint(k3, (a.B, a.T), 0, a.V)
    _block((h, w, y))

    if a.variant == "naive":
        op = lambda h, w: reference(h, w, y)
    else:
        op = lambda h, w: token_logprobs_and_entropy(h, w, y, chunk_size=a.chunk)

    def loss(h, w):
        logp, ent = op(h, w)
        return jnp.sum(logp) + jnp.sum(ent)

    f = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    compiled = f.lower(h, w).compile()
    ma = compiled.memory_analysis()
    xla_temp = int(getattr(ma, "temp_size_in_bytes", 0) or 0)
    res = {"variant": a.variant, "V": a.V, "xla_temp_bytes": xla_temp}
    if xla_temp > a.max_run_gb * 2**30:
        res.update(ran=False)
        return res
    dev = jax.devices()[0]
    stats = dev.memory_stats() if hasattr(dev, "memory_stats") else None
    base = _rss_bytes()
    res["seconds"] = _timeit(lambda: compiled(h, w), a.iters)
    stats = dev.memory_stats() if stats is not None else None
    if stats and "peak_bytes_in_use" in stats:
        res.update(peak_bytes=int(stats["peak_bytes_in_use"]), peak_kind="device peak_bytes_in_use")
    else:
        res.update(peak_bytes=max(_peak_rss_bytes() - base, 0), peak_kind="host peak RSS growth")
    res["ran"] = True
    return res


def child_model(a) -> dict:
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from espo_jax.models import Decoder, ModelConfig

    cfg = ModelConfig.from_hf(dict(
        architectures=["Qwen3ForCausalLM"], vocab_size=a.V, hidden_size=a.D,
        intermediate_size=3 * a.D, num_hidden_layers=a.layers, num_attention_heads=4,
        num_key_value_heads=2, head_dim=a.D // 4, tie_word_embeddings=True))
    model = Decoder(cfg, rngs=nnx.Rngs(0), dtype=a.dtype, param_dtype=a.dtype)
    graphdef, state = nnx.split(model)
    ids = jax.random.randint(jax.random.key(1), (a.B, a.T), 0, a.V)

    fwd = jax.jit(lambda st, ids: nnx.merge(graphdef, st)(ids))
    t_fwd = _timeit(lambda: fwd(state, ids), a.iters)

    # Cached decode: one token per call for a batch, cache of a.T slots, half full.
    cache = model.init_cache(a.B, a.T)
    kv_mask = jnp.ones((a.B, a.T), jnp.int32)

    @jax.jit
    def step(st, cache, tok, i):
        return nnx.merge(graphdef, st)(tok, attention_mask=kv_mask, cache=cache, cache_index=i)

    tok = ids[:, :1]
    t_dec = _timeit(lambda: step(state, cache, tok, jnp.int32(a.T // 2)), a.iters * 5)
    return {"variant": "model", "params": sum(x.size for x in jax.tree.leaves(state)),
            "fwd_tokens_per_s": a.B * a.T / t_fwd, "fwd_seconds": t_fwd,
            "decode_tokens_per_s": a.B / t_dec, "decode_step_seconds": t_dec}


def auto_chunk(vocab: int) -> int:
    """Largest power of two with chunk * V * 4 bytes <= 128 MiB (at least 64 rows)."""
    c = 64
    while 2 * c * vocab * 4 <= 2**27:
        c *= 2
    return c


def run_child(args: list[str]) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child"] + args
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        return {"error": (out.stderr or out.stdout).strip().splitlines()[-1:]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def _gb(x):
    return f"{x / 2**30:8.3f}" if x is not None else "     n/a"


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small shapes, one vocab size")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--variant", default="chunked")
    p.add_argument("--B", type=int, default=2)
    p.add_argument("--T", type=int, default=2048)
    p.add_argument("--D", type=int, default=256)
    p.add_argument("--V", type=int, default=32768)
    p.add_argument("--vocab", type=int, nargs="*", default=None)
    p.add_argument("--chunk", type=int, default=0,
                   help="token rows per block; 0 = auto, so a [chunk, V] f32 block is ~128 MiB")
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--max_run_gb", type=float, default=8.0,
                   help="compile-only for variants whose XLA temp buffers exceed this")
    a = p.parse_args()

    if a.child:
        if not a.chunk:
            a.chunk = auto_chunk(a.V)
        res = child_model(a) if a.variant == "model" else child_op(a)
        print(json.dumps(res))
        return

    if a.quick:
        a.T, a.iters, a.layers, a.chunk = 256, 1, 2, a.chunk or 128
    vocabs = a.vocab or ([32768] if a.quick else [32768, 151936])
    common = ["--B", str(a.B), "--T", str(a.T), "--D", str(a.D), "--iters", str(a.iters),
              "--chunk", str(a.chunk), "--max_run_gb", str(a.max_run_gb)]
    import jax  # only to name the backend in the report
    print(f"backend={jax.default_backend()} devices={jax.device_count()} "
          f"B={a.B} T={a.T} D={a.D} chunk={a.chunk or 'auto'} value_and_grad of sum(logp)+sum(entropy)")
    print(f"{'V':>7} {'chunk':>5} {'variant':>8} {'peak GiB':>9} {'XLA temp GiB':>12} {'time s':>8}"
          f" {'mem ratio':>9} {'time ratio':>10}")
    for v in vocabs:
        rows = {var: run_child(common + ["--variant", var, "--V", str(v)])
                for var in ("naive", "chunked")}
        for var in ("naive", "chunked"):
            r = rows[var]
            if "error" in r:
                print(f"{v:>7} {var:>8} error: {r['error']}")
                continue
            n, c = rows["naive"], rows["chunked"]
            mem_ratio = time_ratio = ""
            if var == "chunked" and "error" not in n:
                if n.get("ran") and c.get("ran"):
                    mem_ratio = f"{n['peak_bytes'] / max(c['peak_bytes'], 1):.1f}x"
                    time_ratio = f"{c['seconds'] / n['seconds']:.2f}x"
                else:
                    mem_ratio = f"{n['xla_temp_bytes'] / max(c['xla_temp_bytes'], 1):.1f}x*"
            secs = f"{r['seconds']:8.3f}" if r.get("ran") else " not run"
            print(f"{v:>7} {a.chunk or auto_chunk(v):>5} {var:>8} {_gb(r.get('peak_bytes'))} {_gb(r['xla_temp_bytes']):>12} "
                  f"{secs} {mem_ratio:>9} {time_ratio:>10}")
    print("peak = device peak_bytes_in_use if reported, else host peak-RSS growth; "
          "* = ratio of XLA temp buffers (variant too big to run here)")

    m = run_child(["--variant", "model", "--B", str(a.B), "--T", str(a.T if a.quick else 1024),
                   "--D", str(a.D), "--V", "32768", "--layers", str(a.layers),
                   "--iters", str(a.iters), "--dtype", a.dtype])
    if "error" in m:
        print("model: error", m["error"])
    else:
        print(f"model: random Qwen3 D={a.D} layers={a.layers} V=32768 ({m['params'] / 1e6:.1f}M "
              f"params, {a.dtype}): forward {m['fwd_tokens_per_s']:.0f} tokens/s "
              f"(B={a.B}, T={a.T if a.quick else 1024}); cached decode "
              f"{m['decode_tokens_per_s']:.0f} tokens/s (B={a.B}, one token per step)")


if __name__ == "__main__":
    main()
