"""The engine's decode attention over a long cache, for several ``decode_read`` values:
tune it on an accelerator.

A decode step reads a cache of at most ``decode_read`` positions whole, in place, and a
longer one block by block up to the longest live row (``kv_attention.
ragged_decode_attention``; ``generate(decode_read=)``, ``rollout.decode_read``). The
default (2048) was tuned on CPU, where each block read is a copy; on a GPU or TPU a loop of
one block per iteration may cost more than reading dead positions. This times one layer's
decode attention (K slots, one query each, the kv heads / head dim of a Qwen3 shape, in a
jitted loop of --steps steps) for live lengths in four regimes of a continuous-batching
rollout, against the default in the same run (medians of --reps, settings interleaved).
On this CPU (2 cores, f32, 0.6b's heads, K=8, S=8192) block by block beat the whole
cache in every regime (1.5x near S, 22x at the start).

    python experiments/benchmarks/decode_read.py --model=1.7b --slots=64 --cache=16896
    python experiments/benchmarks/decode_read.py --tiny       # seconds, on a CPU
"""
from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from espo_jax.rollout.kv_attention import DECODE_READ, ragged_decode_attention

from gpu_check import SHAPES  # noqa: E402  (same directory)


def regimes(k: int, s: int, seed: int = 0) -> dict:
    """Live lengths i32[K] of a cache of s positions: the rollout's start, its middle
    (lengths uniform), one long row among short ones (a drain), its end."""
    rng = np.random.default_rng(seed)
    return {"all short (S/16)": np.full(k, max(1, s // 16)),
            "uniform in [1, S]": rng.integers(1, s + 1, k),
            "one at S/2, rest 64": np.r_[s // 2, np.full(k - 1, min(64, s))],
            "all near S": np.full(k, s - 1)}


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="1.7b", choices=sorted(SHAPES))
    ap.add_argument("--slots", type=int, default=64, help="K: decode rows (one per slot)")
    ap.add_argument("--cache", type=int, default=16896, help="S: positions per slot")
    ap.add_argument("--kv-block", type=int, default=256)
    ap.add_argument("--reads", default="", help="comma list of decode_read values "
                    "(default: one kv block, the default, the whole cache)")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--steps", type=int, default=20, help="decode steps per timed call")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--tiny", action="store_true", help="a tiny shape, 4 slots x 1024")
    args = ap.parse_args()
    if args.tiny:
        args.model, args.slots, args.cache, args.kv_block = "tiny", 4, 1024, 64
        args.steps, args.reps = 2, 1
    shape = SHAPES[args.model]
    kvh, hd = shape["num_kv_heads"], shape["head_dim"]
    h, k, blk = shape["num_heads"], args.slots, args.kv_block
    s = -(-args.cache // blk) * blk
    dt = jnp.dtype(args.dtype)
    reads = ([int(x) for x in args.reads.split(",")] if args.reads
             else sorted({blk, DECODE_READ, s}))
    keys = jax.random.split(jax.random.key(0), 3)
    kc = jax.random.normal(keys[0], (k, kvh, s // blk, hd, blk), dt)
    vc = jax.random.normal(keys[1], (k, kvh, s, hd), dt)
    q = jax.random.normal(keys[2], (k, 1, h, hd), dt)

    def make(read):
        def run(q, kc, vc, lens):  # each step's query depends on the last: no hoisting
            step = lambda i, x: x + (1e-3 * ragged_decode_attention(  # noqa: E731
                x, kc, vc, None, lens, read=read)).astype(x.dtype)
            return jax.lax.fori_loop(0, args.steps, step, q)
        return jax.jit(run)

    fns = {r: make(r) for r in reads}
    lens = {name: jnp.asarray(v, jnp.int32) for name, v in regimes(k, s).items()}
    outs, secs = {}, {(r, n): [] for r in reads for n in lens}
    for name, ln in lens.items():  # warm-up (compiles each read once)
        for r, f in fns.items():
            outs[r, name] = np.asarray(jax.block_until_ready(f(q, kc, vc, ln)), np.float32)
    for _ in range(args.reps):
        for name, ln in lens.items():
            for r, f in fns.items():
                start = time.perf_counter()
                jax.block_until_ready(f(q, kc, vc, ln))
                secs[r, name].append(time.perf_counter() - start)
    ms = {key: statistics.median(v) / args.steps * 1e3 for key, v in secs.items()}
    base = DECODE_READ if DECODE_READ in reads else reads[0]
    print(f"\ndecode attention, one layer: K={k} slots x S={s} positions (kv block {blk}), "
          f"{h} heads / {kvh} kv heads x {hd} ({args.model}), {args.dtype}; "
          f"{jax.devices()[0].device_kind}; ms per step, median of {args.reps} x {args.steps}")
    head = "".join(f"{f'read {r}':>14}" for r in reads)
    print(f"{'live lengths':<22}{head}  fastest vs read {base}")
    for name in lens:
        cells = "".join(f"{ms[r, name]:>14.3f}" for r in reads)
        best = min(reads, key=lambda r: ms[r, name])
        close = all(np.allclose(outs[r, name], outs[base, name], rtol=2e-2, atol=2e-2)
                    for r in reads)
        print(f"{name:<22}{cells}  read {best}: {ms[base, name] / ms[best, name]:.2f}x"
              f"{'' if close else '  (outputs differ!)'}")
    print("(read >= S: the whole cache in place; below: block by block up to the longest "
          "live row)")


if __name__ == "__main__":
    main()
