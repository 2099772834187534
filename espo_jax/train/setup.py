"""Run set-up: the objective's hyper-parameters and loading the policy + tokenizer
(validation is ``espo_jax.train.validate``)."""
from __future__ import annotations

import pathlib

import jax.numpy as jnp

from espo_jax import data as data_lib


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


def load_policy(config, mesh):
    """(model, tokenizer): the policy loaded straight into its shardings on ``mesh`` (the
    table ``train.mesh.DEFAULT_RULES``), with clear errors for a missing directory or a
    vocab mismatch."""
    from espo_jax.models import from_pretrained  # noqa: PLC0415
    from espo_jax.train.mesh import DEFAULT_RULES  # noqa: PLC0415

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
    kw = dict(mesh=mesh, rules=DEFAULT_RULES,
              # ModelConfig overrides from the run config.
              attention_impl=str(config.model.attention_impl),
              attention_chunk=int(config.model.attention_chunk),
              remat_policy=str(config.model.remat_policy),
              scan_layers=bool(config.model.scan_layers))
    if config.model.remat:
        kw["remat"] = True  # rematerialise each layer in training
    # Compute in model.dtype; master weights (and so the optimizer state) in model.param_dtype.
    model = from_pretrained(str(path), dtype=_dtype(config.model.dtype),
                            param_dtype=_dtype(config.model.param_dtype, "model.param_dtype"),
                            **kw)
    data_lib.check_vocab(tok, int(model.config.vocab_size))
    return model, tok
