"""Shared config blocks (objectives, training, DAPO, eval, checkpoints, mesh) for configs/*.py (files starting with "_" are helpers, not configs).

Every key a user may override exists here, so a locked ConfigDict rejects typos with a
message naming the key. Objective hyper-parameters and their defaults come from
``espo_jax.objectives.OBJECTIVES``.
"""
from __future__ import annotations

import ml_collections

from espo_jax.objectives import OBJECTIVES

OBJECTIVE_NAMES = ("espo", "grpo", "dapo", "gspo", "gmpo", "cispo")

# Runtime-only arguments (vocab_size) and the KL weight (train.beta) are not objective
# config keys.
_RUNTIME_KEYS = ("vocab_size", "beta", "counts", "ref_logp")


def objective_defaults(name: str) -> dict:
    """Config keys + defaults of objective ``name``: the registry
    (``espo_jax.objectives.OBJECTIVES[name].defaults``) is the one place they live."""
    return {k: (list(v) if isinstance(v, tuple) else v)
            for k, v in OBJECTIVES[name].defaults.items() if k not in _RUNTIME_KEYS}


def _field(v):
    # None fields are typed by their later value; give those that hold numbers a placeholder
    # FieldReference so `--config.objective.cispo.clip_low=0.2` works on a locked dict.
    if v is None:
        return ml_collections.FieldReference(None, field_type=object)
    return v


def objective_block(name: str) -> ml_collections.ConfigDict:
    o = ml_collections.ConfigDict()
    o.name = name
    for n in OBJECTIVE_NAMES:
        o[n] = ml_collections.ConfigDict({k: _field(v) for k, v in objective_defaults(n).items()})
    return o


