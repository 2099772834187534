"""Validate a whole run config before any work: no weights, data or devices are touched.

``validate(config, num_devices=...)`` raises ``ValueError`` (or ``FileNotFoundError``) with
one line naming the key, the value and what is allowed. The runner calls it first thing,
before loading weights or data, so a bad flag costs seconds, not a model load and a
rollout; the dry run and the tests call it with a simulated device count.

What it checks: the objective's hyper-parameters through the objectives registry (the very
checks ``policy_loss`` runs inside the first jitted update), the advantage estimator, the
mesh against the device count, the batch / minibatch / micro-batch divisibility per device,
rollout / eval / checkpoint / score settings, dtype names, input files and directories,
the workdir, and ``resume.allow_changes``.
"""
from __future__ import annotations

import math
import os
from typing import Any

from etils import epath

from espo_jax.models.config import ATTENTION_IMPLS, REMAT_POLICIES
from espo_jax.models.dtypes import canonical_dtype
from espo_jax.objectives import resolve_hparams
from espo_jax.objectives.advantages import ESTIMATORS
from espo_jax.rollout.paged_attention import ATTENTION_IMPLS as ENGINE_ATTENTION

TASKS = ("arith", "countdown", "math")
MESH_AXES = ("data", "fsdp", "tensor", "expert")
_VOCAB_PLACEHOLDER = 2  # espo's vocab_size is a runtime value (the model's); any valid one


def _int(config, key: str, *, lo: int | None = None, hi: int | None = None) -> int:
    """``config[key]`` (dotted) as an int within [lo, hi]; the error names the key."""
    v = _get(config, key)
    if isinstance(v, bool) or not isinstance(v, int):
        raise ValueError(f"{key} must be an integer, got {v!r}")
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise ValueError(f"{key} must be {rng}, got {v}")
    return v


def _float(config, key: str, *, lo: float = -math.inf, lo_open: bool = False,
           hi: float = math.inf) -> float:
    v = _get(config, key)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ValueError(f"{key} must be a finite number, got {v!r}")
    if v < lo or (lo_open and v == lo) or v > hi:
        lo_s = f"> {lo}" if lo_open else f">= {lo}"
        raise ValueError(f"{key} must be {lo_s}" + (f" and <= {hi}" if hi < math.inf else "")
                         + f", got {v}")
    return float(v)


def _get(config, key: str):
    node = config
    for part in key.split("."):
        node = node[part]
    return node


def micro_batch_size(config, batch_devices: int) -> int:
    """The global micro-batch size (0 = the whole minibatch at once).

    ``train.micro_batch_per_device`` > 0 derives it from the mesh (per-device rows times
    the data x fsdp devices), so one config fits 8 or 256 chips; otherwise
    ``train.micro_batch_size`` is the global number.
    """
    per_dev = int(config.train.get("micro_batch_per_device", 0))
    if per_dev > 0:
        return per_dev * int(batch_devices)
    return int(config.train.micro_batch_size)


def mesh_shape(config, num_devices: int) -> dict[str, int]:
    """config.mesh resolved against ``num_devices`` ({axis: size}); ValueError naming mesh.*."""
    from espo_jax.train.mesh import resolve_mesh_shape  # noqa: PLC0415

    sizes = []
    for a in MESH_AXES:
        if a == "expert" and "expert" not in config.mesh:  # configs from before MoE
            sizes.append(1)
            continue
        sizes.append(_int(config, f"mesh.{a}", lo=-1))
    return dict(zip(MESH_AXES, resolve_mesh_shape(sizes, int(num_devices))))


