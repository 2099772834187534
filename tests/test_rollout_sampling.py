"""The per-step sampler: frequencies match the filtered, tempered softmax (chi-square),
returned log-probs are those of that distribution, greedy is argmax."""
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from scipy import stats

from espo_jax.rollout import apply_top_k, apply_top_p, process_logits, sample_step
from espo_jax.rollout.sampling import greedy_rows

V = 8
LOGITS = np.array([2.0, 1.5, 1.2, 0.3, 0.0, -0.4, -1.0, -2.5], np.float32)
NUM_DRAWS = 40_000


def reference_probs(logits, temperature, top_k, top_p):
    """numpy reference: temperature -> top-k -> top-p, renormalised."""
    z = logits.astype(np.float64) / temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    keep = np.ones_like(p, bool)
    if 0 < top_k < len(p):
        keep &= z >= np.sort(z)[::-1][top_k - 1]
    q = np.where(keep, p, 0.0)
    q /= q.sum()
    if top_p < 1.0:
        order = np.argsort(-q)
        before = np.cumsum(q[order]) - q[order]
        kept = np.zeros_like(keep)
        kept[order[before < top_p]] = True
        q = np.where(kept, q, 0.0)
        q /= q.sum()
    return q


@pytest.fixture(scope="module")
def draw():
    cache = {}

    def run(temperature, top_k, top_p):
        fn = cache.get((top_k, top_p < 1.0))
        if fn is None:
            def one(key, t, p):
                return sample_step(jnp.asarray(LOGITS)[None], key, t, p, top_k=top_k,
                                   use_top_p=top_p < 1.0)
            fn = jax.jit(jax.vmap(one, in_axes=(0, None, None)))
            cache[(top_k, top_p < 1.0)] = fn
        keys = jax.random.split(jax.random.key(1234), NUM_DRAWS)
        tok, logp = fn(keys, jnp.float32(temperature), jnp.float32(top_p))
        return np.asarray(tok[:, 0]), np.asarray(logp[:, 0])

    return run


@pytest.mark.parametrize("temperature,top_k,top_p", [
    (1.0, 0, 1.0), (0.7, 0, 1.0), (1.3, 3, 1.0), (1.0, 0, 0.8), (0.9, 5, 0.7), (2.0, 0, 0.5)])
def test_frequencies_match_filtered_softmax(draw, temperature, top_k, top_p):
    tokens, logps = draw(temperature, top_k, top_p)
    expected = reference_probs(LOGITS, temperature, top_k, top_p)
    counts = np.bincount(tokens, minlength=V)
    # Filtered tokens are never drawn.
    assert counts[expected == 0].sum() == 0, (counts, expected)
    support = expected > 0
    chi2 = ((counts[support] - NUM_DRAWS * expected[support]) ** 2
            / (NUM_DRAWS * expected[support])).sum()
    dof = max(int(support.sum()) - 1, 1)
    assert chi2 < stats.chi2.ppf(0.9999, dof), (chi2, counts, expected)
    # Returned log-probs are those of the distribution sampled from.
    np.testing.assert_allclose(logps, np.log(expected[tokens]), rtol=1e-5, atol=1e-5)


def test_greedy_is_argmax_with_untempered_logprob():
    logits = jax.random.normal(jax.random.key(0), (5, 11))
    tok, logp = sample_step(logits, jax.random.key(1), 0.5, greedy=True)
    np.testing.assert_array_equal(tok, np.argmax(logits, -1))
    ref = jax.nn.log_softmax(logits, -1)[jnp.arange(5), tok]
    np.testing.assert_allclose(logp, ref, rtol=1e-6)


@settings(max_examples=40, deadline=None)
@given(v=st.integers(1, 700), block=st.sampled_from([1, 4, 256]), seed=st.integers(0, 2**16),
       ties=st.booleans(), coarse=st.booleans())
def test_blocked_greedy_equals_flat_argmax_float64_reference(v, block, seed, ties, coarse):
    """greedy_rows (two-level argmax) = the first index of the maximum, and its log-prob =
    log_softmax in float64, for any V (padded last block), ties, -inf entries, an all -inf
    row but one finite token."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(4, v)) * 4
    if coarse:  # many exact ties
        x = np.round(x)
    if ties:
        x[0, :] = x[0].max()
    x[1, rng.random(v) < 0.5] = -np.inf
    x[1, rng.integers(v)] = 1.0
    x[2, :] = -np.inf
    x[2, -1] = 0.0
    tok, logp = greedy_rows(jnp.asarray(x, jnp.float32), block=block)
    x32 = x.astype(np.float32).astype(np.float64)
    ref_tok = np.argmax(x32, -1)
    np.testing.assert_array_equal(np.asarray(tok), ref_tok)
    m = x32.max(-1, keepdims=True)
    ref = (x32 - m - np.log(np.exp(x32 - m).sum(-1, keepdims=True)))[np.arange(4), ref_tok]
    np.testing.assert_allclose(np.asarray(logp), ref, rtol=1e-5, atol=1e-6)


def test_filters_keep_at_least_one_token_and_match_reference():
    logits = jax.random.normal(jax.random.key(3), (4, 16)) * 3
    for top_k in (1, 4, 16):
        kept = np.isfinite(np.asarray(apply_top_k(logits, top_k))).sum(-1)
        np.testing.assert_array_equal(kept, min(top_k, 16))
    for top_p in (1e-6, 0.3, 0.9, 1.0):
        out = np.asarray(apply_top_p(logits, top_p))
        for row, lrow in zip(out, np.asarray(logits)):
            ref = reference_probs(lrow, 1.0, 0, top_p)
            np.testing.assert_array_equal(np.isfinite(row), ref > 0)
    # Temperature scales before filtering; log_softmax of the output is the distribution.
    out = process_logits(logits, 0.5, 0.9, top_k=6)
    ref = np.stack([reference_probs(r, 0.5, 6, 0.9) for r in np.asarray(logits)])
    np.testing.assert_allclose(np.exp(jax.nn.log_softmax(out, -1)), ref, atol=1e-6)


@pytest.mark.parametrize("v", [1000, 70_000])  # fewer blocks than a block's tokens, and more
def test_blocked_gumbel_uses_the_documented_draws(v):
    """_blocked_gumbel's block and token Gumbels come from one draw per row; they are
    exactly those of separate draws from split(key): a block by Gumbel-max over the
    blocks' log-masses with nb Gumbels from the first subkey, then a token of it with
    `block` Gumbels from the second (the random stream a given key has always given)."""
    from espo_jax.rollout.sampling import _blocked_gumbel
    block, b = 256, 6
    x = jax.random.normal(jax.random.key(3), (b, v)) * 3
    keys = jax.random.split(jax.random.key(4), b)
    tok, logp = _blocked_gumbel(x, keys, block)
    nb = -(-v // block)
    xp = np.pad(np.asarray(x, np.float64), ((0, 0), (0, nb * block - v)),
                constant_values=-np.inf).reshape(b, nb, block)
    mass = np.log(np.exp(xp).sum(-1))
    for i in range(b):
        k_block, k_tok = jax.random.split(keys[i])
        blk = np.argmax(mass[i] + np.asarray(jax.random.gumbel(k_block, (nb,)), np.float64))
        t = np.argmax(xp[i, blk] + np.asarray(jax.random.gumbel(k_tok, (block,)), np.float64))
        assert int(tok[i]) == blk * block + t
        ref = np.asarray(x[i], np.float64)
        np.testing.assert_allclose(float(logp[i]), ref[tok[i]] - np.log(np.exp(ref).sum()),
                                   rtol=1e-5)
