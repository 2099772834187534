"""Mask-free attention: blockwise = dense = HF PyTorch, packed rows, exact gradients, linear
memory, the cuDNN length mapping and TPU splash (Pallas interpret mode) on CPU."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from espo_jax.models import (Decoder, ModelConfig, from_pretrained,  # noqa: E402
                             positions_from_segment_ids)
from espo_jax.models import attention as attn  # noqa: E402

V = 300
BASE = dict(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            max_position_embeddings=512, rms_norm_eps=1e-6, tie_word_embeddings=False)
BLOCK = 16  # T = 45 below is not a multiple of it


def rel_err(a, b, valid):
    v = np.asarray(valid).astype(bool)
    return float(np.abs(np.asarray(a) - np.asarray(b))[v].max() / np.abs(np.asarray(b)[v]).max())


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    cfg = transformers.Qwen3Config(**BASE)
    torch.manual_seed(0)
    model = transformers.Qwen3ForCausalLM(cfg).eval()
    with torch.no_grad():  # perturb everything (HF inits norms to 1)
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    path = tmp_path_factory.mktemp("qwen3")
    model.save_pretrained(path)
    return model, str(path)


def load(path, impl):
    return from_pretrained(path, dtype="float32", attention_impl=impl, attention_chunk=BLOCK)


@nnx.jit
def _logits_mask(model, ids, mask):
    return model(ids, attention_mask=mask)


@nnx.jit
def _logits_packed(model, ids, seg):
    return model(ids, segment_ids=seg)


def test_blockwise_and_dense_match_hf_with_left_padding(hf_dir):
    hf, path = hf_dir
    b, t = 3, 45
    rng = np.random.default_rng(0)
    ids = rng.integers(0, V, (b, t)).astype(np.int32)
    mask = np.ones((b, t), np.int32)
    mask[1, :19] = 0  # more than one whole block of padding
    mask[2, :3] = 0
    ids[mask == 0] = 0
    pos = np.maximum(np.cumsum(mask, 1) - 1, 0)
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids, dtype=torch.long),
                 attention_mask=torch.tensor(mask, dtype=torch.long),
                 position_ids=torch.tensor(pos, dtype=torch.long)).logits.float().numpy()
    outs = {}
    for impl in ("dense", "blockwise"):
        out = np.asarray(_logits_mask(load(path, impl), jnp.asarray(ids), jnp.asarray(mask)))
        assert np.isfinite(out).all(), impl  # padding rows too
        assert rel_err(out, ref, mask) < 1e-4, impl
        outs[impl] = out
    assert rel_err(outs["blockwise"], outs["dense"], mask) < 1e-5


def _packed_batch(rng):
    """Two rows of 48 tokens: [13, 20, 9 | 6 pad] and [3 pad | 30, 15]; the sequences."""
    t = 48
    layout = [[(1, 13), (2, 20), (3, 9), (0, 6)], [(0, 3), (7, 30), (8, 15)]]
    ids = np.zeros((2, t), np.int32)
    seg = np.zeros((2, t), np.int32)
    seqs = []
    for r, row in enumerate(layout):
        i = 0
        for sid, n in row:
            if sid:
                toks = rng.integers(0, V, n).astype(np.int32)
                ids[r, i:i + n] = toks
                seqs.append((r, i, toks))
            seg[r, i:i + n] = sid
            i += n
    return ids, seg, seqs


def test_packed_rows_give_each_sequence_its_unpacked_logits(hf_dir):
    """Reference: each sequence alone in its own left-padded row (= HF, test above)."""
    _, path = hf_dir
    ids, seg, seqs = _packed_batch(np.random.default_rng(1))
    n = max(len(s) for _, _, s in seqs)
    alone_ids = np.zeros((len(seqs), n), np.int32)
    alone_mask = np.zeros((len(seqs), n), np.int32)
    for i, (_, _, toks) in enumerate(seqs):
        alone_ids[i, n - len(toks):], alone_mask[i, n - len(toks):] = toks, 1
    ref = np.asarray(_logits_mask(load(path, "dense"), jnp.asarray(alone_ids),
                                  jnp.asarray(alone_mask)))
    for impl in ("dense", "blockwise"):
        packed = np.asarray(_logits_packed(load(path, impl), jnp.asarray(ids), jnp.asarray(seg)))
        assert np.isfinite(packed).all()
        for i, (r, start, toks) in enumerate(seqs):
            alone = ref[i, n - len(toks):]
            np.testing.assert_allclose(packed[r, start:start + len(toks)], alone, rtol=1e-5,
                                       atol=1e-5 * np.abs(alone).max(), err_msg=impl)


def test_positions_from_segment_ids():
    seg = jnp.asarray([[1, 1, 1, 2, 2, 0, 0], [0, 0, 5, 5, 5, 5, 9]])
    np.testing.assert_array_equal(positions_from_segment_ids(seg),
                                  [[0, 1, 2, 0, 1, 0, 0], [0, 0, 0, 1, 2, 3, 0]])


def test_blockwise_gradients_match_dense():
    """Parameter gradients through the whole model, packed rows + padding, float32."""
    cfg = ModelConfig.from_hf(dict(architectures=["Qwen3ForCausalLM"],
                                   **{**BASE, "num_hidden_layers": 1}))
    ids, seg, _ = _packed_batch(np.random.default_rng(2))
    ids, seg = jnp.asarray(ids), jnp.asarray(seg)
    model = Decoder(cfg.replace(attention_impl="dense"), rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    g_block = nnx.graphdef(Decoder(cfg.replace(attention_impl="blockwise", attention_chunk=BLOCK),
                                   rngs=nnx.Rngs(0)))
    w = jnp.asarray(np.random.default_rng(3).normal(size=(V,)), jnp.float32)

    @jax.jit
    def grads(st):
        def f(st, gd):
            logits = nnx.merge(gd, st)(ids, segment_ids=seg)
            return jnp.sum(jnp.where(seg[..., None] > 0, jax.nn.log_softmax(logits) * w, 0.0))
        return jax.grad(f)(st, graphdef), jax.grad(f)(st, g_block)

    g_ref, g_out = grads(state)
    for a, b in zip(jax.tree.leaves(g_out), jax.tree.leaves(g_ref)):
        assert np.isfinite(np.asarray(a)).all()
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(jnp.abs(b).max()))


def _qkv(rng, b, t, h, k, hd, dtype=jnp.float32):
    def n(*s):
        return jnp.asarray(rng.normal(size=s), dtype)
    return n(b, t, h, hd), n(b, t, k, hd), n(b, t, k, hd)


def test_blockwise_kernel_gradients_and_all_padding_rows():
    """q/k/v gradients vs dense; a row of only padding stays finite (values and grads)."""
    rng = np.random.default_rng(4)
    q, k, v = _qkv(rng, 3, 37, 4, 2, 8)
    seg = np.ones((3, 37), np.int32)
    seg[0, :11] = 0
    seg[1, :5], seg[1, 5:20], seg[1, 20:33], seg[1, 33:] = 1, 2, 3, 0
    seg[2] = 0
    seg = jnp.asarray(seg)
    wt = jnp.asarray(rng.normal(size=(37, 4, 8)), jnp.float32)

    def loss(fn):
        return lambda q, k, v: jnp.sum(jnp.where(seg[..., None, None] > 0, fn(q, k, v), 0) * wt)

    dense = jax.jit(jax.grad(loss(lambda q, k, v: attn.dense_attention(q, k, v, seg, seg)),
                             (0, 1, 2)))
    for block in (8,):
        out = attn.blockwise_attention(q, k, v, seg, seg, block=block)
        assert np.isfinite(np.asarray(out)).all()
        assert rel_err(out, attn.dense_attention(q, k, v, seg, seg), seg > 0) < 1e-6
        blk = jax.grad(loss(lambda q, k, v: attn.blockwise_attention(q, k, v, seg, seg,
                                                                     block=block)), (0, 1, 2))
        for a, b in zip(jax.jit(blk)(q, k, v), dense(q, k, v)):
            assert np.isfinite(np.asarray(a)).all()
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * float(jnp.abs(b).max()))


def test_blockwise_skips_masked_tiles():
    """Tile plan: causal, padding-only query tiles see only their diagonal tile, and tiles
    of different packed segments are skipped."""
    seg = np.zeros((1, 64), np.int32)
    seg[0, 16:32] = 1  # tile 0 = padding, tile 1 = segment 1, tiles 2-3 = segment 2
    seg[0, 32:] = 2
    need = np.asarray(attn._block_need(jnp.asarray(seg), jnp.asarray(seg), 16, 16))
    np.testing.assert_array_equal(need, [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 1]])


def _temp_bytes(fn, *args):
    return jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes


def test_blockwise_memory_is_linear_in_length_dense_is_quadratic():
    """Compiled temporaries of value-and-grad at T = 1k and 4k (nothing is run)."""
    ratios = {}
    for impl in ("dense", "blockwise"):
        temp = []
        for t in (1024, 4096):
            spec = jax.ShapeDtypeStruct((1, t, 2, 16), jnp.float32)
            kspec = jax.ShapeDtypeStruct((1, t, 1, 16), jnp.float32)
            seg = jnp.ones((1, t), jnp.int32)

            def f(q, k, v, seg=seg, impl=impl):
                return jnp.sum(attn.attend(q, k, v, seg, seg, impl=impl, block=128) ** 2)
            temp.append(_temp_bytes(jax.grad(f, (0, 1, 2)), spec, kspec, kspec))
        ratios[impl] = temp[1] / temp[0]
    # 4x the length: linear ~4x (allow 6), quadratic ~16x.
    assert ratios["blockwise"] < 6, ratios
    assert ratios["dense"] > 12, ratios


def test_blockwise_stays_batch_parallel_on_an_fsdp_mesh():
    """Rows sharded over 8 devices: value-and-grad compiles without gathering activations;
    the one collective is the all-reduce of the tiny bool tile plan."""
    mesh = jax.make_mesh((8,), ("fsdp",), axis_types=(jax.sharding.AxisType.Auto,))
    sh = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("fsdp"))
    q = jax.ShapeDtypeStruct((8, 512, 4, 16), jnp.float32, sharding=sh)
    k = jax.ShapeDtypeStruct((8, 512, 2, 16), jnp.float32, sharding=sh)
    seg = jax.ShapeDtypeStruct((8, 512), jnp.int32, sharding=sh)

    def f(q, k, v, seg):
        return jnp.sum(attn.blockwise_attention(q, k, v, seg, seg, block=128) ** 2)
    with jax.set_mesh(mesh):
        hlo = jax.jit(jax.grad(f, (0, 1, 2))).lower(q, k, k, seg).compile().as_text()
    collectives = [ln for ln in hlo.splitlines()
                   if any(f"{op}(" in ln or f"{op}-start(" in ln
                          for op in ("all-gather", "all-reduce", "all-to-all",
                                     "collective-permute", "reduce-scatter"))]
    assert len(collectives) == 1 and "pred[4,4]" in collectives[0], collectives


def test_cudnn_length_mapping_on_cpu():
    """The rotation + lengths mapping of the cuDNN path (run with the XLA implementation of
    the same public API) equals dense attention on left- and right-padded rows."""
    rng = np.random.default_rng(5)
    q, k, v = _qkv(rng, 3, 21, 4, 2, 8)
    seg = np.ones((3, 21), np.int32)
    seg[0, :6] = 0
    seg[1, 15:] = 0
    seg[2, :2], seg[2, 19:] = 0, 0
    seg = jnp.asarray(seg)
    out = jax.jit(lambda q, k, v: attn.cudnn_attention(q, k, v, seg, implementation="xla"))(
        q, k, v)
    assert np.isfinite(np.asarray(out)).all()
    assert rel_err(out, attn.dense_attention(q, k, v, seg, seg), seg > 0) < 1e-6


def test_splash_attention_in_interpret_mode_on_a_mesh():
    """TPU splash kernel (Pallas interpret mode) inside shard_map: rows over fsdp, heads
    over tensor, as under the product's (Auto-axes) mesh."""
    rng = np.random.default_rng(6)
    q, k, v = _qkv(rng, 2, 200, 2, 2, 128)
    seg = np.ones((2, 200), np.int32)
    seg[0, :30], seg[1, 100:] = 0, 2
    seg = jnp.asarray(seg)
    mesh = jax.make_mesh((2, 2), ("fsdp", "tensor"),
                         axis_types=(jax.sharding.AxisType.Auto,) * 2)
    fn = jax.jit(lambda q, k, v, s: attn.splash_attention(q, k, v, s, block=128,
                                                          interpret=True))
    with jax.set_mesh(mesh):
        out = fn(q, k, v, seg)
    assert np.isfinite(np.asarray(out)).all()
    assert rel_err(out, attn.dense_attention(q, k, v, seg, seg), seg > 0) < 1e-5


