"""GSPO, GSPO-token form: one length-normalised ratio per sequence, token-level gradient."""
from __future__ import annotations

import jax.numpy as jnp

from espo_jax.objectives import aggregation, metrics
from espo_jax.objectives.clipping import clipped_surrogate
from espo_jax.objectives.ratios import group_ratio_token_form


def gspo(batch, *, clip_low, clip_high, max_log_ratio):
    """s_t = exp(logp_t - sg(logp_t) + sg(clamp(mean_t Delta))), clipped surrogate,
    w_t = 1/(N_seq L_i)."""
    delta = batch.logp - batch.old
    seq_mean = jnp.sum(delta, axis=-1) * aggregation.safe_inverse(batch.lengths)
    ratio = group_ratio_token_form(batch.logp, seq_mean[:, None], max_log_ratio)
    loss, clipped = clipped_surrogate(ratio, batch.adv, 1.0 - clip_low, 1.0 + clip_high)
    return loss, aggregation.seq_mean_token_mean(batch), metrics.base_metrics(ratio, clipped, batch)
