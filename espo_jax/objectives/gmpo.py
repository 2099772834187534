"""GMPO: geometric-mean sequence ratio with the clip applied per token in log space."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from espo_jax.objectives import aggregation, metrics
from espo_jax.objectives.ratios import clamp

sg = jax.lax.stop_gradient


def gmpo(batch, *, clip_low, clip_high, max_log_ratio):
    """loss = -mean_i(mean_t(A) * exp(mean_t Delta*_t)), Delta* = Delta clipped to
    [-clip_low, clip_high] only on the side that favours the advantage's sign
    (Delta* = sgn(A) min(sgn(A) Delta, sgn(A) clip(Delta))).

    Written per token as l_t = -Abar_i R_i with w_t = 1/(N_seq L_i), so the sum is the mean
    over sequences. `clip_frac` counts tokens whose log-ratio was clipped.
    """
    delta = batch.logp - batch.old
    adv = batch.adv
    clipped = batch.mask & (((adv > 0) & (delta > clip_high)) | ((adv < 0) & (delta < -clip_low)))
    delta_star = jnp.where(clipped, sg(jnp.clip(delta, -clip_low, clip_high)), delta)
    inv_len = aggregation.safe_inverse(batch.lengths)
    seq_ratio = jnp.exp(clamp(jnp.sum(delta_star, axis=-1) * inv_len, max_log_ratio))
    seq_adv = jnp.sum(adv, axis=-1) * inv_len
    loss = jnp.broadcast_to((-seq_adv * seq_ratio)[:, None], delta.shape)
    # Reported ratio: the unclipped geometric-mean ratio of each sequence, per token.
    shown = jnp.exp(clamp(jnp.sum(delta, axis=-1) * inv_len, max_log_ratio))
    shown = jnp.broadcast_to(shown[:, None], delta.shape)
    return loss, aggregation.seq_mean_token_mean(batch), metrics.base_metrics(shown, clipped, batch)
