"""Input canonicalisation and batch counts shared by every objective.

Shapes: B sequences, T response tokens.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp


class BatchCounts(NamedTuple):
    """Counts of the FULL batch, passed to every micro-batch for exact accumulation.

    num_seqs: int32[] sequences with at least one valid token.
    num_tokens: int32[] valid tokens.
    """

    num_seqs: jax.Array
    num_tokens: jax.Array


def batch_counts(mask) -> BatchCounts:
    """BatchCounts of `mask` (bool/float[B, T], nonzero = valid token)."""
    mask = jnp.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"batch_counts: mask must be [B, T], got shape {mask.shape}")
    lengths = jnp.sum(mask != 0, axis=-1, dtype=jnp.int32)
    return BatchCounts(jnp.sum(lengths > 0, dtype=jnp.int32), jnp.sum(lengths, dtype=jnp.int32))


class Batch(NamedTuple):
    """Sanitised float32 inputs: every masked position holds 0 (so no NaN/inf from padding
    can reach a value or a gradient)."""

    logp: jax.Array  # f32[B, T], differentiable
    old: jax.Array  # f32[B, T]
    adv: jax.Array  # f32[B, T] (per-sequence advantages broadcast)
    entropy: Optional[jax.Array]  # f32[B, T] or None
    ref: Optional[jax.Array]  # f32[B, T] or None
    mask: jax.Array  # bool[B, T]
    valid: jax.Array  # f32[B, T]
    lengths: jax.Array  # int32[B]
    num_seqs: jax.Array  # f32[] normaliser: sequences (global if counts given)
    num_tokens: jax.Array  # f32[] normaliser: tokens (global if counts given)


def check_shapes(name: str, logp, old_logp, advantages, mask, entropy, ref_logp) -> None:
    """Raise ValueError naming the arrays and shapes when they do not agree."""
    logp_shape = jnp.shape(logp)
    if len(logp_shape) != 2:
        raise ValueError(f"{name}: logp must be [B, T], got shape {logp_shape}")
    named = {"old_logp": old_logp, "mask": mask, "entropy": entropy, "ref_logp": ref_logp}
    for key, arr in named.items():
        if arr is not None and jnp.shape(arr) != logp_shape:
            raise ValueError(
                f"{name}: {key} has shape {jnp.shape(arr)} but logp has shape {logp_shape}; "
                "expected both [B, T]")
    adv_shape = jnp.shape(advantages)
    if adv_shape not in (logp_shape[:1], logp_shape):
        raise ValueError(
            f"{name}: advantages has shape {adv_shape}; expected [B]={logp_shape[:1]} or "
            f"[B, T]={logp_shape} (logp shape {logp_shape})")


def _safe(x, mask):
    return jnp.where(mask, jnp.asarray(x, jnp.float32), 0.0)


def prepare(logp, old_logp, advantages, mask, entropy=None, ref_logp=None,
            counts: Optional[BatchCounts] = None) -> Batch:
    """Cast to float32, broadcast advantages to [B, T], zero masked positions."""
    m = jnp.asarray(mask) != 0
    adv = jnp.asarray(advantages, jnp.float32)
    if adv.ndim == 1:
        adv = jnp.broadcast_to(adv[:, None], m.shape)
    lengths = jnp.sum(m, axis=-1, dtype=jnp.int32)
    if counts is None:
        num_seqs = jnp.sum(lengths > 0)
        num_tokens = jnp.sum(lengths)
    else:
        num_seqs, num_tokens = counts
    return Batch(
        logp=_safe(logp, m),
        old=_safe(old_logp, m),
        adv=_safe(adv, m),
        entropy=None if entropy is None else _safe(entropy, m),
        ref=None if ref_logp is None else _safe(ref_logp, m),
        mask=m,
        valid=m.astype(jnp.float32),
        lengths=lengths,
        num_seqs=jnp.asarray(num_seqs, jnp.float32),
        num_tokens=jnp.asarray(num_tokens, jnp.float32),
    )
