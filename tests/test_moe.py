"""Qwen3-MoE: logit parity with PyTorch Qwen3MoeForCausalLM, export round trip, greedy
generate, grouped vs dense experts, routing replay, expert-parallel train step."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from _hf_reference import hf_logits, left_padded_batch  # noqa: E402
from espo_jax.models import from_pretrained, save_pretrained  # noqa: E402
from espo_jax.models.moe import dense_swiglu, grouped_swiglu, route  # noqa: E402

V, T, B, PAD = 128, 96, 2, 23
BASE = dict(vocab_size=V, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
            num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
            num_experts=8, num_experts_per_tok=2, mlp_only_layers=[1],
            max_position_embeddings=512, tie_word_embeddings=False)


def make_hf(norm_topk_prob, seed=0):
    cfg = transformers.Qwen3MoeConfig(**BASE, norm_topk_prob=norm_topk_prob)
    torch.manual_seed(seed)
    model = transformers.Qwen3MoeForCausalLM(cfg).eval()
    with torch.no_grad():  # perturb everything; a wide router keeps top-k away from ties
        for name, p in model.named_parameters():
            p.add_(torch.randn_like(p) * (0.5 if name.endswith("mlp.gate.weight") else 0.05))
    return model


def batch():
    return left_padded_batch(V, B, T, PAD)


@nnx.jit
def _forward(model, ids, mask):
    return model(ids, attention_mask=mask, return_routing=True)


def rel_err(a, b, mask):
    v = mask.astype(bool)
    return float(np.abs(a - b)[v].max() / np.abs(b[v]).max())


@pytest.fixture(scope="module", params=[True, False], ids=["norm_topk", "no_norm_topk"])
def hf_dir(request, tmp_path_factory):
    model = make_hf(request.param)
    path = tmp_path_factory.mktemp(f"moe_{request.param}")
    model.save_pretrained(path)
    return model, path


def test_config_and_sparse_layers(hf_dir):
    _, path = hf_dir
    model = from_pretrained(path, dtype="float32")
    cfg = model.config
    assert cfg.family == "qwen3_moe" and cfg.num_experts == 8 and cfg.num_experts_per_tok == 2
    # transformers' rule: not in mlp_only_layers, (i + 1) % decoder_sparse_step == 0
    assert cfg.moe_layers == (0, 2)
    assert [layer.sparse for layer in model.layers] == [True, False, True]
    assert model.layers[0].mlp.experts.gate_proj.get_value().shape == (8, 32, 16)
    assert model.layers[0].mlp.experts.gate_proj.get_metadata()["out_sharding"] == (
        "experts", "embed", "mlp")


def test_logit_parity_float32(hf_dir):
    hf, path = hf_dir
    ids, mask = batch()
    model = from_pretrained(path, dtype="float32")
    logits, routing = _forward(model, jnp.asarray(ids), jnp.asarray(mask))
    ref = hf_logits(hf, ids, mask)
    assert rel_err(np.asarray(logits), ref, mask) < 1e-4
    assert routing["experts"].shape == (B, T, 2, 2) and routing["probs"].shape == (B, T, 2, 8)


def test_export_round_trip_through_transformers(hf_dir, tmp_path):
    hf, path = hf_dir
    ids, mask = batch()
    model = from_pretrained(path, dtype="float32")
    save_pretrained(model, tmp_path / "out")
    back = transformers.Qwen3MoeForCausalLM.from_pretrained(tmp_path / "out").eval()
    for (n, p), (_, q) in zip(hf.state_dict().items(), back.state_dict().items()):
        np.testing.assert_array_equal(p.numpy(), q.numpy(), err_msg=n)
    assert back.config.norm_topk_prob == hf.config.norm_topk_prob
    assert back.config.mlp_only_layers == [1]
    again = from_pretrained(tmp_path / "out", dtype="float32")
    np.testing.assert_array_equal(np.asarray(_forward(again, ids, mask)[0]),
                                  np.asarray(_forward(model, ids, mask)[0]))


@pytest.mark.parametrize("norm", [True, False])
def test_grouped_experts_equal_dense_and_replay_forces_selection(norm):
    k0, k1, k2, k3, k4 = jax.random.split(jax.random.key(0), 5)
    n, d, f, e, k = 50, 8, 6, 8, 2
    x = jax.random.normal(k0, (n, d))
    logits = jax.random.normal(k1, (n, e))
    gate, up = (jax.random.normal(kk, (e, d, f)) * 0.3 for kk in (k2, k3))
    down = jax.random.normal(k4, (e, f, d)) * 0.3
    w, ex, topk, probs = route(logits, k, norm)
    np.testing.assert_array_equal(ex, topk)
    ref = np.zeros((n, d))
    x64, p64, g64, u64, d64 = (np.asarray(a, np.float64) for a in (x, probs, gate, up, down))
    for i in range(n):  # float64 loop reference
        sel = np.argsort(-p64[i])[:k]
        wi = p64[i, sel] / (p64[i, sel].sum() if norm else 1.0)
        for j, ei in enumerate(sel):
            g, u = x64[i] @ g64[ei], x64[i] @ u64[ei]
            ref[i] += wi[j] * ((g / (1 + np.exp(-g))) * u) @ d64[ei]
    for fn in (grouped_swiglu, dense_swiglu):
        out = jax.jit(fn, static_argnums=6)(x, ex, w, gate, up, down, jnp.float32)
        np.testing.assert_allclose(out, ref, atol=1e-5)
    # Replay: forced experts, weights from the current probs at those experts.
    forced = jnp.stack([jnp.arange(n) % e, (jnp.arange(n) + 3) % e], -1).astype(jnp.int32)
    w2, ex2, topk2, _ = route(logits, k, norm, forced)
    np.testing.assert_array_equal(ex2, forced)
    np.testing.assert_array_equal(topk2, topk)
    want = np.take_along_axis(p64, np.asarray(forced), -1)
    if norm:
        want = want / want.sum(-1, keepdims=True)
    np.testing.assert_allclose(w2, want, rtol=1e-6)



def test_grouped_experts_gradients_equal_dense():
    """grouped_swiglu's custom backward pieces (un-sort gather, gradient tie) against the dense
    all-experts layer's autodiff, for every input (tokens, routing weights, the 3 weights)."""
    ks = jax.random.split(jax.random.key(1), 6)
    n, d, f, e, k = 40, 8, 6, 8, 2
    x = jax.random.normal(ks[0], (n, d))
    w, ex, _, _ = route(jax.random.normal(ks[1], (n, e)), k, True)
    gate, up = (jax.random.normal(kk, (e, d, f)) * 0.3 for kk in (ks[2], ks[3]))
    down = jax.random.normal(ks[4], (e, f, d)) * 0.3
    cot = jax.random.normal(ks[5], (n, d))

    def grads(fn):
        loss = lambda *a: jnp.sum(fn(a[0], ex, *a[1:], jnp.float32) * cot)  # noqa: E731
        return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))(x, w, gate, up, down)

    for got, want in zip(grads(grouped_swiglu), grads(dense_swiglu)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)

