"""Sampler throughput: espo_jax.rollout.generate vs Hugging Face generate (torch CPU), and
continuous batching vs static batches on a ragged workload.

Same random Qwen3 weights on both sides (built with transformers, saved, loaded with
espo_jax.models.from_pretrained in float32).

Uniform workload (default): greedy decoding, no early stopping. Prefill is timed alone
(generate with max_new_tokens=1), then the full generate; decode = full - prefill. The
static sampler (max_concurrent=None) and the engine (max_concurrent=B) against HF.

Ragged workload (--ragged): --ragged-prompts prompts (lengths 8..64), sampled at T=1 with a
stop set of V/40 token ids, so on the near-uniform random model a response ends with
probability ~1/40 per token: geometric lengths, mean ~40, capped at --ragged-cap. Useful
tokens/s (response tokens up to the stop) of the engine with K=--ragged-k slots vs the
static sampler run on consecutive batches of K prompts (each batch runs until its longest
row ends). Also the forward steps each ran, and the fewest any K-slot continuous batching
needs for the same lengths (``fifo_steps``): a step reads every weight whatever its row
count, so where that read dominates the step counts bound the ratio. Each static batch
passes its first row (``generate(first_row=)``), so it draws the engine's very responses
(the table counts the rows that match): both samplers produce the same tokens. The key
decides the lengths, so one key's ratio is noisy; --seeds S runs keys 0..S-1 and pools
them (total useful tokens / total seconds of each sampler).

Decode-step breakdown (--breakdown): the per-token cost of the parts of a greedy decode
step at B rows (the unembedding, then the unembedding plus: a flat argmax; the sampler's
greedy token and log-prob; a T=1 draw), each timed in a jitted loop of 200 steps, against
the whole static decode step and HF's: what bounds the uniform ratio (HF's greedy computes
no log-probs). Then the unembedding's two costs apart: its arithmetic with the weights in
cache (the same FLOPs as 8 dots on one eighth of the columns) and a read of its weights'
bytes from memory (NumPy sums, one thread per core): on a CPU where the dot does not
overlap the two, the unembedding takes about their sum.

Medians over --reps runs after one warm-up (the JAX compile), the samplers interleaved rep
by rep so that they all see the same machine load.

    .venv/bin/python experiments/benchmarks/sampler.py            # 16 x 32 prompt, 128 new
    .venv/bin/python experiments/benchmarks/sampler.py --ragged   # 64 ragged prompts, K=16
    .venv/bin/python experiments/benchmarks/sampler.py --batch 2 --prompt-len 2048 --new-tokens 8
    .venv/bin/python experiments/benchmarks/sampler.py --ragged --seeds 8  # pooled over 8 keys
    .venv/bin/python experiments/benchmarks/sampler.py --breakdown  # decode step's parts
    .venv/bin/python experiments/benchmarks/sampler.py --quick    # seconds, for smoke tests
"""
from __future__ import annotations

import os
import statistics
import tempfile
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers

from espo_jax.models import from_pretrained
from espo_jax.rollout import engine as engine_lib
from espo_jax.rollout import generate
from espo_jax.rollout.sampling import sample_rows, token_keys

from workloads import MODEL, workload_parser  # noqa: E402  (same directory)


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


def fifo_steps(lengths, k: int) -> int:
    """Fewest forward steps of continuous batching with k slots for responses of these
    lengths, prompts started in order: a slot runs a prompt for its length in steps (the
    step that ends its prefill draws token 1) and takes the next prompt the step after;
    prefill costs no extra step. The engine's floor at these lengths."""
    free = [0] * k  # the step at which each slot is next free
    for n in lengths:
        j = min(range(k), key=free.__getitem__)
        free[j] += int(n)
    return max(free)


