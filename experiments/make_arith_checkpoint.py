"""Build the embedded task's warm-start policy: espo_jax/assets/arith.

Writes the character-level tokenizer and a tiny Qwen3-architecture model, supervised on
train-split problems only (cross-entropy on response tokens), in two phases: --scratch_steps
steps on scratchpad targets (``37+48=85;85-19=66;#66``), then a MIX in which a fraction
--direct_frac of the targets answers at once (``#66``, arith.direct_response) and the rest
works the scratchpad. The policy so learns both styles, and its first response token is a
genuine, high-entropy decision: the shortcut is almost always wrong (so small a model
cannot add 2-4 numbers in one go), the scratchpad is mostly right. With the defaults greedy
decoding takes the shortcut on about half of the eval prompts (greedy accuracy ~0.3) and
temperature-1 samples about as often; RL raises greedy accuracy by learning to work the
problems out (response length grows with it), then by sharpening the scratchpad.
Optionally stop early once dev greedy accuracy reaches --target_acc (dev = held-out
train-split problems, never the eval split). --phase1_cache speeds up experiments with
phase 2 (the committed assets were built without it).

Run (a few minutes on 2 CPU cores; deterministic for a given --seed):
    .venv/bin/python experiments/make_arith_checkpoint.py            # -> espo_jax/assets/arith
    .venv/bin/python experiments/make_arith_checkpoint.py --out /tmp/arith --direct_frac 0.5
"""
from __future__ import annotations

import argparse
import functools
import json
import pathlib
import pickle
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from espo_jax.data import arith, check_disjoint
from espo_jax.models.decoder import positions_from_mask

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from harness import warm_start as W  # noqa: E402  (experiments/harness/)

MAX_NEW = arith.MAX_RESPONSE_TOKENS


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(arith.ASSET_DIR))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n_train", type=int, default=20000)
    p.add_argument("--n_dev", type=int, default=256)
    p.add_argument("--n_eval", type=int, default=500)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--max_steps", type=int, default=1150)
    p.add_argument("--scratch_steps", type=int, default=1000,
                   help="phase 1: steps on scratchpad targets only")
    p.add_argument("--eval_every", type=int, default=100)
    p.add_argument("--target_acc", type=float, default=1.01, help="stop early at this dev acc")
    p.add_argument("--direct_frac", type=float, default=0.6,
                   help="phase 2: fraction of SFT targets that skip the scratchpad")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--intermediate", type=int, default=384)
    p.add_argument("--samples", type=int, default=8, help="G for the sampled pass@1")
    p.add_argument("--no_save", action="store_true")
    p.add_argument("--phase1_cache", default="",
                   help="pickle of the state after phase 1: reused if present, else written")
    return p.parse_args()


def encode_sft(tok, examples, length: int, direct):
    """ids i32[N,length] (prompt + response + eos, right padded), loss mask f32[N,length-1]
    marking targets that are response tokens (incl. eos). direct bool[N]: shortcut target."""
    ids = np.full((len(examples), length), tok.pad_token_id, np.int32)
    mask = np.zeros((len(examples), length - 1), np.float32)
    for i, ex in enumerate(examples):
        p = tok.encode(ex.prompt, add_special_tokens=False)
        target = (arith.direct_response if direct[i] else arith.reference_response)(ex.prompt)
        r = tok.encode(target, add_special_tokens=False) + [tok.eos_token_id]
        seq = p + r
        assert len(seq) <= length, (ex.prompt, len(seq))
        ids[i, : len(seq)] = seq
        mask[i, len(p) - 1 : len(seq) - 1] = 1.0  # target t+1 is a response token
    return ids, mask


def encode_prompts(tok, prompts):
    """Left-padded prompt ids i32[B,P] and mask i32[B,P]."""
    enc = [tok.encode(p, add_special_tokens=False) for p in prompts]
    P = max(map(len, enc))
    ids = np.full((len(enc), P), tok.pad_token_id, np.int32)
    mask = np.zeros((len(enc), P), np.int32)
    for i, e in enumerate(enc):
        ids[i, P - len(e):] = e
        mask[i, P - len(e):] = 1
    return ids, mask


def make_decode(graphdef, eos_id: int, pad_id: int):
    """Jitted KV-cached decoding: greedy when temperature == 0, else sampled."""

    @functools.partial(jax.jit, static_argnames=("max_new",))
    def decode(params, ids, pmask, key, temperature, max_new):
        model = nnx.merge(graphdef, params)
        B, P = ids.shape
        cache = model.init_cache(B, P + max_new)
        kv = jnp.concatenate([pmask, jnp.ones((B, max_new), pmask.dtype)], axis=1)
        logits, cache = model(ids, positions_from_mask(pmask), attention_mask=kv, cache=cache,
                              cache_index=0)
        plen = pmask.sum(axis=1).astype(jnp.int32)

        def pick(logits, k):
            sampled = jax.random.categorical(k, logits / jnp.maximum(temperature, 1e-6), axis=-1)
            return jnp.where(temperature > 0, sampled, jnp.argmax(logits, axis=-1)).astype(jnp.int32)

        def step(carry, t):
            cache, last_logits, done, key = carry
            key, k = jax.random.split(key)
            tok = pick(last_logits, k)
            out = jnp.where(done, pad_id, tok)
            done = done | (tok == eos_id)
            logits, cache = model(tok[:, None], (plen + t)[:, None], attention_mask=kv, cache=cache,
                                  cache_index=P + t)
            return (cache, logits[:, -1], done, key), out

        init = (cache, logits[:, -1], jnp.zeros((B,), bool), key)
        _, toks = jax.lax.scan(step, init, jnp.arange(max_new))
        return toks.T  # [B, max_new]

    return decode


