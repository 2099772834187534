"""Token weights w[B, T] for the three aggregation rules; loss = sum_t w_t * l_t.

The normalisers (N_seq, N_tok) come from `Batch`, i.e. from the full batch when `counts`
is given, which makes the sum of micro-batch losses equal the full-batch loss.
"""
from __future__ import annotations

import jax.numpy as jnp


def safe_inverse(x):
    """1/x where x > 0, else 0 (no inf, no NaN, also in gradients)."""
    x = jnp.asarray(x, jnp.float32)
    pos = x > 0
    return jnp.where(pos, 1.0 / jnp.where(pos, x, 1.0), 0.0)


def seq_mean_token_mean(batch):
    """w_t = 1 / (N_seq * L_i): mean over tokens, then over sequences (GRPO, GSPO, GMPO)."""
    per_seq = safe_inverse(batch.lengths.astype(jnp.float32) * batch.num_seqs)
    return batch.valid * per_seq[:, None]


def token_mean(batch):
    """w_t = 1 / N_tok: one mean over every valid token of the batch (DAPO, CISPO)."""
    return batch.valid * safe_inverse(batch.num_tokens)


def group_mean(batch, groups_per_seq, group_size):
    """ESPO Eq. 5: w_t = 1 / (N_seq * K_i * |tau(t)|).

    groups_per_seq: f32[B] non-empty groups K_i; group_size: f32[B, T] size of t's group.
    """
    denom = batch.num_seqs * groups_per_seq[:, None] * group_size
    return batch.valid * safe_inverse(denom)