def test_impl_resolution_and_errors():
    kw = dict(block=512, dtype=jnp.float32, head_dim=128, packed=False)
    if jax.default_backend() == "cpu":
        assert attn.resolve_impl("auto", seq_len=512, **kw) == "dense"
        assert attn.resolve_impl("auto", seq_len=513, **kw) == "blockwise"
    with pytest.raises(ValueError, match="attention_impl must be one of.*'flash'"):
        attn.resolve_impl("flash", seq_len=8, **kw)
    with pytest.raises(ValueError, match="cudnn.*packed"):
        attn.resolve_impl("cudnn", seq_len=8, **{**kw, "packed": True})
    with pytest.raises(ValueError, match="cudnn.*bfloat16"):
        attn.resolve_impl("cudnn", seq_len=8, **kw)
    with pytest.raises(ValueError, match="attention_impl must be one of"):
        ModelConfig.from_hf(dict(architectures=["Qwen3ForCausalLM"], **BASE),
                            attention_impl="xla")
    cfg = ModelConfig.from_hf(dict(architectures=["Qwen3ForCausalLM"], **BASE))
    model = Decoder(cfg, rngs=nnx.Rngs(0))
    ids = jnp.zeros((1, 4), jnp.int32)
    with pytest.raises(ValueError, match="segment_ids"):
        model(ids, attention_mask=jnp.ones((1, 4)), segment_ids=jnp.ones((1, 4), jnp.int32))


