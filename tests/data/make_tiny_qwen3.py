"""Writes tests/data/tiny_qwen3: a tiny RANDOM Qwen3 checkpoint (config.json + safetensors)
with a printable-ASCII character tokenizer and a minimal chat template, for the
configs/qwen3_math.py:smoke run and the tests. Rerun to regenerate:

    .venv/bin/python tests/data/make_tiny_qwen3.py
"""
from __future__ import annotations

import json
import pathlib
import string

import jax.numpy as jnp
from flax import nnx

from espo_jax.data.char_tokenizer import build_char_tokenizer, save_char_tokenizer
from espo_jax.models import Decoder, ModelConfig, save_pretrained

OUT = pathlib.Path(__file__).resolve().parent / "tiny_qwen3"
ALPHABET = "".join(c for c in string.printable if c not in "\t\r\x0b\x0c")
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def main(out: pathlib.Path = OUT) -> pathlib.Path:
    tok = build_char_tokenizer(ALPHABET)
    save_char_tokenizer(tok, out)
    cfg_path = out / "tokenizer_config.json"
    tcfg = json.loads(cfg_path.read_text())
    tcfg["chat_template"] = CHAT_TEMPLATE
    cfg_path.write_text(json.dumps(tcfg, indent=2) + "\n")
    hf = {
        "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3",
        "vocab_size": 128, "hidden_size": 32, "intermediate_size": 64,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 8, "rope_theta": 10000.0, "rms_norm_eps": 1e-6,
        "tie_word_embeddings": True, "max_position_embeddings": 1024,
        "hidden_act": "silu", "attention_bias": False, "torch_dtype": "float32",
        "bos_token_id": 1, "eos_token_id": 1, "pad_token_id": 0,
    }
    model = Decoder(ModelConfig.from_hf(hf), rngs=nnx.Rngs(0), dtype=jnp.float32)
    save_pretrained(model, out)
    return out


if __name__ == "__main__":
    print(main())