# -- training: routing replay, router agreement, load-balancing loss, expert parallelism --

def _state(model, mesh=None):
    import optax
    from espo_jax.train import mesh as mesh_lib
    from espo_jax.train.state import create_state, state_shardings
    tx = optax.sgd(0.5)
    sh = None
    if mesh is not None:
        sh = state_shardings(model, tx, mesh, param_shardings_fn=mesh_lib.param_shardings,
                             opt_shardings_fn=mesh_lib.opt_state_shardings)
    return tx, create_state(model, tx, shardings=sh), sh


@pytest.fixture(scope="module")
def rollout(tmp_path_factory):
    """A tiny MoE policy, its rollout (8 rows, routed experts recorded) and HF twin."""
    from espo_jax.rollout import generate
    hf = make_hf(True, seed=1)
    path = tmp_path_factory.mktemp("moe_train")
    hf.save_pretrained(path)
    model = from_pretrained(path, dtype="float32")
    rng = np.random.default_rng(1)
    prompts = [list(rng.integers(1, V, size=n)) for n in (5, 9, 3, 7)]
    ro = generate(model, prompts, max_new_tokens=8, temperature=1.0, key=jax.random.key(3),
                  eos_id=7, num_samples=2, pad_id=0)
    return hf, model, jax.device_get(ro)


