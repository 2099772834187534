"""Hugging Face `config.json` -> a frozen `ModelConfig` for the one decoder we build.

Families (picked from `architectures[0]`, else `model_type`):
  qwen3  q/k RMSNorm, GQA, explicit head_dim, optional attention bias (q,k,v,o)
  qwen2  q/k/v bias, no q/k norm, no o bias
  llama  optional attention_bias (q,k,v,o) and mlp_bias
  qwen3_moe  qwen3 attention; sparse layers replace the SwiGLU MLP by `num_experts` routed
             SwiGLU experts (top-`num_experts_per_tok`, see `models/moe.py`)
All: RoPE (rotate-half), SwiGLU MLP, RMSNorm, tied or untied embeddings.
The raw HF dict is kept (`hf_config`) so that export writes back what was read.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping

ARCHITECTURES = {
    "Qwen3ForCausalLM": "qwen3",
    "Qwen2ForCausalLM": "qwen2",
    "LlamaForCausalLM": "llama",
    "Qwen3MoeForCausalLM": "qwen3_moe",
}
MODEL_TYPES = {"qwen3": "qwen3", "qwen2": "qwen2", "llama": "llama", "qwen3_moe": "qwen3_moe"}
MOE_IMPLS = ("ragged", "dense")
ROPE_TYPES = ("default", "linear", "llama3")
ATTENTION_IMPLS = ("auto", "dense", "blockwise", "cudnn", "splash")
REMAT_POLICIES = ("nothing", "matmuls")
_FAMILY_ARCH = {v: k for k, v in ARCHITECTURES.items()}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Static description of a decoder-only transformer (hashable, usable as a jit static)."""

    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    rope_type: str = "default"
    # Extra RoPE parameters as sorted (key, value) pairs (hashable): factor, low_freq_factor, ...
    rope_params: tuple = ()
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    max_position_embeddings: int = 32768
    # Rematerialise each decoder layer in the non-cached (training) forward pass, keeping
    # what `remat_policy` says: "nothing" (only the layer input) or "matmuls" (also the
    # weight-matmul outputs: less recompute, more memory).
    remat: bool = False
    remat_policy: str = "nothing"
    # Run the non-cached forward as one lax.scan over (identical) layers: compile time does
    # not grow with depth. Parameters, HF loading and export are unchanged.
    scan_layers: bool = False
    # Attention implementation (see espo_jax/models/attention.py): "auto" (best for the
    # backend), "dense", "blockwise" (flash-style XLA, any backend), "cudnn" (GPU), "splash"
    # (TPU). The cached decode path always uses "dense".
    attention_impl: str = "auto"
    # Tile size (queries and keys) of "blockwise"/"splash"; "auto" runs "dense" when the
    # sequence fits in one tile.
    attention_chunk: int = 512
    # Mixture of experts (qwen3_moe; num_experts = 0 means dense). A layer i is sparse when
    # i not in mlp_only_layers and (i + 1) % decoder_sparse_step == 0 (transformers' rule).
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple = ()
    # "ragged": tokens sorted by expert + jax.lax.ragged_dot (dropless grouped matmul);
    # "dense": every expert on every token, masked (a reference for tests / benchmarks).
    moe_impl: str = "ragged"
    # The HF dict this came from (export writes it back); excluded from eq/hash.
    hf_config: Mapping[str, Any] | None = dataclasses.field(
        default=None, compare=False, hash=False, repr=False)

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_kv_heads})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ValueError(f"attention_impl must be one of {list(ATTENTION_IMPLS)}, "
                             f"got {self.attention_impl!r}")
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(f"remat_policy must be one of {list(REMAT_POLICIES)}, "
                             f"got {self.remat_policy!r}")
        if self.attention_chunk < 1:
            raise ValueError(f"attention_chunk must be >= 1, got {self.attention_chunk}")
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(f"unsupported rope type {self.rope_type!r}; supported: {ROPE_TYPES}")
        if self.moe_impl not in MOE_IMPLS:
            raise ValueError(f"moe_impl must be one of {MOE_IMPLS}; got {self.moe_impl!r}")
        if self.num_experts and not 1 <= self.num_experts_per_tok <= self.num_experts:
            raise ValueError(f"num_experts_per_tok must be in [1, num_experts={self.num_experts}], "
                             f"got {self.num_experts_per_tok}")
        if self.num_experts and self.moe_intermediate_size < 1:
            raise ValueError(
                f"moe_intermediate_size must be >= 1, got {self.moe_intermediate_size}")
        if self.decoder_sparse_step < 1:
            raise ValueError(f"decoder_sparse_step must be >= 1, got {self.decoder_sparse_step}")
        if self.scan_layers and self.is_moe:
            raise ValueError("model.scan_layers=True is for dense models (MoE routing is recorded "
                             "and replayed per layer); set --config.model.scan_layers=False")

    @property
    def moe_layers(self) -> tuple:
        """Indices of the sparse (routed-experts) layers, in order."""
        if self.num_experts <= 0:
            return ()
        return tuple(i for i in range(self.num_layers) if i not in self.mlp_only_layers
                     and (i + 1) % self.decoder_sparse_step == 0)

    @property
    def is_moe(self) -> bool:
        return bool(self.moe_layers)

    @property
    def rope(self) -> dict:
        return dict(self.rope_params)

    def replace(self, **kw) -> "ModelConfig":
        return dataclasses.replace(self, **kw)

    @classmethod
    def from_hf(cls, config: Mapping[str, Any] | str | os.PathLike, **overrides) -> "ModelConfig":
        """Builds a config from an HF dict, a config.json path, or a directory holding one.

        `overrides` replace fields after parsing (e.g. `remat=True`).
        """
        if not isinstance(config, Mapping):
            path = os.fspath(config)
            if os.path.isdir(path):
                path = os.path.join(path, "config.json")
            if not os.path.isfile(path):
                raise FileNotFoundError(f"config file not found: {path}")
            with open(path) as f:
                config = json.load(f)
        cfg = _parse(dict(config))
        return dataclasses.replace(cfg, **overrides) if overrides else cfg

    def to_hf(self) -> dict:
        """The HF config dict for export: the original dict updated with our fields."""
        d = dict(self.hf_config or {})
        arch = _FAMILY_ARCH[self.family]
        rope = {"rope_type": self.rope_type, "rope_theta": self.rope_theta, **self.rope}
        d.update(
            architectures=[arch], model_type=self.family, vocab_size=self.vocab_size,
            hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers, num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads, head_dim=self.head_dim,
            rms_norm_eps=self.rms_norm_eps, tie_word_embeddings=self.tie_word_embeddings,
            max_position_embeddings=self.max_position_embeddings, hidden_act="silu",
            rope_parameters=rope, rope_theta=self.rope_theta)
        # Older transformers / vLLM read `rope_theta` + `rope_scaling`; write both spellings.
        d["rope_scaling"] = None if self.rope_type == "default" else {
            "rope_type": self.rope_type, **self.rope}
        if self.family in ("qwen3", "llama", "qwen3_moe"):
            d["attention_bias"] = self.qkv_bias
        if self.family == "qwen3_moe":
            d.update(num_experts=self.num_experts, num_local_experts=self.num_experts,
                     num_experts_per_tok=self.num_experts_per_tok,
                     moe_intermediate_size=self.moe_intermediate_size,
                     norm_topk_prob=self.norm_topk_prob,
                     decoder_sparse_step=self.decoder_sparse_step,
                     mlp_only_layers=list(self.mlp_only_layers))
        if self.family == "llama":
            d["mlp_bias"] = self.mlp_bias
        return d


