"""token_logprobs_and_entropy vs a float64 NumPy reference and autodiff through full logits."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

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
    h = jnp.ones((b, t, d)); w = jnp.ones((d, v)); y = jnp.arange(b * t).reshape(b, t) % v

    def temp_bytes(fn):
        # targets are an argument (data), not a constant XLA could fold into the loop
        f = lambda h, w, y: jnp.sum(fn(h, w, y)[0] + fn(h, w, y)[1])
        compiled = jax.jit(jax.value_and_grad(f, argnums=(0, 1))).lower(h, w, y).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    ours = temp_bytes(lambda h, w, y: token_logprobs_and_entropy(h, w, y, chunk_size=32))
    naive = temp_bytes(lambda h, w, y: reference(h, w, y))
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


# ----------------------------------------------------------------- batch-sharded (FSDP) --
def _mesh(n, explicit=False):
    kind = jax.sharding.AxisType.Explicit if explicit else jax.sharding.AxisType.Auto
    return jax.make_mesh((n,), ("fsdp",), axis_types=(kind,), devices=jax.devices()[:n])


def _while_bodies(hlo: str) -> str:
    """The text of every computation that is a while loop's body in compiled HLO text."""
    names = set(re.findall(r"body=%?([\w.\-]+)", hlo))
    comps = re.split(r"\n(?=%|ENTRY)", hlo)
    return "\n".join(c for c in comps if c.lstrip("%").split(" ")[0] in names)


def _compile_sharded(n, b, t, d, v, chunk_size):
    """value_and_grad of the op with hidden/targets sharded over an n-device fsdp axis."""
    mesh = _mesh(n)
    rows, rep = NamedSharding(mesh, PartitionSpec("fsdp")), NamedSharding(mesh, PartitionSpec())

    def f(h, w, y):
        logp, ent = token_logprobs_and_entropy(h, w, y, chunk_size=chunk_size, temperature=0.7)
        return jnp.sum(logp) + 0.5 * jnp.sum(ent), (logp, ent)

    fn = jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True),
                 in_shardings=(rows, rep, rows))
    sds = (jax.ShapeDtypeStruct((b, t, d), jnp.float32), jax.ShapeDtypeStruct((d, v), jnp.float32),
           jax.ShapeDtypeStruct((b, t), jnp.int32))
    with jax.set_mesh(mesh):  # what the train step does (espo_jax.train.mesh.under_mesh)
        return mesh, fn, fn.lower(*sds).compile()


def test_batch_sharded_op_never_gathers_activations_and_memory_falls_with_devices():
    """Hidden states split over 8 devices on the batch axis: no all-gather (each device scores
    its own rows), dW reduced once after the loop (not per block), per-device temporaries
    ~1/8 of one device's, and values/gradients equal the unsharded float64 reference."""
    assert jax.device_count() >= 8
    b, t, d, v, chunk = 8, 256, 32, 1024, 512     # blocks of 8 x 64 positions
    _, _, one = _compile_sharded(1, b, t, d, v, chunk)
    mesh, fn, eight = _compile_sharded(8, b, t, d, v, chunk)
    hlo = eight.as_text()
    assert "all-gather" not in hlo, re.findall(r"= (\S+) all-gather", hlo)
    assert "all-reduce" in hlo                    # the check can fail: dW is reduced ...
    assert "all-reduce" not in _while_bodies(hlo)  # ... once, outside the loops
    t1 = one.memory_analysis().temp_size_in_bytes
    t8 = eight.memory_analysis().temp_size_in_bytes
    dw = d * v * 4                                # one (replicated) dW per device
    assert t1 > 8 * dw, (t1, dw)                  # block buffers dominate the check
    assert t8 <= t1 / 8 + 2 * dw, (t8, t1, dw)

    h, w, y = (jax.random.normal(jax.random.key(1), (b, t, d)),
               jax.random.normal(jax.random.key(2), (d, v)) * 0.5,
               jax.random.randint(jax.random.key(3), (b, t), 0, v))
    rows = NamedSharding(mesh, PartitionSpec("fsdp"))
    with jax.set_mesh(mesh):
        (_, (logp, ent)), (gh, gw) = fn(jax.device_put(h, rows), w, jax.device_put(y, rows))
    assert logp.sharding.spec == gh.sharding.spec == PartitionSpec("fsdp")
    ref_lp, ref_ent = numpy_f64(h, w, y, 0.7)
    np.testing.assert_allclose(logp, ref_lp, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ent, ref_ent, rtol=1e-5, atol=1e-5)
    loss = lambda h, w: (lambda lp, e: jnp.sum(lp) + 0.5 * jnp.sum(e))(
        *reference(h, w, y, temperature=0.7))
    rh, rw = jax.jit(jax.grad(loss, argnums=(0, 1)))(h, w)
    np.testing.assert_allclose(gh, rh, rtol=2e-4, atol=2e-5 * float(jnp.abs(rh).max()))
    np.testing.assert_allclose(gw, rw, rtol=2e-4, atol=2e-5 * float(jnp.abs(rw).max()))


def test_explicit_axis_mesh_traces_and_keeps_the_batch_sharded():
    """With an explicit-axis mesh (sharding in types) the op traces (no 'xs must be
    replicated' error) and its outputs and dHidden stay batch-sharded."""
    mesh = _mesh(8, explicit=True)
    rows = NamedSharding(mesh, PartitionSpec("fsdp"))
    b, t, d, v = 8, 20, 8, 64
    h = jax.random.normal(jax.random.key(4), (b, t, d))
    w = jax.random.normal(jax.random.key(5), (d, v))
    y = jax.random.randint(jax.random.key(6), (b, t), 0, v)
    f = lambda h, w, y: jnp.sum(token_logprobs_and_entropy(h, w, y, chunk_size=24)[0])
    with jax.set_mesh(mesh):
        hs, ys = jax.device_put(h, rows), jax.device_put(y, rows)
        gh, gw = jax.jit(jax.grad(f, argnums=(0, 1)))(hs, w, ys)
        logp = jax.jit(lambda *a: token_logprobs_and_entropy(*a, chunk_size=24)[0])(hs, w, ys)
    assert gh.sharding.spec[0] == logp.sharding.spec[0] == "fsdp"
    np.testing.assert_allclose(logp, numpy_f64(h, w, y, 1.0)[0], rtol=1e-5, atol=1e-5)
    rh, rw = jax.grad(lambda h, w: jnp.sum(reference(h, w, y)[0]), argnums=(0, 1))(h, w)
    np.testing.assert_allclose(gh, rh, rtol=2e-4, atol=1e-5)
    np.testing.assert_allclose(gw, rw, rtol=2e-4, atol=1e-4)
