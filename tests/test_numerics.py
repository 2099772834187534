"""The paper's numerics and the RL step's semantics (issue: f32 master weights, exact
on-policy updates, ESPO groups once per rollout):

* bf16 compute + lr 1e-6 moves most weights (f32 masters; a bf16 master would not move);
* the sampler's log-probs equal the scoring pass's at T != 1 (and the metrics say so);
* the first, on-policy update has ratios 1; metrics are exact over micro-batches;
* the stop-token union, DAPO's budget, ESPO's precomputed groups, rollout correction.
"""
from __future__ import annotations

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from ml_collections import ConfigDict

from espo_jax.models import from_pretrained, save_pretrained
from espo_jax.objectives import entropy_groups, policy_loss, rollout_correction_weights
from espo_jax.rewards import overlong_budget, overlong_penalty
from espo_jax.rollout import generate
from espo_jax.train.optim import make_optimizer
from espo_jax.train.score_phase import espo_groups, score_extras
from espo_jax.train.state import create_state
from espo_jax.train.step import make_score_fn, make_train_step
from espo_jax.train.tasks import stop_token_ids

TINY = pathlib.Path(__file__).resolve().parent / "data" / "tiny_qwen3"
PROMPTS = [[5, 9, 11, 4], [7, 3], [12, 13, 14, 15, 16, 17]]
TEMP = 0.7


def _adamw(lr):
    return make_optimizer(ConfigDict(dict(lr=lr, warmup_steps=0, weight_decay=0.0,
                                          grad_clip=1.0, b1=0.9, b2=0.999, eps=1e-8)))


@pytest.fixture(scope="module")
def rollout_batch():
    """A T=0.7 rollout of the tiny f32 model and its scoring pass (host arrays)."""
    model = from_pretrained(str(TINY), dtype=jnp.float32)
    ro = generate(model, PROMPTS, max_new_tokens=12, temperature=TEMP, key=jax.random.key(7),
                  eos_id=list(range(1, 8)), num_samples=4)
    state = create_state(model, optax.sgd(0.0))
    score = make_score_fn(state.graphdef, chunk_size=8, temperature=TEMP)
    logp, ent = score(state.params, state.rest, ro.prompt_tokens, ro.prompt_mask, ro.tokens)
    mask = np.asarray(ro.mask, np.float32)
    rng = np.random.default_rng(0)
    batch = dict(prompt_tokens=np.asarray(ro.prompt_tokens), prompt_mask=np.asarray(ro.prompt_mask),
                 tokens=np.asarray(ro.tokens), mask=mask,
                 sampler_logp=np.asarray(ro.logprobs, np.float32),
                 old_logp=np.asarray(logp) * mask, entropy=np.asarray(ent),
                 advantages=rng.normal(size=(mask.shape[0],)).astype(np.float32))
    assert mask.sum() > 20 and (mask.sum(-1) < mask.shape[1]).any()  # some rows stopped early
    return model, batch


# ------------------------------------------------------------------ master weights --
@pytest.mark.parametrize("param_dtype, moved_min, moved_max", [("float32", 0.5, 1.0),
                                                              ("bfloat16", 0.0, 0.05)])
def test_bf16_compute_lr_1e6_moves_the_weights(rollout_batch, tmp_path, param_dtype,
                                               moved_min, moved_max):
    """One AdamW step at lr 1e-6 with bf16 compute: f32 masters move > 50% of q_proj (seen in
    an export with dtype=float32); bf16 masters (the old default) round almost every update
    back to the old value — the failure this guards against."""
    _, batch = rollout_batch
    model = from_pretrained(str(TINY), dtype="bfloat16", param_dtype=param_dtype)
    assert model.dtype == jnp.bfloat16
    tx = _adamw(1e-6)
    state = create_state(model, tx)
    before = np.asarray(state.params["layers"][0]["self_attn"]["q_proj"]["kernel"], np.float32)
    step = make_train_step(tx, "espo", {"vocab_size": model.config.vocab_size}, chunk_size=8,
                           temperature=TEMP)
    keys = ("prompt_tokens", "prompt_mask", "tokens", "mask", "old_logp", "entropy", "advantages")
    state, metrics, _ = step(state, {k: jnp.asarray(batch[k]) for k in keys})
    assert float(metrics["grad_norm"]) > 0 and float(metrics["nonfinite"]) == 0
    save_pretrained(state.model(), tmp_path / "out", dtype="float32")
    after = np.asarray(from_pretrained(str(tmp_path / "out"), dtype="float32")
                       .layers[0].self_attn.q_proj.kernel.get_value())
    moved = float(np.mean(after != before))
    print(f"[numerics] param_dtype={param_dtype}: {moved:.1%} of q_proj moved")
    assert moved_min <= moved <= moved_max, moved
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg.get("torch_dtype", cfg.get("dtype")) == "float32"


