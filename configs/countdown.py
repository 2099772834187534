"""Countdown with search traces: ESPO on a task with many decision points per response.

Run::

    python -m espo_jax.main --config=configs/countdown.py --workdir=runs/countdown

Variants (``--config=configs/countdown.py:ARG``, ARG a comma list):
  smoke            a < 1 minute run (2 steps, tiny batch, checkpoint) for the tests
  espo|grpo|dapo|gspo|gmpo|cispo
                   select the objective, e.g. ``:gspo`` or ``:smoke,dapo``
Override any key: ``--config.train.lr=1e-4 --config.objective.espo.alpha=0.05``.

The warm start (espo_jax/assets/countdown, experiments/make_countdown_checkpoint.py)
imitates a noisy solver (moves drawn from a softmax over a heuristic, an expansion budget):
its gate (warm_start.json) has T=1 pass@1 in [0.2, 0.4], pass@16 >= 0.75, and high entropy
at its choices of operands and operators; the rest of its samples give up (``?``) or answer
wrong. Evaluation: 1,024 fixed eval problems (``eval.seed``), greedy and T=1 pass@1.
Four minibatch updates per rollout (1 epoch), so 3 of 4 updates are off-policy and the
objectives' ratio clipping acts; lr 3e-5 keeps the entropy from collapsing in a few steps.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _base as common  # noqa: E402

from espo_jax.data import countdown  # noqa: E402


def get_config(arg: str | None = None):
    flags, objective = common.parse_arg(arg, ("smoke",))
    c = common.base_config()
    c.seed = 0
    c.num_steps = 60
    c.model.path = str(countdown.ASSET_DIR)
    c.model.dtype = "float32"
    c.task.name = "countdown"
    c.task.num_train = 8192
    c.task.num_eval = 1024
    c.rollout.prompts_per_step = 16
    c.rollout.group_size = 16
    c.rollout.max_new_tokens = countdown.MAX_RESPONSE_TOKENS  # the longest solver trace + slack
    c.rollout.temperature = 1.0
    c.train.num_epochs = 1
    c.train.num_minibatches = 4
    c.train.micro_batch_size = 0
    c.train.lr = 3e-5
    c.train.warmup_steps = 2
    c.train.grad_clip = 1.0
    c.eval.every = 10
    c.eval.num_examples = 1024
    c.eval.sampled_samples = 1      # T=1 pass@1 next to greedy
    c.eval.max_new_tokens = countdown.MAX_RESPONSE_TOKENS
    c.checkpoint.every = 25
    c.checkpoint.keep = 2
    c.score.chunk_size = 256
    if "smoke" in flags:
        common.apply_smoke(c, max_new_tokens=24)
    common.apply_objective(c, objective or "espo")
    c.lock()
    return c
