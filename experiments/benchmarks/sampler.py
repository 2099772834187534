"""Sampler throughput: espo_jax.rollout.generate vs Hugging Face generate (torch CPU).

Same random Qwen3 weights on both sides (built with transformers, saved, loaded with
espo_jax.models.from_pretrained in float32), greedy decoding, no early stopping.
Prefill is timed alone (generate with max_new_tokens=1), then the full generate;
decode = full - prefill. Medians over --reps runs after one warm-up (the JAX compile).

    .venv/bin/python experiments/benchmarks/sampler.py            # 16 x 32 prompt, 128 new
    .venv/bin/python experiments/benchmarks/sampler.py --quick    # seconds, for smoke tests
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers

from espo_jax.models import from_pretrained
from espo_jax.rollout import generate

MODEL = dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
             head_dim=64, intermediate_size=768, vocab_size=32000, max_position_embeddings=2048,
             rms_norm_eps=1e-6, rope_theta=1_000_000.0, tie_word_embeddings=True)


def build_models(tmp: str, seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.Qwen3Config(**MODEL, bos_token_id=None, eos_token_id=None, pad_token_id=0)
    hf = transformers.Qwen3ForCausalLM(config).eval()
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    hf.save_pretrained(tmp)
    return hf, from_pretrained(tmp, dtype=jnp.float32)


def timed(fn, reps: int) -> float:
    """Median wall seconds of fn() over reps runs (fn must block until done)."""
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="4 prompts x 16 tokens, 16 new, 1 rep")
    args = ap.parse_args()
    if args.quick:
        args.batch, args.prompt_len, args.new_tokens, args.reps = 4, 16, 16, 1
    b, p, n = args.batch, args.prompt_len, args.new_tokens

    with tempfile.TemporaryDirectory() as tmp:
        hf, model = build_models(tmp)
    rng = np.random.default_rng(0)
    prompts = rng.integers(1, MODEL["vocab_size"], size=(b, p)).astype(np.int64)
    ids_t, mask_t = torch.from_numpy(prompts), torch.ones(b, p, dtype=torch.long)
    key = jax.random.key(0)

    def hf_run(new):
        with torch.inference_mode():
            return hf.generate(input_ids=ids_t, attention_mask=mask_t, do_sample=False,
                               max_new_tokens=new, min_new_tokens=new, pad_token_id=0)

    def jax_run(new):
        ro = generate(model, prompts.tolist(), max_new_tokens=new, temperature=0.0, key=key,
                      eos_id=None)
        return jax.block_until_ready(ro)

    results = {}
    for name, run in (("jax", jax_run), ("hf", hf_run)):
        out_full = run(n)  # warm-up (compiles the JAX buckets)
        run(1)
        prefill = timed(lambda: run(1), args.reps)
        full = timed(lambda: run(n), args.reps)
        results[name] = dict(prefill=prefill, full=full, decode=max(full - prefill, 1e-9),
                             out=np.asarray(out_full.tokens if name == "jax" else out_full[:, p:]))

    same = np.array_equal(results["jax"]["out"], results["hf"]["out"])
    rows = [
        ("prefill (s)", "prefill", lambda r: r["prefill"], False),
        ("prefill tok/s", "prefill", lambda r: b * p / r["prefill"], True),
        ("decode (s)", "decode", lambda r: r["decode"], False),
        ("decode tok/s", "decode", lambda r: b * (n - 1) / r["decode"], True),
        ("generate (s)", "full", lambda r: r["full"], False),
        ("generate new tok/s", "full", lambda r: b * n / r["full"], True),
    ]
    print(f"\nsampler benchmark: B={b} prompts x P={p} tokens, N={n} new, greedy; "
          f"Qwen3 {MODEL['hidden_size']}d x {MODEL['num_hidden_layers']} layers, vocab "
          f"{MODEL['vocab_size']}; jax {jax.__version__} ({jax.devices()[0].platform}), "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads), "
          f"{os.cpu_count()} CPUs; median of {args.reps}")
    print(f"{'metric':<20} {'espo_jax':>12} {'HF torch':>12} {'speedup':>10}")
    for label, _, fn, higher_better in rows:
        j, h = fn(results["jax"]), fn(results["hf"])
        ratio = j / h if higher_better else h / j  # > 1 means JAX is faster
        print(f"{label:<20} {j:>12.4g} {h:>12.4g} {ratio:>9.2f}x")
    print(f"greedy tokens identical to HF: {same}")


if __name__ == "__main__":
    main()
