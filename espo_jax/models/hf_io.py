"""Hugging Face checkpoints <-> `Decoder`: memory-mapped safetensors load, sharded export.

Parameter names follow transformers' `*ForCausalLM` layout; our kernels are [in, out]
(HF Linear weights are [out, in], so they are transposed on the way in and out).
MoE experts are stacked here ([E, D, F] gate/up, [E, F, D] down) and one tensor per expert
in HF files (`mlp.experts.{e}.{gate,up,down}_proj.weight`, [out, in]): each device reads
only its experts' slices, and export writes the per-expert layout back.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from espo_jax.models.config import ModelConfig
from espo_jax.models.decoder import Decoder
from espo_jax.models.dtypes import canonical_dtype, dtype_name
from espo_jax.models.sharding import DEFAULT_RULES, logical_to_sharding

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# Buffers some exporters write that have no parameter counterpart.
_IGNORED = re.compile(r".*rotary_emb\.inv_freq$")


_EXPERT_PROJS = ("gate_proj", "up_proj", "down_proj")


def expert_names(path: tuple, num_experts: int) -> list[str] | None:
    """HF per-expert tensor names of a stacked expert parameter, or None for other params."""
    keys = [str(p) for p in path]
    if len(keys) < 3 or keys[-2] != "experts" or keys[-1] not in _EXPERT_PROJS:
        return None
    prefix = "model." + ".".join(keys[:-1])
    return [f"{prefix}.{e}.{keys[-1]}.weight" for e in range(num_experts)]


def hf_name(path: tuple) -> tuple[str, bool]:
    """Our state path -> (HF tensor name, transpose?)."""
    keys = [str(p) for p in path]
    if keys == ["embed_tokens"]:
        return "model.embed_tokens.weight", False
    if keys == ["lm_head"]:
        return "lm_head.weight", True
    transpose = keys[-1] == "kernel"
    if transpose:
        keys[-1] = "weight"
    return "model." + ".".join(keys), transpose


# -- loading ----------------------------------------------------------------------------

def _weight_files(path: str) -> dict[str, str]:
    """HF tensor name -> file, from the sharded index or the single file(s)."""
    index = os.path.join(path, INDEX_FILE)
    if os.path.isfile(index):
        with open(index) as f:
            weight_map = json.load(f).get("weight_map")
        if not weight_map:
            raise ValueError(f"{index} has no 'weight_map'")
        files = {n: os.path.join(path, fn) for n, fn in weight_map.items()}
        for fn in sorted(set(files.values())):
            if not os.path.isfile(fn):
                raise FileNotFoundError(f"checkpoint shard listed in {index} not found: {fn}")
        return files
    single = os.path.join(path, SINGLE_FILE)
    candidates = [single] if os.path.isfile(single) else sorted(
        os.path.join(path, f) for f in os.listdir(path) if f.endswith(".safetensors"))
    if not candidates:
        raise FileNotFoundError(
            f"no safetensors weights in {path}: expected {SINGLE_FILE} or {INDEX_FILE}")
    files = {}
    for fn in candidates:
        with safe_open(fn, framework="numpy") as f:
            files.update({k: fn for k in f.keys()})
    return files


def from_pretrained(path: str | os.PathLike, *, dtype: Any = jnp.bfloat16, mesh=None,
                    rules=None, param_dtype: Any = jnp.float32, **config_overrides) -> Decoder:
    """Loads an HF directory (config.json + *.safetensors) into a `Decoder`.

    dtype: compute dtype ("bfloat16", "float32", or a jnp dtype). param_dtype: storage dtype
      of the parameters (the master weights), float32 by default whatever the compute dtype:
      bf16 masters would round small updates away (lr 1e-6 is below half a bf16 ulp of most
      weights). Pass param_dtype=dtype for an inference-only bf16 copy.
    mesh/rules: when a mesh is given, each tensor is read (memory-mapped, only the slices a
      device needs) straight onto NamedSharding(mesh, rules[logical axes]); rules default to
      `espo_jax.models.sharding.DEFAULT_RULES`. Without a mesh, plain `jax.device_put`.
    config_overrides: ModelConfig fields, e.g. remat=True.
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint directory not found: {path}")
    cfg = ModelConfig.from_hf(path, **config_overrides)
    dtype = canonical_dtype(dtype)
    param_dtype = canonical_dtype(param_dtype if param_dtype is not None else jnp.float32)
    files = _weight_files(path)

    abstract = nnx.eval_shape(
        lambda: Decoder(cfg, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype))
    graphdef, abs_state = nnx.split(abstract)
    rules = DEFAULT_RULES if rules is None else rules

    handles: dict[str, Any] = {}

    def tensor(name):
        fn = files.get(name)
        if fn is None:
            raise KeyError(f"tensor {name!r} not found in checkpoint {path}")
        if fn not in handles:
            handles[fn] = safe_open(fn, framework="numpy")
        return handles[fn].get_slice(name)

    used = set()
    flat = []
    for key, var in nnx.to_flat_state(abs_state):
        shape, names = var.get_value().shape, var.get_metadata().get("out_sharding")
        experts = expert_names(key, cfg.num_experts)
        if experts is not None:
            read = _expert_reader(experts, shape, tensor, files, param_dtype)
            used.update(experts)
            flat.append((key, var.replace(_place(read, shape, names, mesh, rules))))
            continue
        name, transpose = hf_name(key)
        sl = tensor(name)
        used.add(name)
        hf_shape = tuple(sl.get_shape())
        want = tuple(reversed(shape)) if transpose else tuple(shape)
        if hf_shape != want:
            raise ValueError(f"tensor {name!r} in {files[name]} has shape {hf_shape}, "
                             f"expected {want} from config.json")

        def read(idx, sl=sl, transpose=transpose, ndim=len(shape)):
            idx = tuple(idx) + (slice(None),) * (ndim - len(tuple(idx)))
            if transpose:
                return np.ascontiguousarray(sl[idx[::-1]].T).astype(param_dtype)
            return np.asarray(sl[idx]).astype(param_dtype)

        flat.append((key, var.replace(_place(read, shape, names, mesh, rules))))
    unused = sorted(n for n in files if n not in used and not _IGNORED.match(n)
                    and not (cfg.tie_word_embeddings and n == "lm_head.weight"))
    if unused:
        warnings.warn(f"{len(unused)} checkpoint tensors were not used, e.g. {unused[:5]}")
    handles.clear()
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def _place(read, shape, names, mesh, rules):
    """`read(index) -> np.ndarray` placed in its sharding (only the needed slices are read)."""
    if mesh is None:
        return jax.device_put(read(()))
    sharding = logical_to_sharding(names or (None,) * len(shape), shape, mesh, rules)
    return jax.make_array_from_callback(shape, sharding, read)