def accuracy(decode, params, tok, examples, *, temperature=0.0, samples=1, key=None, batch=512):
    """Verified-reward stats over examples x samples: {acc, len, direct_frac, direct_acc,
    scratch_acc} (direct = the response starts with '#', i.e. skips the scratchpad)."""
    prompts = [ex.prompt for ex in examples for _ in range(samples)]
    answers = [ex.answer for ex in examples for _ in range(samples)]
    key = jax.random.key(0) if key is None else key
    rewards, lengths, direct = [], [], []
    for s in range(0, len(prompts), batch):
        ids, pmask = encode_prompts(tok, prompts[s : s + batch])
        key, k = jax.random.split(key)
        out = np.asarray(decode(params, ids, pmask, k, jnp.float32(temperature), max_new=MAX_NEW))
        for row, ans in zip(out, answers[s : s + batch]):
            row = row.tolist()
            n = row.index(tok.eos_token_id) if tok.eos_token_id in row else len(row)
            text = tok.decode(row[:n], skip_special_tokens=True)
            lengths.append(n + 1)
            direct.append(text.startswith("#"))
            rewards.append(arith.verify(text, ans)[0])
    r, d = np.array(rewards), np.array(direct)
    nan_mean = lambda x: float(x.mean()) if x.size else float("nan")
    return {"acc": float(r.mean()), "len": float(np.mean(lengths)), "direct_frac": float(d.mean()),
            "direct_acc": nan_mean(r[d]), "scratch_acc": nan_mean(r[~d])}


def main():
    a = parse_args()
    out = pathlib.Path(a.out)
    t0, c0 = time.time(), time.process_time()

    # -- data: train-split problems only; dev = other train-split problems ---------------------
    pool = arith.make_examples("train", a.n_train + a.n_dev, a.seed)
    train, dev_set = pool[: a.n_train], pool[a.n_train :]
    evals = arith.make_examples("eval", a.n_eval, a.seed)
    check_disjoint(train + dev_set, evals)

    # -- tokenizer, saved first so the model is built against what AutoTokenizer loads -------
    tmp = out.with_name(out.name + ".tmp")
    tok, graphdef, params = W.new_policy(arith.build_tokenizer(), tmp, layers=a.layers,
                                         hidden=a.hidden, intermediate=a.intermediate,
                                         head_dim=32, seed=a.seed)

    direct = np.random.default_rng(a.seed + 7).random(len(train)) < a.direct_frac
    phases = (encode_sft(tok, train, 56, np.zeros(len(train), bool)),  # scratchpad only
              encode_sft(tok, train, 56, direct))                         # mixed styles
    tx = W.sft_optimizer(a.lr, a.max_steps, final_frac=0.1)
    opt_state = tx.init(params)
    train_step = W.sft_step(graphdef, tx)

    decode = make_decode(graphdef, tok.eos_token_id, tok.pad_token_id)
    rng = np.random.default_rng(a.seed)
    t_sft, c_sft = time.time(), time.process_time()
    step, dev_acc = 0, 0.0
    cache = pathlib.Path(a.phase1_cache) if a.phase1_cache else None
    while step < a.max_steps:
        if cache is not None and step == a.scratch_steps:
            if cache.is_file():  # identical to recomputing phase 1 (same seed and flags)
                params, opt_state, rng_state = pickle.loads(cache.read_bytes())
                rng.bit_generator.state = rng_state
            else:
                cache.write_bytes(pickle.dumps(
                    (jax.device_get(params), jax.device_get(opt_state), rng.bit_generator.state)))
        if cache is not None and cache.is_file() and step < a.scratch_steps:
            step = a.scratch_steps
            continue
        idx = rng.integers(0, len(train), a.batch)
        ids, lmask = phases[int(step >= a.scratch_steps)]
        params, opt_state, loss = train_step(params, opt_state, ids[idx], lmask[idx])
        step += 1
        if step % a.eval_every == 0:
            dev = accuracy(decode, params, tok, dev_set)
            dev_acc = dev["acc"]
            print(f"step {step:5d}  loss {float(loss):.4f}  dev greedy acc {dev_acc:.3f} "
                  f"(shortcut {dev['direct_frac']:.2f})  ({time.time() - t_sft:.0f}s)", flush=True)
            if dev_acc >= a.target_acc:
                break
    sft_s, sft_cpu = time.time() - t_sft, time.process_time() - c_sft

    # -- report: greedy eval accuracy and sampled pass@1 (G samples, temperature 1) -----------
    greedy = accuracy(decode, params, tok, evals)
    sampled = accuracy(decode, params, tok, evals, temperature=1.0, samples=a.samples,
                       key=jax.random.key(a.seed + 1))
    summary = {
        "sft_steps": step, "sft_seconds": round(sft_s, 1), "sft_cpu_seconds": round(sft_cpu, 1),
        "scratch_steps": a.scratch_steps, "direct_frac_phase2": a.direct_frac, "dev_greedy_acc": dev_acc,
        "eval_greedy": greedy, f"eval_sampled_G{a.samples}_T1": sampled,
        "n_params": W.n_params(params),
    }
    print(json.dumps(summary, indent=2))

    if a.no_save:
        return
    W.write_asset(nnx.merge(graphdef, params), tok, tmp, {**summary, "seed": a.seed})
    size = W.promote(tmp, out)
    print(f"wrote {out} ({size/1e6:.2f} MB) in {time.time() - t0:.0f}s total "
          f"({time.process_time() - c0:.0f}s CPU)")


if __name__ == "__main__":
    main()
