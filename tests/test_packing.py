"""Sequence packing (espo_jax.train.packing): exact pack/unpack round trip, packed scoring
equal to unpacked, and packed train steps equal to unpacked for every objective."""
from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from espo_jax.models import from_pretrained
from espo_jax.train import packing
from espo_jax.train.state import create_state
from espo_jax.train.step import make_score_fn, make_train_step

TINY = pathlib.Path(__file__).resolve().parent / "data" / "tiny_qwen3"
B, P, N = 8, 6, 9


def _random_batch(rng, b, p, n, vocab=500):
    """Left-padded prompts (>= 1 real token) and responses with a random last valid token
    (some empty) and holes in the mask."""
    k = rng.integers(1, p + 1, size=b)
    pmask = (np.arange(p)[None, :] >= (p - k)[:, None]).astype(np.int32)
    prompt = np.where(pmask > 0, rng.integers(3, vocab, size=(b, p)), 0).astype(np.int32)
    tokens = rng.integers(3, vocab, size=(b, n)).astype(np.int32)
    last = rng.integers(0, n + 1, size=b)
    mask = (np.arange(n)[None, :] < last[:, None]).astype(np.float32)
    mask *= (rng.random((b, n)) > 0.1)                   # holes inside the response
    return prompt, pmask, tokens, mask


@pytest.mark.parametrize("seed", range(20))
def test_pack_unpack_round_trip(seed):
    rng = np.random.default_rng(seed)
    per_micro, dev = [(0, 1), (1, 1), (2, 2), (4, 2), (0, 4)][seed % 5]
    b = int(rng.integers(1, 12))
    p, n = int(rng.integers(1, 8)), int(rng.integers(1, 12))
    prompt, pmask, tokens, mask = _random_batch(rng, b, p, n)
    budget = p + n - 1 + int(rng.integers(0, 20))
    pk = packing.pack(prompt, pmask, tokens, mask, max_tokens_per_row=budget,
                      rows_per_micro=per_micro, num_devices=dev)
    k, last = packing.sequence_lengths(pmask, mask)
    micro = pk.num_micro
    r = pk.ids.shape[0] // micro
    assert pk.ids.shape[0] % micro == 0 and r % dev == 0
    assert per_micro == 0 or r == per_micro
    assert pk.ids.shape[1] <= max(budget, 16)
    # Every valid response token comes back exactly from the position that predicts it.
    np.testing.assert_array_equal(packing.unpack(pk.targets, pk, fill=-1),
                                  np.where(pk.valid, tokens, -1))
    np.testing.assert_array_equal(pk.valid, np.arange(n)[None] < last[:, None])
    assert pk.tokens == int(np.where(last > 0, k + last - 1, 0).sum())
    for i in range(b):
        if last[i] == 0:
            continue
        g = pk.micro[i] + micro * pk.row[i, 0]
        seg = pk.segment_ids[g, pk.col[i, 0]]
        sel = pk.segment_ids[g] == seg
        want = np.concatenate([prompt[i][pmask[i] > 0], tokens[i, :last[i] - 1]])
        np.testing.assert_array_equal(pk.ids[g][sel], want)     # the input, contiguous
        np.testing.assert_array_equal(pk.positions[g][sel], np.arange(len(want)))
        assert np.all(np.diff(np.flatnonzero(sel)) == 1)
    # Rows fit the budget; the devices' token loads differ by at most the longest row.
    loads = (pk.segment_ids > 0).sum(1)
    assert loads.max(initial=0) <= budget
    blocks = np.stack([loads[m::micro].reshape(dev, -1).sum(1) for m in range(micro)])
    assert blocks.max() - blocks.min() <= loads.max(initial=0)


def test_pack_errors_and_compaction():
    rng = np.random.default_rng(0)
    prompt, pmask, tokens, mask = _random_batch(rng, 4, 4, 5)
    mask[0] = 1
    with pytest.raises(ValueError, match="train.max_tokens_per_row"):
        packing.pack(prompt, pmask, tokens, mask, max_tokens_per_row=4 + 5 - 2)
    # Short sequences share rows: 16 sequences of <= 3 tokens in 48-token rows -> 1 row.
    prompt, pmask = np.ones((16, 2), np.int32), np.ones((16, 2), np.int32)
    tokens, mask = np.ones((16, 9), np.int32), np.zeros((16, 9), np.float32)
    mask[:, :2] = 1
    pk = packing.pack(prompt, pmask, tokens, mask, max_tokens_per_row=48)
    assert pk.ids.shape == (1, 48)


@pytest.fixture(scope="module")
def setup():
    model = from_pretrained(str(TINY), dtype=jnp.float32)
    rng = np.random.default_rng(1)
    prompt, pmask, tokens, mask = _random_batch(rng, B, P, N, model.config.vocab_size)
    mask[0] = 1                                          # one full-length sequence
    mask[3] = 0                                          # one empty response
    state = create_state(model, optax.sgd(0.5))
    score = make_score_fn(state.graphdef, chunk_size=16, temperature=0.8)
    logp, ent = score(state.params, state.rest, prompt, pmask, tokens)
    old = np.asarray(logp) + rng.normal(0, 0.05, size=(B, N)).astype(np.float32)
    batch = dict(prompt_tokens=prompt, prompt_mask=pmask, tokens=tokens, mask=mask,
                 old_logp=old, entropy=np.asarray(ent),
                 advantages=rng.normal(size=(B,)).astype(np.float32))
    return model, state, score, batch