def _parse(d: dict) -> ModelConfig:
    archs = d.get("architectures") or []
    if archs:
        if archs[0] not in ARCHITECTURES:
            raise ValueError(f"unsupported architecture {archs[0]!r} in config.json "
                             "'architectures'; "
                             f"supported: {sorted(ARCHITECTURES)}")
        family = ARCHITECTURES[archs[0]]
    else:
        mt = d.get("model_type")
        if mt not in MODEL_TYPES:
            raise ValueError(f"unsupported model_type {mt!r} (and no 'architectures'); "
                             f"supported: {sorted(MODEL_TYPES)}")
        family = MODEL_TYPES[mt]

    def need(key):
        if key not in d:
            raise KeyError(f"config.json is missing required key {key!r} for family {family!r}")
        return d[key]

    act = d.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"unsupported hidden_act {act!r}; supported: ['silu']")
    if d.get("use_sliding_window"):
        raise ValueError("sliding-window attention (use_sliding_window=true) is not supported")
    layer_types = d.get("layer_types") or []
    if any(t != "full_attention" for t in layer_types):
        raise ValueError(f"unsupported layer_types {sorted(set(layer_types))}; "
                         "supported: ['full_attention']")

    # RoPE: transformers 5 writes `rope_parameters`; older files `rope_theta` + `rope_scaling`.
    rope = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
    rope_type = rope.pop("rope_type", None) or rope.pop("type", None) or "default"
    rope.pop("type", None)
    theta = float(rope.pop("rope_theta", d.get("rope_theta", 10000.0)))
    if rope_type not in ROPE_TYPES:
        raise ValueError(
            f"unsupported rope scaling type {rope_type!r}; supported: {list(ROPE_TYPES)}")
    if rope_type == "linear":
        rope = {"factor": float(rope["factor"])}
    elif rope_type == "llama3":
        rope = {k: float(rope[k]) for k in ("factor", "low_freq_factor", "high_freq_factor",
                                            "original_max_position_embeddings")}
    else:
        rope = {}

    hidden = int(need("hidden_size"))
    heads = int(need("num_attention_heads"))
    head_dim = d.get("head_dim") or hidden // heads
    attn_bias = bool(d.get("attention_bias", False))
    moe = {}
    if family == "qwen3_moe":
        if "num_experts" not in d and "num_local_experts" in d:  # transformers 5 writes this
            d = {**d, "num_experts": d["num_local_experts"]}
        moe = dict(num_experts=int(need("num_experts")),
                   num_experts_per_tok=int(need("num_experts_per_tok")),
                   moe_intermediate_size=int(need("moe_intermediate_size")),
                   norm_topk_prob=bool(d.get("norm_topk_prob", False)),
                   decoder_sparse_step=int(d.get("decoder_sparse_step", 1)),
                   mlp_only_layers=tuple(int(i) for i in d.get("mlp_only_layers") or ()))
    return ModelConfig(
        family=family,
        vocab_size=int(need("vocab_size")),
        hidden_size=hidden,
        intermediate_size=int(need("intermediate_size")),
        num_layers=int(need("num_hidden_layers")),
        num_heads=heads,
        num_kv_heads=int(d.get("num_key_value_heads") or heads),
        head_dim=int(head_dim),
        rope_theta=theta,
        rope_type=rope_type,
        rope_params=tuple(sorted(rope.items())),
        rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        qkv_bias=True if family == "qwen2" else attn_bias,
        o_bias=False if family == "qwen2" else attn_bias,
        mlp_bias=bool(d.get("mlp_bias", False)) if family == "llama" else False,
        qk_norm=family in ("qwen3", "qwen3_moe"),
        max_position_embeddings=int(d.get("max_position_embeddings", 32768)),
        hf_config=d,
        **moe,
    )
