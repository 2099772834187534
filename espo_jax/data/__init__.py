"""Prompt sources and tokenizers: jsonl files, the embedded arithmetic task, HF tokenizers.
Plain Python; imports no model code."""
from espo_jax.data import arith, countdown
from espo_jax.data.example import Example, check_disjoint
from espo_jax.data.jsonl import load_jsonl, rows_to_examples
from espo_jax.data.tokenizer import check_vocab, ensure_pad_token, load_tokenizer

__all__ = [
    "Example",
    "arith",
    "countdown",
    "check_disjoint",
    "check_vocab",
    "ensure_pad_token",
    "load_jsonl",
    "load_tokenizer",
    "rows_to_examples",
]
