"""Dry run: ahead-of-time compile of the ESPO train step for a Qwen3-30B-A3B-shaped model on
64 simulated CPU devices (mesh expert=8 x fsdp=8), one sequence per device; prints XLA's
per-device memory (arguments = params + AdamW state, temporaries = grads + activations).

Arguments are exact. Temporaries: XLA's CPU lowering of `jax.lax.ragged_dot` is dense
(every row through every local expert: [N*k, E/|expert|, F] buffers; ~100 GiB per layer at
8k tokens, --no-proxy shows it), so by default the grouped matmul is replaced, for this
compile only, by a stand-in with a grouped kernel's buffers (output [rows, F], weight
gradient [E, D, F]: `lhs @ mean_e(rhs)`); the temporaries are then an estimate of what a
GPU/TPU grouped kernel needs, to be confirmed on the accelerator.

ESPO_AOT_REMAT=0 compiles without per-layer remat. The compile uses the dry run's XLA:CPU
options (memory-optimised scheduler: the default CPU scheduler keeps rematerialised
activations alive, so remat looked like it saved nothing).

Abstract shapes only (no weights). By default 4 and 8 layers are compiled and the per-layer
increase is extrapolated linearly to 48 (arguments exactly, temporaries approximately; the
first layers are not typical: 1 -> 2 layers adds a one-off amount at the peak); --full
compiles all layers.

  XLA_FLAGS=--xla_force_host_platform_device_count=64 \\
    .venv/bin/python experiments/benchmarks/moe_aot.py --tokens 8192 16384
"""
from __future__ import annotations

import argparse
import os
import sys
import time

# Qwen3-30B-A3B config.json (the fields that shape the model).
QWEN3_30B_A3B = dict(
    architectures=["Qwen3MoeForCausalLM"], vocab_size=151936, hidden_size=2048,
    intermediate_size=6144, num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4,
    head_dim=128, num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768,
    norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[], rope_theta=1e6,
    max_position_embeddings=40960, rms_norm_eps=1e-6, tie_word_embeddings=False)
LAYERS = (4, 8)  # compiled layer counts for the linear extrapolation


