"""ESPO on math (the paper's setting): a Qwen3 base model, SimpleRL-style training prompts,
MATH500-style evaluation with avg@k, rewards from math-verify on the last ``\\boxed{}``.

Run (after downloading a model and the data; jsonl rows need ``problem`` and ``answer``)::

    python -m espo_jax.main --config=configs/qwen3_math.py --workdir=runs/qwen3_math \
        --config.model.path=/models/Qwen3-1.7B-Base \
        --config.task.train_file=/data/simplerl_8k.jsonl \
        --config.task.eval_file=/data/math500.jsonl

Variants (``:ARG``, a comma list): ``smoke`` (a tiny random Qwen3 + tests/data problems,
seconds on a CPU), and an objective name (espo|grpo|dapo|gspo|gmpo|cispo), e.g.
``--config=configs/qwen3_math.py:gspo`` or ``:smoke,dapo``.
Prompt: ``task.prompt_template`` (``{prompt}`` = the problem) or ``"chat"`` to use the
tokenizer's chat template around ``task.chat_user_template``.
"""
from __future__ import annotations

import os
import sys

# config_flags loads this file by path (not as a package module): put its directory on
# sys.path so the sibling helper configs/_base.py imports.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _base as common  # noqa: E402

_REPO = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
INSTRUCTION = "{prompt}\nPlease reason step by step, and put your final answer within \\boxed{}."


def get_config(arg: str | None = None):
    flags, objective = common.parse_arg(arg, ("smoke",))
    c = common.base_config()
    c.seed = 0
    c.num_steps = 200
    c.model.path = "/path/to/Qwen3-1.7B-Base"
    c.model.dtype = "bfloat16"       # compute
    c.model.param_dtype = "float32"  # master weights + optimizer state (lr 1e-6 needs f32)
    c.model.remat = True
    # One lax.scan over the 28 layers: compile time flat in depth, and with remat each layer
    # keeps about its input (looped remat kept ~13x more per layer in the AOT measurement).
    c.model.scan_layers = True
    c.task.name = "math"
    c.task.train_file = "/path/to/simplerl_train.jsonl"
    c.task.eval_file = "/path/to/math500.jsonl"
    c.task.num_train = 0          # 0 = all rows
    c.task.num_eval = 500
    c.task.prompt_template = INSTRUCTION
    c.task.chat_user_template = INSTRUCTION
    c.task.num_reward_workers = 8
    c.rollout.prompts_per_step = 128
    c.rollout.group_size = 8
    c.rollout.max_new_tokens = 8192
    c.rollout.temperature = 1.0
    # Continuous batching, 8 slots per batch device (K = 64 on 8 chips): a static batch of
    # the 1,024 rows would hold a KV cache of every row's whole length. Raise it where
    # memory allows; the dry run reports the rollout's memory per device (at 16k, +1.93 GiB
    # per slot: about 24 fit an 80 GB GPU; README, "Will it fit? The dry run").
    c.rollout.max_concurrent_per_device = 8
    c.train.num_epochs = 1
    c.train.num_minibatches = 4
    # Per device, so the same config fits any mesh: 2 rows x (data x fsdp) devices per
    # micro-batch (16 on 8 chips, 64 on 32); the 256-row minibatch must divide by it.
    c.train.micro_batch_size = 0
    c.train.micro_batch_per_device = 2
    c.train.lr = 1e-6
    c.train.warmup_steps = 0
    c.train.weight_decay = 0.01
    c.train.grad_clip = 1.0
    c.eval.every = 20
    c.eval.num_examples = 500
    c.eval.num_samples = 4        # avg@4
    c.eval.temperature = 1.0
    c.eval.max_new_tokens = 8192
    c.eval.batch_size = 128
    c.checkpoint.every = 10
    c.checkpoint.keep = 3
    c.score.chunk_size = 4096
    if "smoke" in flags:
        data = os.path.join(_REPO, "tests", "data")
        c.num_steps = 2
        c.model.path = os.path.join(data, "tiny_qwen3")
        c.model.dtype = "float32"
        c.model.remat = False
        c.task.train_file = os.path.join(data, "math_train.jsonl")
        c.task.eval_file = os.path.join(data, "math_eval.jsonl")
        c.task.num_eval = 4
        c.task.prompt_template = "chat"
        c.task.num_reward_workers = 0
        c.rollout.prompts_per_step = 4
        c.rollout.group_size = 2
        c.rollout.max_new_tokens = 8
        c.train.num_minibatches = 2
        c.train.micro_batch_size = 2
        c.train.micro_batch_per_device = 0
        c.train.lr = 1e-4
        c.eval.every = 2
        c.eval.num_examples = 4
        c.eval.num_samples = 2
        c.eval.max_new_tokens = 8
        c.eval.batch_size = 4
        c.checkpoint.every = 1
        c.score.chunk_size = 64
        c.log.progress = False
    common.apply_objective(c, objective or "espo")
    c.lock()
    return c
