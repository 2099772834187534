"""Hugging Face tokenizers from a local directory, with the checks RL needs.

EOS must never be masked as padding: a sampler that treats pad as "not a token" would
drop the EOS that ends each response, so ``load_tokenizer`` guarantees pad != eos.
"""
from __future__ import annotations

import pathlib

# Tokens that can stand in for a missing / EOS-aliased pad token, in order of preference.
PAD_CANDIDATES = (
    "<pad>", "<|pad|>", "[PAD]", "<|fim_pad|>", "<|finetune_right_pad_id|>",
    "<|endoftext|>", "<unk>",
)
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def ensure_pad_token(tok) -> None:
    """Give ``tok`` a pad token distinct from EOS (in place), or raise ValueError."""
    if tok.eos_token_id is None:
        raise ValueError(f"tokenizer {tok.name_or_path!r} has no eos_token; responses could never end")
    if tok.pad_token_id is not None and tok.pad_token_id != tok.eos_token_id:
        return
    vocab = tok.get_vocab()
    for cand in PAD_CANDIDATES:
        if cand in vocab and vocab[cand] != tok.eos_token_id:
            tok.pad_token = cand
            return
    raise ValueError(
        f"tokenizer {tok.name_or_path!r}: pad token {tok.pad_token!r} is missing or equal to "
        f"eos {tok.eos_token!r}, and none of {list(PAD_CANDIDATES)} is in its vocabulary; "
        "add a distinct pad token to the tokenizer"
    )


def load_tokenizer(path: str | pathlib.Path):
    """``transformers.AutoTokenizer`` from a local directory (never the Hub); pad != eos."""
    p = pathlib.Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"tokenizer directory {p} does not exist")
    if not any((p / f).is_file() for f in _TOKENIZER_FILES):
        raise FileNotFoundError(f"tokenizer directory {p} has none of {list(_TOKENIZER_FILES)}")
    import transformers  # heavy; only when a tokenizer is actually needed

    tok = transformers.AutoTokenizer.from_pretrained(str(p), local_files_only=True)
    ensure_pad_token(tok)
    return tok


def check_vocab(tokenizer, model_vocab_size: int) -> None:
    """Raise ValueError when token ids could index past the model's embedding table."""
    n = len(tokenizer)
    if n > model_vocab_size:
        raise ValueError(
            f"vocab mismatch: tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has {n} tokens "
            f"but the model's vocab_size is {model_vocab_size}; expected len(tokenizer) <= vocab_size"
        )