def _expert_reader(names, shape, tensor, files, param_dtype):
    """read(index) for a stacked [E, a, b] parameter from E HF tensors [b, a] each."""
    e, a, b = shape
    slices = [tensor(n) for n in names]
    for n, sl in zip(names, slices):
        if tuple(sl.get_shape()) != (b, a):
            raise ValueError(f"tensor {n!r} in {files[n]} has shape {tuple(sl.get_shape())}, "
                             f"expected {(b, a)} from config.json")

    def read(idx):
        idx = tuple(idx) + (slice(None),) * (3 - len(tuple(idx)))
        out = [np.asarray(slices[i][idx[2], idx[1]]).T for i in range(e)[idx[0]]]
        return np.ascontiguousarray(np.stack(out)).astype(param_dtype)

    return read


# -- saving -----------------------------------------------------------------------------

def source_dtype(path: str | os.PathLike) -> str | None:
    """The storage dtype named in an HF directory's config.json (`torch_dtype`, or `dtype`
    in newer transformers), or None when it names none."""
    cfg_file = os.path.join(os.fspath(path), "config.json")
    if not os.path.isfile(cfg_file):
        return None
    with open(cfg_file) as f:
        cfg = json.load(f)
    name = cfg.get("torch_dtype") or cfg.get("dtype")
    return str(name) if name else None