def test_greedy_generate_matches_transformers(rollout):
    from espo_jax.rollout import generate
    hf, model, _ = rollout
    prompts = [[5, 9, 17, 3, 44, 2, 7], [11, 12]]
    n = 12
    ro = generate(model, prompts, max_new_tokens=n, temperature=0.0, key=jax.random.key(0),
                  eos_id=None, pad_id=0)
    for i, p in enumerate(prompts):
        with torch.no_grad():
            out = hf.generate(torch.tensor([p]), max_new_tokens=n, do_sample=False,
                              min_new_tokens=n, pad_token_id=0)
        np.testing.assert_array_equal(np.asarray(ro.tokens[i]), out[0, len(p):].numpy())
    # The sampler records the experts of every cache slot (prompt + response): [B,P+N,L,k].
    assert ro.routed_experts.shape == (2, ro.prompt_tokens.shape[1] + n, 2, 2)


def _batch(ro, old_logp, routed):
    b = ro.tokens.shape[0]
    return dict(prompt_tokens=ro.prompt_tokens, prompt_mask=ro.prompt_mask, tokens=ro.tokens,
                mask=ro.mask, old_logp=np.asarray(old_logp), entropy=np.zeros_like(ro.mask),
                advantages=np.linspace(-1, 1, b).astype(np.float32), routed_experts=routed)


def test_routing_replay_first_minibatch_ratios_are_one(rollout):
    from espo_jax.train.step import make_score_fn, make_train_step
    _, model, ro = rollout
    tx, state, _ = _state(model)
    score = make_score_fn(state.graphdef, chunk_size=16, temperature=1.0)
    routed = np.asarray(ro.routed_experts)
    other = (routed + 1) % 8  # forced experts that are never the router's own top-2 set
    old_nat, _ = score(state.params, state.rest, ro.prompt_tokens, ro.prompt_mask, ro.tokens,
                       routed)
    old_rep, _ = score(state.params, state.rest, ro.prompt_tokens, ro.prompt_mask, ro.tokens,
                       other)
    valid = ro.mask > 0
    # Replaying the sampler's own experts gives the sampled log-probs (float32) ...
    np.testing.assert_allclose(np.asarray(old_nat)[valid], ro.logprobs[valid], atol=2e-5)
    # ... and forcing other experts really changes them.
    assert np.abs(np.asarray(old_rep) - np.asarray(old_nat))[valid].max() > 1e-3
    replay = make_train_step(tx, "espo", {"vocab_size": V}, chunk_size=16, temperature=1.0,
                             routing_replay=True)
    _, m, _ = replay(state, {k: jnp.asarray(v) for k, v in _batch(ro, old_rep, other).items()})
    assert float(m["ratio_dev_max"]) < 1e-5          # pi_old and pi_theta on the same experts
    assert float(m["moe/router_agreement"]) == 0.0   # the forced sets are never the top-k
    _, state, _ = _state(model)
    _, m, _ = replay(state, {k: jnp.asarray(v) for k, v in _batch(ro, old_nat, routed).items()})
    assert float(m["ratio_dev_max"]) < 1e-5
    assert float(m["moe/router_agreement"]) == 1.0


@pytest.fixture(scope="module")
def one_device_step(rollout):
    """(batch, state after one update, metrics) on one device: no replay, aux loss on."""
    from espo_jax.train.step import make_train_step
    _, model, ro = rollout
    # An old policy away from the current one: ratios (and clipping) away from the boundary.
    noise = np.random.default_rng(2).normal(0, 0.05, ro.logprobs.shape).astype(np.float32)
    batch = _batch(ro, ro.logprobs + noise, np.asarray(ro.routed_experts))
    batch["entropy"] = np.full_like(ro.logprobs, 0.5)
    tx, state, _ = _state(model)
    step = make_train_step(tx, "espo", {"vocab_size": V}, chunk_size=16, temperature=1.0,
                           moe_aux_loss_coef=0.01)
    s1, m1, _ = step(state, {k: jnp.asarray(v) for k, v in batch.items()})
    return batch, s1, jax.device_get(m1)


