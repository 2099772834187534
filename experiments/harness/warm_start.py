"""What the warm-start scripts (``experiments/make_*_checkpoint.py``) share: a tiny Qwen3
policy built against its saved tokenizer, the SFT step (masked next-token NLL, AdamW with
warm-up + cosine decay, gradient clipping) and the asset's atomic write.

    tok, graphdef, params = new_policy(task.build_tokenizer(), tmp, layers=4, hidden=128,
                                       intermediate=384, head_dim=32, seed=0)
    tx = sft_optimizer(lr=5e-3, steps=2000, final_frac=0.05)
    step = sft_step(graphdef, tx)
    params, opt_state, loss = step(params, tx.init(params), ids, loss_mask)
    write_asset(nnx.merge(graphdef, params), tok, tmp, summary)   # into <out>.tmp
    promote(tmp, out)                                              # <out>.tmp -> <out>
"""
from __future__ import annotations

import json
import pathlib
import shutil

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from espo_jax.data import check_vocab, load_tokenizer
from espo_jax.data.char_tokenizer import save_char_tokenizer
from espo_jax.models import Decoder, ModelConfig


def hf_config(vocab_size: int, tok, *, layers: int, hidden: int, intermediate: int,
              head_dim: int) -> dict:
    """A Hugging Face Qwen3 config.json for a tiny policy (4 query / 2 kv heads, tied
    embeddings, 128 positions)."""
    return {
        "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3",
        "vocab_size": vocab_size, "hidden_size": hidden, "intermediate_size": intermediate,
        "num_hidden_layers": layers, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": head_dim, "hidden_act": "silu", "max_position_embeddings": 128,
        "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": True,
        "attention_bias": False, "attention_dropout": 0.0, "use_sliding_window": False,
        "bos_token_id": None, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id,
        "torch_dtype": "float32",
    }


def new_policy(tokenizer, tmp: pathlib.Path, *, layers: int, hidden: int, intermediate: int,
               head_dim: int, seed: int):
    """Save ``tokenizer`` (a ``char_tokenizer`` one) into a fresh ``tmp`` and build a random
    policy against what AutoTokenizer loads back from it (embedding padded to a multiple
    of 8). Returns (tokenizer, graphdef, params); prints the model's size."""
    shutil.rmtree(tmp, ignore_errors=True)
    save_char_tokenizer(tokenizer, tmp)
    tok = load_tokenizer(tmp)
    vocab_size = -(-len(tok) // 8) * 8
    check_vocab(tok, vocab_size)
    cfg = hf_config(vocab_size, tok, layers=layers, hidden=hidden, intermediate=intermediate,
                    head_dim=head_dim)
    graphdef, params = nnx.split(Decoder(ModelConfig.from_hf(cfg), rngs=nnx.Rngs(seed)))
    print(f"model: {layers} layers, hidden {hidden}, vocab {vocab_size} "
          f"(tokenizer {len(tok)}), {n_params(params) / 1e3:.0f}k params", flush=True)
    return tok, graphdef, params


def n_params(params) -> int:
    return int(sum(x.size for x in jax.tree.leaves(params)))


def sft_optimizer(lr: float, steps: int, final_frac: float) -> optax.GradientTransformation:
    """AdamW (weight decay 0.01), 100 warm-up steps, cosine decay to lr * final_frac,
    gradients clipped to global norm 1."""
    return optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(
        optax.warmup_cosine_decay_schedule(0.0, lr, 100, steps, lr * final_frac),
        weight_decay=0.01))


def sft_step(graphdef, tx):
    """Jitted (params, opt_state, ids i32[N, L], loss_mask f32[N, L-1]) -> (params,
    opt_state, loss): mean NLL of the targets ids[:, 1:] where the mask is 1."""
    def loss_fn(params, ids, lmask):
        logits = nnx.merge(graphdef, params)(ids[:, :-1])
        nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), ids[:, 1:, None], axis=-1)[..., 0]
        return (nll * lmask).sum() / lmask.sum()

    @jax.jit
    def step(params, opt_state, ids, lmask):
        loss, grads = jax.value_and_grad(loss_fn)(params, ids, lmask)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss
    return step


def write_asset(model, tok, tmp: pathlib.Path, summary: dict) -> None:
    """The policy's safetensors + config.json, generation_config.json (eos, pad) and
    ``warm_start.json`` (``summary``) into ``tmp`` (which already holds the tokenizer)."""
    from espo_jax.models import save_pretrained  # noqa: PLC0415

    save_pretrained(model, tmp)
    gen = {"eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    (tmp / "warm_start.json").write_text(json.dumps(summary, indent=2) + "\n")


def promote(tmp: pathlib.Path, out: pathlib.Path) -> int:
    """Replace ``out`` by the finished ``tmp`` (the old asset stays until the new one is
    complete); returns the asset's size in bytes."""
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return sum(f.stat().st_size for f in out.iterdir())