def _objective(config) -> None:
    o = config.objective
    name = o.name
    if name not in o:
        raise ValueError(f"objective.name={name!r} has no objective.{name} block; allowed: "
                         f"{sorted(k for k in o.keys() if k != 'name')}")
    hp = {k: (tuple(v) if isinstance(v, list) else v) for k, v in o[name].to_dict().items()}
    if name == "espo":
        hp["vocab_size"] = _VOCAB_PLACEHOLDER
    try:
        resolve_hparams(name, hp)  # the same checks policy_loss runs at trace time
    except ValueError as e:
        msg = str(e)
        for prefix in (f"{name}: ", "espo: "):
            msg = msg.removeprefix(prefix)
        raise ValueError(f"objective.{name}: {msg}") from None
    _float(config, "train.beta", lo=0.0)
    if config.advantage.estimator not in ESTIMATORS:
        raise ValueError(f"advantage.estimator={config.advantage.estimator!r}; allowed: "
                         f"{list(ESTIMATORS)}")


def _batches(config, batch_devices: int) -> None:
    """Rollout batch -> minibatches -> micro-batches, each a multiple of the batch devices."""
    r, t = config.rollout, config.train
    g = _int(config, "rollout.group_size", lo=2)
    p = _int(config, "rollout.prompts_per_step", lo=1)
    n_mb = _int(config, "train.num_minibatches", lo=1)
    _int(config, "train.num_epochs", lo=1)
    _int(config, "train.micro_batch_size", lo=0)
    if "micro_batch_per_device" in t:
        _int(config, "train.micro_batch_per_device", lo=0)
    batch = p * g
    if batch % n_mb:
        raise ValueError(
            f"the rollout batch rollout.prompts_per_step * rollout.group_size = {p} * {g} = "
            f"{batch} is not divisible by train.num_minibatches={n_mb}")
    mb = batch // n_mb
    micro = micro_batch_size(config, batch_devices)
    key = ("train.micro_batch_per_device" if t.get("micro_batch_per_device", 0) > 0
           else "train.micro_batch_size")
    if micro > 0 and mb % micro:
        raise ValueError(f"{key}: the micro-batch of {micro} rows must divide the minibatch "
                         f"of {mb} rows (= {batch} / train.num_minibatches); "
                         f"train.micro_batch_size={t.micro_batch_size}, "
                         f"{batch_devices} batch devices")
    rows = micro if 0 < micro < mb else mb
    if rows % batch_devices:
        raise ValueError(
            f"the (micro-)batch of {rows} rows is not divisible by the mesh's batch axes "
            f"data x fsdp = {batch_devices} devices; change rollout.prompts_per_step, "
            f"train.num_minibatches, train.micro_batch_size (or micro_batch_per_device) "
            f"or mesh.*")
    if batch % batch_devices:
        raise ValueError(f"the rollout batch of {batch} rows is not divisible by the "
                         f"{batch_devices} batch devices (mesh data x fsdp)")
    _float(config, "rollout.temperature", lo=0.0, lo_open=True)
    n = _int(config, "rollout.max_new_tokens", lo=1)
    if "max_tokens_per_row" in config.train:
        budget = _int(config, "train.max_tokens_per_row", lo=0)
        if 0 < budget < n + 1:
            raise ValueError(f"train.max_tokens_per_row={budget} must be 0 (packing off) or "
                             f">= prompt + rollout.max_new_tokens - 1 tokens of the longest "
                             f"sequence (at least {n + 1})")
    _engine(config)
    _float(config, "train.lr", lo=0.0)
    _int(config, "train.warmup_steps", lo=0)
    _float(config, "train.grad_clip", lo=0.0)
    _int(config, "train.max_nonfinite_in_a_row", lo=1)
    del r


def _engine(config) -> None:
    """rollout.max_concurrent (0 = static batch), max_concurrent_per_device (0 = off),
    decode_read (0 = default) and the engine's power-of-two sizes."""
    r = config.rollout
    for key in ("max_concurrent", "max_concurrent_per_device", "decode_read"):
        if key in r:
            _int(config, f"rollout.{key}", lo=0)
    for key in ("prefill_chunk", "kv_block"):
        if key in r:
            v = _int(config, f"rollout.{key}", lo=1)
            if v & (v - 1):
                raise ValueError(f"rollout.{key} must be a power of two, got {v}")
    impl = r.get("engine_attention", "auto")
    if impl not in ENGINE_ATTENTION:
        raise ValueError(f"rollout.engine_attention must be one of {ENGINE_ATTENTION}, "
                         f"got {impl!r}")


