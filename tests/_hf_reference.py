"""Shared Hugging Face (PyTorch) references for the model and rollout tests: a tiny random
Qwen3 saved as a checkpoint, left-padded batches, teacher-forced logits."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import torch
import transformers

from espo_jax.models import from_pretrained

# The rollout tests' prompts: lengths 5, 11, 1 and 17 (left padding in a batch).
PROMPTS = [[5, 17, 3, 44, 9], [8, 1, 66, 23, 11, 90, 2, 35, 70, 12, 41], [7],
           [13, 26, 39, 52, 65, 78, 91, 4, 17, 30, 43, 56, 69, 82, 95, 8, 21]]


def tiny_qwen3(path, *, vocab: int = 97, max_pos: int = 64, pad: int = 0):
    """(HF model, our float32 model, path): a 2-layer random Qwen3 saved at ``path``, with
    peaky logits (no argmax near-ties, so greedy decodes compare exactly)."""
    torch.manual_seed(0)
    config = transformers.Qwen3Config(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        max_position_embeddings=max_pos, rope_theta=10000.0, rms_norm_eps=1e-6,
        tie_word_embeddings=False, initializer_range=0.2,
        bos_token_id=None, eos_token_id=None, pad_token_id=pad)
    hf = transformers.Qwen3ForCausalLM(config).eval()
    hf.save_pretrained(path)
    return hf, from_pretrained(path, dtype=jnp.float32), path


def left_padded_batch(vocab: int, batch: int, length: int, pad: int, seed: int = 0):
    """(ids i32[B,T], mask i32[B,T]) of random tokens; row 1 has ``pad`` left-pad tokens."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, (batch, length)).astype(np.int32)
    mask = np.ones((batch, length), np.int32)
    mask[1, :pad] = 0
    ids[1, :pad] = 0
    return ids, mask


def hf_logits(model, ids, mask):
    """Teacher-forced logits f32[B,T,V] of a transformers model with left padding."""
    pos = np.maximum(np.cumsum(mask, 1) - 1, 0)
    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids, dtype=torch.long),
                    attention_mask=torch.tensor(mask, dtype=torch.long),
                    position_ids=torch.tensor(pos, dtype=torch.long))
    return out.logits.float().numpy()
