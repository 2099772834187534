"""policy_loss against the float64 NumPy reference, reduction identities, exact
micro-batching, errors, NaN safety, jit / vmap / bf16."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from espo_jax.objectives import OBJECTIVES, BatchCounts, batch_counts, policy_loss

import _reference_objectives as ref

V = 1000  # vocabulary size for the adaptive clip (ln V ~ 6.9)

CONFIGS = {
    "grpo": ("grpo", {}),
    "grpo_dual": ("grpo", dict(clip_ratio_c=1.5)),
    "grpo_kl": ("grpo", dict(beta=0.1)),
    "dapo": ("dapo", {}),
    "gspo": ("gspo", {}),
    "gmpo": ("gmpo", {}),
    "cispo": ("cispo", {}),
    "cispo_two_sided": ("cispo", dict(clip_low=0.2, clip_high=0.28)),
    "espo": ("espo", dict(vocab_size=V)),
    "espo_quantile": ("espo", dict(vocab_size=V, grouping="quantile", num_groups=3)),
    "espo_ranges": ("espo", dict(vocab_size=V, grouping="ranges", entropy_edges=(2.0, 0.7))),
    "espo_token": ("espo", dict(vocab_size=V, grouping="token")),
    "espo_sequence": ("espo", dict(vocab_size=V, grouping="sequence")),
    "espo_gtt": ("espo", dict(vocab_size=V, token_ratio="group_times_token")),
    "espo_fixed": ("espo", dict(vocab_size=V, clip_mode="fixed", clip_low=0.01, clip_high=0.02)),
    "espo_eps_clamp": ("espo", dict(vocab_size=V, eps_min=0.002, eps_max=0.004, top_fraction=0.4)),
    "espo_kl": ("espo", dict(vocab_size=V, beta=0.05)),
}


@functools.lru_cache(maxsize=None)
def _vg(cid, with_counts=False):
    name, hp = CONFIGS[cid]
    fn = functools.partial(policy_loss, name, **hp)

    def f(logp, old, adv, mask, ent, refl, counts):
        return fn(logp, old, adv, mask, ent, ref_logp=refl if hp.get("beta") else None,
                  counts=counts if with_counts else None)
    return jax.jit(jax.value_and_grad(f, has_aux=True))


def run(cid, b, counts=None):
    """Value, gradient and metrics; advantages always passed as [B, T] (one compile per
    config; the [B] form is covered by the identity, vmap and bf16 tests)."""
    adv = b["adv"] if b["adv"].ndim == 2 else np.broadcast_to(b["adv"][:, None], b["mask"].shape)
    (loss, metrics), grad = _vg(cid, counts is not None)(
        b["logp"], b["old"], adv, b["mask"], b["entropy"], b["ref"], counts)
    return float(loss), np.asarray(grad), {k: float(v) for k, v in metrics.items()}


def reference(cid, b):
    name, hp = CONFIGS[cid]
    adv = b["adv"] if b["adv"].ndim == 2 else np.broadcast_to(b["adv"][:, None], b["mask"].shape)
    return ref.objective(name, b["logp"], b["old"], adv, b["mask"], b["entropy"], b["ref"], **hp)


@pytest.fixture(scope="module")
def batches():
    return [ref.make_batch(s) for s in (0, 1, 2)] + [ref.make_batch(3, per_token_adv=True)]


@pytest.mark.parametrize("cid", sorted(CONFIGS))
def test_matches_float64_reference(cid, batches):
    clipped_somewhere = False
    for b in batches:
        loss, grad, metrics = run(cid, b)
        ref_loss, ref_grad, ref_fracs = reference(cid, b)
        scale = max(1.0, abs(ref_loss))
        assert abs(loss - ref_loss) <= 2e-6 * scale, (loss, ref_loss)
        np.testing.assert_allclose(grad, ref_grad, rtol=2e-5, atol=1e-7)
        for key, value in ref_fracs.items():
            assert metrics[key] == pytest.approx(value, abs=1e-6), key
        clipped_somewhere |= ref_fracs["clip_frac"] > 0
        assert np.all(np.isfinite(grad)) and all(np.isfinite(v) for v in metrics.values())
    # the data must exercise the clip, otherwise this comparison proves little
    assert clipped_somewhere, f"{cid}: no token clipped in the test batches"


def test_reference_gradient_matches_finite_differences():
    """The hand-derived reference gradients of the objectives without stop-gradients are
    checked by central differences in float64 (guards the reference itself)."""
    b = ref.make_batch(5, garbage=False)
    adv = np.broadcast_to(b["adv"][:, None], b["mask"].shape)
    logp = b["logp"].astype(np.float64)
    for name in ("grpo", "dapo", "gmpo"):
        _, g, _ = ref.objective(name, logp, b["old"], adv, b["mask"])
        h = 1e-6
        for i, t in zip(*np.nonzero(b["mask"])):
            up, down = logp.copy(), logp.copy()
            up[i, t] += h
            down[i, t] -= h
            fd = (ref.objective(name, up, b["old"], adv, b["mask"])[0]
                  - ref.objective(name, down, b["old"], adv, b["mask"])[0]) / (2 * h)
            assert fd == pytest.approx(g[i, t], abs=1e-7), (name, i, t)


def test_dual_clip_engages(batches):
    plain = sum(run("grpo", b)[2]["clip_frac_low"] for b in batches)
    dual = sum(run("grpo_dual", b)[2]["clip_frac_low"] for b in batches)
    assert dual > plain


# ------------------------------------------------------------------ micro-batching
@pytest.mark.parametrize("cid", ["grpo_dual", "dapo", "gspo", "gmpo", "cispo", "espo",
                                 "espo_quantile", "espo_token", "espo_kl"])
def test_micro_batches_sum_to_full_batch(cid, batches):
    b = batches[0]
    loss, grad, _ = run(cid, b)
    counts = batch_counts(b["mask"])
    parts = [{k: v[s] for k, v in b.items()} for s in (slice(0, 2), slice(2, 4), slice(4, 6))]
    results = [run(cid, p, counts) for p in parts]
    assert sum(r[0] for r in results) == pytest.approx(loss, rel=1e-5, abs=1e-7)
    np.testing.assert_allclose(np.concatenate([r[1] for r in results]), grad, rtol=1e-5, atol=1e-8)


def test_micro_batches_need_the_global_counts(batches):
    """Without counts each micro-batch normalises locally: the sum is wrong (test can fail)."""
    b = batches[0]
    loss, _, _ = run("dapo", b)
    parts = [{k: v[s] for k, v in b.items()} for s in (slice(0, 2), slice(2, 4), slice(4, 6))]
    local = sum(run("dapo", p, batch_counts(p["mask"]))[0] for p in parts)
    assert local != pytest.approx(loss, rel=1e-3)


def test_batch_counts():
    mask = np.array([[1, 1, 0], [0, 0, 0], [1, 0, 1]], np.float32)
    c = batch_counts(mask)
    assert isinstance(c, BatchCounts) and int(c.num_seqs) == 2 and int(c.num_tokens) == 4


# ------------------------------------------------------------------ reduction identities
def _identity_pair(b, cfg_a, cfg_b):
    fa = jax.value_and_grad(lambda lp: policy_loss(*cfg_a[:1], lp, b["old"], b["adv"], b["mask"],
                                                   b["entropy"], **cfg_a[1])[0])
    fb = jax.value_and_grad(lambda lp: policy_loss(*cfg_b[:1], lp, b["old"], b["adv"], b["mask"],
                                                   b["entropy"], **cfg_b[1])[0])
    return jax.jit(fa)(b["logp"]), jax.jit(fb)(b["logp"])


def test_espo_sequence_fixed_equals_gspo(batches):
    for b in batches[:2]:
        (la, ga), (lb, gb) = _identity_pair(
            b, ("espo", dict(vocab_size=V, grouping="sequence", clip_mode="fixed", clip_low=3e-4,
                             clip_high=4e-4)), ("gspo", {}))
        assert float(la) == pytest.approx(float(lb), rel=1e-6, abs=1e-9)
        np.testing.assert_allclose(ga, gb, rtol=1e-6, atol=1e-10)
        assert np.abs(np.asarray(gb)).sum() > 0


def test_espo_token_fixed_equals_grpo(batches):
    for b in batches[:2]:
        (la, ga), (lb, gb) = _identity_pair(
            b, ("espo", dict(vocab_size=V, grouping="token", clip_mode="fixed", clip_low=0.2,
                             clip_high=0.25)), ("grpo", dict(clip_low=0.2, clip_high=0.25)))
        assert float(la) == pytest.approx(float(lb), rel=1e-6, abs=1e-9)
        np.testing.assert_allclose(ga, gb, rtol=1e-6, atol=1e-10)


@pytest.mark.parametrize("grouping,extra,token_ratio", [
    ("top_fraction", {}, "group"), ("top_fraction", {}, "group_times_token"),
    ("quantile", dict(num_groups=3), "group"), ("ranges", dict(entropy_edges=(2.0, 0.7)), "group"),
    ("token", {}, "group"), ("token", {}, "group_times_token"), ("sequence", {}, "group")])
def test_on_policy_gradient_is_weighted_policy_gradient(grouping, extra, token_ratio, batches):
    b = dict(batches[3])  # per-token advantages
    b["old"] = np.where(b["mask"], b["logp"], np.nan).astype(np.float32)
    loss = lambda lp: policy_loss("espo", lp, b["old"], b["adv"], b["mask"], b["entropy"],
                                  vocab_size=V, grouping=grouping, token_ratio=token_ratio, **extra)[0]
    grad = jax.jit(jax.grad(loss))(b["logp"])
    # expected: -w_t A_t with w_t = 1 / (N_seq K_i |tau(t)|) from the reference grouping
    mask = b["mask"]
    n_seq = int((mask.sum(1) > 0).sum())
    expected = np.zeros(mask.shape)
    for i in range(mask.shape[0]):
        groups = ref.groups_of_row(b["entropy"][i], mask[i], grouping, **extra)
        for members in groups.values():
            for t in members:
                expected[i, t] = -b["adv"][i, t] / (n_seq * len(groups) * len(members))
    np.testing.assert_allclose(np.asarray(grad), expected, rtol=1e-5, atol=1e-9)


# ------------------------------------------------------------------ ESPO metrics
def test_espo_group_metrics(batches):
    b = batches[0]
    _, _, m = run("espo_quantile", b)
    g = ref.group_ids(b["entropy"], b["mask"], "quantile", num_groups=3)
    valid = b["mask"]
    assert sum(m[f"group{k}/token_share"] for k in range(3)) == pytest.approx(1.0, abs=1e-6)
    for k in range(3):
        sel = g == k
        assert m[f"group{k}/token_share"] == pytest.approx(sel.sum() / valid.sum(), abs=1e-6)
        assert m[f"group{k}/entropy_mean"] == pytest.approx(b["entropy"][sel].mean(), rel=1e-5)
        eps = [0.02 * b["entropy"][i][g[i] == k].mean() / np.log(V)
               for i in range(len(g)) if (g[i] == k).any()]
        assert m[f"group{k}/eps_mean"] == pytest.approx(np.mean(eps), rel=1e-5)
    assert m["group0/entropy_mean"] >= m["group1/entropy_mean"] >= m["group2/entropy_mean"]
    per_seq = [len(set(g[i][valid[i]])) for i in range(len(g)) if valid[i].any()]
    assert m["groups_per_seq"] == pytest.approx(np.mean(per_seq))
    # clip fraction per group, against the reference's clipped tokens
    _, ref_grad, fr = reference("espo_quantile", b)
    total = sum(m[f"group{k}/clip_frac"] * m[f"group{k}/token_share"] for k in range(3))
    assert total == pytest.approx(fr["clip_frac"], abs=1e-6)


def test_metric_names_are_fixed(batches):
    for cid in CONFIGS:
        _, _, m = run(cid, batches[0])
        for key in ("clip_frac", "clip_frac_high", "clip_frac_low", "approx_kl", "ratio_mean",
                    "ratio_min", "ratio_max", "entropy_mean", "pg_loss"):
            assert key in m, (cid, key)
    _, _, m = run("espo", batches[0])
    assert {"group0/entropy_mean", "group0/eps_mean", "group0/token_share", "group0/clip_frac",
            "group1/clip_frac", "groups_per_seq", "eps_mean"} <= set(m)


def test_ratio_min_max_over_valid_tokens_only(batches):
    b = dict(batches[0])
    b["old"] = np.where(b["mask"], b["old"], 50.0).astype(np.float32)  # exp(-50) if it leaked
    b["logp"] = np.where(b["mask"], b["logp"], 0.0).astype(np.float32)
    _, _, m = run("grpo", b)
    r = np.exp(b["logp"] - b["old"])[b["mask"]]
    assert m["ratio_min"] == pytest.approx(r.min(), rel=1e-5)
    assert m["ratio_max"] == pytest.approx(r.max(), rel=1e-5)
    assert m["approx_kl"] == pytest.approx(np.mean(-(b["logp"] - b["old"])[b["mask"]]), rel=1e-5)


# ------------------------------------------------------------------ edge cases
@pytest.mark.parametrize("cid", sorted(CONFIGS))
def test_all_masked_batch_is_zero_and_finite(cid, batches):
    b = dict(batches[0])
    b["mask"] = np.zeros_like(b["mask"])
    loss, grad, metrics = run(cid, b)
    assert loss == 0.0 and not np.any(grad)
    assert all(np.isfinite(v) for v in metrics.values()), metrics


def test_extreme_log_ratios_are_clamped(batches):
    b = dict(batches[0])
    b["old"] = np.where(b["mask"], b["logp"] - 80.0, 0).astype(np.float32)
    for cid in ("grpo", "gspo", "gmpo", "cispo", "espo", "espo_gtt"):
        loss, grad, metrics = run(cid, b)
        assert np.isfinite(loss) and np.all(np.isfinite(grad))
        # group_times_token multiplies two clamped ratios
        bound = np.exp(40.0 if cid == "espo_gtt" else 20.0)
        assert metrics["ratio_max"] <= bound * 1.0001


# ------------------------------------------------------------------ errors
def _args(b):
    return b["logp"], b["old"], b["adv"], b["mask"], b["entropy"]


def test_unknown_objective_and_hparams(batches):
    b = batches[0]
    with pytest.raises(ValueError, match="unknown objective 'ppo'.*allowed.*espo"):
        policy_loss("ppo", *_args(b))
    with pytest.raises(ValueError, match=r"'gspo'.*\['clip_hi'\].*allowed.*clip_high"):
        policy_loss("gspo", *_args(b), clip_hi=0.1)
    with pytest.raises(ValueError, match="espo.*vocab_size"):
        policy_loss("espo", *_args(b))
    with pytest.raises(ValueError, match="espo.*needs entropy"):
        policy_loss("espo", *_args(b)[:4], vocab_size=V)
    with pytest.raises(ValueError, match="grouping"):
        policy_loss("espo", *_args(b), vocab_size=V, grouping="kmeans")
    with pytest.raises(ValueError, match="entropy_edges"):
        policy_loss("espo", *_args(b), vocab_size=V, grouping="ranges")
    with pytest.raises(ValueError, match="clip_mode"):
        policy_loss("espo", *_args(b), vocab_size=V, clip_mode="auto")
    with pytest.raises(ValueError, match="ref_logp"):
        policy_loss("grpo", *_args(b), beta=0.1)
    with pytest.raises(ValueError, match="clip_ratio_c"):
        policy_loss("grpo", *_args(b), clip_ratio_c=0.5)


def test_shape_errors_name_arrays(batches):
    b = batches[0]
    with pytest.raises(ValueError, match=r"old_logp has shape \(6, 11\).*\(6, 12\)"):
        policy_loss("grpo", b["logp"], b["old"][:, :11], b["adv"], b["mask"])
    with pytest.raises(ValueError, match=r"advantages has shape \(5,\)"):
        policy_loss("grpo", b["logp"], b["old"], b["adv"][:5], b["mask"])
    with pytest.raises(ValueError, match=r"entropy has shape \(6, 3\)"):
        policy_loss("espo", b["logp"], b["old"], b["adv"], b["mask"], b["entropy"][:, :3], vocab_size=V)


def test_registry_declares_defaults():
    assert OBJECTIVES["espo"].defaults["alpha"] == 0.02
    assert OBJECTIVES["espo"].defaults["top_fraction"] == 0.2
    assert OBJECTIVES["espo"].defaults["grouping"] == "top_fraction"
    assert OBJECTIVES["espo"].defaults["token_ratio"] == "group"
    assert OBJECTIVES["espo"].defaults["clip_mode"] == "adaptive"
    assert OBJECTIVES["dapo"].defaults["clip_high"] == 0.28
    assert OBJECTIVES["gspo"].defaults["clip_low"] == 3e-4 and OBJECTIVES["gspo"].defaults["clip_high"] == 4e-4
    assert OBJECTIVES["gmpo"].defaults["clip_low"] == 0.4
    assert OBJECTIVES["cispo"].defaults["clip_low"] is None and OBJECTIVES["cispo"].defaults["clip_high"] == 4.0
    assert OBJECTIVES["grpo"].defaults["clip_ratio_c"] is None
    assert all(s.defaults["max_log_ratio"] == 20.0 and s.defaults["beta"] == 0.0 for s in OBJECTIVES.values())


# ------------------------------------------------------------------ jit / vmap / bf16
def test_vmap_matches_loop(batches):
    b0, b1 = batches[0], batches[1]
    fn = jax.value_and_grad(functools.partial(policy_loss, "espo", vocab_size=V), has_aux=True)
    stack = lambda k: np.stack([b0[k], b1[k]])
    (loss, metrics), grad = jax.jit(jax.vmap(fn))(*(stack(k) for k in ("logp", "old", "adv", "mask", "entropy")))
    for j, b in enumerate((b0, b1)):
        single, g, m = run("espo", b)
        assert float(loss[j]) == pytest.approx(single, rel=1e-6, abs=1e-9)
        np.testing.assert_allclose(grad[j], g, rtol=1e-6, atol=1e-10)
        assert float(metrics["group0/clip_frac"][j]) == pytest.approx(m["group0/clip_frac"])


def test_bf16_inputs_are_computed_in_float32(batches):
    b = batches[0]
    bf = {k: (jnp.asarray(v, jnp.bfloat16) if k in ("logp", "old", "adv", "entropy") else v)
          for k, v in b.items()}
    up = {k: (np.asarray(jnp.asarray(v, jnp.float32)) if k in ("logp", "old", "adv", "entropy") else v)
          for k, v in bf.items()}
    fn = jax.jit(functools.partial(policy_loss, "espo", vocab_size=V))
    loss_bf, metrics = fn(bf["logp"], bf["old"], bf["adv"], bf["mask"], bf["entropy"])
    loss_up, _ = fn(up["logp"], up["old"], up["adv"], up["mask"], up["entropy"])
    assert loss_bf.dtype == jnp.float32 and all(v.dtype == jnp.float32 for v in metrics.values())
    assert float(loss_bf) == float(loss_up)
