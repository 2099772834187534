"""Run set-up: config validation (clear errors naming keys and numbers), the objective's
hyper-parameters, the mesh module, and loading the policy + tokenizer."""
from __future__ import annotations

import pathlib

import jax.numpy as jnp
import numpy as np

from espo_jax import data as data_lib


def _mesh_lib():
    try:
        from espo_jax.train import mesh as mesh_lib  # noqa: PLC0415
    except ImportError as e:
        print(f"WARNING: espo_jax.train.mesh unavailable ({e}); running unsharded", flush=True)
        return None
    return mesh_lib


def batch_axes_size(mesh) -> int:
    if mesh is None:
        return 1
    return int(np.prod([mesh.shape[a] for a in ("data", "fsdp") if a in mesh.shape]))


def validate(config, mesh=None) -> None:
    """Clear errors for inconsistent batch settings (names the keys and the numbers)."""
    r, t = config.rollout, config.train
    if r.group_size < 2:
        raise ValueError(f"rollout.group_size must be >= 2 (group-relative advantages), "
                         f"got {r.group_size}")
    if r.prompts_per_step < 1:
        raise ValueError(f"rollout.prompts_per_step must be >= 1, got {r.prompts_per_step}")
    batch = r.prompts_per_step * r.group_size
    if t.num_minibatches < 1 or batch % t.num_minibatches:
        raise ValueError(
            f"the rollout batch rollout.prompts_per_step * rollout.group_size = "
            f"{r.prompts_per_step} * {r.group_size} = {batch} is not divisible by "
            f"train.num_minibatches={t.num_minibatches}")
    mb = batch // t.num_minibatches
    if t.micro_batch_size > 0 and mb % t.micro_batch_size:
        raise ValueError(f"train.micro_batch_size={t.micro_batch_size} must divide the minibatch "
                         f"size {mb} (= {batch} / train.num_minibatches)")
    n_dev = batch_axes_size(mesh)
    micro = t.micro_batch_size if 0 < t.micro_batch_size < mb else mb
    if micro % n_dev:
        raise ValueError(
            f"the (micro-)batch size {micro} is not divisible by the mesh's batch axes "
            f"data x fsdp = {n_dev} devices; change rollout.prompts_per_step, "
            f"train.num_minibatches, train.micro_batch_size or mesh.*")
    if t.num_epochs < 1:
        raise ValueError(f"train.num_epochs must be >= 1, got {t.num_epochs}")
    if config.num_steps < 0:
        raise ValueError(f"num_steps must be >= 0, got {config.num_steps}")
    if config.objective.name not in config.objective:
        raise ValueError(f"objective.name={config.objective.name!r} has no objective.{config.objective.name} block")
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
    if config.export.dtype not in ("auto", "float32", "bfloat16"):
        raise ValueError(f"export.dtype must be 'auto', 'float32' or 'bfloat16', "
                         f"got {config.export.dtype!r}")
    _dtype(config.model.param_dtype, "model.param_dtype")
    _dtype(config.model.dtype, "model.dtype")


def objective_hparams(config, vocab_size: int) -> dict:
    """The selected objective's hyper-parameters from config (+ runtime vocab_size, beta)."""
    name = config.objective.name
    hp = dict(config.objective[name].to_dict())
    hp = {k: (tuple(v) if isinstance(v, list) else v) for k, v in hp.items()}
    if name == "espo":
        hp["vocab_size"] = int(vocab_size)
    if config.train.beta > 0:
        hp["beta"] = float(config.train.beta)
    return hp


def _dtype(name: str, key: str = "model.dtype"):
    try:
        return jnp.dtype(name)
    except TypeError as e:
        raise ValueError(f"{key}: unknown dtype {name!r}") from e


def load_policy(config, mesh, mesh_lib):
    """(model, tokenizer), with clear errors for a missing directory or a vocab mismatch."""
    from espo_jax.models import from_pretrained  # noqa: PLC0415

    path = pathlib.Path(config.model.path)
    if not config.model.path or not path.is_dir():
        raise FileNotFoundError(f"model.path: model directory {str(path)!r} does not exist")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"model.path: {path} has no config.json (expected a Hugging "
                                "Face model directory with config.json + *.safetensors)")
    tok = data_lib.load_tokenizer(path)
    from espo_jax.models import ModelConfig  # noqa: PLC0415
    # Vocab check from config.json first: a mismatch fails before any weight is read.
    data_lib.check_vocab(tok, int(ModelConfig.from_hf(str(path / "config.json")).vocab_size))
    kw = {}
    if mesh is not None:
        kw["mesh"] = mesh
        rules = getattr(mesh_lib, "DEFAULT_RULES", None)
        if rules is not None:
            kw["rules"] = rules
    if config.model.remat:
        kw["remat"] = True  # ModelConfig override: rematerialise each layer in training
    # Compute in model.dtype; master weights (and so the optimizer state) in model.param_dtype.
    model = from_pretrained(str(path), dtype=_dtype(config.model.dtype),
                            param_dtype=_dtype(config.model.param_dtype, "model.param_dtype"),
                            **kw)
    data_lib.check_vocab(tok, int(model.config.vocab_size))
    return model, tok
