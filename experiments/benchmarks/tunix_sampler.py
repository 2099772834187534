"""Sampler throughput: espo_jax.rollout.generate (static batch and continuous engine) vs
Tunix's sampler (`tunix.generate.sampler.Sampler`, package google-tunix) on the same
random Qwen3 weights, in one process, on the workloads of `sampler.py`.

Tunix is never a dependency of espo-jax: it lives in a separate venv used only here.
Run anywhere else (e.g. `make bench` in the project venv) this script prints one skip
line and exits 0. Install (about 3 minutes on CPU; pins jax/flax to the project venv's):

    python3 -m venv /tmp/tunix-venv
    /tmp/tunix-venv/bin/pip install google-tunix==0.1.7 jax==0.10.2 jaxlib==0.10.2 flax==0.12.8
    /tmp/tunix-venv/bin/pip install -e .          # espo-jax itself (no torch needed here)

    /tmp/tunix-venv/bin/python experiments/benchmarks/tunix_sampler.py           # uniform
    /tmp/tunix-venv/bin/python experiments/benchmarks/tunix_sampler.py --ragged  # ragged
    /tmp/tunix-venv/bin/python experiments/benchmarks/tunix_sampler.py --quick   # smoke

Weights: one random HF-layout checkpoint (config.json from transformers.Qwen3Config, the
tensors drawn like transformers' init: normal(0, 0.02), RMSNorm weights 1) is written to
a temporary directory and loaded by both `espo_jax.models.from_pretrained` and Tunix's
`tunix.models.qwen3.params.create_model_from_safe_tensors`, both in float32; the model
shape is `workloads.py`'s MODEL, as `sampler.py`'s (torch is not needed).

Uniform workload (default): B x P-token prompts (sampler.py's: seed 0, 16 x 32), N new
tokens, greedy, no stop token. Tunix is given a stop id that never occurs (-1), so every
row runs N tokens, and pad id -1: with a real pad id (e.g. 0) Tunix masks out every
*generated* token equal to it from later attention. Greedy tokens are compared across
the three samplers (same weights: a parity check of the two model implementations).

Ragged workload (--ragged): sampler.py's (seed 1: 64 prompts of 8..64 tokens, T=1, a stop
set of V/40 ids, cap 256). Tunix has no continuous batching: its sampler runs static
batches of K prompts (left-padded to 64; a batch stops when all its rows hit a stop id),
top_p=1.0 (plain categorical sampling). Useful tokens = response tokens up to and
including the stop token. Responses differ across samplers (different random streams),
so lengths differ; the table gives the mean/max.

Two Tunix 0.1.7 behaviours this script works around: its Sampler reads the stop ids
(`eos_tokens`) when it traces its jitted decode, so a later call with other stop ids
silently stops on the first call's (hence one Sampler per stop set, i.e. per process
here); and importing tunix.models.qwen3 sets flax's `flax_always_shard_variable` to False
process-wide (harmless for our model on one device).

Every timed call blocks until its outputs are ready (Tunix's call returns host arrays);
one warm-up call each (the compiles), then --reps rounds, samplers interleaved within a
round so that they see the same machine load; medians.
"""
from __future__ import annotations

import sys

try:
    import tunix  # noqa: F401
    from tunix.generate import sampler as tunix_sampler
    from tunix.models.qwen3 import model as tunix_qwen3
    from tunix.models.qwen3 import params as tunix_params
except ImportError as e:  # the project venv: Tunix is benchmark-only
    print(f"tunix_sampler.py: skipped, tunix is not importable ({e}); see the docstring "
          "for the separate venv")
    sys.exit(0)

import json
import os
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import transformers
from safetensors.numpy import save_file

from espo_jax.models import from_pretrained
from espo_jax.rollout import generate

from workloads import MODEL, workload_parser  # noqa: E402  (same directory)

NEVER = -1  # a token id no sampler can draw: Tunix's stop id and pad id when none is wanted


