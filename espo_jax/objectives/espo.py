"""ESPO: entropy-grouped importance ratios with entropy-adaptive clipping (arXiv 2512.00499).

Per response i, tokens are split into entropy groups tau (see grouping.py). For each group:
  s_tau = exp(clamp(mean_{t in tau} Delta_t))                        (Eq. 10)
  eps_tau = alpha * mean_{t in tau}(e_t) / ln V   (adaptive)          (Eq. 8)
  s_t = exp(logp_t - sg(logp_t) + sg(log s_tau))  ("group") or sg(s_tau) r_t
  l_t = -min(s_t A_t, clip(s_t, 1-eps_tau, 1+eps_tau) A_t)
  loss = sum_t l_t / (N_seq * K_i * |tau(t)|)                         (Eq. 5)
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from espo_jax.objectives import aggregation, metrics
from espo_jax.objectives.clipping import clipped_surrogate
from espo_jax.objectives.grouping import group_ids, num_group_ids
from espo_jax.objectives.ratios import group_ratio_token_form, group_times_token_ratio


def _group_stats(batch, delta, *, grouping, top_fraction, num_groups, entropy_edges, groups=None):
    """Per-token group statistics, all f32. ``groups`` int32[B, T] (from ``entropy_groups``
    on the same entropy and mask) skips the grouping; None computes it.

    Returns (member masks: list of K f32[B, T], or None in token mode; per-token mean
    log-ratio [B, T], mean entropy [B, T] and size [B, T] of the token's group; non-empty
    groups per sequence [B]; per-group (count, mean entropy) lists of K f32[B]).
    """
    if grouping == "token":  # each token alone: its group statistics are its own values
        return (None, delta, batch.entropy, batch.valid, batch.lengths.astype(jnp.float32), None)
    T = delta.shape[-1]
    K = num_group_ids(grouping, num_groups, entropy_edges, T)
    if groups is None:
        g = group_ids(batch.entropy, batch.mask, grouping, top_fraction, num_groups, entropy_edges)
    else:  # precomputed once per rollout (old entropy and mask are fixed during updates)
        g = jnp.where(batch.mask, jnp.asarray(groups, jnp.int32), -1)
    # One [B, T] member mask per group (K is small and static): contiguous row reductions,
    # exact f32 (no dot products, which could run in TF32 on GPUs), no [B, T, K] tensor.
    # The last group's sums are the row totals minus the others' (one pass fewer).
    members = [(g == k).astype(jnp.float32) for k in range(K)]

    def sums(x):
        parts = [jnp.sum(m * x, axis=-1) for m in members[:-1]]
        return parts + [jnp.sum(x, axis=-1) - sum(parts)]

    counts = sums(batch.valid)
    inverse = [aggregation.safe_inverse(c) for c in counts]
    means_delta = [s * i for s, i in zip(sums(delta), inverse)]
    sums_ent = sums(batch.entropy)
    means_ent = [s * i for s, i in zip(sums_ent, inverse)]

    def to_tokens(per_group):  # [B] per group -> the value of each token's group, [B, T]
        out = jnp.zeros_like(delta)
        for k in range(K):
            out = jnp.where(g == k, per_group[k][:, None], out)
        return out

    n_groups = sum((c > 0).astype(jnp.float32) for c in counts)
    return (members, to_tokens(means_delta), to_tokens(means_ent), to_tokens(counts), n_groups,
            (counts, means_ent, sums_ent))


def _eps(mean_entropy, *, clip_mode, alpha, vocab_size, eps_min, eps_max):
    eps = alpha * mean_entropy / math.log(vocab_size)
    if eps_min is not None:
        eps = jnp.maximum(eps, eps_min)
    if eps_max is not None:
        eps = jnp.minimum(eps, eps_max)
    return eps


def espo(batch, *, grouping, top_fraction, num_groups, entropy_edges, token_ratio, clip_mode,
         alpha, vocab_size, eps_min, eps_max, clip_low, clip_high, max_log_ratio, groups=None):
    delta = batch.logp - batch.old
    members, g_delta, g_ent, g_size, n_groups, per_group = _group_stats(
        batch, delta, grouping=grouping, top_fraction=top_fraction, num_groups=num_groups,
        entropy_edges=entropy_edges, groups=groups)
    eps_kw = dict(clip_mode=clip_mode, alpha=alpha, vocab_size=vocab_size, eps_min=eps_min, eps_max=eps_max)
    if clip_mode == "adaptive":
        eps = _eps(g_ent, **eps_kw)
        lo, hi = 1.0 - eps, 1.0 + eps
    else:
        lo, hi = 1.0 - clip_low, 1.0 + clip_high
        eps = jnp.full_like(delta, 0.5 * (clip_low + clip_high))
    if token_ratio == "group":
        ratio = group_ratio_token_form(batch.logp, g_delta, max_log_ratio)
    else:
        ratio = group_times_token_ratio(delta, g_delta, max_log_ratio)
    loss, clipped = clipped_surrogate(ratio, batch.adv, lo, hi)
    weights = aggregation.group_mean(batch, n_groups, g_size)

    out = metrics.base_metrics(ratio, clipped, batch)
    nonempty = (batch.lengths > 0).astype(jnp.float32)
    out["groups_per_seq"] = metrics.masked_mean(n_groups, nonempty)
    if members is None:
        out["eps_mean"] = metrics.masked_mean(eps, batch.valid)
        return loss, weights, out
    # Per group rank k, reusing the per-row sums (metrics cost more than the loss itself):
    # eps is constant within a group, so its token mean is the count-weighted mean of the
    # groups' eps; the last group's clipped count is the total minus the others'.
    clipped_f = jax.lax.stop_gradient(clipped.astype(jnp.float32))
    n_tokens = jnp.sum(batch.lengths)
    clipped_left = out["clip_frac"].num  # all clipped valid tokens
    eps_sum = jnp.zeros((), jnp.float32)
    K = len(members)
    for k, (tok, count, mean_ent, sum_ent) in enumerate(zip(members, *per_group)):
        if clip_mode == "adaptive":
            eps_group = _eps(mean_ent, **eps_kw)
        else:
            eps_group = jnp.full_like(mean_ent, 0.5 * (clip_low + clip_high))
        n_k = jnp.sum(count)
        eps_sum = eps_sum + jnp.sum(eps_group * count)
        clipped_k = clipped_left if k == K - 1 else jnp.sum(tok * clipped_f)
        clipped_left = clipped_left - clipped_k
        # Ratios of sums: numerators and denominators add up over micro-batches.
        out[f"group{k}/entropy_mean"] = metrics.ratio(jnp.sum(sum_ent), n_k)
        out[f"group{k}/eps_mean"] = metrics.masked_mean(eps_group, (count > 0).astype(jnp.float32))
        out[f"group{k}/token_share"] = metrics.ratio(n_k, n_tokens)
        out[f"group{k}/clip_frac"] = metrics.ratio(clipped_k, n_k)
    out["eps_mean"] = metrics.ratio(eps_sum, n_tokens)
    return loss, weights, out
