"""The rollout engine's paged KV layout (``espo_jax.rollout.paged_attention``): the layout and
sequence table the TPU Pallas ragged paged attention kernel reads.

The kernel itself compiles for TPU only (and its interpret mode fails on CPU in this JAX), so
the plumbing is checked against the kernel's own reference and validator, shipped with JAX
(``ref_ragged_paged_attention``, ``dynamic_validate_inputs``): our XLA version of the
kernel's contract equals the reference on random tables, and every attention call the engine
makes in a real rollout (mixed prefill + decode steps, drain sizes) passes the validator and
gives the reference's output. The engine with the paged layout samples the same tokens as
with the XLA layout.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from _hf_reference import PROMPTS, tiny_qwen3
from espo_jax.rollout import generate
from espo_jax.rollout import paged_attention as pa

kernel_lib = pytest.importorskip("jax.experimental.pallas.ops.tpu.ragged_paged_attention.kernel")

N = 12
SMALL = dict(prefill_chunk=8, kv_block=8)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return tiny_qwen3(tmp_path_factory.mktemp("qwen3_tiny_paged"))


def _table(rng, q_lens, kv_extra, pps, page, n_pages):
    q_lens = np.asarray(q_lens, np.int32)
    kv_lens = q_lens + np.asarray(kv_extra, np.int32)
    assert kv_lens.max() <= pps * page
    pages = rng.permutation(n_pages)[: len(q_lens) * pps].reshape(len(q_lens), pps)
    cu = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    return (jnp.asarray(kv_lens), jnp.asarray(pages, jnp.int32), jnp.asarray(cu),
            jnp.asarray([len(q_lens)], jnp.int32))


@pytest.mark.parametrize("heads", [(4, 2), (2, 2)])
def test_xla_contract_equals_kernel_reference(heads):
    """Mixed decode (q_len 1), prefill chunks, empty (q_len 0) sequences, scattered pages,
    GQA: our XLA version of the contract equals JAX's reference of the kernel."""
    h, kvh = heads
    hd, page, pps = 16, 4, 5
    rng = np.random.default_rng(h)
    q_lens, extra = [1, 0, 7, 1, 3, 0, 1], [9, 4, 0, 0, 12, 0, 19]
    kv_lens, pages, cu, ns = _table(rng, q_lens, extra, pps, page, n_pages=40)
    tq = int(cu[-1]) + 3  # trailing rows belong to no sequence
    q = jnp.asarray(rng.normal(size=(tq, h, hd)), jnp.float32)
    kv = jnp.asarray(rng.normal(size=(40, page, 2 * kvh, hd)), jnp.float32)
    scale = hd ** -0.5
    kernel_lib.dynamic_validate_inputs(q, kv, kv_lens, pages, cu, ns, sm_scale=scale)
    ref = kernel_lib.ref_ragged_paged_attention(q, kv, kv_lens, pages, cu, ns, sm_scale=scale)
    got = jax.jit(pa.ragged_paged_attention_xla, static_argnames="sm_scale")(
        q, kv, kv_lens, pages, cu, ns, sm_scale=scale)
    np.testing.assert_allclose(np.asarray(got[: int(cu[-1])]), np.asarray(ref), rtol=1e-5,
                               atol=1e-5)
    assert (np.asarray(got[int(cu[-1]):]) == 0).all()


def test_write_paged_layout():
    """Slot s, position p lands in page s * S / page + p // page, row p % page; k head h at
    combined head 2h, v at 2h + 1; an out-of-range slot writes nowhere."""
    slots, length, kvh, hd, page = 3, 16, 2, 4, 4
    kv = pa.init_paged_cache(slots, length, kvh, hd, page, jnp.float32)
    assert kv.shape == (12, 4, 4, 4)
    rng = np.random.default_rng(0)
    k = jnp.asarray(rng.normal(size=(3, 1, kvh, hd)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(3, 1, kvh, hd)), jnp.float32)
    at, pos = jnp.asarray([2, 0, 3]), jnp.asarray([9, 3, 5])
    out = np.asarray(pa.write_paged(kv, at, pos, k, v, num_slots=slots))
    np.testing.assert_array_equal(out[2 * 4 + 2, 1, 0::2], np.asarray(k[0, 0]))
    np.testing.assert_array_equal(out[2 * 4 + 2, 1, 1::2], np.asarray(v[0, 0]))
    np.testing.assert_array_equal(out[0, 3, 0::2], np.asarray(k[1, 0]))
    assert np.count_nonzero(out) == 2 * 2 * kvh * hd  # the slot-3 write was dropped
    pages = pa.page_table(jnp.asarray([2, 0]), 4)
    np.testing.assert_array_equal(np.asarray(pages), [[8, 9, 10, 11], [0, 1, 2, 3]])
    with pytest.raises(ValueError, match="multiple of the page size"):
        pa.init_paged_cache(2, 10, kvh, hd, 4, jnp.float32)