def test_agreement_load_and_aux_loss_match_transformers(rollout, one_device_step):
    from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func
    hf, _, ro = rollout
    _, _, m = one_device_step
    # Without replay the agreement is still reported (same params as the sampler: all agree).
    assert float(m["moe/router_agreement"]) == 1.0
    assert 0 < float(m["moe/expert_load_min"]) <= float(m["moe/expert_load_max"]) < 2
    ids = np.concatenate([ro.prompt_tokens, ro.tokens[:, :-1]], 1)
    valid = np.concatenate([ro.prompt_mask, ro.mask[:, :-1]], 1).astype(np.int64)
    with torch.no_grad():
        out = hf(input_ids=torch.tensor(ids, dtype=torch.long),
                 attention_mask=torch.tensor(valid),
                 position_ids=torch.tensor(np.maximum(np.cumsum(valid, 1) - 1, 0)),
                 output_router_logits=True)
    ref = load_balancing_loss_func(out.router_logits, 8, 2, torch.tensor(valid))
    np.testing.assert_allclose(float(m["moe/aux_loss"]), 0.01 * float(ref), rtol=1e-5)
    # Expert load: top-k counts per (layer, expert) over the valid tokens.
    sel = [torch.topk(g, 2, -1).indices.numpy().reshape(*ids.shape, 2) for g in out.router_logits]
    share = [np.bincount(s[valid > 0].ravel(), minlength=8) / valid.sum() for s in sel]
    np.testing.assert_allclose(float(m["moe/expert_load_max"]), np.max(share), rtol=1e-6)
    np.testing.assert_allclose(float(m["moe/expert_load_min"]), np.min(share), rtol=1e-6)


def test_expert_parallel_step_equals_one_device(rollout, one_device_step):
    from espo_jax.train import mesh as mesh_lib
    from espo_jax.train.step import make_train_step
    from jax.sharding import PartitionSpec as P
    if jax.device_count() < 8:
        pytest.skip("needs 8 devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)")
    _, model, _ = rollout
    batch, s1, m1 = one_device_step
    mesh = mesh_lib.make_mesh(dict(data=1, fsdp=2, tensor=1, expert=4))
    tx, state, sh = _state(model, mesh)
    spec = sh.params["layers"][0]["mlp"]["experts"]["gate_proj"].get_value().spec
    assert spec == P("expert", "fsdp", None)         # [E, D, F]: experts split 4 ways
    bs = mesh_lib.batch_sharding(mesh)
    assert bs.spec == P(("data", "fsdp", "expert"))  # the batch over all 8 devices
    # These shapes take the shard_map expert-parallel path (rows over expert x fsdp).
    from espo_jax.models.moe import _ep_axes
    n = batch["tokens"].shape[0] * (batch["prompt_tokens"].shape[1] + 7)
    assert _ep_axes(mesh.abstract_mesh, n, 32, 16, 8) == (("fsdp", "expert"), "fsdp", None)
    ep = mesh_lib.under_mesh(make_train_step(
        tx, "espo", {"vocab_size": V}, chunk_size=16, temperature=1.0, moe_aux_loss_coef=0.01,
        state_shardings=sh, batch_sharding=bs), mesh)
    s8, m8, _ = ep(state, mesh_lib.shard_batch(batch, mesh))
    for k in ("loss", "grad_norm", "moe/aux_loss", "moe/router_agreement",
              "moe/expert_load_max"):
        np.testing.assert_allclose(float(m8[k]), float(m1[k]), rtol=1e-3, err_msg=k)
    for i in (0, 2):
        w1 = np.asarray(s1.params["layers"][i]["mlp"]["experts"]["down_proj"].get_value())
        w8 = np.asarray(s8.params["layers"][i]["mlp"]["experts"]["down_proj"].get_value())
        np.testing.assert_allclose(w8, w1, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("key,value,msg", [
    ("mesh.expert", 16, "needs 16 devices"),
    ("train.moe_aux_loss_coef", -0.1, "train.moe_aux_loss_coef must be >= 0"),
    ("mesh.expert", 0, "mesh sizes must be >= 1 or -1"),
    ("mesh.expert", 3, "does not divide"),
])
def test_bad_moe_config_keys_are_one_line_errors(key, value, msg):
    import pathlib
    import sys
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "configs"))
    import default  # noqa: PLC0415
    from espo_jax.train.validate import validate
    config = default.get_config("smoke")
    section, name = key.split(".")
    config[section][name] = value
    with pytest.raises(ValueError, match=msg):
        validate(config, num_devices=8, check_files=False)


