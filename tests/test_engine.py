"""Continuous-batching rollout engine (generate(max_concurrent=K)): greedy parity with
Hugging Face generate per prompt, the same sampled responses for every K (and the static
batch), log-probs equal teacher-forced ones, stop tokens, per-prompt budgets, an empty
queue (K > B), one prompt, chunked prefill and multi-block ragged attention.

Small prefill chunks and kv blocks (8) make the 17-token prompt take 3 prefill chunks and
the attention loop run over several blocks. Each (B, K, sampling flags) is one compile.
Decode steps read these small caches whole (``EngineOptions.decode_read``); one test reads
them block by block instead, as a long cache is.
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from _hf_reference import PROMPTS, tiny_qwen3
from espo_jax.models import from_pretrained
from espo_jax.rollout import engine, generate

VOCAB = 97
PAD = 0
N = 12
SMALL = dict(prefill_chunk=8, kv_block=8)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return tiny_qwen3(tmp_path_factory.mktemp("qwen3_tiny_engine"), vocab=VOCAB, pad=PAD)


def hf_greedy_one(hf, prompt, max_new_tokens, eos_id):
    """HF generate on ONE prompt (no padding at all): its new tokens, up to the stop."""
    with torch.inference_mode():
        out = hf.generate(input_ids=torch.tensor([prompt]), do_sample=False,
                          max_new_tokens=max_new_tokens, pad_token_id=PAD, eos_token_id=eos_id)
    return out[0, len(prompt):].tolist()


def test_greedy_continuous_batching_equals_hf_per_prompt(models):
    hf, model, _ = models
    free = [hf_greedy_one(hf, p, N, None) for p in PROMPTS]
    eos = free[0][3]  # a stop token that occurs mid-sequence in some rows
    budgets = [N, 5, N, 9]
    ro = generate(model, PROMPTS, max_new_tokens=budgets, temperature=0.0,
                  key=jax.random.key(0), eos_id=eos, max_concurrent=3, **SMALL)
    tokens, mask = np.asarray(ro.tokens), np.asarray(ro.mask)
    assert tokens.shape == (4, N) and ro.tokens.dtype == jnp.int32
    for i, p in enumerate(PROMPTS):
        ref = hf_greedy_one(hf, p, budgets[i], eos)
        assert int(ro.lengths[i]) == len(ref) <= budgets[i]
        assert tokens[i, :len(ref)].tolist() == ref
        assert (tokens[i, len(ref):] == PAD).all()
        np.testing.assert_array_equal(mask[i], np.arange(N) < len(ref))
    assert any(int(ro.lengths[i]) < budgets[i] for i in range(4))  # the stop token acted
    assert int(ro.lengths[1]) == 5  # the per-prompt budget acted
    # Prompts come back left-padded as from the static sampler.
    for row, p in zip(np.asarray(ro.prompt_tokens), PROMPTS):
        assert row[-len(p):].tolist() == p and (row[:-len(p)] == PAD).all()
    assert (np.asarray(ro.logprobs)[mask == 0] == 0).all()


@pytest.fixture(scope="module")
def sampled(models):
    """The same sampled rollout from the static batch and K = 1, 3, 16; and K = 8 with 3
    packed prompt tokens per light mixed step (two mixed-step budgets: 8 and 3)."""
    _, model, _ = models
    kw = dict(max_new_tokens=N, temperature=0.7, key=jax.random.key(3), eos_id=[1, 2, 3],
              num_samples=3)
    out = {k: generate(model, PROMPTS, max_concurrent=k, **SMALL, **kw)
           for k in (None, 1, 3, 16)}
    out["8p3"] = generate(model, PROMPTS, max_concurrent=8, prefill_tokens=3, **SMALL, **kw)
    return out


def test_sampled_responses_identical_for_every_k(sampled):
    ref = sampled[None]
    lengths = np.asarray(ref.lengths)
    assert lengths.min() < N and lengths.max() == N  # ragged: stops and full-length rows
    assert len(set(map(tuple, np.asarray(ref.tokens).tolist()))) > 6  # draws differ
    for k in (1, 3, 16, "8p3"):
        got = sampled[k]
        np.testing.assert_array_equal(np.asarray(got.tokens), np.asarray(ref.tokens))
        np.testing.assert_array_equal(np.asarray(got.lengths), lengths)
        np.testing.assert_array_equal(np.asarray(got.mask), np.asarray(ref.mask))
        np.testing.assert_allclose(np.asarray(got.logprobs), np.asarray(ref.logprobs),
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("k", [None, 3])
def test_split_calls_with_first_row_give_the_one_call_responses(models, sampled, k):
    """A rollout split into calls over consecutive slices of the prompts, each passing its
    first row (``first_row`` = the slice's start x num_samples), gives the responses of one
    call: static batch and engine. A slice without it draws other responses."""
    _, model, _ = models
    kw = dict(max_new_tokens=N, temperature=0.7, key=jax.random.key(3), eos_id=[1, 2, 3],
              num_samples=3, max_concurrent=k, **SMALL)
    ref = sampled[None]
    parts = [generate(model, PROMPTS[i:i + 2], first_row=3 * i, **kw) for i in (0, 2)]
    for name in ("tokens", "lengths", "mask"):
        np.testing.assert_array_equal(
            np.concatenate([np.asarray(getattr(p, name)) for p in parts]),
            np.asarray(getattr(ref, name)), err_msg=name)
    np.testing.assert_allclose(np.concatenate([np.asarray(p.logprobs) for p in parts]),
                               np.asarray(ref.logprobs), rtol=1e-5, atol=1e-5)
    alone = generate(model, PROMPTS[2:], **kw)  # first_row 0: rows 0-5's keys
    assert not np.array_equal(np.asarray(alone.tokens), np.asarray(ref.tokens)[6:])


def test_block_by_block_decode_same_responses(models, sampled, monkeypatch):
    """Decode attention over a cache longer than ``decode_read`` (the paper's 16k): one
    block per loop iteration, stopping at the longest live row. Same tokens for K = 3 and
    16 as the static batch (every drain size and mixed step runs it)."""
    _, model, _ = models
    jit, seen = engine.engine_jit, []

    def spy(graphdef, options, *args):
        seen.append(options.decode_read)
        return jit(graphdef, options, *args)
    monkeypatch.setattr(engine, "engine_jit", spy)
    kw = dict(max_new_tokens=N, temperature=0.7, key=jax.random.key(3), eos_id=[1, 2, 3],
              num_samples=3, decode_read=SMALL["kv_block"])
    ref = sampled[None]
    for k in (3, 16):
        got = generate(model, PROMPTS, max_concurrent=k, **SMALL, **kw)
        np.testing.assert_array_equal(np.asarray(got.tokens), np.asarray(ref.tokens))
        np.testing.assert_array_equal(np.asarray(got.lengths), np.asarray(ref.lengths))
        np.testing.assert_allclose(np.asarray(got.logprobs), np.asarray(ref.logprobs),
                                   rtol=1e-5, atol=1e-5)
    assert seen == [SMALL["kv_block"]] * 2


def test_engine_logprobs_equal_teacher_forced(models, sampled):
    _, model, _ = models
    ro = sampled[3]
    ids = jnp.concatenate([ro.prompt_tokens, ro.tokens], axis=1)
    mask = jnp.concatenate([ro.prompt_mask, ro.mask.astype(jnp.int32)], axis=1)
    logits = nnx.jit(lambda m, i, a: m(i, attention_mask=a))(model, ids, mask)
    plen = ro.prompt_tokens.shape[1]
    logp = jax.nn.log_softmax(logits[:, plen - 1:-1] / 0.7, axis=-1)
    ref = jnp.take_along_axis(logp, ro.tokens[..., None], axis=-1)[..., 0]
    m = np.asarray(ro.mask)
    np.testing.assert_allclose(np.asarray(ro.logprobs), np.asarray(ref) * m, rtol=1e-4,
                               atol=1e-4)
    assert (np.asarray(ro.logprobs) <= 0).all()


def test_one_prompt_and_first_token_stop(models):
    hf, model, _ = models
    p = PROMPTS[3]  # 17 tokens: three prefill chunks of 8
    ref = hf_greedy_one(hf, p, N, None)
    unused = next(t for t in range(1, VOCAB) if t not in ref)  # same stop-list shape: 1 compile
    ro = generate(model, [p], max_new_tokens=N, temperature=0.0, key=jax.random.key(0),
                  eos_id=unused, max_concurrent=4, **SMALL)
    assert np.asarray(ro.tokens)[0].tolist() == ref and int(ro.lengths[0]) == N
    # The first token is a stop token: the row ends in its prefill step (length 1).
    ro = generate(model, [p], max_new_tokens=N, temperature=0.0, key=jax.random.key(0),
                  eos_id=ref[0], max_concurrent=4, **SMALL)
    assert int(ro.lengths[0]) == 1
    assert np.asarray(ro.tokens)[0].tolist() == ref[:1] + [PAD] * (N - 1)


def test_engine_bad_input(models):
    _, model, _ = models
    kw = dict(temperature=1.0, key=jax.random.key(0), eos_id=None)
    with pytest.raises(ValueError, match="max_concurrent"):
        generate(model, [[1]], max_new_tokens=4, max_concurrent=0, **kw)
    with pytest.raises(ValueError, match="prefill_chunk"):
        generate(model, [[1]], max_new_tokens=4, max_concurrent=2, prefill_chunk=6, **kw)
    for bad in (0, True, 2.0):
        with pytest.raises(ValueError, match="decode_read must be None"):
            generate(model, [[1]], max_new_tokens=4, max_concurrent=2, decode_read=bad, **kw)
    with pytest.raises(ValueError, match="one per prompt"):
        generate(model, [[1], [2]], max_new_tokens=[4], max_concurrent=2, **kw)
    with pytest.raises(ValueError, match=r"max_new_tokens must be >= 1"):
        generate(model, [[1], [2]], max_new_tokens=[4, 0], max_concurrent=2, **kw)
    with pytest.raises(ValueError, match=r"prompt 1 has 2 tokens \+ max_new_tokens=63"):
        generate(model, [[1], [2, 3]], max_new_tokens=[4, 63], max_concurrent=2, **kw)
    for bad in (-1, True, 2**30, 1.0):
        with pytest.raises(ValueError, match="first_row must be an int"):
            generate(model, [[1]], max_new_tokens=4, first_row=bad, **kw)


def test_drain_sizes():
    assert engine.default_decode_sizes(16) == (16, 8, 4, 2)
    assert engine.default_decode_sizes(12) == (12, 6, 3, 2)
    assert engine.default_decode_sizes(8) == (8, 4, 2)
    assert engine.default_decode_sizes(4) == (4,)
    assert engine.default_decode_sizes(3) == (3,)
    assert engine.default_decode_sizes(1) == (1,)


def test_cache_geometry():
    """A cache the decode steps read whole is rounded to SHORT_BLOCK (every position is
    read every step), a longer one or a paged one to the kv block."""
    opts = engine.EngineOptions(max_new_tokens=128, max_concurrent=16, prefill_chunk=512,
                                kv_block=256, decode_sizes=(16,))
    assert engine.SHORT_BLOCK == 64
    assert engine.cache_geometry(32, opts) == (64, 192)
    assert engine.cache_geometry(32, dataclasses.replace(opts, kv_block=8)) == (8, 160)
    assert engine.cache_geometry(32, dataclasses.replace(opts, decode_read=128)) == (256, 256)
    assert engine.cache_geometry(
        32, dataclasses.replace(opts, attention="ragged_paged_xla")) == (256, 256)
    long = dataclasses.replace(opts, max_new_tokens=16384)
    assert engine.cache_geometry(512, long) == (256, 16896)


def test_short_cache_block_same_responses(models):
    """The default kv block on a short cache (generate caps it at 128 here): read whole in
    SHORT_BLOCK blocks; the static batch's tokens."""
    _, model, _ = models
    kw = dict(max_new_tokens=40, temperature=0.7, key=jax.random.key(3), eos_id=[1, 2, 3],
              num_samples=2)
    seen = {}

    def engine_fn(graphdef, options, state, prompts, *rest):
        seen["opts"], seen["geometry"] = options, engine.cache_geometry(prompts.shape[1],
                                                                         options)
        return engine.engine_jit(graphdef, options, state, prompts, *rest)

    got = generate(model, PROMPTS, max_concurrent=3, prefill_chunk=8, engine_fn=engine_fn,
                   **kw)
    assert seen["opts"].kv_block > engine.SHORT_BLOCK
    assert seen["geometry"][0] == engine.SHORT_BLOCK
    ref = generate(model, PROMPTS, **kw)
    np.testing.assert_array_equal(np.asarray(got.tokens), np.asarray(ref.tokens))
    np.testing.assert_allclose(np.asarray(got.logprobs), np.asarray(ref.logprobs),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["gumbel", "inverse_cdf"])
def test_sample_rows_distribution(method):
    """Two-level Gumbel-max and inverse CDF: frequencies match the probabilities (across
    block boundaries, V = 600 > 256, one whole block at probability 0), zero-probability
    tokens are never drawn, and the log-prob is that of the drawn token."""
    from espo_jax.rollout.sampling import sample_rows

    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.full(600, 0.3))
    probs[probs < 1e-3] = 0.0
    probs[256:512] = 0.0  # the second block of 256: all -inf logits
    probs /= probs.sum()
    n = 10000
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(0), i))(jnp.arange(n))
    logits = jnp.log(jnp.asarray(np.tile(probs, (n, 1)), jnp.float32))
    tok, logp = jax.jit(lambda x, k: sample_rows(x, k, 1.0, method=method))(logits, keys)
    tok = np.asarray(tok)
    freq = np.bincount(tok, minlength=600) / n
    assert freq[probs == 0].sum() == 0
    # 5 binomial standard deviations per token
    assert (np.abs(freq - probs) <= 5 * np.sqrt(probs * (1 - probs) / n) + 1e-12).all()
    np.testing.assert_allclose(np.asarray(logp), np.log(probs[tok]), rtol=1e-5, atol=1e-6)


