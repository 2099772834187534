"""Token log-probs and entropy from hidden states, without materialising [B,T,V].

The tokens are scored in blocks of all B sequences x c positions (c = chunk_size // B, so
a block has about `chunk_size` rows). Chunking runs over T only: the batch axis stays an
ordinary (not scanned) axis, so hidden states sharded over the batch (FSDP / data
parallel) stay sharded, nothing is all-gathered and each device scores only its own rows
(per-device block memory ~ chunk_size * V / batch shards). A custom VJP keeps only the
per-token log-sum-exp and E_p[z] from the forward pass and recomputes each block's logits
in the backward pass, so the peak extra memory is O(chunk_size * V) (plus dW [D,V] per
device), instead of several [B,T,V] float32 buffers for autodiff through full logits.
Under a mesh (``jax.set_mesh``) dW is accumulated per batch shard and reduced once after
the loop, not all-reduced per block.

With z = (h @ W) / temperature, p = softmax(z), lse = logsumexp(z):
  logp_t = z_t[y_t] - lse_t                 entropy_t = lse_t - E_p[z]_t
  d logp / dz = onehot(y) - p               d entropy / dz = -p * (z - E_p[z])

Precision: every matmul takes operands in the hidden states' dtype (the compute dtype)
and accumulates in float32 (explicit ``preferred_element_type``): bf16 hidden states give
bf16 x bf16 -> f32 (the unembedding is cast once per call); float32 runs at
``Precision.HIGHEST`` (exact f32, never TF32/bf16 passes on accelerators). Softmax,
log-sum-exp, entropy and the accumulated dW are float32 whatever the operand dtype.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from espo_jax.models.sharding import BATCH_AXES


def token_logprobs_and_entropy(hidden, unembedding, targets, *, chunk_size: int,
                               temperature=1.0):
    """Log-probability of each target and entropy of each next-token distribution.

    hidden f32/bf16[B,T,D] (final-norm hidden states, in the compute dtype: it sets the
    matmul operand dtype); unembedding [D,V] (any float dtype, e.g. the f32 master weights;
    its gradient comes back in that dtype, accumulated in f32); targets int[B,T]
    (must lie in [0, V)); chunk_size: token rows per block over the whole batch (a block
    is B x max(1, chunk_size // B) positions);
    temperature: scalar > 0 (the distribution is softmax(logits / temperature)).
    Returns (logp f32[B,T], entropy f32[B,T]), entropy in nats. Exact gradients with
    respect to hidden, unembedding (and temperature).
    """
    b, t, d = hidden.shape
    if unembedding.ndim != 2 or unembedding.shape[0] != d:
        raise ValueError(f"unembedding must be [D={d}, V], got {unembedding.shape}")
    if targets.shape != (b, t):
        raise ValueError(f"targets must be [B,T]={(b, t)}, got {targets.shape}")
    if int(chunk_size) < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    # Blocks are [B, c] (all sequences, c positions): the batch axis is never folded into
    # the scanned axis, so a batch-sharded `hidden` stays sharded (no all-gather) and each
    # device scores chunk_size / |batch shards| rows per block.
    c = max(1, min(t, int(chunk_size) // b))
    k = -(-t // c)
    pad = k * c - t
    h, y = hidden, targets.astype(jnp.int32)
    if pad:
        h = jnp.pad(h, ((0, 0), (0, pad), (0, 0)))
        y = jnp.pad(y, ((0, 0), (0, pad)))
    temp = jnp.asarray(temperature, jnp.float32)
    logp, ent = _chunked(h, unembedding, y, temp, c)
    if pad:
        logp, ent = logp[:, :t], ent[:, :t]
    return logp, ent


def matmul_precision(dtype):
    """HIGHEST for float32 operands (exact), DEFAULT for bf16/f16 (native, f32 accumulate)."""
    if jnp.dtype(dtype) == jnp.float32:
        return jax.lax.Precision.HIGHEST
    return jax.lax.Precision.DEFAULT


def _dot(a, b, dtype, contract=((-1,), (0,))):
    """Contraction of a and b over `contract` (axes of a, axes of b), operands cast to
    `dtype`, f32 accumulation and result."""
    ca = tuple(i % a.ndim for i in contract[0])
    cb = tuple(i % b.ndim for i in contract[1])
    return jax.lax.dot_general(a.astype(dtype), b.astype(dtype), ((ca, cb), ((), ())),
                               precision=matmul_precision(dtype),
                               preferred_element_type=jnp.float32)


def _block_logits(h, w, temp):
    """[...,D] x [D,V] -> z f32[...,V] = (h @ w) / temp, operands in h.dtype."""
    return _dot(h, w, h.dtype) / temp


def _block_stats(h, w, y, temp):
    z = _block_logits(h, w, temp)
    # Work relative to the row max so that entropy = lse - E_p[z] cancels small numbers.
    m = jax.lax.stop_gradient(jnp.max(z, axis=-1, keepdims=True))
    zs = z - m
    lse_s = jnp.log(jnp.sum(jnp.exp(zs), axis=-1))
    p = jnp.exp(zs - lse_s[..., None])
    ez_s = jnp.sum(p * zs, axis=-1)
    zy = jnp.take_along_axis(zs, y[..., None], axis=-1)[..., 0]
    m = m[..., 0]
    return zy - lse_s, lse_s - ez_s, m + lse_s, m + ez_s


def _block(x, i, c):
    """Positions [i*c, (i+1)*c) of x [B,T,...] (axis 1): a slice, not a transposed copy."""
    return jax.lax.dynamic_slice_in_dim(x, i * c, c, axis=1)


def _unblock(ys):
    """Scan outputs [K,B,c,...] -> [B,K*c,...]."""
    ys = jnp.moveaxis(ys, 0, 1)
    return ys.reshape(ys.shape[0], -1, *ys.shape[3:])


def _batch_groups(b: int):
    """(G, spec): how many ways the active mesh splits a batch of b rows over BATCH_AXES (as
    ``constrain_batch`` pins it) and the PartitionSpec of a [G,...] array split the same
    way; (1, None) without a mesh or when the axes do not divide b."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return 1, None
    axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names and mesh.shape[a] > 1)
    g = math.prod(mesh.shape[a] for a in axes)
    if g == 1 or b % g:
        return 1, None
    return g, PartitionSpec(axes if len(axes) > 1 else axes[0])


def _spec(x) -> tuple:
    """x's PartitionSpec padded to its rank (explicit-axis meshes, where it is in the type)."""
    spec = tuple(jax.typeof(x).sharding.spec)
    return spec + (None,) * (x.ndim - len(spec))


def _compute_weights(w, dtype):
    """w [D,V] in the compute dtype, whole along D (each device contracts its own rows over
    all of D, instead of all-reducing partial logits). The cast comes before the constraint,
    so an FSDP all-gather of D may move compute-dtype bytes (XLA:CPU upcasts bf16 to f32
    anyway, so a CPU compile shows f32 gathers)."""
    wc = w.astype(dtype)
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return wc
    if mesh.are_all_axes_explicit:
        return jax.sharding.reshard(wc, PartitionSpec(None, _spec(w)[1]))
    return jax.lax.with_sharding_constraint(wc, PartitionSpec(None, PartitionSpec.UNCONSTRAINED))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _chunked(h, w, y, temp, c):
    """h [B,T,D], w [D,V], y i32[B,T], temp f32[], c: positions per block (divides T)
    -> (logp f32[B,T], entropy f32[B,T])."""
    return _fwd(h, w, y, temp, c)[0]


def _fwd(h, w, y, temp, c):
    wc = _compute_weights(w, h.dtype)  # one cast (and gather) per call, not per block

    def body(_, i):
        logp, ent, lse, ez = _block_stats(_block(h, i, c), wc, _block(y, i, c), temp)
        return None, (logp, ent, lse, ez)

    k = h.shape[1] // c
    _, out = jax.lax.scan(body, None, jnp.arange(k))
    logp, ent, lse, ez = (_unblock(o) for o in out)
    return (logp, ent), (h, w, y, temp, lse, ez)


def _bwd(c, res, g):
    h, w, y, temp, lse, ez = res
    g_lp, g_ent = g
    v = w.shape[1]
    cd = h.dtype
    wc = _compute_weights(w, cd)

    def body(carry, i):
        dh, dw, dtemp = carry
        hc, yc, lsec, ezc, glc, gec = (_block(x, i, c) for x in (h, y, lse, ez, g_lp, g_ent))
        z = _block_logits(hc, wc, temp)                      # f32[B,c,V]
        p = jnp.exp(z - lsec[..., None])
        onehot = jax.lax.broadcasted_iota(jnp.int32, z.shape, z.ndim - 1) == yc[..., None]
        # d(sum g_lp*logp + g_ent*entropy) / dz
        dz = (jnp.where(onehot, glc[..., None], 0.0)
              - p * (glc[..., None] + gec[..., None] * (z - ezc[..., None])))
        dlogits = dz / temp
        dhc = _dot(dlogits, wc, cd, ((-1,), (1,)))           # [B,c,V] x [D,V] -> [B,c,D]
        # dW partial sums per batch shard [G,D,V]: each device accumulates its own rows and
        # the G partials are summed once after the loop (not one [D,V] all-reduce per block).
        hg = hc.reshape(groups, -1, hc.shape[-1])            # [G, B/G*c, D] (a bitcast)
        dg = dlogits.reshape(groups, -1, v)                  # [G, B/G*c, V]
        dw = dw + jax.lax.dot_general(hg.astype(cd), dg.astype(cd), (((1,), (1,)), ((0,), (0,))),
                                      precision=matmul_precision(cd),
                                      preferred_element_type=jnp.float32)
        dtemp = dtemp - jnp.sum(dz * z) / temp  # dz/dtemp = -z/temp
        # Written in place into the carried dh (stacked scan outputs would need a transposed copy).
        dh = jax.lax.dynamic_update_slice_in_dim(dh, dhc.astype(h.dtype), i * c, axis=1)
        return (dh, dw, dtemp), None

    groups, spec = _batch_groups(h.shape[0])
    dw0 = jnp.zeros((groups, h.shape[-1], v), jnp.float32)
    if spec is not None:
        if jax.sharding.get_abstract_mesh().are_all_axes_explicit:
            dw0 = jax.sharding.reshard(dw0, PartitionSpec(spec[0], None, _spec(w)[1]))
        else:  # D, V: as the partitioner likes (e.g. V over a tensor axis, like the logits)
            u = PartitionSpec.UNCONSTRAINED
            dw0 = jax.lax.with_sharding_constraint(dw0, PartitionSpec(spec[0], u, u))
    init = (jnp.zeros_like(h), dw0, jnp.zeros((), jnp.float32))
    (dh, dw, dtemp), _ = jax.lax.scan(body, init, jnp.arange(h.shape[1] // c))
    return dh, jnp.sum(dw, axis=0).astype(w.dtype), None, dtemp


_chunked.defvjp(_fwd, _bwd)


def reference(hidden, unembedding, targets, *, temperature=1.0):
    """Plain full-logits implementation (materialises [B,T,V] f32); for tests and benchmarks."""
    logits = jnp.einsum("btd,dv->btv", hidden.astype(jnp.float32),
                        unembedding.astype(jnp.float32), preferred_element_type=jnp.float32,
                        precision=jax.lax.Precision.HIGHEST)
    logp_all = jax.nn.log_softmax(logits / temperature, axis=-1)
    logp = jnp.take_along_axis(logp_all, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    ent = -jnp.sum(jnp.exp(logp_all) * logp_all, axis=-1)
    return logp, ent