def test_moe_config_errors():
    from espo_jax.models import ModelConfig
    d = dict(architectures=["Qwen3MoeForCausalLM"], vocab_size=8, hidden_size=8,
             intermediate_size=8, num_hidden_layers=1, num_attention_heads=2,
             num_experts=4, num_experts_per_tok=2, moe_intermediate_size=4)
    assert ModelConfig.from_hf(d).moe_layers == (0,)
    with pytest.raises(ValueError, match="moe_impl must be one of"):
        ModelConfig.from_hf(d, moe_impl="loop")
    with pytest.raises(ValueError, match="num_experts_per_tok must be in"):
        ModelConfig.from_hf({**d, "num_experts_per_tok": 5})
    with pytest.raises(KeyError, match="moe_intermediate_size"):
        ModelConfig.from_hf({k: v for k, v in d.items() if k != "moe_intermediate_size"})


def test_moe_keys_on_a_dense_model_are_errors(tmp_path):
    import json
    import pathlib
    import sys
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "configs"))
    import default  # noqa: PLC0415
    from espo_jax.train.validate import validate
    config = default.get_config("smoke")  # the dense arith model
    validate(config, num_devices=1)
    config.model.routing_replay = True
    with pytest.raises(ValueError, match="model.routing_replay is set but model.path is not"):
        validate(config, num_devices=1)
    moe = tmp_path / "moe"
    moe.mkdir()
    (moe / "config.json").write_text(json.dumps({"architectures": ["Qwen3MoeForCausalLM"]}))
    config.model.path = str(moe)
    validate(config, num_devices=1)
    # Features without MoE support yet are refused before any weight is loaded.
    for key, value in (("train.max_tokens_per_row", 256), ("model.scan_layers", True)):
        bad = config.copy_and_resolve_references()
        section, name = key.split(".")
        bad[section][name] = value
        with pytest.raises(ValueError, match=f"{key}=.* not supported for mixture-of-experts"):
            validate(bad, num_devices=1)
    ok = config.copy_and_resolve_references()  # the engine runs MoE (routing recorded)
    ok.rollout.max_concurrent = 4
    validate(ok, num_devices=1)


def test_non_expert_weights_are_split_over_fsdp_and_expert():
    from jax.sharding import PartitionSpec as P
    from espo_jax.models import logical_to_spec as model_spec
    from espo_jax.train import mesh as mesh_lib
    mesh = mesh_lib.make_mesh(dict(data=1, fsdp=2, tensor=1, expert=4))
    for spec in (lambda n, s: mesh_lib.logical_to_spec(n, shape=s, mesh=mesh),
                 lambda n, s: model_spec(n, s, mesh)):
        assert spec(("embed", "heads"), (32, 16)) == P(("fsdp", "expert"), None)
        assert spec(("experts", "embed", "mlp"), (8, 32, 16)) == P("expert", "fsdp", None)
        assert spec(("embed", "heads"), (6, 16)) == P("fsdp", None)  # 6 % 8: fsdp only
    one = mesh_lib.make_mesh(dict(data=1, fsdp=8, tensor=1))
    assert mesh_lib.logical_to_spec(("embed", "heads"), shape=(32, 16), mesh=one) == P(
        "fsdp", None)


