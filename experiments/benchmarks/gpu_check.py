"""Times one ESPO train step of a random Qwen3-shaped model and reports MFU.

The step is the product's own ``espo_jax.train.step.make_train_step``, jitted with the
project's shardings (``espo_jax.train.mesh``): forward (prompt + response) -> chunked token
log-probs (espo_jax.ops) -> policy_loss("espo") -> grads -> clip -> AdamW (state donated).

MFU = 6 * N * tokens / step_time / peak_flops, with N = all parameters (for a tied
model the embedding counts once, as the unembedding matmul; the lookup is free).
Attention score FLOPs are reported separately (``mfu_with_attn``). Peak FLOPs: dense
bf16 from a table keyed by ``jax.devices()[0].device_kind`` (``--peak-tflops`` overrides).

  python experiments/benchmarks/gpu_check.py                 # Qwen3-0.6B shape, bf16
  python experiments/benchmarks/gpu_check.py --model=1.7b    # Qwen3-1.7B shape
  python experiments/benchmarks/gpu_check.py --tiny          # seconds on a laptop CPU

Prefer ``experiments/benchmarks/gpu_check.sh`` (sets XLA flags, prints the GPU).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from espo_jax.models import Decoder, ModelConfig
from espo_jax.train.mesh import (
    abstract_state, batch_sharding, check_batch, make_mesh, opt_state_shardings,
    param_shardings)

# Qwen3 shapes (HF config.json values; tied embeddings)
SHAPES = {
    "0.6b": dict(hidden_size=1024, num_layers=28, num_heads=16, num_kv_heads=8, head_dim=128,
                 intermediate_size=3072, vocab_size=151936),
    "1.7b": dict(hidden_size=2048, num_layers=28, num_heads=16, num_kv_heads=8, head_dim=128,
                 intermediate_size=6144, vocab_size=151936),
    "4b": dict(hidden_size=2560, num_layers=36, num_heads=32, num_kv_heads=8, head_dim=128,
               intermediate_size=9728, vocab_size=151936),
    "tiny": dict(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                 intermediate_size=128, vocab_size=512),
}

# Dense (no sparsity) bf16 peak FLOP/s per chip. First substring match (lower-case) wins.
PEAK_BF16 = (
    ("gb200", 2.5e15), ("b200", 2.25e15), ("b100", 1.75e15),
    ("h200", 989e12), ("h100 pcie", 756e12), ("h100 nvl", 835e12), ("h100", 989e12),
    ("h800", 989e12), ("gh200", 989e12),
    ("a100", 312e12), ("a800", 312e12), ("a10g", 70e12), ("a10", 125e12),
    ("l40s", 362e12), ("l40", 181e12), ("l4", 121e12), ("rtx 4090", 165e12),
    ("rtx 3090", 71e12), ("v100", 125e12), ("mi300x", 1307e12), ("mi250", 362e12),
    ("tpu v6", 918e12), ("tpu v5p", 459e12), ("tpu v5 lite", 197e12), ("tpu v5e", 197e12),
    ("tpu v5", 459e12), ("tpu v4", 275e12), ("tpu v3", 123e12),
)


def peak_flops(device_kind: str) -> float | None:
    kind = device_kind.lower()
    for key, flops in PEAK_BF16:
        if key in kind:
            return flops
    return None


def model_config(name: str, remat: bool, num_layers: int = 0) -> ModelConfig:
    shape = dict(SHAPES[name])
    if num_layers > 0:
        shape["num_layers"] = num_layers
    return ModelConfig(family="qwen3", qk_norm=True, tie_word_embeddings=True,
                       rope_theta=1e6, remat=remat, **shape)


def count_params(abs_params) -> int:
    return int(sum(math.prod(x.shape) for x in jax.tree.leaves(abs_params)))


def train_step_flops(cfg: ModelConfig, n_params: int, batch: int, prompt_len: int,
                     response_len: int) -> tuple[float, float]:
    """(6*N*tokens, attention-score FLOPs fwd+bwd) for one update on [B, P+N] tokens."""
    t = prompt_len + response_len
    dense = 6.0 * n_params * batch * t
    # QK^T and AV: 2 matmuls * 2 FLOP * T^2 * H*hd per layer fwd; causal halves it; x3 fwd+bwd
    attn = 3 * 2 * 2 * batch * t * t * cfg.num_heads * cfg.head_dim * cfg.num_layers / 2
    return dense, attn


def make_batch(key, cfg: ModelConfig, batch: int, prompt_len: int, response_len: int):
    """Random rollout-shaped minibatch (numpy, host) in the layout of espo_jax.train.step."""
    rng = np.random.default_rng(int(jax.random.randint(key, (), 0, 2**31 - 1)))
    prompt_mask = np.ones((batch, prompt_len), np.int32)
    prompt_mask[: batch // 2, : prompt_len // 4] = 0      # some left padding
    mask = np.ones((batch, response_len), np.float32)
    mask[::2, response_len * 3 // 4:] = 0                 # some early EOS
    return {
        "prompt_tokens": rng.integers(1, cfg.vocab_size, (batch, prompt_len), dtype=np.int32),
        "prompt_mask": prompt_mask,
        "tokens": rng.integers(1, cfg.vocab_size, (batch, response_len), dtype=np.int32),
        "mask": mask,
        "old_logp": (-rng.exponential(2.0, (batch, response_len))).astype(np.float32),
        "entropy": rng.exponential(1.0, (batch, response_len)).astype(np.float32),
        "advantages": rng.standard_normal(batch).astype(np.float32),
    }


def build(args):
    """Mesh, shardings, abstract state and the product's jitted train step
    (``espo_jax.train.step.make_train_step``); ``espo_jax.train.dry_run`` (``--dry_run``)
    compiles the same from a run config."""
    from espo_jax.train.optim import make_optimizer
    from espo_jax.train.state import TrainState, state_shardings
    from espo_jax.train.step import make_train_step

    cfg = model_config(args.model, args.remat, args.layers)
    dtype, pdtype = jnp.dtype(args.dtype), jnp.dtype(args.param_dtype)
    mesh = make_mesh(dict(data=args.data, fsdp=args.fsdp, tensor=args.tensor))
    check_batch(args.batch, mesh)
    init = lambda: Decoder(cfg, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=pdtype)  # noqa: E731
    abstract_model = nnx.eval_shape(init)
    tx = make_optimizer(ml_collections.ConfigDict(dict(
        lr=1e-6, warmup_steps=0, weight_decay=0.0, grad_clip=1.0, b1=0.9, b2=0.999, eps=1e-8)))
    shardings = state_shardings(abstract_model, tx, mesh, param_shardings_fn=param_shardings,
                                opt_shardings_fn=opt_state_shardings)
    b_sh = batch_sharding(mesh)
    jstep = make_train_step(tx, "espo", dict(vocab_size=cfg.vocab_size),
                            chunk_size=args.chunk_size, temperature=1.0, micro_batch_size=0,
                            state_shardings=shardings, batch_sharding=b_sh)
    graphdef, abs_params, abs_rest = nnx.split(abstract_model, nnx.Param, ...)
    return dict(cfg=cfg, mesh=mesh, init=init, tx=tx, graphdef=graphdef, abs_params=abs_params,
                abs_rest=abs_rest, shardings=shardings, b_sh=b_sh, jstep=jstep,
                TrainState=TrainState)


def abstract_inputs(b, batch: int, prompt_len: int, response_len: int):
    """(TrainState, batch) of ShapeDtypeStructs with shardings for ``jstep.lower``."""
    sh = b["shardings"]
    sds = lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)  # noqa: E731
    state = b["TrainState"](
        graphdef=b["graphdef"], params=abstract_state(b["abs_params"], sh.params),
        rest=abstract_state(b["abs_rest"], sh.rest),
        opt_state=jax.tree.map(sds, jax.eval_shape(b["tx"].init, b["abs_params"]), sh.opt_state),
        step=jax.ShapeDtypeStruct((), jnp.int32, sharding=sh.step), ref_params=None)
    host = make_batch(jax.random.key(0), b["cfg"], batch, prompt_len, response_len)  # small
    data = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=b["b_sh"]) for k, v in host.items()}
    return state, data


def create_state(b):
    """A real, sharded TrainState of the random model (each device builds only its shards)."""
    from espo_jax.train.state import create_state as _create
    sh = b["shardings"]
    params, rest = jax.jit(lambda: nnx.split(b["init"](), nnx.Param, ...)[1:],
                           out_shardings=(sh.params, sh.rest))()
    model = nnx.merge(b["graphdef"], params, rest)
    return _create(model, b["tx"], shardings=sh)


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="0.6b", choices=sorted(SHAPES))
    p.add_argument("--layers", type=int, default=0, help="override the number of layers")
    p.add_argument("--tiny", action="store_true", help="tiny model and batch (CPU syntax check)")
    p.add_argument("--batch", type=int, default=8, help="sequences per step (global)")
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--response-len", type=int, default=768)
    p.add_argument("--chunk-size", type=int, default=1024, help="log-prob op token chunk")
    p.add_argument("--dtype", default="bfloat16", help="compute dtype")
    p.add_argument("--param-dtype", default="float32",
                   help="master weights (float32: RL learning rates ~1e-6 vanish in bf16)")
    p.add_argument("--remat", type=int, default=1, help="rematerialise each layer (1/0)")
    p.add_argument("--data", type=int, default=1)
    p.add_argument("--fsdp", type=int, default=-1)
    p.add_argument("--tensor", type=int, default=1)
    p.add_argument("--steps", type=int, default=5, help="timed steps (after 1 warm-up)")
    p.add_argument("--peak-tflops", type=float, default=0.0,
                   help="peak dense bf16 TFLOP/s per device (default: table by device kind)")
    p.add_argument("--json", default="", help="also write the result here")
    p.add_argument("--force", action="store_true", help="run the full size even on CPU")
    args = p.parse_args(argv)
    if jax.default_backend() == "cpu" and not (args.tiny or args.force):
        print("no accelerator found: running the --tiny variant instead (--force runs the "
              "full size on CPU; for a GPU: pip install -U 'jax[cuda12]')", flush=True)
        args.tiny = True
    if args.tiny:
        args.model = "tiny"
        args.batch, args.prompt_len, args.response_len, args.chunk_size = 8, 8, 16, 16
        args.dtype = args.param_dtype = "float32"
    return args


def main(argv=None) -> dict:
    from espo_jax.train.distributed import setup_distributed
    setup_distributed(None)  # before the first backend query (parse asks for the backend)
    args = parse(argv)
    dev = jax.devices()[0]
    print(f"jax {jax.__version__}, backend {jax.default_backend()}, {jax.device_count()} x "
          f"{dev.device_kind}", flush=True)
    b = build(args)
    cfg, mesh = b["cfg"], b["mesh"]
    n_params = count_params(b["abs_params"])
    print(f"model {args.model}: {n_params / 1e6:.1f}M params, {cfg.num_layers} layers, "
          f"dtype {args.dtype}/{args.param_dtype}, remat={bool(args.remat)}; mesh "
          f"{dict(mesh.shape)}; batch {args.batch} x ({args.prompt_len}+{args.response_len})",
          flush=True)

    t0 = time.perf_counter()
    state = create_state(b)
    data = jax.device_put(make_batch(jax.random.key(0), cfg, args.batch, args.prompt_len,
                                     args.response_len), b["b_sh"])
    jax.block_until_ready(state)
    t_init = time.perf_counter() - t0

    t0 = time.perf_counter()
    with jax.set_mesh(mesh):  # lets model-side constrain_batch pin activations (see mesh.py)
        compiled = b["jstep"].lower(state, data).compile()
    t_compile = time.perf_counter() - t0
    mem = compiled.memory_analysis()

    state, metrics, _ = compiled(state, data)  # warm-up
    jax.block_until_ready(metrics)
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        state, metrics, _ = compiled(state, data)
        jax.block_until_ready((state, metrics))
        times.append(time.perf_counter() - t0)
    loss = metrics["loss"]
    step_time = float(np.median(times))

    tokens = args.batch * (args.prompt_len + args.response_len)
    dense, attn = train_step_flops(cfg, n_params, args.batch, args.prompt_len, args.response_len)
    peak_one = args.peak_tflops * 1e12 if args.peak_tflops else peak_flops(dev.device_kind)
    n_dev = mesh.size
    res = {
        "device_kind": dev.device_kind, "backend": jax.default_backend(), "devices": n_dev,
        "mesh": dict(mesh.shape), "model": args.model, "params": n_params,
        "batch": args.batch, "prompt_len": args.prompt_len, "response_len": args.response_len,
        "tokens_per_step": tokens, "dtype": args.dtype, "param_dtype": args.param_dtype,
        "remat": bool(args.remat), "step_time_s": step_time, "step_times_s": times,
        "tokens_per_s": tokens / step_time, "init_s": t_init, "compile_s": t_compile,
        "loss": float(loss), "model_tflops_per_step": dense / 1e12,
        "attn_tflops_per_step": attn / 1e12,
        "peak_tflops_per_device": (peak_one / 1e12) if peak_one else None,
        "mfu": dense / step_time / (peak_one * n_dev) if peak_one else None,
        "mfu_with_attn": (dense + attn) / step_time / (peak_one * n_dev) if peak_one else None,
        "temp_bytes_per_device": getattr(mem, "temp_size_in_bytes", None),
        "argument_bytes_per_device": getattr(mem, "argument_size_in_bytes", None),
    }
    mfu = f"{100 * res['mfu']:.1f}%" if res["mfu"] is not None else "n/a (unknown peak; pass --peak-tflops)"
    mfu_a = f"{100 * res['mfu_with_attn']:.1f}%" if res["mfu_with_attn"] is not None else "n/a"
    print(f"step {1e3 * step_time:.1f} ms (median of {len(times)}; compile {t_compile:.1f} s), "
          f"{res['tokens_per_s']:.0f} tokens/s, loss {res['loss']:.4f}")
    print(f"MFU {mfu} (6*N*tokens = {dense / 1e12:.2f} TFLOP/step); with attention {mfu_a}")
    if res["temp_bytes_per_device"] is not None:
        print(f"per-device memory: arguments {res['argument_bytes_per_device'] / 2**30:.2f} GiB, "
              f"temporaries {res['temp_bytes_per_device'] / 2**30:.2f} GiB")
    if not math.isfinite(res["loss"]):
        print("ERROR: non-finite loss", file=sys.stderr)
        sys.exit(1)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    return res


if __name__ == "__main__":
    main()
