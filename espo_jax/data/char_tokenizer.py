"""A character-level Hugging Face tokenizer (``tokenizers`` library) for small tasks.

Every character of ``alphabet`` is one token; special tokens come first so their ids
are stable. Saved as ``tokenizer.json`` + ``tokenizer_config.json`` +
``special_tokens_map.json``, so ``transformers.AutoTokenizer.from_pretrained(dir)`` loads it.
"""
from __future__ import annotations

import json
import pathlib

from tokenizers import Tokenizer, decoders, models

PAD, EOS, UNK = "<pad>", "<eos>", "<unk>"
SPECIALS = (PAD, EOS, UNK)  # ids 0, 1, 2


def build_char_tokenizer(alphabet: str) -> Tokenizer:
    """One token per character (ids after the specials, in ``alphabet`` order)."""
    if len(set(alphabet)) != len(alphabet):
        raise ValueError(f"build_char_tokenizer: alphabet has repeated characters: {alphabet!r}")
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    vocab.update({c: len(SPECIALS) + i for i, c in enumerate(alphabet)})
    # BPE without merges splits text into single characters; unknown ones map to <unk>.
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK))
    tok.add_special_tokens(list(SPECIALS))
    tok.decoder = decoders.Fuse()  # concatenate characters, no spaces between tokens
    return tok


def save_char_tokenizer(tok: Tokenizer, directory: str | pathlib.Path) -> pathlib.Path:
    """Write the files AutoTokenizer needs; returns the directory."""
    d = pathlib.Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    tok.save(str(d / "tokenizer.json"))
    specials = {"pad_token": PAD, "eos_token": EOS, "unk_token": UNK}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": 512,
        "padding_side": "left",  # generation pads prompts on the left
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        **specials,
    }
    (d / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (d / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n")
    return d