def _eval_and_io(config, batch_devices: int) -> None:
    _int(config, "eval.every", lo=0)
    _int(config, "eval.num_examples", lo=1)
    k = _int(config, "eval.num_samples", lo=1)
    _int(config, "eval.max_new_tokens", lo=1)
    bs = _int(config, "eval.batch_size", lo=0)
    if _int(config, "eval.sampled_samples", lo=0) > 0:
        _float(config, "eval.sampled_temperature", lo=0.0, lo_open=True)
    _int(config, "eval.seed", lo=0)
    if k > 1:
        _float(config, "eval.temperature", lo=0.0, lo_open=True)
    else:
        _float(config, "eval.temperature", lo=0.0)
    del bs, batch_devices  # an eval batch that does not split over the devices runs unsplit
    _int(config, "checkpoint.every", lo=0)
    _int(config, "checkpoint.keep", lo=1)
    _int(config, "dump.every", lo=0)
    _int(config, "score.chunk_size", lo=1)
    _int(config, "num_steps", lo=0)
    _int(config, "seed", lo=0)
    if config.dapo.dynamic_sampling:
        _int(config, "dapo.max_sampling_tries", lo=1)
    if not isinstance(config.model.get("routing_replay", False), bool):
        raise ValueError(f"model.routing_replay must be True or False, "
                         f"got {config.model.routing_replay!r}")
    if "moe_aux_loss_coef" in config.train:
        _float(config, "train.moe_aux_loss_coef", lo=0.0)
    for key in ("model.dtype", "model.param_dtype"):
        try:
            canonical_dtype(_get(config, key))
        except ValueError as e:
            raise ValueError(f"{key}: {e}") from None
    impl = config.model.get("attention_impl", "auto")
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"model.attention_impl must be one of {list(ATTENTION_IMPLS)}, "
                         f"got {impl!r}")
    if "attention_chunk" in config.model:
        _int(config, "model.attention_chunk", lo=1)
    policy = config.model.get("remat_policy", "nothing")
    if policy not in REMAT_POLICIES:
        raise ValueError(f"model.remat_policy must be one of {list(REMAT_POLICIES)}, "
                         f"got {policy!r}")
    if config.export.dtype not in ("auto", "float32", "bfloat16"):
        raise ValueError(f"export.dtype must be 'auto', 'float32' or 'bfloat16', "
                         f"got {config.export.dtype!r}")


def _sampling(config) -> None:
    r = config.rollout
    if not r.allow_truncated_sampling:
        # The scoring pass takes log-probs of the untruncated distribution: with a nucleus /
        # top-k filter the sampler's distribution differs, so the 'old' policy is off-policy.
        if r.top_p < 1.0:
            raise ValueError(f"rollout.top_p={r.top_p} < 1 makes the old log-probs off-policy; "
                             "set rollout.allow_truncated_sampling=True to train anyway")
        if r.top_k > 0:
            raise ValueError(f"rollout.top_k={r.top_k} > 0 makes the old log-probs off-policy; "
                             "set rollout.allow_truncated_sampling=True to train anyway")
    rc = config.rollout_correction
    if rc.mode not in ("off", "token", "sequence"):
        raise ValueError(f"rollout_correction.mode must be 'off', 'token' or 'sequence', "
                         f"got {rc.mode!r}")
    if not rc.threshold > 0:
        raise ValueError(f"rollout_correction.threshold must be > 0, got {rc.threshold}")