def test_sharded_decode_weights_same_tokens(models, sampled):
    """An FSDP x TP model on 8 CPU devices: decode_model gathers the FSDP splits once
    (TP splits stay) and the engine samples the same tokens as on one device."""
    from jax.sharding import PartitionSpec as P

    from espo_jax.rollout.engine_sharding import decode_model
    from espo_jax.train.mesh import make_mesh

    _, _, path = models
    mesh = make_mesh(dict(data=1, fsdp=4, tensor=2))
    sharded = from_pretrained(path, dtype=jnp.float32, mesh=mesh)
    q = sharded.layers[0].self_attn.q_proj.kernel[...]
    assert q.sharding.spec == P("fsdp", "tensor")
    dec = decode_model(sharded)
    for leaf in jax.tree.leaves(nnx.state(dec)):
        assert "fsdp" not in str(leaf.sharding.spec)
    assert dec.layers[0].self_attn.q_proj.kernel[...].sharding.spec == P(None, "tensor")
    ro = generate(dec, PROMPTS, max_new_tokens=N, temperature=0.7, key=jax.random.key(3),
                  eos_id=[1, 2, 3], num_samples=3, max_concurrent=3, **SMALL)
    np.testing.assert_array_equal(np.asarray(ro.tokens), np.asarray(sampled[3].tokens))
    np.testing.assert_allclose(np.asarray(ro.logprobs), np.asarray(sampled[3].logprobs),
                               rtol=1e-5, atol=1e-5)
    # One engine per batch shard (data x fsdp = 4 shards of 3 rows): the same tokens.
    from espo_jax.rollout.engine_sharding import sharded_engine_fn

    ro = generate(dec, PROMPTS, max_new_tokens=N, temperature=0.7, key=jax.random.key(3),
                  eos_id=[1, 2, 3], num_samples=3, max_concurrent=3, **SMALL,
                  engine_fn=sharded_engine_fn(make_mesh(dict(data=2, fsdp=2, tensor=2))))
    assert ro.tokens.sharding.spec == P(("data", "fsdp"))
    np.testing.assert_array_equal(np.asarray(ro.tokens), np.asarray(sampled[3].tokens))
    np.testing.assert_allclose(np.asarray(ro.logprobs), np.asarray(sampled[3].logprobs),
                               rtol=1e-5, atol=1e-5)
    # A later slice of the rollout (prompts 2, 3 from row 6; 12 rows, so the shards
    # split them): the shards' keys follow first_row.
    ro = generate(dec, PROMPTS[2:] * 2, max_new_tokens=N, temperature=0.7,
                  key=jax.random.key(3), eos_id=[1, 2, 3], num_samples=3, max_concurrent=3,
                  **SMALL, first_row=6,
                  engine_fn=sharded_engine_fn(make_mesh(dict(data=2, fsdp=2, tensor=2))))
    assert ro.tokens.sharding.spec == P(("data", "fsdp"))
    np.testing.assert_array_equal(np.asarray(ro.tokens)[:6], np.asarray(sampled[3].tokens)[6:])
    # Cached per (mesh, axes): the training rollout and evaluation share one compiled program.
    mesh = make_mesh(dict(data=2, fsdp=2, tensor=2))
    assert sharded_engine_fn(mesh) is sharded_engine_fn(make_mesh(dict(data=2, fsdp=2, tensor=2)))
    # compute dtype copy: a bf16-compute model with f32 masters gets bf16 decode weights
    bf = decode_model(from_pretrained(path, dtype=jnp.bfloat16))
    assert all(leaf.dtype == jnp.bfloat16 for leaf in jax.tree.leaves(nnx.state(bf, nnx.Param)))


