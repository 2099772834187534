"""Evaluation on the held-out split: greedy accuracy, or avg@k with k sampled responses.

accuracy = mean reward over the evaluated responses (rewards are 1/0 correctness), i.e.
greedy accuracy for ``eval.num_samples == 1`` and avg@k for k > 1 (sampled at
``eval.temperature``). Prompts are evaluated in fixed-size batches (the last one padded by
repetition and trimmed), so every call reuses one compiled sampler.
"""
from __future__ import annotations

import jax
import numpy as np

from espo_jax.rollout import generate
from espo_jax.rollout.engine import decode_model, engine_kwargs
from espo_jax.train.distributed import to_host
from espo_jax.train.tasks import Task, decode_responses, encode_prompts, stop_token_ids


def evaluate(model, task: Task, tokenizer, config, *, key: jax.Array, decode_fn=None) -> dict:
    """Metrics dict: eval_accuracy, eval_response_len_mean, eval_gradable_frac, eval_num.
    ``decode_fn``: the sampler to use (e.g. ``mesh.sharded_decode_fn(mesh)``; None: default).
    Stops on ``tasks.stop_token_ids`` (tokenizer EOS + generation_config.json's)."""
    ecfg = config.eval
    examples = task.eval[: max(1, int(ecfg.num_examples))]
    k = max(1, int(ecfg.num_samples))
    temperature = float(ecfg.temperature) if k > 1 else 0.0
    prompts = encode_prompts(examples, config.task, tokenizer)
    stop_ids = stop_token_ids(tokenizer, config.model.path)
    bs = int(ecfg.batch_size) if ecfg.batch_size and ecfg.batch_size > 0 else len(prompts)
    engine = engine_kwargs(config.rollout)
    if engine["max_concurrent"] is not None:
        model = decode_model(model)  # TP-only / replicated weights, made once per evaluation
    rewards, gradable, lengths = [], [], []
    for start in range(0, len(prompts), bs):
        chunk = prompts[start:start + bs]
        n_real = len(chunk)
        chunk = chunk + [chunk[-1]] * (bs - n_real)       # constant shape -> one compile
        ro = generate(model, chunk, max_new_tokens=int(ecfg.max_new_tokens),
                      temperature=temperature, key=jax.random.fold_in(key, start),
                      eos_id=stop_ids, num_samples=k,
                      pad_id=tokenizer.pad_token_id, decode_fn=decode_fn,
                      **engine)
        tokens, mask = to_host((ro.tokens, ro.mask))        # rows may live on other hosts
        tokens, mask = tokens[: n_real * k], mask[: n_real * k]
        texts = decode_responses(tokens, mask, tokenizer)
        exs = [e for e in examples[start:start + n_real] for _ in range(k)]
        r, g = task.score(texts, exs)
        rewards.append(r)
        gradable.append(g)
        lengths.append(mask.sum(-1))
    r, g, ln = np.concatenate(rewards), np.concatenate(gradable), np.concatenate(lengths)
    return {"eval_accuracy": float(r.mean()), "eval_gradable_frac": float(g.mean()),
            "eval_response_len_mean": float(ln.mean()), "eval_num": len(examples) * k}
