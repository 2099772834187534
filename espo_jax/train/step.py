"""The two jitted training computations: ``score`` (the pi_old pass) and ``train_step``.

Batch layout (dict of arrays, leading dim B = sequences):
  prompt_tokens i32[B,P] (left padded), prompt_mask i32[B,P], tokens i32[B,T] (response),
  mask f32[B,T] (1 = response token that counts), old_logp f32[B,T], entropy f32[B,T]
  (old policy, nats), advantages f32[B], and optionally ref_logp f32[B,T] (KL term on),
  groups i32[B,T] (ESPO's entropy groups, computed once per rollout) and is_weights
  f32[B,T] (rollout-correction weights, ``objectives.rollout_correction_weights``).
  MoE models: routed_experts u8/i32[B,P+T,L,k] (the sampler's experts per cache slot,
  ``Rollout.routed_experts``); replayed with ``routing_replay``, and compared with the
  current router's top-k for ``moe/router_agreement``.

Precision: the params are the f32 masters; the forward runs in the model's compute dtype
(each layer casts its weights), the log-prob op takes compute-dtype operands with f32
accumulation, gradients are accumulated over micro-batches in f32 and reach optax in f32.

Both recompute hidden states over prompt + response in one forward pass and take log-probs
and entropy of the response tokens with the chunked op at the sampling temperature (the
distribution the sampler drew from), never materialising [B,T,V].
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from espo_jax.ops import token_logprobs_and_entropy
from espo_jax.objectives import batch_counts, combine_stats, finalize, policy_loss_stats
from espo_jax.objectives.aggregation import safe_inverse
from espo_jax.objectives.metrics import masked_extreme
from espo_jax.train.packing import ROW_KEYS
from espo_jax.train.state import TrainState

# Pins activations' batch dim to ("data","fsdp") under an active mesh (FSDP as intended).
from espo_jax.models.sharding import constrain_batch

BATCH_AXES = ("data", "fsdp")


def response_logprobs(model, prompt_tokens, prompt_mask, tokens, *, chunk_size: int,
                      temperature: float, routed=None, return_routing: bool = False):
    """(logp f32[B,T], entropy f32[B,T]) of ``tokens`` given the prompt, at ``temperature``.

    The hidden state at position P-1+j predicts response token j, so the forward pass runs
    over prompt + tokens[:, :-1] (P+T-1 positions). Response positions are marked real in
    the attention mask; tokens after EOS only attend backwards and are masked out later.
    MoE: ``routed`` i32[B,P+T,L,k] replays experts (slots P+T-1.. unused);
    ``return_routing`` appends the routing of the P+T-1 input positions (or None).
    """
    p = prompt_tokens.shape[1]
    ids = jnp.concatenate([prompt_tokens, tokens[:, :-1]], axis=1)
    am = jnp.concatenate([prompt_mask.astype(jnp.int32),
                          jnp.ones_like(tokens[:, :-1], jnp.int32)], axis=1)
    ids, am = constrain_batch(ids), constrain_batch(am)
    if routed is not None:
        routed = constrain_batch(routed[:, :ids.shape[1]])
    hidden, routing = model.hidden_states(ids, attention_mask=am, routed_experts=routed,
                                          return_routing=True)
    hidden = constrain_batch(hidden[:, p - 1:])  # [B,T,D]
    # Operands in the compute dtype (bf16 x bf16 -> f32 on accelerators; exact f32 in f32).
    out = token_logprobs_and_entropy(hidden.astype(model.dtype), model.unembedding(),
                                     tokens.astype(jnp.int32), chunk_size=chunk_size,
                                     temperature=temperature)
    return (*out, routing) if return_routing else out


def packed_logprobs(model, rows: dict, *, chunk_size: int, temperature: float):
    """(logp, entropy) f32[R,L] at the packed positions of one micro-batch's rows
    (``train.packing``: pack_ids / pack_segment_ids / pack_positions / pack_targets
    i32[R,L]); the position predicting nothing gets the value for target 0 (unused)."""
    ids, seg = constrain_batch(rows["pack_ids"]), constrain_batch(rows["pack_segment_ids"])
    hidden = model.hidden_states(ids, positions=rows["pack_positions"], segment_ids=seg)
    return token_logprobs_and_entropy(
        constrain_batch(hidden).astype(model.dtype), model.unembedding(),
        rows["pack_targets"].astype(jnp.int32), chunk_size=chunk_size, temperature=temperature)


def num_packed_micro(pack: dict, rows_per_micro: int) -> int:
    """Micro-batches of packed rows: all rows / ``rows_per_micro`` (0 = one micro-batch)."""
    r = pack["pack_ids"].shape[0]
    if rows_per_micro <= 0:
        return 1
    if r % rows_per_micro:
        raise ValueError(f"{r} packed rows are not a multiple of the micro-batch of "
                         f"{rows_per_micro} rows (pack with rows_per_micro=micro_batch_size)")
    return r // rows_per_micro


def unpack_tokens(values, pack: dict, micro=None, num_micro: int = 1):
    """Packed per-position values -> per-sequence f32[B,N], 0 where not ``pack_valid``.

    values [M*R, L] (all rows, strided micro-batch layout, M = ``num_micro``) with
    ``micro=None``, or [R, L] (micro-batch ``micro``'s rows; sequences of other micro-batches
    get 0)."""
    valid = pack["pack_valid"] != 0
    if micro is None:
        g = pack["pack_micro"][:, None] + num_micro * pack["pack_row"]
    else:
        g = pack["pack_row"]
        valid = valid & (pack["pack_micro"] == micro)[:, None]
    return jnp.where(valid, values[g, pack["pack_col"]], 0.0)


def _moe_terms(routing, mb, num_experts: int, aux_coef: float):
    """(aux loss f32[], stats, load) of one micro-batch's routing (see ``make_train_step``).

    Tokens counted: every real input token (prompt, and response tokens fed back)."""
    from espo_jax.models.moe import load_balancing_terms, router_agreement  # noqa: PLC0415
    from espo_jax.objectives.metrics import ratio  # noqa: PLC0415

    topk = routing["experts"]                                            # [B,S,L,k]
    valid = jnp.concatenate([mb["prompt_mask"] > 0, mb["mask"][:, :-1] > 0], axis=1)  # [B,S]
    stats = {}
    if "routed_experts" in mb:
        rx = mb["routed_experts"][:, :topk.shape[1]].astype(jnp.int32)
        same, n = router_agreement(topk, rx, valid)
        stats["moe/router_agreement"] = ratio(same, n, empty=1.0)
    vm = valid.astype(jnp.float32)[..., None, None]
    counts = jnp.sum(jax.nn.one_hot(topk, num_experts, dtype=jnp.float32).sum(-2) * vm,
                     axis=(0, 1))                                        # [L,E]
    load = (jax.lax.stop_gradient(counts), jnp.sum(vm))
    aux = jnp.zeros((), jnp.float32)
    if aux_coef > 0:
        c, psum, rows = load_balancing_terms(topk, routing["probs"], valid, num_experts)
        aux = aux_coef * num_experts * jnp.sum(c * psum) * safe_inverse(rows * rows)
        stats["moe/aux_loss"] = ratio(aux, 1.0)
    return aux, stats, load


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
    """Jitted ``score(params, rest, prompt_tokens, prompt_mask, tokens, routed=None,
    pack=None) -> (logp, entropy)``, f32[B,T] each, computed in micro-batches of
    ``micro_batch_size`` rows (0 = all at once). ``routed`` i32[B,P+T,L,k]: MoE experts to
    replay (routing replay). ``pack``: ``packing.pack(..., rows_per_micro=micro_batch_size)
    .arrays()``: the forward runs over its packed rows in micro-batches of
    ``micro_batch_size`` rows, and the values are 0 past each sequence's last valid token.
    Use it with the reference params for ref log-probs."""

    def score(params, rest, prompt_tokens, prompt_mask, tokens, routed=None, pack=None):
        if pack is not None:
            return _score_packed(params, rest, pack, routed)
        n = _num_micro(tokens.shape[0], micro_batch_size)

        def one(p, r, xs):
            model = nnx.merge(graphdef, p, r)
            return response_logprobs(model, *xs[:3], chunk_size=chunk_size,
                                     temperature=temperature, routed=xs[3])

        if n == 1:
            return one(params, rest, (prompt_tokens, prompt_mask, tokens, routed))
        xs = tuple(None if x is None else _split_micro(x, n)
                   for x in (prompt_tokens, prompt_mask, tokens, routed))
        # The params ride in the scan carry (not closed over), so the model is built from
        # values of the loop body's own trace level (NNX transforms such as the decoder's
        # nnx.remat refuse Variables from an outer trace).
        _, (logp, ent) = jax.lax.scan(lambda c, x: (c, one(*c, x)), (params, rest), xs)
        return _merge_micro(logp), _merge_micro(ent)

    def _score_packed(params, rest, pack, routed):
        if routed is not None:
            raise ValueError("train.max_tokens_per_row > 0 (packing) does not support MoE "
                             "routing replay; use 0")
        n = num_packed_micro(pack, micro_batch_size)
        rows = {k: _split_micro(pack[k], n) for k in ROW_KEYS}

        def one(c, xs):
            return c, packed_logprobs(nnx.merge(graphdef, *c), xs, chunk_size=chunk_size,
                                      temperature=temperature)

        _, (logp, ent) = jax.lax.scan(one, (params, rest), rows)
        return tuple(unpack_tokens(_merge_micro(v), pack, num_micro=n) for v in (logp, ent))

    if param_shardings is None:
        return jax.jit(score)
    bs = batch_sharding
    jitted = jax.jit(score, in_shardings=(param_shardings, rest_shardings, bs, bs, bs, bs, bs),
                     out_shardings=(bs, bs))
    # in_shardings name all 7 positional arguments: callers may leave routed / pack out.
    full = lambda args: args + (None,) * (7 - len(args))  # noqa: E731

    def call(*args):
        return jitted(*full(args))

    call.lower = lambda *args: jitted.lower(*full(args))
    return call


def make_train_step(tx: optax.GradientTransformation, objective: str, hparams: dict, *,
                    chunk_size: int, temperature: float, micro_batch_size: int = 0,
                    state_shardings: TrainState | None = None, batch_sharding=None,
                    routing_replay: bool = False, moe_aux_loss_coef: float = 0.0) -> Callable:
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
    MoE models add ``moe/router_agreement`` (share of (real input token, sparse layer) pairs
    whose current top-k set equals ``batch['routed_experts']``'s), ``moe/expert_load_max``
    / ``_min`` (tokens routed to an expert / tokens, over layers and experts; sums to k over
    experts) and, with ``moe_aux_loss_coef`` > 0, transformers' load-balancing loss times the
    coefficient (per micro-batch, divided by the number of micro-batches) added to the loss.
    ``routing_replay``: the forward uses ``batch['routed_experts']`` (the rollout's experts).
    """

    def loss_fn(params, rest, graphdef, mb, counts, n_micro):
        model = nnx.merge(graphdef, params, rest)
        routed = mb.get("routed_experts") if routing_replay else None
        if "pack_ids" in mb:  # packed rows (train.max_tokens_per_row > 0); dense models only
            if routed is not None or model.config.num_experts:
                raise ValueError("train.max_tokens_per_row > 0 (packing) supports dense models "
                                 "only; use 0 for MoE")
            lp, _ = packed_logprobs(model, mb, chunk_size=chunk_size, temperature=temperature)
            # Every sequence's arrays, with the sequences of other micro-batches masked out.
            logp = unpack_tokens(lp, mb, mb["pack_index"])
            mine = (mb["pack_micro"] == mb["pack_index"])[:, None]
            mb = {**mb, "mask": jnp.where(mine, mb["mask"], 0).astype(mb["mask"].dtype)}
            routing = None
        else:
            logp, _, routing = response_logprobs(
                model, mb["prompt_tokens"], mb["prompt_mask"], mb["tokens"],
                chunk_size=chunk_size, temperature=temperature, routed=routed,
                return_routing=True)
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
        load = None
        if routing is not None:  # MoE
            aux, moe_stats, load = _moe_terms(routing, mb, model.config.num_experts,
                                              moe_aux_loss_coef)
            loss = loss + aux / n_micro
            stats.update(moe_stats)
        return loss, (stats, logp, load)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def train_step(state: TrainState, batch: dict):
        counts = batch_counts(batch["mask"])
        packed = "pack_ids" in batch
        if packed:  # micro-batches of packed rows; every micro-batch sees all sequences
            n = num_packed_micro(batch, micro_batch_size)
            micro = {k: _split_micro(batch[k], n) for k in ROW_KEYS}
            micro["pack_index"] = jnp.arange(n, dtype=jnp.int32)
            whole = {k: v for k, v in batch.items() if k not in ROW_KEYS}
        else:
            n = _num_micro(batch["tokens"].shape[0], micro_batch_size)
            micro = jax.tree.map(lambda x: _split_micro(x, n), batch)
            whole = {}
        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)

        def body(acc, mb):
            # params/rest ride in the carry (see make_score_fn: NNX trace levels).
            params, rest, g_acc, l_acc = acc
            mb = {**whole, **mb}
            (loss, (stats, logp, load)), g = grad_fn(params, rest, state.graphdef, mb, counts, n)
            g_acc = jax.tree.map(lambda a, b: a + b.astype(jnp.float32), g_acc, g)
            return (params, rest, g_acc, l_acc + loss), (stats, logp, load)

        (_, _, grads, loss), (stats, logp, load) = jax.lax.scan(
            body, (state.params, state.rest, zeros, jnp.zeros((), jnp.float32)), micro)
        metrics = finalize(combine_stats(stats))
        if load is not None:  # MoE: per-(layer, expert) share of tokens over the minibatch
            share = load[0].sum(0) * safe_inverse(load[1].sum())
            metrics["moe/expert_load_max"] = jnp.max(share)
            metrics["moe/expert_load_min"] = jnp.min(share)
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
        # Packed: each sequence's log-probs come from its own micro-batch (0 in the others).
        return new_state, metrics, logp.sum(0) if packed else _merge_micro(logp)

    if state_shardings is None:
        return jax.jit(train_step, donate_argnums=0)
    return jax.jit(train_step, donate_argnums=0,
                   in_shardings=(state_shardings, batch_sharding),
                   out_shardings=(state_shardings, None, batch_sharding))