def test_engine_equals_static_sampler_with_routing(rollout):
    """Continuous batching on the MoE model (K=3 slots for 8 rows, chunked prefill,
    refills): the same sampled tokens, log-probs and recorded experts as the static batch
    (experts compared on the slots the trainer replays: real prompt tokens and every
    response token fed back)."""
    from espo_jax.rollout import generate
    _, model, _ = rollout
    rng = np.random.default_rng(1)
    prompts = [list(rng.integers(1, V, size=n)) for n in (5, 9, 3, 7)]
    kw = dict(max_new_tokens=8, temperature=1.0, key=jax.random.key(3),
              eos_id=list(range(1, 25)), num_samples=2, pad_id=0)
    ref = jax.device_get(generate(model, prompts, **kw))
    ro = jax.device_get(generate(model, prompts, max_concurrent=3, prefill_chunk=4,
                                 kv_block=8, **kw))
    np.testing.assert_array_equal(ro.tokens, ref.tokens)
    np.testing.assert_array_equal(ro.lengths, ref.lengths)
    assert ref.lengths.min() < 8 and ref.lengths.max() == 8  # a stop acted, a row ran out
    np.testing.assert_allclose(ro.logprobs, ref.logprobs, atol=1e-5)
    assert ro.routed_experts.shape == ref.routed_experts.shape
    assert ro.routed_experts.dtype == ref.routed_experts.dtype
    fed = np.concatenate([ref.prompt_mask.astype(bool),
                          np.arange(8)[None] < ref.lengths[:, None] - 1], axis=1)
    assert fed.sum() > 40
    np.testing.assert_array_equal(ro.routed_experts[fed], ref.routed_experts[fed])
    assert (ro.routed_experts[~fed] == 0).all()  # nothing fed there
    assert len(np.unique(ro.routed_experts[fed])) > 4  # the routers do pick different experts
    # Greedy: the engine equals the static sampler (which equals transformers, above).
    greedy = [generate(model, prompts, max_new_tokens=10, temperature=0.0,
                       key=jax.random.key(0), eos_id=None, pad_id=0, max_concurrent=k)
              for k in (None, 2)]
    np.testing.assert_array_equal(np.asarray(greedy[1].tokens), np.asarray(greedy[0].tokens))


def test_sharded_engine_on_an_expert_mesh_equals_one_device(rollout):
    """The training rollout's path on an FSDP x expert mesh: decode_model gathers the
    expert / FSDP splits once, one engine per batch shard (the rows split over fsdp AND
    expert, as the training batch: no device repeats another's rows) runs all experts
    locally (no nested expert-parallel shard_map); the same tokens and recorded experts."""
    from espo_jax.rollout import generate
    from espo_jax.rollout.engine_sharding import decode_model, sharded_engine_fn
    from espo_jax.train import mesh as mesh_lib
    if jax.device_count() < 8:
        pytest.skip("needs 8 devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)")
    _, model, _ = rollout
    mesh = mesh_lib.make_mesh(dict(data=1, fsdp=2, tensor=1, expert=4))
    _, state, _ = _state(model, mesh)
    rng = np.random.default_rng(2)
    prompts = [list(rng.integers(1, V, size=n)) for n in (6, 2, 8, 4)]
    kw = dict(max_new_tokens=8, temperature=1.0, key=jax.random.key(4),
              eos_id=list(range(1, 25)), num_samples=2, pad_id=0, max_concurrent=4)
    ref = jax.device_get(generate(model, prompts, **kw))
    got = generate(decode_model(state.compute_model()), prompts, **kw,
                   engine_fn=sharded_engine_fn(mesh))
    assert got.tokens.sharding.spec[0] == ("fsdp", "expert")  # rows over all 8 devices
    got = jax.device_get(got)
    np.testing.assert_array_equal(got.tokens, ref.tokens)
    np.testing.assert_array_equal(got.routed_experts, ref.routed_experts)
    assert ref.lengths.min() < 8
