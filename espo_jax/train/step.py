"""The two jitted training computations: ``score`` (the pi_old pass) and ``train_step``.

Batch layout (dict of arrays, leading dim B = sequences):
  prompt_tokens i32[B,P] (left padded), prompt_mask i32[B,P], tokens i32[B,T] (response),
  mask f32[B,T] (1 = response token that counts), old_logp f32[B,T], entropy f32[B,T]
  (old policy, nats), advantages f32[B], and optionally ref_logp f32[B,T] (KL term on),
  groups i32[B,T] (ESPO's entropy groups, computed once per rollout) and is_weights
  f32[B,T] (rollout-correction weights, ``objectives.rollout_correction_weights``).

Precision: the params are the f32 masters; the forward runs in the model's compute dtype
(each layer casts its weights), the log-prob op takes compute-dtype operands with f32
accumulation, gradients are accumulated over micro-batches in f32 and reach optax in f32.

Both recompute hidden states over prompt + response in one forward pass and take log-probs
and entropy of the response tokens with the chunked op at the sampling temperature (the
distribution the sampler drew from), never materialising [B,T,V].
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from espo_jax.ops import token_logprobs_and_entropy
from espo_jax.objectives import batch_counts, combine_stats, finalize, policy_loss_stats
from espo_jax.objectives.metrics import masked_extreme
from espo_jax.train.state import TrainState

# Pins activations' batch dim to ("data","fsdp") under an active mesh (FSDP as intended).
from espo_jax.models.sharding import constrain_batch

BATCH_AXES = ("data", "fsdp")


def response_logprobs(model, prompt_tokens, prompt_mask, tokens, *, chunk_size: int,
                      temperature: float):
    """(logp f32[B,T], entropy f32[B,T]) of ``tokens`` given the prompt, at ``temperature``.

    The hidden state at position P-1+j predicts response token j, so the forward pass runs
    over prompt + tokens[:, :-1] (P+T-1 positions). Response positions are marked real in
    the attention mask; tokens after EOS only attend backwards and are masked out later.
    """
    p = prompt_tokens.shape[1]
    ids = jnp.concatenate([prompt_tokens, tokens[:, :-1]], axis=1)
    am = jnp.concatenate([prompt_mask.astype(jnp.int32),
                          jnp.ones_like(tokens[:, :-1], jnp.int32)], axis=1)
    ids, am = constrain_batch(ids), constrain_batch(am)
    hidden = constrain_batch(model.hidden_states(ids, attention_mask=am)[:, p - 1:])  # [B,T,D]
    # Operands in the compute dtype (bf16 x bf16 -> f32 on accelerators; exact f32 in f32).
    return token_logprobs_and_entropy(hidden.astype(model.dtype), model.unembedding(),
                                      tokens.astype(jnp.int32), chunk_size=chunk_size,
                                      temperature=temperature)


def _split_micro(x, n: int):
    """[B,...] -> [n, B/n, ...], micro-batch i = rows i, i+n, i+2n, ... (strided, so that
    each micro-batch draws evenly from every device's contiguous block of rows)."""
    b = x.shape[0]
    return x.reshape(b // n, n, *x.shape[1:]).swapaxes(0, 1)


def _merge_micro(x):
    """Inverse of ``_split_micro``: [n, m, ...] -> [n*m, ...]."""
    return x.swapaxes(0, 1).reshape(-1, *x.shape[2:])


def _num_micro(batch_size: int, micro_batch_size: int) -> int:
    if micro_batch_size <= 0 or micro_batch_size >= batch_size:
        return 1
    if batch_size % micro_batch_size:
        raise ValueError(f"train.micro_batch_size={micro_batch_size} must divide the minibatch "
                         f"size {batch_size}")
    return batch_size // micro_batch_size


def make_score_fn(graphdef, *, chunk_size: int, temperature: float, micro_batch_size: int = 0,
                  param_shardings=None, rest_shardings=None, batch_sharding=None) -> Callable:
    """Jitted ``score(params, rest, prompt_tokens, prompt_mask, tokens) -> (logp, entropy)``,
    f32[B,T] each, computed in micro-batches of ``micro_batch_size`` rows (0 = all at once).
    Use it with the reference params for ref log-probs."""

    def score(params, rest, prompt_tokens, prompt_mask, tokens):
        n = _num_micro(tokens.shape[0], micro_batch_size)

        def one(p, r, xs):
            model = nnx.merge(graphdef, p, r)
            return response_logprobs(model, *xs, chunk_size=chunk_size, temperature=temperature)

        if n == 1:
            return one(params, rest, (prompt_tokens, prompt_mask, tokens))
        xs = tuple(_split_micro(x, n) for x in (prompt_tokens, prompt_mask, tokens))
        # The params ride in the scan carry (not closed over), so the model is built from
        # values of the loop body's own trace level (NNX transforms such as the decoder's
        # nnx.remat refuse Variables from an outer trace).
        _, (logp, ent) = jax.lax.scan(lambda c, x: (c, one(*c, x)), (params, rest), xs)
        return _merge_micro(logp), _merge_micro(ent)

    if param_shardings is None:
        return jax.jit(score)
    bs = batch_sharding
    return jax.jit(score, in_shardings=(param_shardings, rest_shardings, bs, bs, bs),
                   out_shardings=(bs, bs))


def make_train_step(tx: optax.GradientTransformation, objective: str, hparams: dict, *,
                    chunk_size: int, temperature: float, micro_batch_size: int = 0,
                    state_shardings: TrainState | None = None, batch_sharding=None) -> Callable:
    """Jitted ``train_step(state, batch) -> (state, metrics, logp)``; donates ``state``.

    One optimizer update on a minibatch: forward -> log-probs -> ``policy_loss`` -> grads,
    summed exactly over micro-batches (each micro-batch's loss is normalised by the
    BatchCounts of the whole minibatch, so the sum equals the full-minibatch loss) ->
    non-finite check -> optax. A non-finite loss or gradient norm leaves params, optimizer
    state and step unchanged and sets metrics['nonfinite'] = 1.
    metrics: dict of f32[] (loss, grad_norm, objective metrics, ratio_dev_max = max |r - 1|
    of the token ratios before the update, nonfinite); every metric is combined exactly over
    micro-batches (losses summed, ratios of sums kept as numerator / denominator);
    logp f32[B,T]: the current policy's log-probs before the update (for ratio dumps).
    """

    def loss_fn(params, rest, graphdef, mb, counts):
        model = nnx.merge(graphdef, params, rest)
        logp, _ = response_logprobs(model, mb["prompt_tokens"], mb["prompt_mask"], mb["tokens"],
                                    chunk_size=chunk_size, temperature=temperature)
        kw = dict(hparams)
        for key, arg in (("ref_logp", "ref_logp"), ("groups", "groups"),
                         ("is_weights", "token_weights")):
            if key in mb:
                kw[arg] = mb[key]
        loss, stats = policy_loss_stats(objective, logp, mb["old_logp"], mb["advantages"],
                                        mb["mask"], entropy=mb.get("entropy"), counts=counts,
                                        **kw)
        valid = mb["mask"] != 0
        dev = jnp.abs(jnp.exp(jnp.where(valid, logp - mb["old_logp"], 0.0)) - 1.0)
        stats["ratio_dev_max"] = masked_extreme(dev, valid, "max")
        return loss, (stats, logp)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def train_step(state: TrainState, batch: dict):
        bsz = batch["tokens"].shape[0]
        n = _num_micro(bsz, micro_batch_size)
        counts = batch_counts(batch["mask"])
        micro = jax.tree.map(lambda x: _split_micro(x, n), batch)
        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)

        def body(acc, mb):
            # params/rest ride in the carry (see make_score_fn: NNX trace levels).
            params, rest, g_acc, l_acc = acc
            (loss, (stats, logp)), g = grad_fn(params, rest, state.graphdef, mb, counts)
            g_acc = jax.tree.map(lambda a, b: a + b.astype(jnp.float32), g_acc, g)
            return (params, rest, g_acc, l_acc + loss), (stats, logp)

        (_, _, grads, loss), (stats, logp) = jax.lax.scan(
            body, (state.params, state.rest, zeros, jnp.zeros((), jnp.float32)), micro)
        metrics = finalize(combine_stats(stats))
        # Accumulated in f32; they reach optax in the master params' dtype (f32 by default,
        # model.param_dtype).
        grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, state.params)
        gnorm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(gnorm)
        updates, new_opt = tx.update(grads, state.opt_state, state.params)
        new_params = optax.apply_updates(state.params, updates)
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)  # noqa: E731
        new_state = state.replace(params=keep(new_params, state.params),
                                  opt_state=keep(new_opt, state.opt_state),
                                  step=state.step + finite.astype(jnp.int32))
        metrics.update(loss=loss, grad_norm=gnorm, nonfinite=1.0 - finite.astype(jnp.float32))
        return new_state, metrics, _merge_micro(logp)

    if state_shardings is None:
        return jax.jit(train_step, donate_argnums=0)
    return jax.jit(train_step, donate_argnums=0,
                   in_shardings=(state_shardings, batch_sharding),
                   out_shardings=(state_shardings, None, batch_sharding))
