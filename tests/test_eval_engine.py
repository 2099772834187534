"""Evaluation through the rollout engine on a mesh: with rollout.max_concurrent > 0 and
weights on 8 CPU devices, evaluate() runs the per-device sharded engine (as the training
rollout does), its slots per device from rollout.max_concurrent_per_device, and gives
the same metrics as one device, and as smaller eval batches."""
import pathlib
import sys

import jax
import numpy as np
import pytest

from espo_jax.rollout import engine_sharding
from espo_jax.train.evaluate import evaluate
from espo_jax.train.mesh import make_mesh
from espo_jax.train.setup import load_policy
from espo_jax.train.tasks import build_task

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "configs"))
import default  # noqa: E402


def test_eval_on_a_mesh_uses_the_sharded_engine_and_equals_one_device(monkeypatch):
    config = default.get_config("smoke")
    config.rollout.max_concurrent_per_device = 2  # K = 2 on one device, 8 on the mesh
    config.eval.num_examples = 8
    config.eval.batch_size = 8
    config.eval.num_samples = 2      # sampled (T > 0): keys follow the global rows
    config.eval.temperature = 1.0
    config.eval.sampled_samples = 2  # and the T=1 pass
    task = build_task(config.task, int(config.seed), eval_seed=int(config.eval.seed))
    one = make_mesh(dict(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1])
    model1, tok = load_policy(config, one)
    mesh = make_mesh(dict(data=2, fsdp=2, tensor=2))
    model8, _ = load_policy(config, mesh)

    used = []
    real = engine_sharding.sharded_engine_fn

    def spy(m, *a):
        fn = real(m, *a)

        def wrapped(*args):
            used.append((args[3].shape[0], args[1].max_concurrent))
            return fn(*args)
        return wrapped

    monkeypatch.setattr(engine_sharding, "sharded_engine_fn", spy)
    key = jax.random.key(5)
    ref = evaluate(model1, task, tok, config, key=key)
    assert not used  # one device: the plain engine
    got = evaluate(model8, task, tok, config, key=key)
    # rows split over data x fsdp = 4, with 2 slots per device
    assert used and all(b % 4 == 0 and k == min(8, b) for b, k in used), used
    assert ref["eval_num"] == got["eval_num"] == 16 and "eval_sampled_accuracy" in got
    for name, value in ref.items():
        np.testing.assert_allclose(got[name], value, rtol=1e-6, err_msg=name)
    assert 0 < ref["eval_response_len_mean"] < config.eval.max_new_tokens
    # Batches of 4 prompts (each call passes its first row): the same responses.
    config.eval.batch_size = 4
    small = evaluate(model1, task, tok, config, key=key)
    for name, value in ref.items():
        np.testing.assert_allclose(small[name], value, rtol=1e-6, err_msg=name)
