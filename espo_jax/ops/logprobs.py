"""Token log-probs and entropy from hidden states, without materialising [B,T,V].

The B*T token rows are scored in blocks of `chunk_size` rows. A custom VJP keeps only the
per-token log-sum-exp and E_p[z] from the forward pass and recomputes each block's logits
in the backward pass, so the peak extra memory is O(chunk_size * V) (plus dW [D,V]),
instead of several [B,T,V] float32 buffers for autodiff through full logits.

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

import jax
import jax.numpy as jnp


def token_logprobs_and_entropy(hidden, unembedding, targets, *, chunk_size: int,
                               temperature=1.0):
  """Log-probability of each target and entropy of each next-token distribution.

  hidden f32/bf16[B,T,D] (final-norm hidden states, in the compute dtype: it sets the
  matmul operand dtype); unembedding [D,V] (any float dtype, e.g. the f32 master weights;
  its gradient comes back in that dtype, accumulated in f32); targets int[B,T]
  (must lie in [0, V)); chunk_size: token rows (of the flattened B*T) per block;
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
  n = b * t
  c = min(int(chunk_size), n)
  k = -(-n // c)
  pad = k * c - n
  h = jnp.pad(hidden.reshape(n, d), ((0, pad), (0, 0))).reshape(k, c, d)
  y = jnp.pad(targets.reshape(n).astype(jnp.int32), (0, pad)).reshape(k, c)
  temp = jnp.asarray(temperature, jnp.float32)
  logp, ent = _chunked(h, unembedding, y, temp)
  return logp.reshape(-1)[:n].reshape(b, t), ent.reshape(-1)[:n].reshape(b, t)


def matmul_precision(dtype):
  """HIGHEST for float32 operands (exact), DEFAULT for bf16/f16 (native, f32 accumulate)."""
  if jnp.dtype(dtype) == jnp.float32:
    return jax.lax.Precision.HIGHEST
  return jax.lax.Precision.DEFAULT


def _dot(a, b, dtype):
  """a @ b with operands cast to `dtype`, f32 accumulation and result."""
  return jnp.dot(a.astype(dtype), b.astype(dtype), preferred_element_type=jnp.float32,
                 precision=matmul_precision(dtype))


def _block_logits(h, w, temp):
  """[c,D] x [D,V] -> z f32[c,V] = (h @ w) / temp, operands in h.dtype."""
  return _dot(h, w, h.dtype) / temp


def _block_stats(h, w, y, temp):
  z = _block_logits(h, w, temp)
  # Work relative to the row max so that entropy = lse - E_p[z] cancels small numbers.
  m = jax.lax.stop_gradient(jnp.max(z, axis=-1, keepdims=True))
  zs = z - m
  lse_s = jnp.log(jnp.sum(jnp.exp(zs), axis=-1))
  p = jnp.exp(zs - lse_s[:, None])
  ez_s = jnp.sum(p * zs, axis=-1)
  zy = jnp.take_along_axis(zs, y[:, None], axis=-1)[:, 0]
  m = m[:, 0]
  return zy - lse_s, lse_s - ez_s, m + lse_s, m + ez_s


@jax.custom_vjp
def _chunked(h, w, y, temp):
  """h [K,c,D], w [D,V], y i32[K,c], temp f32[] -> (logp f32[K,c], entropy f32[K,c])."""
  return _fwd(h, w, y, temp)[0]


def _fwd(h, w, y, temp):
  wc = w.astype(h.dtype)  # one cast per call, not per block

  def body(_, xs):
    hc, yc = xs
    logp, ent, lse, ez = _block_stats(hc, wc, yc, temp)
    return None, (logp, ent, lse, ez)

  _, (logp, ent, lse, ez) = jax.lax.scan(body, None, (h, y))
  return (logp, ent), (h, w, y, temp, lse, ez)


def _bwd(res, g):
  h, w, y, temp, lse, ez = res
  g_lp, g_ent = g
  v = w.shape[1]
  cd = h.dtype
  wc = w.astype(cd)

  def body(carry, xs):
    dw, dtemp = carry
    hc, yc, lsec, ezc, glc, gec = xs
    z = _block_logits(hc, wc, temp)
    p = jnp.exp(z - lsec[:, None])
    onehot = jax.lax.broadcasted_iota(jnp.int32, z.shape, 1) == yc[:, None]
    # d(sum g_lp*logp + g_ent*entropy) / dz
    dz = jnp.where(onehot, glc[:, None], 0.0) - p * (glc[:, None] + gec[:, None] * (z - ezc[:, None]))
    dlogits = dz / temp
    dh = _dot(dlogits, wc.T, cd)
    dw = dw + _dot(hc.T, dlogits, cd)
    dtemp = dtemp - jnp.sum(dz * z) / temp  # dz/dtemp = -z/temp
    return (dw, dtemp), dh.astype(h.dtype)

  init = (jnp.zeros((h.shape[-1], v), jnp.float32), jnp.zeros((), jnp.float32))
  (dw, dtemp), dh = jax.lax.scan(body, init, (h, y, lse, ez, g_lp, g_ent))
  return dh, dw.astype(w.dtype), None, dtemp


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