def test_bf16_engine_same_tokens_for_every_k_and_logprobs_near_f32(models, sampled):
    """The paper's precision: a bf16-compute model (f32 masters, ``decode_model``'s bf16
    copy, bf16 KV cache). The engine gives the same responses for K = 1, 3, 16 and with
    3-token mixed steps (per-row keys; a row's arithmetic does not depend on its slot,
    its neighbours or the step it is prefilled in: one prefill key block for every step
    size, two rows at least per forward), log-probs equal to f32 rounding (a prefill block
    that followed the step size put them up to 0.03 apart). The static
    batch computes attention differently (left-padded dense), so in bf16 its rounding can
    flip a near-tied draw: most rows agree, not all. The engine's log-probs of its bf16
    tokens, scored teacher-forced by the f32 model, agree to bf16 precision."""
    from espo_jax.rollout.engine_sharding import decode_model

    _, model32, path = models
    dec = decode_model(from_pretrained(path, dtype=jnp.bfloat16))
    kw = dict(max_new_tokens=N, temperature=0.7, key=jax.random.key(3), eos_id=[1, 2, 3],
              num_samples=3, **SMALL)
    ros = {k: generate(dec, PROMPTS, max_concurrent=k, **kw) for k in (None, 1, 3, 16)}
    ros["8p3"] = generate(dec, PROMPTS, max_concurrent=8, prefill_tokens=3, **kw)
    ref = ros[3]
    for k in (1, 16, "8p3"):
        np.testing.assert_array_equal(np.asarray(ros[k].tokens), np.asarray(ref.tokens))
        np.testing.assert_array_equal(np.asarray(ros[k].lengths), np.asarray(ref.lengths))
        np.testing.assert_allclose(np.asarray(ros[k].logprobs), np.asarray(ref.logprobs),
                                   rtol=1e-5, atol=1e-5)
    rows_same = lambda a, b: (np.asarray(a.tokens) == np.asarray(b.tokens)).all(axis=1)
    assert rows_same(ros[None], ref).mean() >= 0.75
    assert rows_same(sampled[3], ref).mean() >= 0.5  # bf16 follows the f32 rollout
    ids = jnp.concatenate([ref.prompt_tokens, ref.tokens], axis=1)
    mask = jnp.concatenate([ref.prompt_mask, ref.mask.astype(jnp.int32)], axis=1)
    logits = nnx.jit(lambda m, i, a: m(i, attention_mask=a))(model32, ids, mask)
    plen = ref.prompt_tokens.shape[1]
    logp = jax.nn.log_softmax(logits[:, plen - 1:-1] / 0.7, axis=-1)
    f32 = np.asarray(jnp.take_along_axis(logp, ref.tokens[..., None], axis=-1)[..., 0])
    m = np.asarray(ref.mask).astype(bool)
    err = np.abs(np.asarray(ref.logprobs) - f32)[m]
    assert np.asarray(ref.logprobs).dtype == np.float32
    assert err.max() < 0.25 and err.mean() < 0.05, (err.max(), err.mean())
    assert err.mean() > 1e-4  # bf16 really ran (the f32 engine matches to ~1e-6)
