"""The embedded demo: ESPO on multi-step arithmetic with a tiny warm-started Qwen3 policy.

Run (``make demo``)::

    python -m espo_jax.main --config=configs/default.py --workdir=runs/demo

Variants (``--config=configs/default.py:ARG``, ARG a comma list):
  smoke            a < 1 minute run (2 steps, tiny batch, checkpoint) for the tests
  espo|grpo|dapo|gspo|gmpo|cispo
                   select the objective (``dapo`` also turns on dynamic sampling and
                   overlong shaping), e.g. ``:gspo`` or ``:smoke,dapo``
Override any key: ``--config.train.lr=1e-4 --config.objective.espo.alpha=0.05``.
"""
from __future__ import annotations

import os
import sys

# config_flags loads this file by path (not as a package module): put its directory on
# sys.path so the sibling helper configs/_base.py imports.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _base as common  # noqa: E402

from espo_jax.data import arith  # noqa: E402


def _asset_dir() -> str:
    return str(arith.ASSET_DIR)


def get_config(arg: str | None = None):
    flags, objective = common.parse_arg(arg, ("smoke",))
    c = common.base_config()
    c.seed = 0
    # Tuned for a 2-core CPU (about 2 minutes): 16 prompts x G=16 at temperature 1.0, two
    # minibatch updates per rollout (so ESPO's ratios and clipping act on the second), Adam
    # lr 3e-4. The warm start answers about half the problems with the '#<ans>' shortcut
    # (almost always wrong); RL learns to work through the scratchpad instead.
    c.num_steps = 60
    c.model.path = _asset_dir()
    c.model.dtype = "float32"
    c.task.name = "arith"
    c.task.num_train = 8192
    c.task.num_eval = 256
    c.rollout.prompts_per_step = 16
    c.rollout.group_size = 16
    c.rollout.max_new_tokens = 40   # arith.MAX_RESPONSE_TOKENS: the longest reference response
    c.rollout.temperature = 1.0
    c.train.num_epochs = 1
    c.train.num_minibatches = 2
    c.train.micro_batch_size = 0
    c.train.lr = 3e-4
    c.train.warmup_steps = 2
    c.train.grad_clip = 1.0
    c.eval.every = 10
    c.eval.num_examples = 256
    c.eval.max_new_tokens = 40
    c.checkpoint.every = 25
    c.checkpoint.keep = 2
    c.score.chunk_size = 256
    if "smoke" in flags:
        common.apply_smoke(c, max_new_tokens=16)
    common.apply_objective(c, objective or "espo")
    c.lock()
    return c
