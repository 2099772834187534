"""Countdown with search traces: reach a target from 3-4 small numbers with + - * /.

Format (one token per number 0..99 or symbol, tokens separated by spaces; see
``build_tokenizer``)::

    prompt   "2 3 7 8 -> 46 :"
    response "8 * 7 = 56 , 56 - 3 = 53 , < 8 * 3 = 24 , ... , # ( 8 * 7 ) - ( 3 * 2 )" + <eos>
    answer   "2 3 7 8 -> 46"   (numbers and target: all the verifier needs)

The response is a search trace: expansions ``a op b = c ,`` (the larger operand first),
``<`` backtracks (undoes the last expansion of the current path), and the trace ends with
``# EXPR`` (an expression over the given numbers that equals the target) or the give-up
marker ``?``. Only the final expression is verified (``espo_jax.rewards.countdown``).

Problems: 3 or 4 numbers from 1..9 (sorted, so a multiset is one problem) and a target in
TARGET_RANGE that the move rules of ``countdown_solver`` reach in at least MIN_SOLUTIONS
distinct ways (most have many, so a good policy stays stochastic at choice tokens). Move
rules: integer intermediates in 1..99 (each one token), subtraction and division with the
larger operand first, division exact. The verifier itself accepts any exact expression.

Split: a problem belongs to ``eval`` iff a SHA-256 hash of ``"numbers -> target"`` falls
in the first EVAL_PERCENT buckets of 100, so train and eval are disjoint for every seed;
``make_examples`` draws distinct problems of one split with a seeded RNG.
"""
from __future__ import annotations

import functools
import hashlib
import itertools
import pathlib
import random

from espo_jax.data.countdown_solver import MAX_VALUE, SolverConfig, reach_counts, solve
from espo_jax.data.example import Example
from espo_jax.rewards.countdown import parse_answer, score_countdown

ASSET_DIR = pathlib.Path(__file__).resolve().parent.parent / "assets" / "countdown"

NUMBER_RANGE = (1, 9)
NUM_NUMBERS = (3, 4)
TARGET_RANGE = (10, 60)
MIN_SOLUTIONS = 2
EVAL_PERCENT = 20
SYMBOLS = ("+", "-", "*", "/", "=", "(", ")", ",", "<", "#", "?", "->", ":")
# Longest trace of the default solver (SolverConfig): 10 expansions (6 tokens each), their
# backtracks and a <= 14-token answer: at most 85 tokens + <eos>.
MAX_RESPONSE_TOKENS = 88
SPLITS = ("train", "eval")

verify = score_countdown  # (response, answer) -> (reward, gradable)
__all__ = [
    "ASSET_DIR", "MAX_RESPONSE_TOKENS", "SolverConfig", "all_problems", "build_tokenizer",
    "make_examples", "parse_prompt", "solve", "split_of", "verify",
]


def _key(numbers, target) -> str:
    return " ".join(map(str, numbers)) + f" -> {target}"


def split_of(numbers, target) -> str:
    """'eval' or 'train' for a problem (numbers sorted)."""
    h = int.from_bytes(hashlib.sha256(f"countdown:{_key(numbers, target)}".encode()).digest()[:8], "big")
    return "eval" if h % 100 < EVAL_PERCENT else "train"


def parse_prompt(prompt: str) -> tuple[list[int], int]:
    """(numbers, target) of a prompt ``"2 3 7 8 -> 46 :"``; ValueError otherwise."""
    text = prompt.strip()
    if not text.endswith(":"):
        raise ValueError(f"not a countdown prompt (expected '<n> ... -> <target> :'): {prompt!r}")
    return parse_answer(text[:-1])


@functools.lru_cache(maxsize=1)
def all_problems() -> dict[str, tuple[tuple[tuple[int, ...], int], ...]]:
    """Every admissible problem ((numbers, target), sorted) of each split."""
    lo, hi = NUMBER_RANGE
    out = {s: [] for s in SPLITS}
    for k in NUM_NUMBERS:
        for nums in itertools.combinations_with_replacement(range(lo, hi + 1), k):
            counts = reach_counts(nums)
            for target in range(TARGET_RANGE[0], TARGET_RANGE[1] + 1):
                if counts.get(target, 0) >= MIN_SOLUTIONS:
                    out[split_of(nums, target)].append((nums, target))
    return {s: tuple(v) for s, v in out.items()}


def make_examples(split: str, n: int, seed: int) -> list[Example]:
    """``n`` distinct problems of ``split`` ('train' | 'eval'), deterministic in ``seed``."""
    if split not in SPLITS:
        raise ValueError(f"countdown.make_examples: split must be one of {SPLITS}, got {split!r}")
    pool = list(all_problems()[split])
    if not 0 <= n <= len(pool):
        raise ValueError(f"countdown.make_examples: cannot draw {n} distinct {split} problems "
                         f"(the split has {len(pool)})")
    random.Random(f"countdown/{split}/{seed}").shuffle(pool)
    out = []
    for nums, target in pool[:n]:
        key = _key(nums, target)
        out.append(Example(prompt=f"{key} :", answer=key,
                           id=f"countdown-{split}-{key.replace(' -> ', '-').replace(' ', '.')}"))
    return out


def build_tokenizer():
    """A word-level ``tokenizers.Tokenizer``: <pad>=0, <eos>=1, <unk>=2, numbers 0..99,
    then SYMBOLS; text splits on whitespace and decodes with single spaces between tokens,
    so a decoded response re-encodes to the same ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: PLC0415

    from espo_jax.data.char_tokenizer import SPECIALS, UNK  # noqa: PLC0415

    words = list(SPECIALS) + [str(i) for i in range(MAX_VALUE + 1)] + list(SYMBOLS)
    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(list(SPECIALS))
    return tok