def write_checkpoint(path: str, seed: int = 0) -> None:
    """Random Qwen3 HF checkpoint (config.json + model.safetensors, float32) at path."""
    m = MODEL
    transformers.Qwen3Config(**m, bos_token_id=None, eos_token_id=None,
                             pad_token_id=0).save_pretrained(path)
    rng = np.random.default_rng(seed)
    d, f, h = m["hidden_size"], m["intermediate_size"], m["head_dim"]
    q, kv = m["num_attention_heads"] * h, m["num_key_value_heads"] * h

    def normal(*shape):  # HF Linear weights are [out, in]
        return rng.normal(0.0, 0.02, size=shape).astype(np.float32)

    t = {"model.embed_tokens.weight": normal(m["vocab_size"], d),
         "model.norm.weight": np.ones(d, np.float32)}
    for i in range(m["num_hidden_layers"]):
        p = f"model.layers.{i}."
        t.update({
            p + "self_attn.q_proj.weight": normal(q, d), p + "self_attn.k_proj.weight": normal(kv, d),
            p + "self_attn.v_proj.weight": normal(kv, d), p + "self_attn.o_proj.weight": normal(d, q),
            p + "self_attn.q_norm.weight": np.ones(h, np.float32),
            p + "self_attn.k_norm.weight": np.ones(h, np.float32),
            p + "mlp.gate_proj.weight": normal(f, d), p + "mlp.up_proj.weight": normal(f, d),
            p + "mlp.down_proj.weight": normal(d, f),
            p + "input_layernorm.weight": np.ones(d, np.float32),
            p + "post_attention_layernorm.weight": np.ones(d, np.float32)})
    save_file(t, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})


def tunix_config():
    m = MODEL
    return tunix_qwen3.ModelConfig(
        num_layers=m["num_hidden_layers"], vocab_size=m["vocab_size"], embed_dim=m["hidden_size"],
        hidden_dim=m["intermediate_size"], num_heads=m["num_attention_heads"],
        head_dim=m["head_dim"], num_kv_heads=m["num_key_value_heads"],
        rope_theta=int(m["rope_theta"]), norm_eps=m["rms_norm_eps"],
        use_tied_embedding=m["tie_word_embeddings"], dtype=jnp.float32,
        param_dtype=jnp.float32)


class IdTokenizer:
    """Tunix's tokenizer interface over prompts that are already token-id lists."""

    def __init__(self, pad_id: int):
        self._pad = pad_id

    def encode(self, ids, **_):
        return list(ids)

    def decode(self, ids, **_):
        return ""

    def bos_id(self):
        return None  # no BOS prepended

    def eos_id(self):
        return NEVER

    def pad_id(self):
        return self._pad


def build(tmp: str, cache_size: int):
    """(our Decoder, Tunix Sampler) on the same random weights."""
    write_checkpoint(tmp)
    ours = from_pretrained(tmp, dtype=jnp.float32)
    theirs = tunix_params.create_model_from_safe_tensors(tmp, tunix_config(), dtype=jnp.float32)
    cache = tunix_sampler.CacheConfig(cache_size=cache_size, num_layers=MODEL["num_hidden_layers"],
                                      num_kv_heads=MODEL["num_key_value_heads"],
                                      head_dim=MODEL["head_dim"])
    return ours, tunix_sampler.Sampler(theirs, IdTokenizer(pad_id=NEVER), cache)


def interleaved(runs: dict, reps: int) -> dict:
    """name -> median wall seconds over reps rounds; each round runs every fn once."""
    times = {name: [] for name in runs}
    for _ in range(reps):
        for name, fn in runs.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def header(title: str, reps: int) -> str:
    return (f"{title}; Qwen3 {MODEL['hidden_size']}d x {MODEL['num_hidden_layers']} layers, "
            f"{MODEL['num_attention_heads']}/{MODEL['num_key_value_heads']} heads x "
            f"{MODEL['head_dim']}, vocab {MODEL['vocab_size']}, float32; jax {jax.__version__} "
            f"({jax.devices()[0].platform}), tunix {_version()}, {os.cpu_count()} CPUs; "
            f"median of {reps}")


def _version() -> str:
    try:
        from importlib.metadata import version
        return version("google-tunix")
    except Exception:  # noqa: BLE001 (a label only)
        return "?"