# ------------------------------------------------------------- on-policy semantics --
def test_sampler_logprobs_equal_scorer_at_temperature_07(rollout_batch):
    _, batch = rollout_batch
    cfg = ConfigDict(dict(objective=dict(name="grpo"),
                          rollout_correction=dict(mode="off", threshold=2.0)))
    extra, metrics = score_extras(cfg, {}, batch["mask"], batch["sampler_logp"], batch["old_logp"],
                                  batch["entropy"])
    assert extra == {}
    assert metrics["sampler_scorer/logp_abs_diff_max"] < 1e-4
    assert 0 <= metrics["sampler_scorer/logp_abs_diff_mean"] <= metrics[
        "sampler_scorer/logp_abs_diff_max"]
    # The check can fail: a scorer at T=1 disagrees with a sampler at T=0.7.
    model, b = rollout_batch
    state = create_state(model, optax.sgd(0.0))
    logp1, _ = make_score_fn(state.graphdef, chunk_size=8, temperature=1.0)(
        state.params, state.rest, b["prompt_tokens"], b["prompt_mask"], b["tokens"])
    _, bad = score_extras(cfg, {}, batch["mask"], batch["sampler_logp"], np.asarray(logp1),
                          batch["entropy"])
    assert bad["sampler_scorer/logp_abs_diff_max"] > 1e-2


@pytest.mark.parametrize("objective", ["espo", "gspo", "cispo"])  # group, sequence, token
def test_first_update_is_on_policy_and_micro_batch_metrics_are_exact(rollout_batch, objective):
    """Update 0 (old_logp = the scoring pass) has ratio_dev_max ~ 0; every metric of a step
    with 4 micro-batches equals the 1-micro-batch metric."""
    model, batch = rollout_batch
    keys = ("prompt_tokens", "prompt_mask", "tokens", "mask", "old_logp", "entropy", "advantages")
    b = {k: jnp.asarray(batch[k]) for k in keys}
    hp = {"vocab_size": model.config.vocab_size} if objective == "espo" else {}
    out = {}
    for micro in (0, 3):
        tx = optax.sgd(0.1)
        step = make_train_step(tx, objective, hp, chunk_size=8, temperature=TEMP,
                               micro_batch_size=micro)
        _, metrics, _ = step(create_state(model, tx), b)
        out[micro] = {k: float(v) for k, v in metrics.items()}
    assert out[0]["ratio_dev_max"] < 1e-4 and out[0]["clip_frac"] == 0.0
    assert set(out[0]) == set(out[3])
    for k, v in out[0].items():
        np.testing.assert_allclose(out[3][k], v, rtol=2e-5, atol=1e-6, err_msg=k)


# --------------------------------------------------------------------- stop tokens --
def test_stop_tokens_are_the_union_of_tokenizer_and_generation_config(tmp_path):
    class Tok:
        eos_token_id = 7

    assert stop_token_ids(Tok(), tmp_path) == [7]
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [9, 7, 3]}))
    assert stop_token_ids(Tok(), tmp_path) == [3, 7, 9]
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 11}))
    assert stop_token_ids(Tok(), tmp_path) == [7, 11]
    Tok.eos_token_id = None
    assert stop_token_ids(Tok(), tmp_path) == [11]
    assert stop_token_ids(Tok(), None) == []


