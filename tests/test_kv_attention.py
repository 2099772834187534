"""The rollout engine's slot-cache attention (``espo_jax.rollout.kv_attention``) against a
float64 NumPy reference, and the property the engine's K-invariance rests on: a row's decode
attention, and a prompt token's packed prefill attention, are bitwise the same whichever
rows share the call, however the prompt is split into runs and however much of the cache
the call reads."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from espo_jax.rollout.kv_attention import (key_blocks, packed_prefill_attention,
                                           ragged_decode_attention)

H, KVH, HD, BLOCK = 4, 2, 8, 8


def _reference(q, kc, vc, slots, kv_len):
    """float64: row m's one query over keys [0, kv_len[m]) of slot slots[m]."""
    q, kc, vc = (np.asarray(x, np.float64) for x in (q, kc, vc))
    out = np.zeros(q.shape)
    g = H // KVH
    for m, (slot, n) in enumerate(zip(slots, kv_len)):
        for head in range(H):
            kk, vv = kc[slot, head // g, :n], vc[slot, head // g, :n]
            sc = kk @ q[m, 0, head] / math.sqrt(HD)
            p = np.exp(sc - sc.max())
            out[m, 0, head] = p @ vv / p.sum()
    return out


def _cache(seed, k, s):
    """Keys [K, KVH, S, hd], values [K, KVH, S, hd], a query key."""
    ks = jax.random.split(jax.random.key(seed), 3)
    return (jax.random.normal(ks[0], (k, KVH, s, HD)), jax.random.normal(ks[1], (k, KVH, s, HD)),
            ks[2])


@pytest.mark.parametrize("read", [64, 16], ids=["in_place", "block_windows"])
@pytest.mark.parametrize("gather", [False, True])
def test_decode_attention_equals_float64_reference(read, gather):
    k, s = 5, 48
    kc, vc, key = _cache(0, k, s)
    slots = np.array([3, 0, 4, 1]) if gather else np.arange(k)
    kv_len = np.array([1, 17, 48, 8, 30][: len(slots)])
    q = jax.random.normal(key, (len(slots), 1, H, HD))
    kb = key_blocks(kc, BLOCK)  # the cache's layout [K, KVH, S/B, hd, B]
    np.testing.assert_array_equal(np.asarray(kb[:, :, 2, :, 3]),
                                  np.asarray(kc[:, :, 2 * BLOCK + 3]))
    got = ragged_decode_attention(q, kb, vc, jnp.asarray(slots) if gather else None,
                                  jnp.asarray(kv_len), read=read)
    np.testing.assert_allclose(np.asarray(got), _reference(q, kc, vc, slots, kv_len),
                               atol=2e-6, rtol=2e-6)
    # The prefill path agrees, each query a run of one token at position kv_len - 1,
    # reading whole blocks or sub-blocks of the cache's.
    m = len(slots)
    for block in (BLOCK, BLOCK // 4):
        pre = packed_prefill_attention(q, kb, vc, jnp.asarray(slots), jnp.arange(m),
                                       jnp.ones((m,), jnp.int32), jnp.asarray(kv_len - 1),
                                       rows=1, block=block)
        np.testing.assert_allclose(np.asarray(got), np.asarray(pre), atol=2e-6, rtol=2e-6)
    # A row with kv_len 0 (an idle row) gives zeros, not NaN.
    idle = ragged_decode_attention(q[:1], kb, vc, jnp.zeros((1,), jnp.int32),
                                   jnp.zeros((1,), jnp.int32), read=read)
    assert not np.any(np.asarray(idle))


@settings(max_examples=15, deadline=None)
@given(st.lists(st.integers(1, 48), min_size=2, max_size=6), st.sampled_from([64, 16]),
       st.sampled_from([jnp.float32, jnp.bfloat16]))
def test_decode_attention_row_result_does_not_depend_on_its_call(lens, read, dtype):
    """Row 0 alone (fewest blocks read) and row 0 with longer rows, gathered from other slots
    (more blocks or windows read): bitwise the same output."""
    k, s = len(lens), 48
    kc, vc, key = _cache(1, k, s)
    kc, vc = key_blocks(kc, BLOCK).astype(dtype), vc.astype(dtype)
    q = jax.random.normal(key, (len(lens), 1, H, HD)).astype(dtype)
    kv_len = jnp.asarray(lens)
    together = ragged_decode_attention(q, kc, vc, None, kv_len, read=read)
    alone = ragged_decode_attention(q[:1], kc, vc, jnp.zeros((1,), jnp.int32), kv_len[:1],
                                    read=read)
    gathered = ragged_decode_attention(q[::-1], kc, vc, jnp.arange(len(lens))[::-1],
                                       kv_len[::-1], read=read)
    np.testing.assert_array_equal(np.asarray(alone[0], np.float32),
                                  np.asarray(together[0], np.float32))
    np.testing.assert_array_equal(np.asarray(gathered[::-1], np.float32),
                                  np.asarray(together, np.float32))


def test_bad_cache_layouts():
    kc, vc, key = _cache(2, 2, 20)
    q = jax.random.normal(key, (2, 1, H, HD))
    with pytest.raises(ValueError, match="multiple of the kv block"):
        key_blocks(kc, BLOCK)
    kb = key_blocks(kc[:, :, :16], BLOCK)
    with pytest.raises(ValueError, match="blocks of 8 positions but the value cache 20"):
        ragged_decode_attention(q, kb, vc, None, jnp.asarray([3, 4]))
    with pytest.raises(ValueError, match="block 3 must divide the cache's kv block 8"):
        packed_prefill_attention(q, kb, vc[:, :, :16], jnp.asarray([0, 1]), jnp.asarray([0, 1]),
                                 jnp.asarray([1, 1]), jnp.asarray([2, 3]), rows=1, block=3)


def _prefill_reference(q, kc, vc, runs):
    """float64: each run (slot, start, n, pos0)'s token r (row start + r, position pos0 + r)
    over keys [0, pos0 + r] of its slot; rows of no run are zero."""
    q, kc, vc = (np.asarray(x, np.float64) for x in (q, kc, vc))
    out = np.zeros(q.shape)
    g = H // KVH
    for slot, start, n, pos0 in runs:
        for r in range(n):
            for head in range(H):
                kk, vv = kc[slot, head // g, :pos0 + r + 1], vc[slot, head // g, :pos0 + r + 1]
                sc = kk @ q[start + r, 0, head] / math.sqrt(HD)
                p = np.exp(sc - sc.max())
                out[start + r, 0, head] = p @ vv / p.sum()
    return out


def _runs(runs, count):
    """(slot, start, len, pos0) i32[count] each from a list of runs, padded with empty runs."""
    cols = np.zeros((4, count), np.int32)
    cols[:, :len(runs)] = np.asarray(runs, np.int32).T
    return [jnp.asarray(c) for c in cols]


@pytest.mark.parametrize("block", [BLOCK, BLOCK // 2])
def test_packed_prefill_equals_float64_reference(block):
    """Runs of several slots packed back to back: a whole prompt from position 0, a chunk
    continuing a prompt already cached up to position 13, a one-token run; rows past the
    runs (budget left over) are zero; empty runs at the end are skipped."""
    k, s = 4, 40
    kc, vc, key = _cache(3, k, s)
    runs = [(2, 0, 9, 13), (0, 9, 11, 0), (3, 20, 1, 30)]   # (slot, start, len, pos0)
    t = 24
    q = jax.random.normal(key, (t, 1, H, HD))
    got = packed_prefill_attention(q, key_blocks(kc, BLOCK), vc, *_runs(runs, k), rows=11,
                                   block=block)
    want = _prefill_reference(q, kc, vc, runs)
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-6, rtol=2e-6)
    assert not np.any(np.asarray(got)[21:])


@settings(max_examples=15, deadline=None)
@given(st.integers(2, 30), st.integers(1, 29), st.integers(0, 5),
       st.sampled_from([jnp.float32, jnp.bfloat16]))
def test_packed_prefill_token_result_does_not_depend_on_its_run(n, cut, lead, dtype):
    """A prompt of n tokens prefilled as one run, or as two runs (chunks) split at ``cut``
    in separate calls with other rows bounds, behind another slot's run of ``lead``
    tokens: every token's output bitwise the same (the engine's K-invariance)."""
    cut = min(cut, n - 1)
    k, s = 3, 32
    kc, vc, key = _cache(4, k, s)
    kc, vc = key_blocks(kc, BLOCK).astype(dtype), vc.astype(dtype)
    q = jax.random.normal(key, (n + lead, 1, H, HD)).astype(dtype)
    whole = packed_prefill_attention(q[:n], kc, vc, *_runs([(1, 0, n, 0)], k), rows=n,
                                     block=BLOCK)
    runs = [(2, 0, lead, 0)] if lead else []
    first = packed_prefill_attention(jnp.concatenate([q[n:], q[:cut]]), kc, vc,
                                     *_runs(runs + [(1, lead, cut, 0)], k), rows=max(cut, lead),
                                     block=BLOCK)
    rest = packed_prefill_attention(q[cut:n], kc, vc, *_runs([(1, 0, n - cut, cut)], k),
                                    rows=32, block=BLOCK)
    split = jnp.concatenate([first[lead:], rest])
    np.testing.assert_array_equal(np.asarray(split, np.float32), np.asarray(whole, np.float32))
