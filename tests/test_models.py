"""Decoder vs Hugging Face PyTorch: logit parity, export round trip, sharded IO, KV cache."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from _hf_reference import hf_logits, left_padded_batch  # noqa: E402
from espo_jax.models import (Decoder, ModelConfig, from_pretrained,  # noqa: E402
                             save_pretrained)

V, T, B, PAD = 500, 224, 2, 41
BASE = dict(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
            rms_norm_eps=1e-6)
LLAMA3_ROPE = dict(rope_type="llama3", rope_theta=50000.0, factor=8.0, low_freq_factor=1.0,
                   high_freq_factor=4.0, original_max_position_embeddings=64)
CASES = {
    # head_dim != hidden/heads, tied; and untied with attention bias.
    "qwen3_tied": ("Qwen3", dict(head_dim=24, tie_word_embeddings=True)),
    "qwen3_untied_bias": ("Qwen3", dict(head_dim=16, tie_word_embeddings=False,
                                        attention_bias=True)),
    "qwen2_tied": ("Qwen2", dict(tie_word_embeddings=True)),
    "llama_untied_rope3": ("Llama", dict(tie_word_embeddings=False,
                                         rope_parameters=LLAMA3_ROPE)),
}


def make_hf(case, seed=0):
    family, extra = CASES[case]
    cfg = getattr(transformers, f"{family}Config")(**BASE, **extra)
    torch.manual_seed(seed)
    model = getattr(transformers, f"{family}ForCausalLM")(cfg).eval()
    with torch.no_grad():  # perturb everything (HF inits biases to 0 and norms to 1)
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def batch():
    return left_padded_batch(V, B, T, PAD)


@nnx.jit
def _forward(model, ids, mask):
    return model(ids, attention_mask=mask)


def jax_logits(model, ids, mask):
    return np.asarray(_forward(model, jnp.asarray(ids), jnp.asarray(mask)))


def rel_err(a, b, mask):
    v = mask.astype(bool)
    return float(np.abs(a - b)[v].max() / np.abs(b[v]).max())


@pytest.fixture(scope="module")
def data():
    return batch()


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory, data):
    """case -> (HF model, its save_pretrained directory, its logits on `data`)."""
    out = {}
    for case in sorted(CASES):
        model = make_hf(case)
        path = tmp_path_factory.mktemp(case)
        model.save_pretrained(path)
        out[case] = (model, str(path), hf_logits(model, *data))
    return out


@pytest.fixture(params=sorted(CASES))
def hf_case(request, hf_dirs):
    return (request.param,) + hf_dirs[request.param]


def test_logit_parity_float32(hf_case, data):
    case, _, path, ref = hf_case
    model = from_pretrained(path, dtype="float32")
    out = jax_logits(model, *data)
    assert out.dtype == np.float32 and out.shape == (B, T, V)
    assert np.isfinite(out).all()  # padding rows too: no NaN for `loss * mask` to spread
    assert rel_err(out, ref, data[1]) < 1e-4, case


def test_export_round_trip_through_transformers(hf_case, data, tmp_path):
    case, _, path, ref = hf_case
    ours = from_pretrained(path, dtype=jnp.float32)
    save_pretrained(ours, tmp_path)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(back).__name__ == json.load(open(os.path.join(path, "config.json")))[
        "architectures"][0]
    assert rel_err(hf_logits(back, *data), ref, data[1]) < 1e-5, case


def test_sharded_checkpoint_save_and_load(tmp_path, data):
    hf = make_hf("qwen3_untied_bias", seed=1)
    ref = hf_logits(hf, *data)
    hf.save_pretrained(tmp_path / "hf", max_shard_size="100KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").exists()
    ours = from_pretrained(tmp_path / "hf", dtype="float32")
    assert rel_err(jax_logits(ours, *data), ref, data[1]) < 1e-4
    # Our own sharded export: several files + index, and transformers reads it back.
    save_pretrained(ours, tmp_path / "ours", max_shard_size=60_000)
    index = json.load(open(tmp_path / "ours" / "model.safetensors.index.json"))
    assert len(set(index["weight_map"].values())) > 2
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours").eval()
    assert rel_err(hf_logits(back, *data), ref, data[1]) < 1e-5
    again = from_pretrained(tmp_path / "ours", dtype="float32")
    assert rel_err(jax_logits(again, *data), ref, data[1]) < 1e-4


def test_load_onto_mesh_places_each_tensor_on_its_sharding(hf_dirs, data):
    _, path, ref = hf_dirs["qwen3_tied"]
    devs = np.array(jax.devices()[:8]).reshape(2, 4)
    mesh = jax.sharding.Mesh(devs, ("fsdp", "tensor"))
    rules = {"vocab": "tensor", "embed": "fsdp", "heads": "tensor", "kv_heads": "tensor",
             "mlp": "tensor", "norm": None}
    model = from_pretrained(path, dtype="float32", mesh=mesh, rules=rules)
    q = model.layers[0].self_attn.q_proj.kernel
    assert q.get_value().sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    spec = model.embed_tokens.get_value().sharding.spec
    assert spec == jax.sharding.PartitionSpec("tensor", "fsdp")
    assert rel_err(jax_logits(model, *data), ref, data[1]) < 1e-4


def test_bfloat16_compute_keeps_float32_logits(hf_dirs, data):
    _, path, ref = hf_dirs["qwen3_tied"]
    model = from_pretrained(path)  # default: bfloat16 compute, float32 master weights
    assert model.embed_tokens.get_value().dtype == jnp.float32
    assert model.dtype == jnp.bfloat16
    out = jax_logits(model, *data)
    assert out.dtype == np.float32
    assert rel_err(out, ref, data[1]) < 5e-2


def test_params_carry_logical_axis_names():
    cfg = ModelConfig.from_hf(dict(architectures=["Qwen3ForCausalLM"], **BASE, head_dim=16))
    model = nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0)))
    allowed = {"vocab", "embed", "heads", "kv_heads", "mlp", "norm"}
    flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
    assert len(flat) == 3 + 2 * 11  # embed, lm_head, final norm; 11 per layer
    for path, var in flat:
        names = var.get_metadata()["out_sharding"]
        assert len(names) == var.get_value().ndim and set(names) <= allowed, path
    assert isinstance(model.layers, list) and len(model.layers) == 2
    k = model.layers[0].self_attn.k_proj.kernel
    assert k.get_value().shape == (64, 2 * 16) and k.get_metadata()["out_sharding"] == (
        "embed", "kv_heads")


# -- KV cache --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_model():
    cfg = ModelConfig.from_hf(dict(architectures=["Qwen3ForCausalLM"], **BASE, head_dim=16))
    return Decoder(cfg, rngs=nnx.Rngs(3))


def test_cached_decoding_matches_full_forward(small_model):
    """Prefill a left-padded prompt into the cache, then feed tokens one at a time."""
    m = small_model
    rng = np.random.default_rng(1)
    p_len, n_new, s = 9, 7, 20
    ids = jnp.asarray(rng.integers(0, V, (2, p_len + n_new)), jnp.int32)
    mask = jnp.ones((2, p_len + n_new), jnp.int32).at[1, :4].set(0)
    full = _forward(m, ids, mask)

    kv_mask = jnp.zeros((2, s), jnp.int32).at[:, :p_len + n_new].set(mask)
    pos = jnp.maximum(jnp.cumsum(mask, 1) - 1, 0)

    @nnx.jit
    def step(model, tok, p, kvm, cache, i):
        return model(tok, positions=p, attention_mask=kvm, cache=cache, cache_index=i)

    cache = m.init_cache(2, s)
    logits, cache = step(m, ids[:, :p_len], pos[:, :p_len], kv_mask, cache, jnp.int32(0))
    outs = [logits]
    for i in range(p_len, p_len + n_new):
        logits, cache = step(m, ids[:, i:i + 1], pos[:, i:i + 1], kv_mask, cache, jnp.int32(i))
        outs.append(logits)
    cached = jnp.concatenate(outs, axis=1)
    v = np.asarray(mask).astype(bool)
    assert rel_err(np.asarray(cached), np.asarray(full), v) < 1e-5
    # positions may be left out in the cached call: they are derived from the kv mask.
    l2, _ = nnx.jit(lambda m, c: m(ids[:, :p_len], attention_mask=kv_mask, cache=c,
                                    cache_index=0))(m, m.init_cache(2, s))
    assert rel_err(np.asarray(l2), np.asarray(full[:, :p_len]), v[:, :p_len]) < 1e-5


def test_hidden_states_and_unembedding_give_logits(small_model):
    ids = jnp.arange(24, dtype=jnp.int32).reshape(2, 12)
    h, w, logits = nnx.jit(lambda m: (m.hidden_states(ids), m.unembedding(), m(ids)))(small_model)
    assert h.shape == (2, 12, 64) and h.dtype == jnp.float32
    assert w.shape == (64, V)
    np.testing.assert_allclose(h @ w, logits, rtol=1e-5, atol=1e-5)


def test_remat_gives_same_values_and_grads(small_model):
    ids = jnp.arange(24, dtype=jnp.int32).reshape(2, 12) % V
    graphdef, state = nnx.split(small_model)
    g_remat = nnx.graphdef(Decoder(small_model.config.replace(remat=True), rngs=nnx.Rngs(0)))

    def loss(st, gd):
        return jnp.sum(nnx.merge(gd, st)(ids)[..., :5] ** 2)

    vg = jax.jit(jax.value_and_grad(loss), static_argnums=1)
    l1, g1 = vg(state, graphdef)
    l2, g2 = vg(state, g_remat)
    np.testing.assert_allclose(l1, l2, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("impl", ["blockwise", "dense"])
def test_other_attention_impls_match_einsum_attention(small_model, impl):
    """Values and parameter gradients vs the default (auto = dense at T <= chunk); chunk 7
    does not divide T = 20."""
    ids = jnp.arange(40, dtype=jnp.int32).reshape(2, 20) % V
    mask = jnp.ones((2, 20), jnp.int32).at[0, :6].set(0)
    graphdef, state = nnx.split(small_model)
    other = nnx.graphdef(Decoder(small_model.config.replace(
        attention_impl=impl, attention_chunk=7), rngs=nnx.Rngs(0)))

    @jax.jit
    def value_and_grad(st):
        def f(st, gd):
            logits = nnx.merge(gd, st)(ids, attention_mask=mask)
            return jnp.sum(jnp.where(mask[..., None] > 0, logits, 0.0) ** 2) * 1e-3, logits
        return (jax.value_and_grad(f, has_aux=True)(st, graphdef),
                jax.value_and_grad(f, has_aux=True)(st, other))

    ((_, ref), g_ref), ((_, out), g_out) = value_and_grad(state)
    v = np.asarray(mask).astype(bool)
    assert rel_err(np.asarray(out), np.asarray(ref), v) < 1e-5
    for a, b in zip(jax.tree.leaves(g_out), jax.tree.leaves(g_ref)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6 * float(jnp.abs(b).max()))


def test_export_copies_tokenizer_files(hf_dirs, tmp_path):
    _, path, _ = hf_dirs["qwen2_tied"]
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "tokenizer_config.json").write_text("{}")
    model = from_pretrained(path, dtype="float32")
    save_pretrained(model, tmp_path / "out", copy_files_from=tmp_path / "src", dtype="bfloat16")
    assert (tmp_path / "out" / "tokenizer_config.json").exists()
    assert json.load(open(tmp_path / "out" / "config.json"))["dtype"] == "bfloat16"
    back = from_pretrained(tmp_path / "out", dtype="float32")
    np.testing.assert_array_equal(  # stored as bf16: weights are the bf16 rounding of ours
        back.embed_tokens[...], model.embed_tokens[...].astype(jnp.bfloat16).astype(jnp.float32))


# -- errors ----------------------------------------------------------------------------

def _write_config(tmp_path, **kw):
    d = dict(architectures=["Qwen3ForCausalLM"], **BASE, head_dim=16)
    d.update(kw)
    (tmp_path / "config.json").write_text(json.dumps(d))
    return tmp_path


def test_missing_directory_and_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        from_pretrained(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="config.json"):
        from_pretrained(tmp_path)
    _write_config(tmp_path)
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        from_pretrained(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"model.norm.weight": "model-00001-of-00002.safetensors"}}))
    with pytest.raises(FileNotFoundError, match="model-00001-of-00002"):
        from_pretrained(tmp_path)


def test_unknown_architecture_and_rope_scaling_are_errors():
    base = dict(**BASE, head_dim=16)
    with pytest.raises(ValueError, match="MistralForCausalLM.*Qwen3ForCausalLM"):
        ModelConfig.from_hf(dict(architectures=["MistralForCausalLM"], **base))
    with pytest.raises(ValueError, match="model_type 'gpt2'"):
        ModelConfig.from_hf(dict(model_type="gpt2", **base))
    with pytest.raises(ValueError, match="rope scaling type 'yarn'.*supported"):
        ModelConfig.from_hf(dict(architectures=["Qwen3ForCausalLM"], **base,
                                 rope_scaling={"rope_type": "yarn", "factor": 4.0}))
    with pytest.raises(ValueError, match="sliding-window"):
        ModelConfig.from_hf(dict(architectures=["Qwen2ForCausalLM"], **base,
                                 use_sliding_window=True))


def test_wrong_dtype_names_are_errors(tmp_path):
    cfg = ModelConfig.from_hf(dict(architectures=["Qwen3ForCausalLM"], **BASE, head_dim=16))
    with pytest.raises(ValueError, match="unknown dtype name 'bf32'.*bfloat16"):
        Decoder(cfg, rngs=nnx.Rngs(0), dtype="bf32")
    with pytest.raises(ValueError, match="int32"):
        Decoder(cfg, rngs=nnx.Rngs(0), param_dtype=jnp.int32)
    _write_config(tmp_path)
    with pytest.raises(ValueError, match="'float63'"):
        from_pretrained(tmp_path, dtype="float63")


def test_config_round_trips_through_hf_dict():
    hf = transformers.Qwen3Config(**BASE, head_dim=16, tie_word_embeddings=True).to_dict()
    hf["architectures"] = ["Qwen3ForCausalLM"]
    cfg = ModelConfig.from_hf(hf)
    assert (cfg.family, cfg.head_dim, cfg.num_kv_heads, cfg.qk_norm, cfg.qkv_bias) == (
        "qwen3", 16, 2, True, False)
    assert ModelConfig.from_hf(cfg.to_hf()) == cfg
    q2 = ModelConfig.from_hf(dict(architectures=["Qwen2ForCausalLM"], **BASE))
    assert q2.qkv_bias and not q2.o_bias and not q2.qk_norm and q2.head_dim == 16


@pytest.mark.parametrize("rope", [
    dict(rope_type="default", rope_theta=1e6),
    dict(rope_type="linear", rope_theta=1e4, factor=4.0),
    dict(LLAMA3_ROPE),
])
def test_rope_frequencies_match_transformers(rope):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from espo_jax.models.layers import rope_inv_freq
    hf_cfg = transformers.LlamaConfig(**BASE, rope_parameters=dict(rope))
    hf_cfg.architectures = ["LlamaForCausalLM"]
    ours = rope_inv_freq(ModelConfig.from_hf(hf_cfg.to_dict()))
    if rope["rope_type"] == "default":
        theta, hd = rope["rope_theta"], BASE["hidden_size"] // BASE["num_attention_heads"]
        ref = 1.0 / theta ** (np.arange(0, hd, 2) / hd)
    else:
        ref, scale = ROPE_INIT_FUNCTIONS[rope["rope_type"]](hf_cfg, "cpu")
        assert scale == 1.0
        ref = ref.numpy()
    np.testing.assert_allclose(ours, ref, rtol=1e-6)