def uniform(args) -> None:
    b, p, n = args.batch, args.prompt_len, args.new_tokens
    with tempfile.TemporaryDirectory() as tmp:
        model, sampler = build(tmp, cache_size=p + n)
    rng = np.random.default_rng(0)  # sampler.py's prompts
    prompts = rng.integers(1, MODEL["vocab_size"], size=(b, p)).tolist()
    key = jax.random.key(0)

    def ours(max_concurrent=None):
        ro = generate(model, prompts, max_new_tokens=n, temperature=0.0, key=key, eos_id=None,
                      max_concurrent=max_concurrent)
        return np.asarray(jax.block_until_ready(ro).tokens)

    def tunix_run():
        out = sampler(prompts, max_generation_steps=n, max_prompt_length=p, temperature=0.0,
                      eos_tokens=[NEVER])
        return np.stack([np.asarray(t) for t in out.tokens])

    runs = {"espo static": ours, f"espo engine K={b}": lambda: ours(b), "tunix Sampler": tunix_run}
    outs = {name: fn() for name, fn in runs.items()}  # warm-up: compiles
    secs = interleaved(runs, args.reps)
    print("\n" + header(f"uniform workload: B={b} x P={p}, N={n} new, greedy, no stop",
                        args.reps))
    print(f"{'sampler':<18} {'seconds':>9} {'new tok/s':>10} {'vs tunix':>9}")
    for name, s in secs.items():
        print(f"{name:<18} {s:>9.3f} {b * n / s:>10.1f} {secs['tunix Sampler'] / s:>8.2f}x")
    ref = outs["tunix Sampler"]
    for name in ("espo static", f"espo engine K={b}"):
        o = outs[name]
        agree = (o == ref).all(-1).mean() if o.shape == ref.shape else float("nan")
        first = [int(np.argmax(r != t)) if (r != t).any() else n for r, t in zip(o, ref)]
        print(f"greedy tokens {name} == tunix: {bool(o.shape == ref.shape and (o == ref).all())} "
              f"(rows identical {agree:.0%}, first difference at token min {min(first)})")


def ragged(args) -> None:
    v, k, cap = MODEL["vocab_size"], args.ragged_k, args.ragged_cap
    rng = np.random.default_rng(1)  # sampler.py's ragged workload
    prompts = [rng.integers(1, v, size=int(m)).tolist()
               for m in rng.integers(8, 65, size=args.ragged_prompts)]
    stops = rng.choice(np.arange(1, v), size=v // 40, replace=False).tolist()
    p_max = max(len(x) for x in prompts)
    with tempfile.TemporaryDirectory() as tmp:
        model, sampler = build(tmp, cache_size=p_max + cap)
    kw = dict(max_new_tokens=cap, temperature=1.0, key=jax.random.key(0), eos_id=stops,
              sampling=args.sampling)

    def ours_engine():
        return np.asarray(jax.block_until_ready(
            generate(model, prompts, max_concurrent=k, **kw)).lengths)

    def ours_static():
        return np.concatenate([np.asarray(jax.block_until_ready(
            generate(model, prompts[i:i + k], first_row=i, **kw)).lengths)
            for i in range(0, len(prompts), k)])

    def tunix_static():
        lengths = []
        for i in range(0, len(prompts), k):
            out = sampler(prompts[i:i + k], max_generation_steps=cap, max_prompt_length=p_max,
                          temperature=1.0, top_p=1.0, eos_tokens=stops, seed=i)
            # Tunix's tokens stop before the stop id; count it, as our lengths do.
            lengths += [min(len(t) + 1, cap) for t in out.tokens]
        return np.asarray(lengths)

    runs = {f"espo engine K={k}": ours_engine, f"espo static x{k}": ours_static,
            f"tunix static x{k}": tunix_static}
    lengths = {name: fn() for name, fn in runs.items()}  # warm-up: compiles
    secs = interleaved(runs, args.reps)
    print("\n" + header(f"ragged workload: {len(prompts)} prompts (8..64 tokens), T=1, "
                        f"{len(stops)} stop ids, cap {cap}, {args.sampling} sampling (ours)",
                        args.reps))
    print(f"{'sampler':<18} {'seconds':>9} {'useful tok':>11} {'tok/s':>9} {'len mean/max':>13} "
          f"{'vs tunix':>9}")
    tps = {name: lengths[name].sum() / s for name, s in secs.items()}
    for name, s in secs.items():
        ln = lengths[name]
        print(f"{name:<18} {s:>9.3f} {int(ln.sum()):>11d} {tps[name]:>9.1f} "
              f"{ln.mean():>7.1f}/{ln.max():<5d} {tps[name] / tps[f'tunix static x{k}']:>8.2f}x")


def main():
    ap = workload_parser(__doc__, reps=5, quick_help="tiny sizes, 1 rep (smoke test)")
    args = ap.parse_args()
    if args.quick:
        args.batch, args.prompt_len, args.new_tokens, args.reps = 4, 16, 16, 1
        args.ragged_prompts, args.ragged_k, args.ragged_cap = 8, 4, 32
    (ragged if args.ragged else uniform)(args)


if __name__ == "__main__":
    main()