@pytest.mark.parametrize("per_micro", [0, 1])
def test_packed_logprobs_equal_unpacked(setup, per_micro):
    model, state, _, b = setup
    score = make_score_fn(state.graphdef, chunk_size=16, temperature=0.8,
                          micro_batch_size=per_micro)
    args = (state.params, state.rest, b["prompt_tokens"], b["prompt_mask"], b["tokens"])
    lp, ent = make_score_fn(state.graphdef, chunk_size=16, temperature=0.8)(*args)
    pk = packing.pack(b["prompt_tokens"], b["prompt_mask"], b["tokens"], b["mask"],
                      max_tokens_per_row=P + N - 1, rows_per_micro=per_micro)
    assert pk.ids.size < B * (P + N - 1)                 # fewer positions than unpacked
    assert pk.num_micro == (1 if per_micro == 0 else pk.ids.shape[0])
    lp2, ent2 = score(*args, pack=pk.arrays())
    v = pk.valid
    np.testing.assert_allclose(np.asarray(lp2)[v], np.asarray(lp)[v], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(ent2)[v], np.asarray(ent)[v], rtol=1e-5, atol=1e-5)
    assert np.all(np.asarray(lp2)[~v] == 0) and np.all(np.isfinite(np.asarray(lp2)))


@pytest.mark.parametrize("objective", ["espo", "grpo", "dapo", "gspo", "gmpo", "cispo"])
def test_packed_train_step_equals_unpacked(setup, objective):
    """Loss, metrics, updated params (SGD: = gradient) and log-probs agree; unpacked in 2
    micro-batches of 4 sequences, packed in micro-batches of one row (a different split)."""
    model, _, _, b = setup
    tx = optax.sgd(0.5)
    hp = {"vocab_size": model.config.vocab_size} if objective == "espo" else {}
    step = make_train_step(tx, objective, hp, chunk_size=16, temperature=0.8,
                           micro_batch_size=B // 2)
    step1 = make_train_step(tx, objective, hp, chunk_size=16, temperature=0.8,
                            micro_batch_size=1)
    pk = packing.pack(b["prompt_tokens"], b["prompt_mask"], b["tokens"], b["mask"],
                      max_tokens_per_row=P + N, rows_per_micro=1)
    assert pk.num_micro > 1
    outs = []
    for fn, extra in ((step, {}), (step1, pk.arrays())):
        batch = {k: jnp.asarray(v) for k, v in {**b, **extra}.items()}
        outs.append(fn(create_state(model, tx), batch))
    (s1, m1, lp1), (s2, m2, lp2) = outs
    assert set(m1) == set(m2)
    for key in m1:
        np.testing.assert_allclose(float(m2[key]), float(m1[key]), rtol=2e-5, atol=1e-6,
                                   err_msg=key)
    assert float(m1["grad_norm"]) > 0
    for a, c in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s2.params)):
        np.testing.assert_allclose(np.asarray(c), np.asarray(a), rtol=1e-5, atol=1e-6)
    v = pk.valid
    np.testing.assert_allclose(np.asarray(lp2)[v], np.asarray(lp1)[v], rtol=1e-5, atol=1e-5)



def test_validate_max_tokens_per_row():
    import importlib.util  # noqa: PLC0415

    from espo_jax.train.validate import validate  # noqa: PLC0415
    path = pathlib.Path(__file__).resolve().parent.parent / "configs" / "default.py"
    spec = importlib.util.spec_from_file_location("cfg_default_packing", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    c = mod.get_config("smoke")
    assert c.train.max_tokens_per_row == 0
    n = c.rollout.max_new_tokens
    for ok in (0, n + 1, 4 * n):
        c.train.max_tokens_per_row = ok
        validate(c, 1, check_files=False)
    for bad, msg in ((-1, ">= 0"), (n, f"at least {n + 1}")):
        c.train.max_tokens_per_row = bad
        with pytest.raises(ValueError, match=f"train.max_tokens_per_row.*{msg}"):
            validate(c, 1, check_files=False)


def test_packed_train_step_on_an_fsdp_mesh(setup):
    """Packed rows balanced over 2 fsdp devices, micro-batches of 2 rows, under the product's
    shardings: the same loss, metrics and update as unpacked on the same mesh."""
    from espo_jax.train import mesh as mesh_lib  # noqa: PLC0415
    from espo_jax.train.state import state_shardings  # noqa: PLC0415

    model, _, _, b = setup
    mesh = mesh_lib.make_mesh(dict(data=1, fsdp=2, tensor=1))
    tx = optax.sgd(0.5)
    sh = state_shardings(model, tx, mesh, param_shardings_fn=mesh_lib.param_shardings,
                         opt_shardings_fn=mesh_lib.opt_state_shardings)
    pk = packing.pack(b["prompt_tokens"], b["prompt_mask"], b["tokens"], b["mask"],
                      max_tokens_per_row=P + N, rows_per_micro=2, num_devices=2)
    outs = []
    for micro, extra in ((4, {}), (2, pk.arrays())):
        step = mesh_lib.under_mesh(make_train_step(
            tx, "gspo", {}, chunk_size=16, temperature=0.8, micro_batch_size=micro,
            state_shardings=sh, batch_sharding=mesh_lib.batch_sharding(mesh)), mesh)
        batch = jax.device_put({k: jnp.asarray(v) for k, v in {**b, **extra}.items()},
                               mesh_lib.batch_sharding(mesh))
        outs.append(step(create_state(model, tx, shardings=sh), batch))
    (s1, m1, _), (s2, m2, _) = outs
    for key in m1:
        np.testing.assert_allclose(float(m2[key]), float(m1[key]), rtol=2e-5, atol=1e-6,
                                   err_msg=key)
    for x, y in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s2.params)):
        np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=1e-5, atol=1e-6)