def compile_step(layers: int, tokens: int, prompt: int, devices: int, expert: int,
                 proxy: bool = True):
    import jax
    import jax.numpy as jnp
    if proxy:  # memory stand-in for a grouped kernel (see the module docstring)
        jax.lax.ragged_dot = lambda lhs, rhs, group_sizes, **kw: jnp.dot(
            lhs, jnp.mean(rhs, axis=0).astype(lhs.dtype))
    import ml_collections
    from flax import nnx
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import gpu_check as g  # noqa: PLC0415 (the AOT helpers: abstract_inputs)
    from espo_jax.models import Decoder, ModelConfig
    from espo_jax.train.mesh import (batch_sharding, make_mesh, opt_state_shardings,
                                     param_shardings)
    from espo_jax.train.optim import make_optimizer
    from espo_jax.train.state import TrainState, state_shardings
    from espo_jax.train.step import make_train_step

    cfg = ModelConfig.from_hf(dict(QWEN3_30B_A3B, num_hidden_layers=layers),
                              remat=os.environ.get("ESPO_AOT_REMAT", "1") == "1",
                              attention_impl="blockwise", attention_chunk=512)
    mesh = make_mesh(dict(data=1, fsdp=devices // expert, tensor=1, expert=expert))
    init = lambda: Decoder(cfg, rngs=nnx.Rngs(0), dtype="bfloat16", param_dtype="float32")  # noqa: E731
    abstract_model = nnx.eval_shape(init)
    tx = make_optimizer(ml_collections.ConfigDict(dict(
        lr=1e-6, warmup_steps=0, weight_decay=0.0, grad_clip=1.0, b1=0.9, b2=0.999, eps=1e-8)))
    sh = state_shardings(abstract_model, tx, mesh, param_shardings_fn=param_shardings,
                         opt_shardings_fn=opt_state_shardings)
    b_sh = batch_sharding(mesh)
    step = make_train_step(tx, "espo", dict(vocab_size=cfg.vocab_size), chunk_size=1024,
                           temperature=1.0, state_shardings=sh, batch_sharding=b_sh)
    graphdef, abs_params, abs_rest = nnx.split(abstract_model, nnx.Param, ...)
    b = dict(cfg=cfg, shardings=sh, abs_params=abs_params, abs_rest=abs_rest, tx=tx,
             graphdef=graphdef, b_sh=b_sh, TrainState=TrainState)
    state, data = g.abstract_inputs(b, devices, prompt, tokens - prompt)
    t0 = time.perf_counter()
    from espo_jax.train.aot import CPU_COMPILE_OPTIONS  # the dry run's CPU scheduler
    with jax.set_mesh(mesh):
        compiled = step.lower(state, data).compile(compiler_options=CPU_COMPILE_OPTIONS)
    mem = compiled.memory_analysis()
    return dict(args=mem.argument_size_in_bytes, temp=mem.temp_size_in_bytes,
                params=g.count_params(abs_params), compile_s=time.perf_counter() - t0)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, nargs="+", default=[8192, 16384],
                   help="tokens per sequence (prompt + response)")
    p.add_argument("--prompt", type=int, default=1024)
    p.add_argument("--devices", type=int, default=64)
    p.add_argument("--expert", type=int, default=8)
    p.add_argument("--full", action="store_true", help="compile all 48 layers")
    p.add_argument("--no-proxy", dest="proxy", action="store_false",
                   help="compile the real ragged_dot (dense on CPU: huge temporaries)")
    a = p.parse_args(argv)
    flag = f"--xla_force_host_platform_device_count={a.devices}"
    if flag not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flag).strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    n = QWEN3_30B_A3B["num_hidden_layers"]
    gib = 2**30
    print(f"Qwen3-30B-A3B-shaped ESPO train step, mesh expert={a.expert} x "
          f"fsdp={a.devices // a.expert} ({a.devices} simulated devices), 1 sequence per device, "
          "bf16 compute, f32 masters + AdamW, remat per layer, blockwise attention")
    print(f"{'tokens/seq':>10}{'params B':>10}{'args GiB':>10}{'temp GiB':>10}{'total GiB':>11}"
          f"{'layer GiB':>11}{'compile s':>11}")
    for t in a.tokens:
        layer = float("nan")  # temporaries added per layer (extrapolation only)
        if a.full:
            est = compile_step(n, t, a.prompt, a.devices, a.expert, a.proxy)
            secs = est["compile_s"]
        else:
            lo, hi = (compile_step(m, t, a.prompt, a.devices, a.expert, a.proxy) for m in LAYERS)
            est = {k: hi[k] + (n - LAYERS[1]) * (hi[k] - lo[k]) / (LAYERS[1] - LAYERS[0])
                   for k in ("args", "temp", "params")}
            secs = lo["compile_s"] + hi["compile_s"]
            layer = (hi["temp"] - lo["temp"]) / (LAYERS[1] - LAYERS[0])
        print(f"{t:>10}{est['params'] / 1e9:>10.2f}{est['args'] / gib:>10.2f}"
              f"{est['temp'] / gib:>10.2f}{(est['args'] + est['temp']) / gib:>11.2f}"
              f"{layer / gib:>11.2f}{secs:>11.0f}",
              flush=True)
    if not a.full:
        print(f"({LAYERS[0]} and {LAYERS[1]} layers compiled, extrapolated linearly to 48: "
              "arguments exact, temporaries approximate)")
    if a.proxy:
        print("(temporaries with a grouped-kernel memory stand-in for ragged_dot; --no-proxy "
              "for XLA CPU's dense lowering)")


if __name__ == "__main__":
    main()