def _parse_size(size) -> int:
    if isinstance(size, (int, np.integer)):
        return int(size)
    m = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?i?B)?\s*", str(size), re.I)
    if not m:
        raise ValueError(f"max_shard_size must be an int (bytes) or like '5GB', got {size!r}")
    unit = (m.group(2) or "B").upper()
    mult = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
            "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}[unit]
    return int(float(m.group(1)) * mult)


# Non-weight files worth carrying over on export (tokenizer, chat template, generation).
_SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
               "vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json",
               "chat_template.jinja", "chat_template.json", "generation_config.json")


def save_pretrained(model: Decoder, path: str | os.PathLike, *, max_shard_size="5GB",
                    dtype: Any = None, copy_files_from: str | os.PathLike | None = None) -> None:
    """Writes config.json + safetensors (sharded with an index above `max_shard_size`).

    dtype: storage dtype: None (each parameter's own dtype), "float32", "bfloat16", or "auto"
    (the source checkpoint's `torch_dtype`/`dtype` in `copy_files_from`'s config.json, else
    each parameter's own). copy_files_from: a source HF
    directory whose tokenizer / generation files are copied alongside, so the result is a
    complete checkpoint for transformers, vLLM or lm-eval.
    """
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    if copy_files_from is not None:
        src = os.fspath(copy_files_from)
        if not os.path.isdir(src):
            raise FileNotFoundError(f"copy_files_from directory not found: {src}")
        for fn in _SIDE_FILES:
            if os.path.isfile(os.path.join(src, fn)):
                shutil.copyfile(os.path.join(src, fn), os.path.join(path, fn))
    limit = _parse_size(max_shard_size)
    if isinstance(dtype, str) and dtype == "auto":
        dtype = source_dtype(copy_files_from) if copy_files_from is not None else None
    store = canonical_dtype(dtype) if dtype is not None else None

    # Plan shards from shapes alone, then gather one shard at a time to bound host memory.
    entries = {}
    for key, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        value = var.get_value()
        dt = np.dtype(store or value.dtype)
        experts = expert_names(key, model.config.num_experts)
        if experts is not None:  # stacked [E, a, b] -> E tensors [b, a] (entry: (value, e))
            n = int(np.prod(value.shape[1:])) * dt.itemsize
            entries.update({name: ((value, e), True, dt, n) for e, name in enumerate(experts)})
            continue
        name, transpose = hf_name(key)
        entries[name] = (value, transpose, dt, int(np.prod(value.shape)) * dt.itemsize)

    shards, cur, cur_size = [], [], 0
    for name in sorted(entries):
        n = entries[name][3]
        if cur and cur_size + n > limit:
            shards.append(cur)
            cur, cur_size = [], 0
        cur.append(name)
        cur_size += n
    shards.append(cur)

    def gather(names):
        out = {}
        for name in names:
            value, transpose, dt, _ = entries[name]
            if isinstance(value, tuple):  # one expert of a stacked parameter
                arr = np.asarray(jax.device_get(value[0][value[1]]))
            else:
                arr = np.asarray(jax.device_get(value))
            out[name] = np.ascontiguousarray((arr.T if transpose else arr).astype(dt, copy=False))
        return out

    for stale in os.listdir(path):  # weights of an earlier save would shadow or mix in
        if stale in (SINGLE_FILE, INDEX_FILE) or re.fullmatch(r"model-\d+-of-\d+\.safetensors",
                                                               stale):
            os.remove(os.path.join(path, stale))
    meta = {"format": "pt"}
    if len(shards) == 1:
        save_file(gather(shards[0]), os.path.join(path, SINGLE_FILE), metadata=meta)
    else:
        weight_map = {}
        for i, names in enumerate(shards):
            fn = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(gather(names), os.path.join(path, fn), metadata=meta)
            weight_map.update({n: fn for n in names})
        index = {"metadata": {"total_size": sum(e[3] for e in entries.values())},
                 "weight_map": weight_map}
        with open(os.path.join(path, INDEX_FILE), "w") as f:
            json.dump(index, f, indent=2)

    hf = model.config.to_hf()
    stored = entries["model.embed_tokens.weight"][2]
    hf["dtype"] = dtype_name(stored)
    hf.pop("torch_dtype", None)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf, f, indent=2)
