"""generate(): greedy parity with Hugging Face generate (torch CPU), log-probs equal
teacher-forced log-probs, stop tokens, seeds, num_samples grouping, edge cases, no retrace.

One tiny random Qwen3 (module fixture); each distinct (B, P bucket, N, static flags) is
one compile, so the tests share shapes where they can.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from _hf_reference import PROMPTS, tiny_qwen3
from espo_jax.models import from_pretrained
from espo_jax.rollout import Rollout, bucket_length, decode_jit, generate

VOCAB = 97
PAD = 0
MAX_POS = 64
N = 12


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return tiny_qwen3(tmp_path_factory.mktemp("qwen3_tiny"), vocab=VOCAB, max_pos=MAX_POS,
                      pad=PAD)


def hf_greedy(hf, prompts, max_new_tokens, eos_id=None):
    """HF generate on left-padded prompts -> new tokens (pad after stop), np.int64[B, <=N]."""
    width = max(map(len, prompts))
    ids = torch.tensor([[PAD] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.inference_mode():
        out = hf.generate(input_ids=ids, attention_mask=mask, do_sample=False,
                          max_new_tokens=max_new_tokens, pad_token_id=PAD, eos_token_id=eos_id)
    return out[:, width:].numpy()


@pytest.fixture(scope="module")
def greedy(models):
    _, model, _ = models
    return generate(model, PROMPTS, max_new_tokens=N, temperature=0.0, key=jax.random.key(0),
                    eos_id=None)


def test_greedy_matches_hf_without_stop(models, greedy):
    hf, _, _ = models
    ref = hf_greedy(hf, PROMPTS, N)
    assert isinstance(greedy, Rollout)
    assert greedy.tokens.shape == (4, N) and greedy.tokens.dtype == jnp.int32
    assert greedy.prompt_tokens.shape == (4, bucket_length(17)) == (4, 32)
    np.testing.assert_array_equal(np.asarray(greedy.tokens), ref)
    np.testing.assert_array_equal(np.asarray(greedy.mask), 1.0)
    np.testing.assert_array_equal(np.asarray(greedy.lengths), N)
    # Prompts come back left-padded, real tokens right-aligned.
    for row, p in zip(np.asarray(greedy.prompt_tokens), PROMPTS):
        assert row[-len(p):].tolist() == p and (row[:-len(p)] == PAD).all()


def test_greedy_matches_hf_with_stop_tokens(models, greedy):
    hf, model, _ = models
    free = np.asarray(greedy.tokens)
    # A stop token that occurs mid-sequence in some rows (but not as everyone's first).
    eos = int(free[0, 3])
    ro = generate(model, PROMPTS, max_new_tokens=N, temperature=0.0, key=jax.random.key(0),
                  eos_id=eos)
    ref = hf_greedy(hf, PROMPTS, N, eos_id=eos)
    tokens, mask = np.asarray(ro.tokens), np.asarray(ro.mask)
    np.testing.assert_array_equal(tokens[:, :ref.shape[1]], ref)
    assert (tokens[:, ref.shape[1]:] == PAD).all()
    for row in range(len(PROMPTS)):
        hits = np.flatnonzero(free[row] == eos)
        length = hits[0] + 1 if hits.size else N
        assert ro.lengths[row] == length
        np.testing.assert_array_equal(mask[row], np.arange(N) < length)
        np.testing.assert_array_equal(tokens[row, :length], free[row, :length])
        assert (tokens[row, length:] == PAD).all()
    assert (np.asarray(ro.logprobs)[mask == 0] == 0).all()
    # A list of stop tokens: whichever comes first ends the row.
    eos2 = int(free[1, 1])
    ro2 = generate(model, PROMPTS, max_new_tokens=N, temperature=0.0, key=jax.random.key(0),
                   eos_id=[eos, eos2])
    for row in range(len(PROMPTS)):
        hits = np.flatnonzero(np.isin(free[row], [eos, eos2]))
        assert ro2.lengths[row] == (hits[0] + 1 if hits.size else N)


@nnx.jit(static_argnums=2)
def teacher_forced_logprobs(model, ro, temperature):
    """log_softmax(logits / T) of the response tokens from one uncached forward pass."""
    ids = jnp.concatenate([ro.prompt_tokens, ro.tokens], axis=1)
    mask = jnp.concatenate([ro.prompt_mask, ro.mask.astype(jnp.int32)], axis=1)
    logits = model(ids, attention_mask=mask)
    plen = ro.prompt_tokens.shape[1]
    logp = jax.nn.log_softmax(logits[:, plen - 1:-1] / temperature, axis=-1)
    return jnp.take_along_axis(logp, ro.tokens[..., None], axis=-1)[..., 0]


@pytest.fixture(scope="module")
def sampled(models):
    _, model, _ = models
    return generate(model, PROMPTS, max_new_tokens=N, temperature=0.7, key=jax.random.key(3),
                    eos_id=[1, 2, 3], num_samples=3)


def test_sampled_logprobs_equal_teacher_forced(models, sampled):
    _, model, _ = models
    ref = teacher_forced_logprobs(model, sampled, 0.7)
    mask = np.asarray(sampled.mask)
    np.testing.assert_allclose(np.asarray(sampled.logprobs), np.asarray(ref) * mask,
                               rtol=1e-4, atol=1e-4)
    assert (np.asarray(sampled.logprobs) <= 0).all()


def test_num_samples_grouped_and_seed_reproducible(models, sampled):
    _, model, _ = models
    g = 3
    assert sampled.tokens.shape == (len(PROMPTS) * g, N)
    prompts = np.asarray(sampled.prompt_tokens)
    for i in range(len(PROMPTS)):
        assert (prompts[i * g:(i + 1) * g] == prompts[i * g]).all()
    # The G samples of a prompt differ (independent draws), rows are not all identical.
    tokens = np.asarray(sampled.tokens)
    assert any(not np.array_equal(tokens[i * g], tokens[i * g + 1]) for i in range(len(PROMPTS)))
    # Same key -> identical rollout; another key -> different. Same shapes: no recompile.
    size = decode_jit._cache_size()
    again = generate(model, PROMPTS, max_new_tokens=N, temperature=0.7, key=jax.random.key(3),
                     eos_id=[1, 2, 3], num_samples=3)
    # temperature, top_p and stop-token values are traced: changing them does not recompile.
    other = generate(model, PROMPTS, max_new_tokens=N, temperature=0.9, key=jax.random.key(4),
                     eos_id=[4, 5, 6], num_samples=3)
    assert decode_jit._cache_size() == size
    for a, b in zip(sampled, again):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(other.tokens), tokens)


def test_array_prompts_equal_list_prompts(models, greedy):
    _, model, _ = models
    width = 20  # not a bucket size: re-padded to 32 on the left
    ids = np.full((len(PROMPTS), width), PAD, np.int32)
    mask = np.zeros_like(ids)
    for i, p in enumerate(PROMPTS):
        ids[i, width - len(p):], mask[i, width - len(p):] = p, 1
    ro = generate(model, (ids, mask), max_new_tokens=N, temperature=0.0, key=jax.random.key(0),
                  eos_id=None)
    for a, b in zip(ro, greedy):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_max_new_tokens_one(models, greedy):
    _, model, _ = models
    ro = generate(model, PROMPTS, max_new_tokens=1, temperature=0.0, key=jax.random.key(0),
                  eos_id=None)
    assert ro.tokens.shape == (len(PROMPTS), 1)
    np.testing.assert_array_equal(np.asarray(ro.tokens[:, 0]), np.asarray(greedy.tokens[:, 0]))
    np.testing.assert_array_equal(np.asarray(ro.mask), 1.0)
    np.testing.assert_allclose(np.asarray(ro.logprobs[:, 0]), np.asarray(greedy.logprobs[:, 0]),
                               rtol=1e-5, atol=1e-6)


def test_all_rows_stop_at_once(models, greedy):
    _, model, _ = models
    # Every first greedy token is a stop token: all rows finish at step 0, loop exits.
    first = sorted(set(np.asarray(greedy.tokens[:, 0]).tolist()))
    ro = generate(model, PROMPTS, max_new_tokens=N, temperature=0.0, key=jax.random.key(0),
                  eos_id=first)
    np.testing.assert_array_equal(np.asarray(ro.lengths), 1)
    np.testing.assert_array_equal(np.asarray(ro.tokens[:, 0]), np.asarray(greedy.tokens[:, 0]))
    assert (np.asarray(ro.tokens[:, 1:]) == PAD).all()
    assert (np.asarray(ro.logprobs[:, 1:]) == 0).all()


def test_clear_errors(models):
    _, model, _ = models
    kw = dict(temperature=1.0, key=jax.random.key(0), eos_id=None)
    with pytest.raises(ValueError, match=r"60 tokens \+ max_new_tokens=8 = 68 > 64"):
        generate(model, [[1] * 60, [2, 3]], max_new_tokens=8, **kw)
    with pytest.raises(ValueError, match=r"> 16 .*max_len"):
        generate(model, [[1] * 10], max_new_tokens=8, max_len=16, **kw)
    with pytest.raises(ValueError, match="empty prompt"):
        generate(model, [[1, 2], []], max_new_tokens=4, **kw)
    with pytest.raises(ValueError, match="no prompts"):
        generate(model, [], max_new_tokens=4, **kw)
    with pytest.raises(ValueError, match="LEFT-padded"):
        generate(model, (np.ones((1, 4), np.int32), np.array([[1, 1, 0, 0]])), max_new_tokens=4,
                 **kw)
    with pytest.raises(ValueError, match=r"\[0, 97\)"):
        generate(model, [[1, 97]], max_new_tokens=4, **kw)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, [[1]], max_new_tokens=0, **kw)


def test_decode_fn_hook_with_batch_sharding(models, greedy):
    """Sharding-ready: a user-jitted `decode` with batch shardings gives the same tokens."""
    from jax.sharding import NamedSharding, PartitionSpec

    from espo_jax.rollout import STATIC_ARGNUMS, decode

    _, model, _ = models
    mesh = jax.make_mesh((4,), ("data",), devices=jax.devices()[:4])
    rows = NamedSharding(mesh, PartitionSpec("data"))
    fn = jax.jit(decode, static_argnums=STATIC_ARGNUMS,
                 in_shardings=(None, rows, rows, None, None, None, None, rows, rows),
                 out_shardings=(rows, rows, rows))
    ro = generate(model, PROMPTS, max_new_tokens=N, temperature=0.0, key=jax.random.key(0),
                  eos_id=None, decode_fn=fn)
    assert ro.tokens.sharding.is_equivalent_to(rows, 2)
    np.testing.assert_array_equal(np.asarray(ro.tokens), np.asarray(greedy.tokens))


def test_truncation_to_one_token_is_greedy(models, greedy):
    """top_k=1 (with top_p on too) samples the argmax; its log-prob under the truncated
    distribution it was drawn from is 0 (the documented mismatch with the scorer)."""
    _, model, _ = models
    ro = generate(model, PROMPTS, max_new_tokens=N, temperature=1.3, key=jax.random.key(9),
                  eos_id=None, top_k=1, top_p=0.5)
    np.testing.assert_array_equal(np.asarray(ro.tokens), np.asarray(greedy.tokens))
    np.testing.assert_allclose(np.asarray(ro.logprobs), 0.0, atol=1e-6)


def test_bfloat16_model(models):
    _, _, path = models
    model = from_pretrained(path, dtype=jnp.bfloat16)
    ro = generate(model, PROMPTS[:2], max_new_tokens=4, temperature=1.0, key=jax.random.key(0),
                  eos_id=None)
    # The bf16 path runs (cache in bf16) and log-probs stay float32 and sane.
    assert ro.logprobs.dtype == jnp.float32 and ro.mask.dtype == jnp.float32
    logp = np.asarray(ro.logprobs)
    assert np.isfinite(logp).all() and (logp <= 0).all() and (logp > -np.log(VOCAB) - 5).all()
