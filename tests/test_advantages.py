"""compute_advantages against the float64 reference and its edge cases."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from espo_jax.objectives import compute_advantages

import _reference_objectives as ref


@pytest.mark.parametrize("estimator", ["grpo", "drgrpo"])
@pytest.mark.parametrize("valid_only", [False, True])
def test_matches_reference(estimator, valid_only):
    rng = np.random.default_rng(0)
    G = 4
    rewards = rng.choice([0.0, 0.5, 1.0], size=6 * G).astype(np.float32)
    rewards[:G] = 1.0  # all equal -> 0
    gradable = rng.random(6 * G) < 0.7
    gradable[G:2 * G] = [True, False, False, False]  # one gradable response -> 0 under valid_only
    gradable[2 * G:3 * G] = False
    got = np.asarray(compute_advantages(rewards, G, estimator=estimator, gradable=gradable,
                                        valid_only=valid_only))
    want = ref.advantages(rewards, G, estimator, gradable, valid_only)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert got.dtype == np.float32 and got.shape == (6 * G,)
    if valid_only:
        assert np.all(got[~gradable] == 0)
        assert np.all(got[G:2 * G] == 0)


def test_known_values():
    adv = compute_advantages(jnp.array([1.0, 0.0, 0.0, 0.0]), 4)
    std = np.std([1, 0, 0, 0], ddof=1)  # unbiased, as verl
    np.testing.assert_allclose(adv, (np.array([1, 0, 0, 0]) - 0.25) / (std + 1e-6), rtol=1e-6)
    np.testing.assert_allclose(compute_advantages(jnp.array([1.0, 0.0]), 2, estimator="drgrpo"), [0.5, -0.5])
    assert np.all(np.asarray(compute_advantages(jnp.array([3.0, 1.0]), 1)) == 0)  # groups of one


def test_errors():
    with pytest.raises(ValueError, match=r"shape \(6,\).*group_size=4"):
        compute_advantages(jnp.zeros(6), 4)
    with pytest.raises(ValueError, match="estimator"):
        compute_advantages(jnp.zeros(4), 2, estimator="rloo")
    with pytest.raises(ValueError, match="gradable"):
        compute_advantages(jnp.zeros(4), 2, valid_only=True)


def test_jit_bf16_and_finite_gradients():
    fn = jax.jit(compute_advantages, static_argnames=("group_size", "estimator", "valid_only"))
    rewards = jnp.array([1.0, 1.0, 0.0, 1.0], jnp.bfloat16)
    out = fn(rewards, group_size=2)
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(out[:2], 0.0)
    grad = jax.grad(lambda r: jnp.sum(compute_advantages(r, 2, gradable=r > 0.5, valid_only=True) ** 2))(
        jnp.array([1.0, 1.0, 0.0, 1.0]))
    assert np.all(np.isfinite(grad))