def test_scanned_layers_match_the_loop_and_hf(hf_dir):
    """scan_layers (with and without remat, both policies) = the Python loop: logits and
    parameter gradients; the scanned model still loads HF weights and matches PyTorch."""
    hf, path = hf_dir
    rng = np.random.default_rng(7)
    ids = jnp.asarray(rng.integers(0, V, (2, 21)), jnp.int32)
    mask = jnp.ones((2, 21), jnp.int32).at[1, :5].set(0)
    looped = load(path, "dense")
    graphdef, state = nnx.split(looped)
    variants = [looped.config.replace(scan_layers=True, remat=True),
                looped.config.replace(scan_layers=True, remat=True, remat_policy="matmuls")]
    gds = [graphdef] + [nnx.graphdef(nnx.eval_shape(lambda c=c: Decoder(c, rngs=nnx.Rngs(0))))
                        for c in variants]

    @jax.jit
    def run(st):
        def f(st, gd):
            logits = nnx.merge(gd, st)(ids, attention_mask=mask)
            return jnp.sum(jnp.where(mask[..., None] > 0, jax.nn.log_softmax(logits), 0.0)
                           * jnp.arange(V) / V), logits
        return [jax.value_and_grad(f, has_aux=True)(st, gd) for gd in gds]

    outs = run(state)
    (_, ref), g_ref = outs[0]
    for (_, out), g in outs[1:]:
        assert rel_err(out, ref, mask) < 1e-6
        for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * float(jnp.abs(b).max()))
    pos = np.maximum(np.cumsum(np.asarray(mask), 1) - 1, 0)
    with torch.no_grad():
        hf_ref = hf(input_ids=torch.tensor(np.asarray(ids), dtype=torch.long),
                    attention_mask=torch.tensor(np.asarray(mask), dtype=torch.long),
                    position_ids=torch.tensor(pos, dtype=torch.long)).logits.float().numpy()
    scanned = from_pretrained(path, dtype="float32", scan_layers=True)
    assert isinstance(scanned.layers, list)  # same parameter tree as the loop (HF export)
    assert rel_err(_logits_mask(scanned, ids, mask), hf_ref, mask) < 1e-4
