"""Evaluation on the held-out split: greedy accuracy or avg@k, plus an optional sampled pass.

The primary pass gives ``eval_accuracy`` = mean reward over the evaluated responses (rewards
are 1/0 correctness): greedy accuracy for ``eval.num_samples == 1``, avg@k for k > 1 (sampled
at ``eval.temperature``). ``eval.sampled_samples = k > 0`` adds a second pass of k samples per
problem at ``eval.sampled_temperature`` (T=1 pass@1 next to greedy, for tasks where the policy
should stay stochastic): ``eval_sampled_accuracy`` (pass@1 averaged over the k samples) and
``eval_sampled_pass_at_k`` (problems with at least one correct sample).

The eval problems and the sampling key come from ``eval.seed``, not the run's seed, so every
seed and arm of a sweep is scored on the same problems. Prompts are evaluated in fixed-size
batches (the last one padded by repetition and trimmed), so every call reuses one compiled
sampler.
"""
from __future__ import annotations

import jax
import numpy as np

from espo_jax.rollout import generate
from espo_jax.rollout.engine import engine_kwargs
from espo_jax.rollout.engine_sharding import decode_model, mesh_engine_fn, model_mesh
from espo_jax.train.distributed import to_host
from espo_jax.train.mesh import batch_divisor
from espo_jax.train.tasks import Task, decode_responses, encode_prompts, stop_token_ids


def _sample_and_score(model, task: Task, tokenizer, config, examples, prompts, *, k: int,
                      temperature: float, key: jax.Array, decode_fn, engine: dict):
    """(rewards f32[n*k], gradable bool[n*k], lengths int[n*k]) of k responses per prompt,
    the k samples of a prompt adjacent. The prompts go in batches of ``eval.batch_size``,
    each drawing as its rows of one call (``first_row``): the batch size changes no
    response."""
    ecfg = config.eval
    stop_ids = stop_token_ids(tokenizer, config.model.path)
    bs = int(ecfg.batch_size) if ecfg.batch_size and ecfg.batch_size > 0 else len(prompts)
    rewards, gradable, lengths = [], [], []
    for start in range(0, len(prompts), bs):
        chunk = prompts[start:start + bs]
        n_real = len(chunk)
        chunk = chunk + [chunk[-1]] * (bs - n_real)       # constant shape -> one compile
        ro = generate(model, chunk, max_new_tokens=int(ecfg.max_new_tokens),
                      temperature=temperature, key=key, first_row=start * k,
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
    return np.concatenate(rewards), np.concatenate(gradable), np.concatenate(lengths)


def evaluate(model, task: Task, tokenizer, config, *, key: jax.Array, decode_fn=None) -> dict:
    """Metrics dict: eval_accuracy, eval_response_len_mean, eval_gradable_frac, eval_num, and
    with ``eval.sampled_samples > 0`` eval_sampled_accuracy, eval_sampled_pass_at_k,
    eval_sampled_response_len_mean.
    ``decode_fn``: the sampler to use (e.g. ``mesh.sharded_decode_fn(mesh)``; None: default).
    Stops on ``tasks.stop_token_ids`` (tokenizer EOS + generation_config.json's)."""
    ecfg = config.eval
    examples = task.eval[: max(1, int(ecfg.num_examples))]
    prompts = encode_prompts(examples, config.task, tokenizer)
    mesh = model_mesh(model)  # the weights' mesh (None: unplaced)
    engine = engine_kwargs(config.rollout, batch_divisor(mesh))
    if engine["max_concurrent"] is not None:
        # On a mesh: one engine per batch shard, as the training rollout (same tokens).
        engine["engine_fn"] = mesh_engine_fn(mesh)
        model = decode_model(model)  # TP-only / replicated weights, made once per evaluation
    run = lambda k, temperature, key: _sample_and_score(  # noqa: E731
        model, task, tokenizer, config, examples, prompts, k=k, temperature=temperature,
        key=key, decode_fn=decode_fn, engine=engine)

    k = max(1, int(ecfg.num_samples))
    r, g, ln = run(k, float(ecfg.temperature) if k > 1 else 0.0, key)
    out = {"eval_accuracy": float(r.mean()), "eval_gradable_frac": float(g.mean()),
           "eval_response_len_mean": float(ln.mean()), "eval_num": len(examples) * k}
    ks = int(ecfg.sampled_samples)
    if ks > 0:
        r, _, ln = run(ks, float(ecfg.sampled_temperature), jax.random.fold_in(key, 1 << 20))
        out["eval_sampled_accuracy"] = float(r.mean())
        out["eval_sampled_pass_at_k"] = float(r.reshape(len(examples), ks).max(-1).mean())
        out["eval_sampled_response_len_mean"] = float(ln.mean())
    return out