def _plan(config) -> None:
    if "plan" not in config:  # configs saved before the dry run existed
        return
    _int(config, "plan.prompt_len", lo=1)
    _int(config, "plan.response_len", lo=0)
    _int(config, "plan.layers", lo=0)
    _int(config, "plan.devices", lo=0)


def _files(config, workdir: Any, check_data: bool = True) -> None:
    path = config.model.path
    if not path or not os.path.isdir(path):
        raise FileNotFoundError(f"model.path: model directory {path!r} does not exist")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"model.path: {path} has no config.json (expected a Hugging "
                                "Face model directory with config.json + *.safetensors)")
    _moe_keys(config, os.path.join(path, "config.json"))
    if config.task.name == "math" and check_data:
        for key in ("train_file", "eval_file"):
            f = config.task[key]
            if not f:
                raise ValueError(f"task.{key} must name a jsonl file for task.name='math'")
            if not epath.Path(f).is_file():
                raise FileNotFoundError(f"task.{key}: dataset file {f!r} does not exist")
    if workdir is not None:
        wd = epath.Path(workdir)
        if wd.exists() and not wd.is_dir():
            raise ValueError(f"--workdir={workdir} exists and is not a directory")
        ck = wd / "checkpoints"
        if ck.exists() and not ck.is_dir():
            raise ValueError(f"--workdir: {ck} exists and is not a directory")


def _moe_keys(config, config_json: str) -> None:
    """MoE-only keys set for a dense model are an error, not a silent no-op; features that
    do not support MoE yet are refused for an MoE model before any weight is loaded."""
    import json  # noqa: PLC0415
    with open(config_json) as f:
        archs = json.load(f).get("architectures") or []
    moe = "Qwen3MoeForCausalLM" in archs
    moe_only = [k for k, v in (("model.routing_replay", config.model.routing_replay),
                               ("train.moe_aux_loss_coef", config.train.moe_aux_loss_coef))
                if v]
    if moe_only and not moe:
        raise ValueError(f"{moe_only[0]} is set but model.path is not a mixture-of-experts "
                         f"model (architectures {archs}); allowed: Qwen3MoeForCausalLM")
    dense_only = [k for k, v in (("train.max_tokens_per_row", config.train.max_tokens_per_row),
                                 ("model.scan_layers", config.model.scan_layers)) if v]
    if dense_only and moe:
        raise ValueError(f"{dense_only[0]}={_get(config, dense_only[0])!r} is not supported "
                         f"for mixture-of-experts models yet (model.path is {archs[0]}); "
                         "set it to 0 / False")


def _resume_keys(config) -> None:
    from espo_jax.train.resume import allowed_changes  # noqa: PLC0415

    if "resume" in config:
        allowed_changes(config)  # ValueError naming unknown keys


def validate(config, num_devices: int | None = None, *, workdir: Any = None,
             check_files: bool = True, check_data: bool = True) -> dict[str, int]:
    """Checks ``config`` for a run on ``num_devices`` devices (default: all jax devices).

    ``workdir``: also check it is a directory (or absent); ``check_files``: check that
    model.path and the task's data files exist (off for configs whose paths are
    placeholders, e.g. the paper config validated on a laptop); ``check_data=False`` checks
    model.path/config.json but not the data files (the dry run). Returns the mesh shape.
    Raises ValueError / FileNotFoundError with one line naming the key and what is allowed.
    """
    if num_devices is None:
        import jax  # noqa: PLC0415
        num_devices = jax.device_count()
    if config.task.name not in TASKS:
        raise ValueError(f"task.name: unknown task {config.task.name!r}; expected one of "
                         f"{list(TASKS)}")
    _objective(config)
    shape = mesh_shape(config, num_devices)
    batch_devices = shape["data"] * shape["fsdp"] * shape["expert"]  # batch_axes
    _batches(config, batch_devices)
    _eval_and_io(config, batch_devices)
    _sampling(config)
    _resume_keys(config)
    _plan(config)
    if check_files:
        _files(config, workdir, check_data)
    return shape
