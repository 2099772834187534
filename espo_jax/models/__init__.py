"""Flax NNX decoder for Qwen3 / Qwen2 / Llama checkpoints, with HF safetensors load/save."""
from espo_jax.models.cache import init_cache
from espo_jax.models.config import ModelConfig
from espo_jax.models.decoder import Decoder, positions_from_mask, positions_from_segment_ids
from espo_jax.models.dtypes import canonical_dtype
from espo_jax.models.hf_io import from_pretrained, save_pretrained
from espo_jax.models.sharding import DEFAULT_RULES, logical_to_sharding, logical_to_spec

__all__ = ["ModelConfig", "Decoder", "from_pretrained", "save_pretrained", "init_cache",
           "positions_from_mask", "positions_from_segment_ids", "canonical_dtype",
           "DEFAULT_RULES", "logical_to_sharding", "logical_to_spec"]
