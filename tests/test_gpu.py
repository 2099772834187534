"""GPU-only checks: the cuDNN attention kernel against the XLA paths, on the GPU.

Skipped where JAX has no GPU (CI, laptops): ``experiments/benchmarks/device_check.sh``
runs this module, with the engine and kv-attention tests, on a GPU machine. The CPU
suite covers the same mapping through ``implementation="xla"``
(``test_attention.test_cudnn_length_mapping_on_cpu``); only the kernel is new here.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from espo_jax.models import attention as attn

pytestmark = pytest.mark.skipif(jax.default_backend() != "gpu",
                                reason="needs a GPU (experiments/benchmarks/device_check.sh)")


def _case(seed, b=3, t=256, h=8, kvh=2, hd=128):
    """bf16 q, k, v and segment ids: rows with left padding, right padding, both."""
    rng = np.random.default_rng(seed)
    q, k, v = (jnp.asarray(rng.standard_normal((b, t, n, hd)), jnp.bfloat16)
               for n in (h, kvh, kvh))
    seg = np.ones((b, t), np.int32)
    seg[0, :37] = 0
    seg[1, 200:] = 0
    seg[2, :5], seg[2, 250:] = 0, 0
    return q, k, v, jnp.asarray(seg)


def _rel(a, b, valid):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    v = np.asarray(valid).astype(bool)
    return float(np.abs(a - b)[v].max() / np.abs(b[v]).max())


def test_cudnn_kernel_matches_dense_and_blockwise():
    """Forward: the cuDNN kernel and the blockwise XLA path against dense attention of the
    same bf16 inputs (f32 softmax); bf16 output rounding bounds the error."""
    q, k, v, seg = _case(0)
    dense = jax.jit(attn.dense_attention)(q, k, v, seg, seg)
    cudnn = jax.jit(attn.cudnn_attention)(q, k, v, seg)
    block = jax.jit(lambda *a: attn.blockwise_attention(*a, block=64))(q, k, v, seg, seg)
    valid = seg > 0
    assert _rel(cudnn, dense, valid) < 2e-2
    assert _rel(block, dense, valid) < 2e-2
    assert not np.asarray(cudnn)[~np.asarray(valid)].any()  # padding rows are zero


def test_cudnn_kernel_gradients_match_blockwise():
    """Backward: d(sum(o * w))/d(q, k, v) of the cuDNN kernel against the blockwise custom
    VJP (itself checked against dense on CPU), on the real rows."""
    q, k, v, seg = _case(1)
    w = jnp.asarray(np.random.default_rng(2).standard_normal(q.shape), jnp.float32)
    w = w * (seg > 0)[:, :, None, None]

    def loss(fn):
        return jax.jit(jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32) * w),
                                (0, 1, 2)))

    g_cudnn = loss(lambda q, k, v: attn.cudnn_attention(q, k, v, seg))(q, k, v)
    g_block = loss(lambda q, k, v: attn.blockwise_attention(q, k, v, seg, seg, block=64))(
        q, k, v)
    valid = seg > 0
    for a, b in zip(g_cudnn, g_block):
        assert _rel(a, b, valid) < 5e-2


def test_auto_picks_cudnn_for_long_bf16_rows_on_gpu():
    kw = dict(block=128, head_dim=128, packed=False)
    assert attn.resolve_impl("auto", seq_len=1024, dtype=jnp.bfloat16, **kw) == "cudnn"
    assert attn.resolve_impl("auto", seq_len=1024, dtype=jnp.float32, **kw) == "blockwise"
    assert attn.resolve_impl("auto", seq_len=1024, dtype=jnp.bfloat16,
                             **{**kw, "packed": True}) == "blockwise"
