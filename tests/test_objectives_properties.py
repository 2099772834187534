"""hypothesis properties of policy_loss: padding and sequence-permutation invariance,
gradient linearity in the advantages. Shapes are fixed ([4, 8], padded to [4, 12]) so each
objective compiles twice at most."""
import functools

import hypothesis.strategies as st
import jax
import numpy as np
import pytest
from hypothesis import given, settings

from espo_jax.objectives import policy_loss

import _reference_objectives as ref

B, T, PAD = 4, 8, 4
CASES = {
    "grpo": ("grpo", dict(clip_ratio_c=2.0)),
    "dapo": ("dapo", {}),
    "gspo": ("gspo", {}),
    "gmpo": ("gmpo", {}),
    "cispo": ("cispo", dict(clip_low=0.2)),
    "espo": ("espo", dict(vocab_size=1000)),
    "espo_quantile": ("espo", dict(vocab_size=1000, grouping="quantile", num_groups=3)),
    "espo_token_gtt": ("espo", dict(vocab_size=1000, grouping="token", token_ratio="group_times_token")),
}
SETTINGS = settings(max_examples=12, deadline=None)
lengths_st = st.lists(st.integers(0, T), min_size=B, max_size=B)


@functools.lru_cache(maxsize=None)
def _vg(case):
    name, hp = CASES[case]
    return jax.jit(jax.value_and_grad(
        lambda lp, old, adv, mask, ent: policy_loss(name, lp, old, adv, mask, ent, **hp)[0]))


def _run(case, b, adv=None):
    loss, grad = _vg(case)(b["logp"], b["old"], b["adv"] if adv is None else adv, b["mask"], b["entropy"])
    return float(loss), np.asarray(grad)


@pytest.mark.parametrize("case", sorted(CASES))
@SETTINGS
@given(seed=st.integers(0, 2**31 - 1), lengths=lengths_st)
def test_invariant_to_extra_padding(case, seed, lengths):
    b = ref.make_batch(seed, B=B, T=T, lengths=lengths)
    rng = np.random.default_rng(seed)
    garbage = lambda: rng.choice([np.nan, np.inf, -np.inf, 5.0], size=(B, PAD)).astype(np.float32)
    padded = dict(b, mask=np.concatenate([b["mask"], np.zeros((B, PAD), bool)], axis=1))
    for k in ("logp", "old", "entropy"):
        padded[k] = np.concatenate([b[k], garbage()], axis=1)
    loss, grad = _run(case, b)
    loss_p, grad_p = _run(case, padded)
    # float32 row reductions of another length sum in another order (ESPO's last group is
    # the row total minus the others, which can cancel): a few ulps, not exact.
    assert loss_p == pytest.approx(loss, rel=1e-5, abs=1e-9)
    np.testing.assert_allclose(grad_p[:, :T], grad, rtol=1e-5, atol=1e-9)
    assert not np.any(grad_p[:, T:])


@pytest.mark.parametrize("case", sorted(CASES))
@SETTINGS
@given(seed=st.integers(0, 2**31 - 1), lengths=lengths_st, perm=st.permutations(range(B)))
def test_invariant_to_permuting_sequences(case, seed, lengths, perm):
    b = ref.make_batch(seed, B=B, T=T, lengths=lengths)
    perm = np.asarray(perm)
    loss, grad = _run(case, b)
    loss_p, grad_p = _run(case, {k: v[perm] for k, v in b.items()})
    assert loss_p == pytest.approx(loss, rel=1e-5, abs=1e-6)  # summation order changes
    np.testing.assert_allclose(grad_p, grad[perm], rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("case", sorted(CASES))
@SETTINGS
@given(seed=st.integers(0, 2**31 - 1), lengths=lengths_st, a=st.floats(-3, 3), c=st.floats(0.1, 10.0))
def test_gradient_linear_in_advantages(case, seed, lengths, a, c):
    b = ref.make_batch(seed, B=B, T=T, lengths=lengths)
    adv2 = np.random.default_rng(seed + 1).standard_normal(B).astype(np.float32)
    # off-policy: clip decisions depend only on sign(A), so the gradient is positively homogeneous
    _, g = _run(case, b)
    _, g_scaled = _run(case, b, (c * b["adv"]).astype(np.float32))
    np.testing.assert_allclose(g_scaled, c * g, rtol=1e-4, atol=1e-8)
    # on-policy (logp == old): nothing is clipped and the gradient is linear
    on = dict(b, old=b["logp"])
    _, g1 = _run(case, on)
    _, g2 = _run(case, on, adv2)
    _, g12 = _run(case, on, (a * b["adv"] + adv2).astype(np.float32))
    np.testing.assert_allclose(g12, a * g1 + g2, rtol=1e-4, atol=1e-6)
