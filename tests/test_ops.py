"""token_logprobs_and_entropy vs a float64 NumPy reference and autodiff through full logits."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from espo_jax.ops import reference, token_logprobs_and_entropy

B, T, D, V = 2, 37, 16, 203  # B*T = 74 rows


def inputs(seed=0, dtype=jnp.float32):
  k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
  h = jax.random.normal(k1, (B, T, D), dtype)
  w = jax.random.normal(k2, (D, V), dtype) * 0.7
  y = jax.random.randint(k3, (B, T), 0, V)
  return h, w, y


def numpy_f64(h, w, y, temperature):
  z = np.asarray(h, np.float64) @ np.asarray(w, np.float64) / temperature
  z = z - z.max(-1, keepdims=True)
  logp_all = z - np.log(np.exp(z).sum(-1, keepdims=True))
  logp = np.take_along_axis(logp_all, np.asarray(y)[..., None], -1)[..., 0]
  ent = -(np.exp(logp_all) * logp_all).sum(-1)
  return logp, ent


@pytest.mark.parametrize("temperature", [1.0, 0.6])
@pytest.mark.parametrize("chunk_size", [3, 16, 74, 500])
def test_values_match_float64_reference(chunk_size, temperature):
  h, w, y = inputs()
  logp, ent = jax.jit(lambda *a: token_logprobs_and_entropy(
      *a, chunk_size=chunk_size, temperature=temperature))(h, w, y)
  assert logp.dtype == ent.dtype == jnp.float32 and logp.shape == ent.shape == (B, T)
  ref_lp, ref_ent = numpy_f64(h, w, y, temperature)
  np.testing.assert_allclose(logp, ref_lp, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(ent, ref_ent, rtol=1e-5, atol=1e-5)
  assert np.all(np.asarray(ent) > 0)  # not degenerate: real distributions


def _loss(fn, a, c):
  """A scalar that weights every output differently, so every gradient path matters."""
  def loss(h, w, temp):
    logp, ent = fn(h, w, temp)
    return jnp.sum(a * logp) + jnp.sum(c * ent)
  return loss


@pytest.mark.parametrize("temperature", [1.0, 1.7])
@pytest.mark.parametrize("chunk_size", [9, 32])  # neither divides B*T = 74 (nor T = 37)
def test_gradients_match_autodiff_through_full_logits(chunk_size, temperature):
  h, w, y = inputs(1)
  ka, kc = jax.random.split(jax.random.key(5))
  a = jax.random.normal(ka, (B, T))
  c = jax.random.normal(kc, (B, T))
  ours = _loss(lambda h, w, t: token_logprobs_and_entropy(
      h, w, y, chunk_size=chunk_size, temperature=t), a, c)
  naive = _loss(lambda h, w, t: reference(h, w, y, temperature=t), a, c)
  temp = jnp.float32(temperature)
  v1, g1 = jax.jit(jax.value_and_grad(ours, argnums=(0, 1, 2)))(h, w, temp)
  v2, g2 = jax.jit(jax.value_and_grad(naive, argnums=(0, 1, 2)))(h, w, temp)
  np.testing.assert_allclose(v1, v2, rtol=1e-5)
  for name, x1, x2 in zip(("hidden", "unembedding", "temperature"), g1, g2):
    assert float(jnp.abs(x2).max()) > 1e-3, name  # the check has something to compare
    np.testing.assert_allclose(x1, x2, rtol=2e-4, atol=2e-5 * float(jnp.abs(x2).max()),
                               err_msg=name)


def test_gradients_match_float64_autodiff():
  """Same check in float64 (x64 mode): agreement to ~1e-10, not only to f32 noise."""
  with jax.enable_x64(True):
    h, w, y = inputs(2, jnp.float64)
    a = jnp.linspace(-1, 1, B * T).reshape(B, T)
    ours = _loss(lambda h, w, t: token_logprobs_and_entropy(
        h, w, y, chunk_size=11, temperature=t), a, 1.0 - a)
    naive = _loss(lambda h, w, t: reference(h, w, y, temperature=t), a, 1.0 - a)
    # Our op computes in float32 by contract; compare its float32 outputs to the float64
    # autodiff truth.
    g1 = jax.jit(jax.grad(ours, argnums=(0, 1)))(h.astype(jnp.float32),
                                                 w.astype(jnp.float32), 0.8)
    ref64 = lambda h, w, t: _ref64(h, w, y, t)
    g2 = jax.jit(jax.grad(_loss(ref64, a, 1.0 - a), argnums=(0, 1)))(h, w, 0.8)
    for x1, x2 in zip(g1, g2):
      np.testing.assert_allclose(np.asarray(x1, np.float64), x2, rtol=1e-4,
                                 atol=1e-5 * float(jnp.abs(x2).max()))


def _ref64(h, w, y, t):
  logits = (h @ w) / t
  logp_all = jax.nn.log_softmax(logits, axis=-1)
  logp = jnp.take_along_axis(logp_all, y[..., None], axis=-1)[..., 0]
  return logp, -jnp.sum(jnp.exp(logp_all) * logp_all, axis=-1)


def test_bfloat16_inputs_give_float32_outputs_and_input_dtype_grads():
  h, w, y = inputs(3, jnp.bfloat16)
  f = lambda h, w: jnp.sum(token_logprobs_and_entropy(h, w, y, chunk_size=20)[0])
  logp, ent = jax.jit(lambda h, w: token_logprobs_and_entropy(h, w, y, chunk_size=20))(h, w)
  assert logp.dtype == ent.dtype == jnp.float32
  ref_lp, ref_ent = numpy_f64(h, w, y, 1.0)  # same bf16 inputs, exact arithmetic
  np.testing.assert_allclose(logp, ref_lp, rtol=1e-4, atol=1e-4)
  gh, gw = jax.jit(jax.grad(f, argnums=(0, 1)))(h, w)
  assert gh.dtype == gw.dtype == jnp.bfloat16


def test_chunked_op_never_materialises_full_logits():
  """XLA's temp buffers for value-and-grad stay well below one [B,T,V] f32 array."""
  b, t, d, v = 2, 256, 8, 2048
  full = b * t * v * 4
  h = jnp.ones((b, t, d)); w = jnp.ones((d, v)); y = jnp.zeros((b, t), jnp.int32)

  def temp_bytes(fn):
    f = lambda h, w: jnp.sum(fn(h, w)[0] + fn(h, w)[1])
    compiled = jax.jit(jax.value_and_grad(f, argnums=(0, 1))).lower(h, w).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  ours = temp_bytes(lambda h, w: token_logprobs_and_entropy(h, w, y, chunk_size=32))
  naive = temp_bytes(lambda h, w: reference(h, w, y))
  assert naive >= full  # the check can fail
  assert ours < full / 4, (ours, naive, full)


def test_bad_shapes_are_errors():
  h, w, y = inputs()
  with pytest.raises(ValueError, match="unembedding"):
    token_logprobs_and_entropy(h, w.T, y, chunk_size=8)
  with pytest.raises(ValueError, match="targets"):
    token_logprobs_and_entropy(h, w, y[:, :3], chunk_size=8)
  with pytest.raises(ValueError, match="chunk_size"):
    token_logprobs_and_entropy(h, w, y, chunk_size=0)
