"""FLOPs of padded vs packed scoring + train step on a paper-like length mix (AOT, CPU).

1,024 responses with lognormal lengths (mean ~3k tokens, cap 16,384) after prompts of up to
512 tokens. Padded: every sequence is a row of P + N - 1 = 16,895 positions. Packed
(``train.max_tokens_per_row`` = P + N): ``espo_jax.train.packing.pack`` rows, trimmed to the
bucketed longest row. XLA's cost analysis of one row of each width (the product's
``make_score_fn`` / ``make_train_step``, Qwen3-1.7B layer shapes with ``--layers`` layers,
dense attention and one log-prob chunk so no loop body is under-counted) times the row
counts. Nothing runs, nothing is allocated.

  .venv/bin/python experiments/benchmarks/packing.py --layers 1
"""
from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

from espo_jax.models import Decoder, ModelConfig  # noqa: E402
from espo_jax.train import packing  # noqa: E402
from espo_jax.train.state import create_state  # noqa: E402
from espo_jax.train.step import make_score_fn, make_train_step  # noqa: E402

SHAPE_1P7B = dict(hidden_size=2048, num_heads=16, num_kv_heads=8, head_dim=128,
                  intermediate_size=6144, vocab_size=151936)


def length_mix(rng, n: int, mean: float, cap: int, sigma: float) -> np.ndarray:
    """Lognormal lengths with the given mean (before clipping), clipped to [1, cap]."""
    mu = math.log(mean) - sigma ** 2 / 2
    return np.clip(np.round(rng.lognormal(mu, sigma, n)), 1, cap).astype(np.int64)


def row_flops(cfg: ModelConfig, width: int, rows: int = 1) -> tuple[float, float]:
    """(score FLOPs, train-step FLOPs) of ``rows`` packed rows of ``width`` positions."""
    sds = jax.ShapeDtypeStruct
    tx = optax.sgd(1e-6)
    state = jax.eval_shape(lambda: create_state(
        Decoder(cfg, rngs=nnx.Rngs(0), dtype=jnp.bfloat16, param_dtype=jnp.float32), tx))
    chunk = rows * width                                  # one log-prob block: no loop
    i32 = lambda *s: sds(s, jnp.int32)                    # noqa: E731
    # A packed batch of `rows` sequences, each filling its row (the FLOPs depend on shapes).
    pack = dict(pack_ids=i32(rows, width), pack_segment_ids=i32(rows, width),
                pack_positions=i32(rows, width), pack_targets=i32(rows, width),
                pack_row=i32(rows, 1), pack_col=i32(rows, 1), pack_valid=sds((rows, 1), bool),
                pack_micro=i32(rows))
    seq = (i32(rows, 1), i32(rows, 1), i32(rows, 1))      # prompt, prompt_mask, tokens
    score = make_score_fn(state.graphdef, chunk_size=chunk, temperature=1.0)
    f_score = score.lower(state.params, state.rest, *seq, None, pack).compile().cost_analysis()
    f32 = lambda *s: sds(s, jnp.float32)                  # noqa: E731
    batch = dict(prompt_tokens=i32(rows, 1), prompt_mask=i32(rows, 1), tokens=i32(rows, 1),
                 mask=f32(rows, 1), old_logp=f32(rows, 1), entropy=f32(rows, 1),
                 advantages=f32(rows), **pack)
    step = make_train_step(tx, "grpo", {}, chunk_size=chunk, temperature=1.0)
    f_step = step.lower(state, batch).compile().cost_analysis()
    pick = lambda c: float((c[0] if isinstance(c, list) else c)["flops"])  # noqa: E731
    return pick(f_score), pick(f_step)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--responses", type=int, default=1024)
    p.add_argument("--mean", type=float, default=3000.0)
    p.add_argument("--sigma", type=float, default=1.0)
    p.add_argument("--cap", type=int, default=16384)
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--devices", type=int, default=8)
    p.add_argument("--minibatch", type=int, default=0, help="pack per minibatch (0 = all)")
    p.add_argument("--rows-per-micro", type=int, default=0,
                   help="packed rows per micro-batch (0 = one micro-batch)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    rng = np.random.default_rng(a.seed)
    b, pl, n = a.responses, a.prompt_len, a.cap
    resp = length_mix(rng, b, a.mean, n, a.sigma)
    prom = length_mix(rng, b, 200.0, pl, 0.5)
    pmask = (np.arange(pl)[None] >= (pl - prom)[:, None]).astype(np.int32)
    mask = (np.arange(n)[None] < resp[:, None]).astype(np.float32)
    zeros = lambda s: np.zeros(s, np.int32)               # noqa: E731
    t = time.perf_counter()
    mb = a.minibatch or b
    packs = [packing.pack(zeros((mb, pl)), pmask[i:i + mb], zeros((mb, n)), mask[i:i + mb],
                          max_tokens_per_row=pl + n, rows_per_micro=a.rows_per_micro,
                          num_devices=a.devices)
             for i in range(0, b, mb)]
    shapes = [pk.ids.shape for pk in packs]
    rows = sum(r for r, _ in shapes)
    fill = sum(pk.tokens for pk in packs) / sum(r * w for r, w in shapes)
    print(f"responses: mean {resp.mean():.0f}, median {np.median(resp):.0f}, "
          f"max {resp.max()}, at cap {(resp == n).mean():.1%}; prompts mean {prom.mean():.0f}")
    print(f"packed per minibatch of {mb} ({a.rows_per_micro or 'all'} rows per micro-batch, "
          f"{a.devices} devices): "
          f"{rows} rows, widths {sorted({w for _, w in shapes})} (fill {fill:.1%}; packing "
          f"{time.perf_counter() - t:.1f} s) vs padded {b} rows x {pl + n - 1}")
    cfg = ModelConfig(family="qwen3", qk_norm=True, tie_word_embeddings=True, rope_theta=1e6,
                      num_layers=a.layers, attention_impl="dense", **SHAPE_1P7B)
    per_width = {w: row_flops(cfg, w) for w in {pl + n - 1, *(w for _, w in shapes)}}
    pad = [b * x for x in per_width[pl + n - 1]]
    pkd = [sum(r * per_width[w][k] for r, w in shapes) for k in range(2)]
    print(f"model: Qwen3-1.7B shapes, {a.layers} layer(s), bf16 compute, dense attention")
    for name, x, y in (("score", pad[0], pkd[0]), ("train step", pad[1], pkd[1]),
                       ("score + train step", sum(pad), sum(pkd))):
        print(f"{name:>20}: padded {x:.3e} FLOPs, packed {y:.3e} FLOPs, ratio {x / y:.2f}x")

if __name__ == "__main__":
    main()