def ragged(model, args):
    """Continuous batching (K slots) vs static batches of K prompts; useful tokens/s, for
    each key in 0..--seeds-1, then pooled over the keys (total tokens / total seconds)."""
    v = MODEL["vocab_size"]
    rng = np.random.default_rng(1)
    prompts = [rng.integers(1, v, size=int(n)).tolist()
               for n in rng.integers(8, 65, size=args.ragged_prompts)]
    stops = rng.choice(np.arange(1, v), size=v // 40, replace=False).tolist()
    cap = args.ragged_cap
    print(f"\nragged workload: {len(prompts)} prompts (8..64 tokens), T=1, {len(stops)} stop "
          f"ids, cap {cap}, {args.sampling} sampling; Qwen3 {MODEL['hidden_size']}d x "
          f"{MODEL['num_hidden_layers']} layers, vocab {v}; jax {jax.__version__} "
          f"({jax.devices()[0].platform}); median of {args.reps}")
    pooled = np.zeros((2, 2))  # (engine, static) x (seconds, useful tokens)
    for seed in range(args.seeds):
        pooled += ragged_seed(model, args, prompts, stops, seed)
    if args.seeds > 1:
        (s_e, u_e), (s_s, u_s) = pooled
        print(f"\npooled over keys 0..{args.seeds - 1}: continuous / static useful tokens/s "
              f"{(u_e / s_e) / (u_s / s_s):.2f}x")


def ragged_seed(model, args, prompts, stops, seed: int) -> np.ndarray:
    """One key's runs and table; returns [[seconds, useful tokens]] of the two samplers."""
    k, cap = args.ragged_k, args.ragged_cap
    kw = dict(max_new_tokens=cap, temperature=1.0, key=jax.random.key(seed), eos_id=stops,
              sampling=args.sampling)

    stats = {}

    def engine_fn(*a):  # the engine's step counts ride along (its 4th output)
        out = engine_lib.engine_jit(*a)
        stats["steps"], stats["sizes"] = out[3], a[1].decode_sizes
        return out

    def engine():
        return [jax.block_until_ready(generate(model, prompts, max_concurrent=k,
                                               prefill_tokens=args.prefill_tokens,
                                               engine_fn=engine_fn, **kw))]

    def static():  # batch i draws as rows i.. of one call: the engine's responses
        return [jax.block_until_ready(generate(model, prompts[i:i + k], first_row=i, **kw))
                for i in range(0, len(prompts), k)]

    runs = {"continuous K=%d" % k: engine, "static batches of %d" % k: static}
    rows, times, tokens = {}, {name: [] for name in runs}, {}
    for name, run in runs.items():
        out = run()  # warm-up: compiles
        lengths = np.concatenate([np.asarray(r.lengths) for r in out])
        tokens[name] = np.concatenate([np.asarray(r.tokens) for r in out])
        rows[name] = (int(lengths.sum()), lengths)
    for _ in range(args.reps):  # interleaved, so both see the same machine load
        for name, run in runs.items():
            times[name].append(timed(run, 1))
    rows = {name: (statistics.median(times[name]), *rows[name]) for name in runs}
    print(f"\nkey {seed}:")
    print(f"{'sampler':<24} {'seconds':>9} {'useful tok':>11} {'tok/s':>9} "
          f"{'len mean/max':>13}")
    for name, (secs, useful, lengths) in rows.items():
        print(f"{name:<24} {secs:>9.3f} {useful:>11d} {useful / secs:>9.1f} "
              f"{lengths.mean():>7.1f}/{lengths.max():<5d}")
    (s_e, u_e, _), (s_s, u_s, _) = rows.values()
    a, b = tokens.values()
    print(f"continuous / static useful tokens/s: {(u_e / s_e) / (u_s / s_s):.2f}x; the same "
          f"responses in {int((a == b).all(axis=1).sum())} of {len(a)} rows")
    # Forward steps: every step reads every weight whatever its rows, so where that read
    # dominates a step's cost the step counts bound the ratio.
    steps = np.asarray(stats["steps"]).tolist()
    n, ns = (r[2].tolist() for r in rows.values())  # the engine's, the static lengths
    static_steps = sum(max(ns[i:i + k]) for i in range(0, len(ns), k))
    floor = fifo_steps(n, k)
    by_size = ", ".join(f"{c} at {z} rows" for z, c in zip(stats["sizes"], steps[1:]))
    print(f"forward steps: static {static_steps}; continuous "
          f"{sum(steps)} ({steps[0]} mixed prefill + decode of {k} rows, {by_size}); "
          f"fewest possible with {k} slots {floor}: static / that = "
          f"{static_steps / floor:.2f}x")
    return np.array([[secs, useful] for secs, useful, _ in rows.values()], float)


def stream_read_ms(a: np.ndarray, reps: int) -> float:
    """Median ms to read array a once from memory: NumPy sums of its parts, one thread per
    CPU (NumPy releases the GIL), 10 reads per rep (a is bigger than the cache)."""
    parts = np.array_split(a.reshape(-1), os.cpu_count() or 1)

    def read():
        threads = [threading.Thread(target=part.sum) for part in parts]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    read()
    return timed(lambda: [read() for _ in range(10)], reps) / 10 * 1e3


def breakdown(model, hf_step: float, jax_step: float, b: int, reps: int) -> None:
    """Print ms per step of each part of a greedy decode step at b rows (see the doc)."""
    iters = 200
    d, v = MODEL["hidden_size"], MODEL["vocab_size"]
    w = model.unembedding().astype(jnp.float32)
    hidden = jax.random.normal(jax.random.key(1), (b, d))
    rows, key = jnp.arange(b, dtype=jnp.int32), jax.random.key(2)

    def unembed(h):
        return jnp.dot(h, w, preferred_element_type=jnp.float32)

    parts = {
        "unembed [B,D]x[D,V]": lambda h, i: unembed(h)[:, 0],
        "+ flat jnp.argmax": lambda h, i: jnp.argmax(unembed(h), -1).astype(jnp.float32),
        "+ greedy + log-prob": lambda h, i: sample_rows(unembed(h), None, 1.0, greedy=True)[1],
        "+ T=1 draw + log-prob": lambda h, i: sample_rows(
            unembed(h), token_keys(key, rows, jnp.full((b,), i, jnp.int32)), 1.0)[1],
    }

    w8 = w[:, :v // 8]  # 1/8 of the weights: stays in cache between the 8 dots

    def in_cache(h, i):
        return sum(jnp.dot(h + j, w8, preferred_element_type=jnp.float32)[:, 0]
                   for j in range(8))

    def looped(part):
        @jax.jit
        def run(h):  # each step depends on the last, so XLA cannot hoist or batch them
            return jax.lax.fori_loop(0, iters, lambda i, x: x + 1e-6 * part(x, i)[:, None],
                                     h)
        return run

    def timed_loop(part):
        run = looped(part)
        jax.block_until_ready(run(hidden))
        return timed(lambda: jax.block_until_ready(run(hidden)), reps) / iters * 1e3

    print(f"\ndecode step breakdown: B={b}, D={d}, V={v}; ms per step, median of {reps} "
          f"loops of {iters} steps")
    print(f"{'part':<26} {'ms/step':>8} {'of static step':>15}")
    ms = {name: timed_loop(part) for name, part in parts.items()}
    split = {"unembed in cache 8xV/8": timed_loop(in_cache),
             "read D x V f32 (NumPy)": stream_read_ms(np.asarray(w), reps)}
    both = sum(split.values())
    ms.update(split, **{"  sum of the two above": both})
    for name, t in ms.items():
        print(f"{name:<26} {t:>8.3f} {t / (jax_step * 1e3):>14.0%}")
    print(f"{'static decode step':<26} {jax_step * 1e3:>8.3f} {1:>14.0%}")
    print(f"{'HF decode step':<26} {hf_step * 1e3:>8.3f} {hf_step / jax_step:>14.0%}")
    print(f"unembed / (in cache + read) = {ms['unembed [B,D]x[D,V]'] / both:.2f}: "
          "near 1 where the dot does not overlap its arithmetic with its memory reads")


def main():
    ap = workload_parser(__doc__, reps=3, quick_help="4 prompts x 16 tokens, 16 new, 1 rep")
    ap.add_argument("--seeds", type=int, default=1,
                    help="ragged: run keys 0..seeds-1 (each draws other lengths) and pool them")
    ap.add_argument("--prefill-tokens", type=int, default=None,
                    help="the engine's packed prompt tokens per mixed step (default: its own)")
    ap.add_argument("--breakdown", action="store_true",
                    help="also time the decode step's parts (uniform workload)")
    args = ap.parse_args()
    if args.seeds < 1:
        ap.error(f"--seeds must be >= 1, got {args.seeds}")
    if args.ragged:
        if args.quick:
            args.ragged_prompts, args.ragged_k, args.ragged_cap, args.reps = 8, 4, 32, 1
            args.seeds = min(args.seeds, 2)
        with tempfile.TemporaryDirectory() as tmp:
            _, model = build_models(tmp)
        ragged(model, args)
        return
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

    def jax_run(new, max_concurrent=None):
        ro = generate(model, prompts.tolist(), max_new_tokens=new, temperature=0.0, key=key,
                      eos_id=None, max_concurrent=max_concurrent)
        return jax.block_until_ready(ro)

    def engine_run(new):
        return jax_run(new, max_concurrent=b)

    runs = {"jax": jax_run, "engine": engine_run, "hf": hf_run}
    outs = {}
    for name, run in runs.items():  # warm-up (compiles the JAX buckets)
        out_full = run(n)
        run(1)
        outs[name] = np.asarray(out_full[:, p:] if name == "hf" else out_full.tokens)
    secs = {(name, m): [] for name in runs for m in (1, n)}
    for _ in range(args.reps):  # interleaved, so all three see the same machine load
        for name, run in runs.items():
            for m in (1, n):
                secs[name, m].append(timed(lambda: run(m), 1))  # noqa: B023 (called here)
    results = {}
    for name in runs:
        prefill, full = (statistics.median(secs[name, m]) for m in (1, n))
        results[name] = dict(prefill=prefill, full=full, decode=max(full - prefill, 1e-9),
                             out=outs[name])

    same = np.array_equal(results["jax"]["out"], results["hf"]["out"])
    same_engine = np.array_equal(results["engine"]["out"], results["hf"]["out"])
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
    print(f"{'metric':<20} {'static':>10} {'engine':>10} {'HF torch':>10} {'static/HF':>10} "
          f"{'engine/HF':>10}")
    for label, _, fn, higher_better in rows:
        j, e, h = fn(results["jax"]), fn(results["engine"]), fn(results["hf"])
        ratio = (lambda x: x / h if higher_better else h / x)  # > 1 means JAX is faster
        print(f"{label:<20} {j:>10.4g} {e:>10.4g} {h:>10.4g} {ratio(j):>9.2f}x {ratio(e):>9.2f}x")
    print(f"greedy tokens identical to HF: static {same}, engine {same_engine}")
    if args.breakdown:
        breakdown(model, results["hf"]["decode"] / (n - 1), results["jax"]["decode"] / (n - 1),
                  b, args.reps)


if __name__ == "__main__":
    main()
