"""The embedded task: multi-step integer arithmetic with a scratchpad.

Format (character level; one token per character, see ``build_tokenizer``)::

    prompt   "Q:37+48-19="
    response "37+48=85;85-19=66;#66" + <eos>
    answer   "66"

The prompt is ``Q:`` + 2..4 operands (1..MAX_OPERAND) joined by ``+``/``-`` + ``=``.
The reference response evaluates left to right, one step ``a op b = c;`` per operator,
then ``#`` and the final value. The running value stays in [0, MAX_VALUE]: an operator
that would leave that range is flipped when the problem is generated. Every step is a
decision point (each digit of each partial result), and so is the first token: the shortcut
``#66`` (``direct_response``) skips the scratchpad; the committed warm-start policy
(ASSET_DIR, built by experiments/make_arith_checkpoint.py) was trained on both styles and
often takes that shortcut, which it almost never gets right. Only the integer after the first
``#`` is verified (``verify``: reward 1.0 / 0.0, gradable False without ``#<int>``).

Split: a problem belongs to ``eval`` iff a SHA-256 hash of its expression falls in the
first EVAL_PERCENT buckets of 100, so train and eval are disjoint for every seed and
generator setting; ``make_examples`` draws unique problems of one split from a seeded RNG.
"""
from __future__ import annotations

import hashlib
import pathlib
import random
import re

from espo_jax.data.char_tokenizer import build_char_tokenizer
from espo_jax.data.example import Example
from espo_jax.rewards.arith import extract_answer, score_arith

ASSET_DIR = pathlib.Path(__file__).resolve().parent.parent / "assets" / "arith"

ALPHABET = "0123456789+-=;#Q: "
MAX_OPERAND = 99
MAX_VALUE = 199
EVAL_PERCENT = 10
# Longest reference response is 36 characters (+ <eos>); a sampler budget with slack.
MAX_RESPONSE_TOKENS = 40
SPLITS = ("train", "eval")

_EXPR_RE = re.compile(r"^Q:(\d+(?:[+-]\d+)+)=$")

verify = score_arith  # (response, answer) -> (reward, gradable)
__all__ = [
    "ALPHABET", "ASSET_DIR", "MAX_RESPONSE_TOKENS", "build_tokenizer", "direct_response", "extract_answer", "make_examples",
    "parse_prompt", "reference_response", "split_of", "verify",
]


def split_of(expr: str) -> str:
    """'eval' or 'train' for an expression like ``37+48-19`` (prompt without Q: and =)."""
    h = int.from_bytes(hashlib.sha256(f"arith:{expr}".encode()).digest()[:8], "big")
    return "eval" if h % 100 < EVAL_PERCENT else "train"


def parse_prompt(prompt: str) -> tuple[list[int], list[str]]:
    """(operands, operators) of a task prompt; ValueError for anything else."""
    m = _EXPR_RE.match(prompt.strip())
    if m is None:
        raise ValueError(f"not an arith prompt (expected 'Q:<int>(+|-)<int>...='): {prompt!r}")
    tokens = re.split(r"([+-])", m.group(1))
    return [int(t) for t in tokens[0::2]], tokens[1::2]


def reference_response(prompt: str) -> str:
    """The scratchpad answer, e.g. ``37+48=85;85-19=66;#66`` (no EOS)."""
    nums, ops = parse_prompt(prompt)
    value, steps = nums[0], []
    for op, b in zip(ops, nums[1:]):
        new = value + b if op == "+" else value - b
        steps.append(f"{value}{op}{b}={new};")
        value = new
    return "".join(steps) + f"#{value}"


def direct_response(prompt: str) -> str:
    """The shortcut answer without a scratchpad, e.g. ``#66`` (no EOS).

    The warm-start policy is trained on a mix of both styles, so its first response token
    is a real decision (work it out vs. answer at once) that RL can learn to make.
    """
    return "#" + reference_response(prompt).rsplit("#", 1)[1]


def _sample_expr(rng: random.Random, min_operands: int, max_operands: int, max_operand: int) -> str:
    k = rng.randint(min_operands, max_operands)
    value = rng.randint(1, max_operand)
    parts = [str(value)]
    for _ in range(k - 1):
        b = rng.randint(1, max_operand)
        op = rng.choice("+-")
        if op == "+" and value + b > MAX_VALUE:
            op = "-"
        elif op == "-" and value - b < 0:
            op = "+"
        value = value + b if op == "+" else value - b
        parts += [op, str(b)]
    return "".join(parts)


def make_examples(
    split: str, n: int, seed: int, *, min_operands: int = 2, max_operands: int = 4,
    max_operand: int = MAX_OPERAND,
) -> list[Example]:
    """``n`` distinct problems of ``split`` ('train' | 'eval'), deterministic in ``seed``."""
    if split not in SPLITS:
        raise ValueError(f"arith.make_examples: split must be one of {SPLITS}, got {split!r}")
    if not 2 <= min_operands <= max_operands:
        raise ValueError(f"arith.make_examples: need 2 <= min_operands <= max_operands, "
                         f"got {min_operands}, {max_operands}")
    if not 1 <= max_operand <= MAX_OPERAND:
        raise ValueError(f"arith.make_examples: max_operand must be in [1, {MAX_OPERAND}]")
    rng = random.Random(f"arith/{split}/{seed}")
    seen: set[str] = set()
    out: list[Example] = []
    budget = 100 * n + 10_000
    while len(out) < n:
        budget -= 1
        if budget < 0:
            raise ValueError(f"arith.make_examples: cannot draw {n} distinct {split} problems "
                             f"with operands <= {max_operand} (got {len(out)})")
        expr = _sample_expr(rng, min_operands, max_operands, max_operand)
        if expr in seen or split_of(expr) != split:
            continue
        seen.add(expr)
        prompt = f"Q:{expr}="
        answer = reference_response(prompt).rsplit("#", 1)[1]
        out.append(Example(prompt=prompt, answer=answer, id=f"arith-{split}-{expr}"))
    return out


def build_tokenizer():
    """The task's character-level ``tokenizers.Tokenizer`` (<pad>=0, <eos>=1, <unk>=2)."""
    return build_char_tokenizer(ALPHABET)