def base_config() -> ml_collections.ConfigDict:
    """All keys with neutral defaults; experiment files override values."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.num_steps = 10

    # dtype: compute dtype; param_dtype: the master weights and optimizer state (keep f32:
    # bf16 masters round small updates away).
    # attention_impl: auto | dense | blockwise | cudnn | splash (espo_jax/models/attention.py);
    # attention_chunk: the tile size of blockwise / splash (auto runs dense up to one tile).
    # remat_policy (with remat): nothing (keep only each layer's input) | matmuls.
    # scan_layers: one lax.scan over the layers (compile time flat in depth).
    # routing_replay (MoE models): the scoring pass and the updates reuse the experts the
    # sampler routed each token to, so pi_old and pi_theta are compared on the same experts.
    c.model = ml_collections.ConfigDict(dict(path="", dtype="float32", param_dtype="float32",
                                             remat=False, remat_policy="nothing",
                                             scan_layers=False, attention_impl="auto",
                                             attention_chunk=512, routing_replay=False))
    c.task = ml_collections.ConfigDict(dict(
        name="arith", train_file="", eval_file="", num_train=2048, num_eval=64,
        # "{prompt}" is replaced by the example's prompt; "chat" uses the tokenizer's chat
        # template around the (templated) user message given by task.chat_user_template.
        prompt_template="{prompt}", chat_user_template="{prompt}", num_reward_workers=0))
    c.rollout = ml_collections.ConfigDict(dict(
        prompts_per_step=16, group_size=8, max_new_tokens=32, temperature=1.0,
        # top_p < 1 / top_k > 0 make the scored old log-probs off-policy: refused for
        # training unless allow_truncated_sampling.
        top_p=1.0, top_k=0, allow_truncated_sampling=False,
        # Continuous batching (also for evaluation): K sequences in flight, a finished
        # one's slot refilled with the next prompt; 0 = one static batch of all rows.
        # max_concurrent_per_device > 0 sets K to that many slots per batch device (data x
        # fsdp (x expert)) instead, so one config fits any mesh.
        # prefill_chunk / kv_block: powers of two (prompt tokens per prefill step, kv
        # positions per attention block). engine_attention: auto (the Pallas ragged paged
        # attention kernel on TPU, else xla) | xla | ragged_paged | ragged_paged_xla.
        # decode_read: the xla engine's decode steps read a cache of at most this many
        # positions whole, a longer one block by block (0 = the default, 2048, tuned on
        # CPU; tune it on an accelerator).
        max_concurrent=0, max_concurrent_per_device=0, prefill_chunk=512, kv_block=256,
        engine_attention="auto", decode_read=0))
    # Truncated IS weights between the sampler's and the scoring pass's log-probs, applied
    # to every objective's per-token loss: mode off | token | sequence.
    c.rollout_correction = ml_collections.ConfigDict(dict(mode="off", threshold=2.0))
    c.objective = objective_block("espo")
    c.advantage = ml_collections.ConfigDict(dict(estimator="grpo", valid_only=False))
    c.train = ml_collections.ConfigDict(dict(
        num_epochs=1, num_minibatches=2, micro_batch_size=0,  # 0 = whole minibatch at once
        # > 0: micro-batch = this many rows per batch device (overrides micro_batch_size),
        # so one config fits any mesh size
        micro_batch_per_device=0,
        lr=1e-6, warmup_steps=0, weight_decay=0.0, b1=0.9, b2=0.999, eps=1e-8,
        grad_clip=1.0, max_nonfinite_in_a_row=3, beta=0.0,
        # MoE: coefficient of transformers' load-balancing loss (0 = off).
        moe_aux_loss_coef=0.0,
        # > 0: score and train on packed rows of this many tokens (segment ids, FFD by
        # length; train.packing) instead of P + max_new_tokens per sequence. 0 = off.
        max_tokens_per_row=0))
    c.dapo = ml_collections.ConfigDict(dict(
        dynamic_sampling=False, max_sampling_tries=3,
        # max_len 0 = rollout.max_new_tokens at run time; buffer 0 = buffer_frac * max_len.
        overlong=ml_collections.ConfigDict(dict(enable=False, max_len=0, buffer=0,
                                                buffer_frac=0.25, penalty=1.0))))
    # num_samples = k of avg@k (k > 1 samples at eval.temperature) for eval_accuracy;
    # sampled_samples = k > 0 adds eval_sampled_accuracy (pass@1 over k samples at
    # sampled_temperature) next to it. seed: the eval problems of generated tasks and the
    # eval sampling key, the same for every run seed (paired comparisons across arms).
    c.eval = ml_collections.ConfigDict(dict(
        every=10, num_examples=64, num_samples=1, temperature=0.0, max_new_tokens=32,
        batch_size=0, sampled_samples=0, sampled_temperature=1.0, seed=0))
    c.checkpoint = ml_collections.ConfigDict(dict(every=10, keep=2))
    # Storage dtype of the final policy: auto (the source checkpoint's torch_dtype),
    # float32 or bfloat16.
    c.export = ml_collections.ConfigDict(dict(dtype="auto"))
    c.score = ml_collections.ConfigDict(dict(chunk_size=1024))
    c.dump = ml_collections.ConfigDict(dict(every=0))  # rollout dumps under workdir/dumps/
    # --dry_run shapes (espo_jax.train.dry_run): prompt tokens; response tokens (0 =
    # rollout.max_new_tokens); layers to compile (0 = all; fewer extrapolates per layer);
    # devices > 0 simulates that many CPU devices.
    c.plan = ml_collections.ConfigDict(dict(prompt_len=512, response_len=0, layers=0,
                                            devices=0))
    # expert: expert parallelism for MoE models (the batch is split over it too).
    c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1, expert=1))
    # jax.distributed.initialize() arguments; "" / 0 / -1 mean "let JAX detect it".
    c.distributed = ml_collections.ConfigDict(dict(
        initialize=False, coordinator_address="", num_processes=0, process_id=-1))
    c.log = ml_collections.ConfigDict(dict(progress=True, tensorboard=True))
    # Resuming refuses changes to model/objective/advantage/task/mesh/seed unless listed
    # here (comma-separated keys or prefixes, e.g. "objective.espo.alpha,task").
    c.resume = ml_collections.ConfigDict(dict(allow_changes=""))
    return c


def apply_objective(c: ml_collections.ConfigDict, name: str) -> None:
    """Select objective ``name``; 'dapo' also turns on dynamic sampling and overlong shaping."""
    if name not in OBJECTIVE_NAMES:
        raise ValueError(f"unknown objective {name!r}; expected one of {OBJECTIVE_NAMES}")
    c.objective.name = name
    if name == "dapo":
        c.dapo.dynamic_sampling = True
        c.dapo.overlong.enable = True
        # Follow rollout.max_new_tokens at run time (also when overridden on the command line).
        c.dapo.overlong.max_len = 0
        c.dapo.overlong.buffer = 0


def apply_smoke(c: ml_collections.ConfigDict, max_new_tokens: int) -> None:
    """The ``:smoke`` variant of an embedded-task config: a < 1 minute run (2 steps, 4 x 4
    responses of up to ``max_new_tokens``, 8 greedy eval problems, a checkpoint every step)."""
    c.num_steps = 2
    c.task.num_train = 64
    c.task.num_eval = 8
    c.rollout.prompts_per_step = 4
    c.rollout.group_size = 4
    c.rollout.max_new_tokens = max_new_tokens
    c.train.num_minibatches = 2
    c.eval.every = 2
    c.eval.num_examples = 8
    c.eval.sampled_samples = 0
    c.eval.max_new_tokens = max_new_tokens
    c.checkpoint.every = 1
    c.log.progress = False


def parse_arg(arg: str | None, variants: tuple[str, ...]) -> tuple[set[str], str | None]:
    """'smoke,gspo' -> ({'smoke'}, 'gspo'); errors name the bad token."""
    flags, objective = set(), None
    for tok in (arg or "").split(","):
        tok = tok.strip()
        if not tok:
            continue
        if tok in variants:
            flags.add(tok)
        elif tok in OBJECTIVE_NAMES:
            objective = tok
        else:
            raise ValueError(f"unknown config variant {tok!r}; expected any of {variants} "
                             f"and/or an objective name {OBJECTIVE_NAMES}")
    return flags, objective
