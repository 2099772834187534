"""Unit tests of espo_jax.train: exact micro-batch accumulation, non-finite skip, optimizer
schedule, prompt order, checkpoints (save/restore/corrupt fallback), metric writer."""
from __future__ import annotations

import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from ml_collections import ConfigDict

from espo_jax.models import from_pretrained
from espo_jax.train import checkpoint as ckpt_lib
from espo_jax.train import writers
from espo_jax.train.loop import PromptOrder
from espo_jax.train.optim import learning_rate_schedule, make_optimizer
from espo_jax.train.state import create_state
from espo_jax.train.step import make_score_fn, make_train_step

TINY = pathlib.Path(__file__).resolve().parent / "data" / "tiny_qwen3"
B, P, T = 8, 5, 6


def _train_cfg(**kw):
    base = dict(lr=1e-2, warmup_steps=0, weight_decay=0.0, grad_clip=0.0, b1=0.9, b2=0.999,
                eps=1e-8)
    base.update(kw)
    return ConfigDict(base)


@pytest.fixture(scope="module")
def setup():
    model = from_pretrained(str(TINY), dtype=jnp.float32)
    # SGD: params move by exactly -lr * grad, so parameter equality = gradient equality.
    tx = optax.sgd(0.5)
    rng = np.random.default_rng(0)
    v = model.config.vocab_size
    prompt = rng.integers(3, v, size=(B, P)).astype(np.int32)
    pmask = np.ones((B, P), np.int32)
    pmask[::2, :2] = 0                                   # left padding on some rows
    prompt[pmask == 0] = 0
    tokens = rng.integers(3, v, size=(B, T)).astype(np.int32)
    mask = np.ones((B, T), np.float32)
    mask[1, 3:] = 0
    mask[4, 1:] = 0
    state = create_state(model, tx)
    score = make_score_fn(state.graphdef, chunk_size=16, temperature=1.0)
    logp, ent = score(state.params, state.rest, prompt, pmask, tokens)
    # An old policy slightly different from the current one, so ratios/clipping matter.
    old = np.asarray(logp) + rng.normal(0, 0.05, size=(B, T)).astype(np.float32)
    batch = dict(prompt_tokens=prompt, prompt_mask=pmask, tokens=tokens, mask=mask,
                 old_logp=old, entropy=np.asarray(ent),
                 advantages=rng.normal(size=(B,)).astype(np.float32))
    return model, tx, batch


_STEP_FNS: dict = {}


def _step(model, tx, batch, micro):
    """One ESPO train_step from a fresh state (jitted functions cached per micro size)."""
    state = create_state(model, tx)
    if micro not in _STEP_FNS:
        _STEP_FNS[micro] = make_train_step(
            tx, "espo", {"vocab_size": model.config.vocab_size}, chunk_size=16,
            temperature=1.0, micro_batch_size=micro)
    return _STEP_FNS[micro](state, {k: jnp.asarray(v) for k, v in batch.items()})


def test_score_matches_full_forward(setup):
    model, _, batch = setup
    logits = model(jnp.concatenate([batch["prompt_tokens"], batch["tokens"][:, :-1]], 1),
                   attention_mask=jnp.concatenate(
                       [batch["prompt_mask"], np.ones((B, T - 1), np.int32)], 1))
    lsm = jax.nn.log_softmax(logits[:, P - 1:], -1)
    want = np.take_along_axis(np.asarray(lsm), batch["tokens"][..., None], -1)[..., 0]
    state = create_state(model, optax.sgd(0.1))
    score = make_score_fn(state.graphdef, chunk_size=7, temperature=1.0, micro_batch_size=4)
    got, ent = score(state.params, state.rest, batch["prompt_tokens"], batch["prompt_mask"],
                     batch["tokens"])
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
    assert np.all(np.asarray(ent) >= 0)