# ----------------------------------------------------------------------- DAPO budget --
def test_dapo_overlong_follows_the_response_budget():
    assert overlong_budget(0, 0, 0.25, 128) == (128, 32)
    assert overlong_budget(0, 0, 0.25, 64) == (64, 16)      # --config.rollout.max_new_tokens=64
    assert overlong_budget(100, 10, 0.25, 64) == (100, 10)  # explicit keys win
    assert overlong_budget(0, 0, 0.0, 64) == (64, 0)        # hard penalty only
    m, b = overlong_budget(0, 0, 0.25, 64)
    pen = overlong_penalty(np.array([10, 48, 56, 64]), m, b)
    np.testing.assert_allclose(pen, [0.0, 0.0, -0.5, -1.0])
    with pytest.raises(ValueError, match="buffer_frac"):
        overlong_budget(0, 0, 1.5, 64)
    with pytest.raises(ValueError, match="max_new_tokens"):
        overlong_budget(0, 0, 0.25, 0)
    with pytest.raises(ValueError, match="buffer"):
        overlong_budget(10, 20, 0.25, 64)


# ------------------------------------------------------------------ ESPO groups ----
@pytest.mark.parametrize("grouping, extra", [("top_fraction", {"top_fraction": 0.3}),
                                            ("quantile", {"num_groups": 3}),
                                            ("ranges", {"entropy_edges": "quantiles"}),
                                            ("sequence", {})])