def test_resolve_attention():
    assert pa.resolve_attention("auto") == ("ragged_paged" if jax.default_backend() == "tpu"
                                            else "xla")
    assert pa.resolve_attention("ragged_paged_xla") == "ragged_paged_xla"
    with pytest.raises(ValueError, match="one of"):
        pa.resolve_attention("paged")
    if jax.default_backend() != "tpu":
        with pytest.raises(ValueError, match="TPU Pallas kernel"):
            pa.resolve_attention("ragged_paged")
    assert pa.page_size_for(256) == 64 and pa.page_size_for(8) == 8


def _checked_contract(calls):
    """ragged_paged_attention_xla that also hands each call's concrete inputs to the kernel's
    validator, by a host callback; records (num_seqs, rows, Tq, mixed). The eager reference
    is slow (each new slice length compiles), so it checks only the first mixed call (the
    first half of the sequences decoding past position 0 while the second half prefill);
    test_xla_contract_equals_kernel_reference covers the rest."""
    inner = pa.ragged_paged_attention_xla

    def check(*args, scale):
        q, kv, kv_lens, pages, cu, ns, out = map(np.asarray, args)  # host arrays: fast loops
        kernel_lib.dynamic_validate_inputs(q, kv, kv_lens, pages, cu, ns, sm_scale=scale)
        m, n = int(ns[0]), int(cu[int(ns[0])])
        mixed = bool((kv_lens[: m // 2] > 1).any() and (np.diff(cu)[m // 2: m] > 0).any())
        seen = any(c[3] for c in calls)
        calls.append((m, n, q.shape[0], mixed))
        if seen or not mixed:
            return
        ref = kernel_lib.ref_ragged_paged_attention(jnp.asarray(q), jnp.asarray(kv),
                                                    jnp.asarray(kv_lens), jnp.asarray(pages),
                                                    jnp.asarray(cu), jnp.asarray(ns),
                                                    sm_scale=scale)
        np.testing.assert_allclose(out[:n], np.asarray(ref), rtol=1e-4, atol=1e-5)

    def fn(q, kv, kv_lens, pages, cu, ns, *, sm_scale):
        out = inner(q, kv, kv_lens, pages, cu, ns, sm_scale=sm_scale)
        jax.debug.callback(functools.partial(check, scale=sm_scale), q, kv, kv_lens, pages, cu, ns, out)
        return out

    return fn


def test_engine_paged_layout_same_tokens_and_kernel_contract(models, monkeypatch):
    """The engine with the paged layout: the same sampled tokens and log-probs as the XLA
    layout for K = 8 with 3 packed prompt tokens per light mixed step (prefill chunks,
    mixed steps, drain sizes), and every attention call it makes satisfies the kernel's
    contract (its validator on every call, its reference on a mixed one)."""
    _, model, _ = models
    kw = dict(max_new_tokens=N, temperature=0.7, key=jax.random.key(3), eos_id=[1, 2, 3],
              num_samples=3, max_concurrent=8, prefill_tokens=3, **SMALL)
    calls = []
    monkeypatch.setattr(pa, "ragged_paged_attention_xla", _checked_contract(calls))
    ref = generate(model, PROMPTS, **kw)
    got = generate(model, PROMPTS, **kw, attention="ragged_paged_xla")
    jax.effects_barrier()
    np.testing.assert_array_equal(np.asarray(got.tokens), np.asarray(ref.tokens))
    np.testing.assert_array_equal(np.asarray(got.lengths), np.asarray(ref.lengths))
    np.testing.assert_allclose(np.asarray(got.logprobs), np.asarray(ref.logprobs), rtol=1e-5,
                               atol=1e-5)
    lengths = np.asarray(ref.lengths)
    assert lengths.min() < N and lengths.max() == N  # ragged: stops and full-length rows
    # Calls seen (K = 8): mixed steps (2K sequences), full decode steps (K) and drain
    # sizes (< K), each checked once per layer.
    seqs = {c[0] for c in calls}
    assert {16, 8} <= seqs and min(seqs) < 8, seqs
    assert any(c[0] == 16 and c[3] for c in calls)  # decode rows + packed prefill together
    assert any(n < tq for _, n, tq, _ in calls)  # packed steps with rows outside any sequence


def test_engine_paged_layout_greedy_budgets(models):
    """Greedy, per-prompt budgets and a mid-sequence stop token: paged == XLA layout."""
    _, model, _ = models
    kw = dict(max_new_tokens=[N, 5, N, 9], temperature=0.0, key=jax.random.key(0), eos_id=7,
              max_concurrent=2, **SMALL)
    ref = generate(model, PROMPTS, **kw)
    got = generate(model, PROMPTS, **kw, attention="ragged_paged_xla")
    np.testing.assert_array_equal(np.asarray(got.tokens), np.asarray(ref.tokens))
    np.testing.assert_allclose(np.asarray(got.logprobs), np.asarray(ref.logprobs), rtol=1e-5,
                               atol=1e-5)
