"""Rewards: math answers (last \\boxed{} + math-verify), the embedded task's verifier,
and DAPO's overlong shaping. Plain Python; imports no model code."""
from espo_jax.rewards.arith import extract_answer, score_arith
from espo_jax.rewards.math import last_boxed, score_math, score_math_batch
from espo_jax.rewards.shaping import overlong_budget, overlong_penalty

__all__ = [
    "extract_answer",
    "last_boxed",
    "overlong_budget",
    "overlong_penalty",
    "score_arith",
    "score_math",
    "score_math_batch",
]
