"""GRPO (seq-mean-token-mean) and DAPO (clip-higher, token-mean): token-ratio clipped surrogate."""
from __future__ import annotations

from espo_jax.objectives import aggregation, metrics
from espo_jax.objectives.clipping import clipped_surrogate
from espo_jax.objectives.ratios import token_ratio


def _token_clipped(batch, clip_low, clip_high, clip_ratio_c, max_log_ratio):
    ratio = token_ratio(batch.logp - batch.old, max_log_ratio)
    loss, clipped = clipped_surrogate(ratio, batch.adv, 1.0 - clip_low, 1.0 + clip_high, clip_ratio_c)
    return ratio, loss, clipped


def grpo(batch, *, clip_low, clip_high, clip_ratio_c, max_log_ratio):
    """l_t = -min(r A, clip(r, 1-clip_low, 1+clip_high) A), w_t = 1/(N_seq L_i)."""
    ratio, loss, clipped = _token_clipped(batch, clip_low, clip_high, clip_ratio_c, max_log_ratio)
    return loss, aggregation.seq_mean_token_mean(batch), metrics.base_metrics(ratio, clipped, batch)


def dapo(batch, *, clip_low, clip_high, clip_ratio_c, max_log_ratio):
    """GRPO's token loss with token-mean aggregation w_t = 1/N_tok."""
    ratio, loss, clipped = _token_clipped(batch, clip_low, clip_high, clip_ratio_c, max_log_ratio)
    return loss, aggregation.token_mean(batch), metrics.base_metrics(ratio, clipped, batch)