def test_microbatch_accumulation_is_exact(setup):
    model, tx, batch = setup
    s_full, m_full, lp_full = _step(model, tx, batch, 0)
    s_micro, m_micro, lp_micro = _step(model, tx, batch, 2)
    np.testing.assert_allclose(float(m_micro["loss"]), float(m_full["loss"]), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(float(m_micro["grad_norm"]), float(m_full["grad_norm"]), rtol=1e-4)
    assert float(m_full["grad_norm"]) > 0
    np.testing.assert_allclose(np.asarray(lp_micro), np.asarray(lp_full), rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.tree.leaves(s_micro.params), jax.tree.leaves(s_full.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
    assert int(s_full.step) == int(s_micro.step) == 1


def test_nonfinite_update_is_skipped(setup):
    model, tx, batch = setup
    bad = dict(batch, advantages=np.full((B,), np.nan, np.float32))
    before = create_state(model, tx)
    ref = [np.asarray(x) for x in jax.tree.leaves(before.params)]
    state, m, _ = _step(model, tx, bad, 0)
    assert float(m["nonfinite"]) == 1.0
    assert int(state.step) == 0
    for a, b in zip(jax.tree.leaves(state.params), ref):
        np.testing.assert_array_equal(np.asarray(a), b)
    for leaf in jax.tree.leaves(state.opt_state):
        assert np.all(np.isfinite(np.asarray(leaf)))


def test_warmup_schedule_and_adamw():
    tx = make_optimizer(_train_cfg(warmup_steps=2, grad_clip=1.0, weight_decay=0.1))
    params = {"w": jnp.ones((3,))}
    upd, _ = tx.update({"w": jnp.full((3,), 100.0)}, tx.init(params), params)
    assert np.all(np.isfinite(np.asarray(upd["w"]))) and np.all(np.asarray(upd["w"]) < 0)
    s = learning_rate_schedule(1.0, 4)
    lrs = [float(s(i)) for i in range(7)]
    assert lrs[0] > 0 and lrs[0] < lrs[1] < lrs[3] and lrs[4] == lrs[6] == 1.0
    with pytest.raises(ValueError, match="train.lr"):
        learning_rate_schedule(0.0, 0)


def test_prompt_order_deterministic_and_covers_epochs():
    a, b = PromptOrder(10, seed=3), PromptOrder(10, seed=3)
    seq = [i for k in range(1, 6) for i in a.step(k, 4)]          # 20 draws = 2 epochs
    assert seq == [i for k in range(1, 6) for i in b.step(k, 4)]
    assert sorted(seq[:10]) == list(range(10)) and sorted(seq[10:]) == list(range(10))
    assert a.step(2, 4) != PromptOrder(10, seed=4).step(2, 4)
    assert a.refill(3, 1, 4) == b.refill(3, 1, 4)


def test_checkpoint_roundtrip_and_corrupt_fallback(setup, tmp_path, capsys):
    model, tx, batch = setup
    state0 = create_state(model, tx)
    state1, _, _ = _step(model, tx, batch, 0)
    ck = ckpt_lib.Checkpointer(tmp_path / "ck", keep=3)
    ck.save(1, state0, {"nonfinite_in_a_row": 0})
    ck.save(2, state1, {"nonfinite_in_a_row": 1})
    assert ck.all_steps() == [1, 2]
    step, got, meta = ck.restore(create_state(model, tx))
    assert step == 2 and meta["nonfinite_in_a_row"] == 1 and int(got.step) == 1
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(state1)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    ck.close()
    # Corrupt the newest checkpoint: restore falls back to step 1, loudly.
    state_dir = tmp_path / "ck" / "2" / "state"
    shutil.rmtree(state_dir)
    state_dir.mkdir()
    ck = ckpt_lib.Checkpointer(tmp_path / "ck", keep=3)
    with pytest.warns(RuntimeWarning, match="could not be restored"):
        step, got, _ = ck.restore(create_state(model, tx))
    assert step == 1 and int(got.step) == 0
    assert "WARNING" in capsys.readouterr().out
    # Nothing loadable: a clear error, never a silent restart.
    shutil.rmtree(tmp_path / "ck" / "1" / "state")
    (tmp_path / "ck" / "1" / "state").mkdir()
    with pytest.warns(RuntimeWarning), pytest.raises(RuntimeError, match="refusing to restart"):
        ck.restore(create_state(model, tx))
    ck.close()


def test_metric_writer_truncates_and_merges(tmp_path):
    w = writers.MetricWriter(tmp_path, tensorboard=False)
    for k in range(4):
        w.write(k, {"loss": float(k)})
    w.write(3, {"eval_accuracy": 0.5})
    recs = writers.read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in recs] == [0, 1, 2, 3] and recs[-1]["eval_accuracy"] == 0.5
    w.truncate_after(1)
    assert [r["step"] for r in writers.read_metrics(tmp_path / "metrics.jsonl")] == [0, 1]
    w.write(2, {"loss": float("nan")})
    assert writers.read_metrics(tmp_path / "metrics.jsonl")[-1]["loss"] == "nan"