def test_espo_precomputed_groups_equal_computed(rollout_batch, grouping, extra):
    """ESPO with the rollout's precomputed groups = ESPO grouping itself: value, gradient,
    metrics."""
    _, b = rollout_batch
    if extra.get("entropy_edges") == "quantiles":  # edges inside this batch's entropy range
        e = b["entropy"][b["mask"] > 0]
        extra = {"entropy_edges": (float(np.quantile(e, 0.7)), float(np.quantile(e, 0.3)))}
    hp = dict(vocab_size=500, grouping=grouping, **extra)
    groups = espo_groups(hp, b["entropy"], b["mask"])
    assert groups is not None and groups.shape == b["mask"].shape
    rng = np.random.default_rng(1)
    logp = jnp.asarray(b["old_logp"] + rng.normal(0, 0.1, b["mask"].shape).astype(np.float32))
    args = (b["old_logp"], b["advantages"], b["mask"], b["entropy"])

    def f(lp, groups=None):
        return policy_loss("espo", lp, *args, groups=groups, **hp)

    (l0, m0), g0 = jax.value_and_grad(f, has_aux=True)(logp)
    (l1, m1), g1 = jax.value_and_grad(f, has_aux=True)(logp, groups)
    np.testing.assert_allclose(float(l1), float(l0), rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(np.asarray(g1), np.asarray(g0), rtol=1e-6, atol=1e-9)
    assert m0.keys() == m1.keys()
    for k in m0:
        np.testing.assert_allclose(float(m1[k]), float(m0[k]), rtol=1e-6, atol=1e-8, err_msg=k)
    # Another partition (one group per response) gives another loss: the argument is used.
    if grouping != "sequence":
        assert (groups.max(-1) > 0).any()
        merged = np.where(b["mask"] > 0, 0, groups)
        assert abs(float(f(logp, jnp.asarray(merged))[0]) - float(l0)) > 1e-7


def test_espo_groups_of_token_grouping_are_none(rollout_batch):
    _, b = rollout_batch
    assert espo_groups({"grouping": "token"}, b["entropy"], b["mask"]) is None
    g = espo_groups({"grouping": "quantile", "num_groups": 2}, b["entropy"], b["mask"])
    want = entropy_groups(b["entropy"], b["mask"], mode="quantile", num_groups=2)
    np.testing.assert_array_equal(g, np.asarray(want))


# -------------------------------------------------------------- rollout correction --
def _ref_weights(old, samp, mask, mode, c):
    d = np.where(mask > 0, old.astype(np.float64) - samp.astype(np.float64), 0.0)
    if mode == "sequence":
        d = np.broadcast_to(d.sum(-1, keepdims=True), d.shape)
    raw = np.exp(np.clip(d, -20, 20))
    return np.where(mask > 0, np.minimum(raw, c), 0.0), raw


@pytest.mark.parametrize("mode", ["token", "sequence"])
def test_rollout_correction_weights_match_reference(mode):
    rng = np.random.default_rng(3)
    old = rng.normal(-2, 1, (6, 9)).astype(np.float32)
    samp = (old + rng.normal(0, 0.5, old.shape)).astype(np.float32)
    mask = (rng.random(old.shape) < 0.8).astype(np.float32)
    w, m = rollout_correction_weights(old, samp, mask, mode, 1.5)
    want, raw = _ref_weights(old, samp, mask, mode, 1.5)
    np.testing.assert_allclose(np.asarray(w), want, rtol=1e-5)
    valid = mask > 0
    np.testing.assert_allclose(float(m["rollout_correction/weight_mean"]), want[valid].mean(),
                               rtol=1e-5)
    np.testing.assert_allclose(float(m["rollout_correction/weight_max"]), raw[valid].max(),
                               rtol=1e-5)
    np.testing.assert_allclose(float(m["rollout_correction/clipped_frac"]),
                               (raw[valid] > 1.5).mean(), rtol=1e-6)
    assert 0 < float(m["rollout_correction/clipped_frac"]) < 1
    assert rollout_correction_weights(old, samp, mask, "off", 2.0) == (None, {})
    with pytest.raises(ValueError, match="rollout_correction.mode"):
        rollout_correction_weights(old, samp, mask, "tokens", 2.0)


@pytest.mark.parametrize("objective", ["espo", "grpo", "gspo", "gmpo", "cispo", "dapo"])
def test_rollout_correction_weights_scale_every_objective(rollout_batch, objective):
    """Weights 1 change nothing; weights c scale the policy-gradient loss and its gradient by
    c; the weights carry no gradient."""
    _, b = rollout_batch
    hp = {"vocab_size": 500} if objective == "espo" else {}
    rng = np.random.default_rng(2)
    logp = jnp.asarray(b["old_logp"] + rng.normal(0, 0.1, b["mask"].shape).astype(np.float32))
    args = (b["old_logp"], b["advantages"], b["mask"], b["entropy"])

    def f(lp, w):
        return policy_loss(objective, lp, *args, token_weights=w, **hp)[0]

    base = float(policy_loss(objective, logp, *args, **hp)[0])
    ones = jnp.ones_like(logp)
    np.testing.assert_allclose(float(f(logp, ones)), base, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(float(f(logp, 0.5 * ones)), 0.5 * base, rtol=1e-5, atol=1e-9)
    g1 = jax.grad(f)(logp, ones)
    g5 = jax.grad(f)(logp, 0.5 * ones)
    np.testing.assert_allclose(np.asarray(g5), 0.5 * np.asarray(g1), rtol=1e-5, atol=1e-9)
    assert float(jnp.abs(jax.grad(f, argnums=1)(logp, ones)).max()) == 0.0


def test_score_extras_adds_groups_and_weights(rollout_batch):
    _, b = rollout_batch
    cfg = ConfigDict(dict(objective=dict(name="espo"),
                          rollout_correction=dict(mode="sequence", threshold=2.0)))
    shifted = b["old_logp"] - 0.05 * b["mask"]
    extra, metrics = score_extras(cfg, {"grouping": "top_fraction"}, b["mask"], b["sampler_logp"],
                                  shifted, b["entropy"])
    assert set(extra) == {"groups", "is_weights"}
    want, _ = _ref_weights(shifted, b["sampler_logp"], b["mask"], "sequence", 2.0)
    np.testing.assert_allclose(extra["is_weights"], want, rtol=1e-5)
    assert metrics["rollout_correction/weight_max"] < 1.0  # old < sampler everywhere
    assert metrics["sampler_scorer/logp_abs_diff_max"] == pytest.approx(0.05, rel=1e-3)
