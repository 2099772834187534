"""Verifier of the embedded arithmetic task (format: see ``espo_jax.data.arith``)."""
from __future__ import annotations

import re

_ANSWER_RE = re.compile(r"#\s*(-?\d+)")


def extract_answer(response: str) -> int | None:
    """The integer after the first ``#`` of a response, or None when there is none."""
    m = _ANSWER_RE.search(response)
    if m is None or len(m.group(1)) > 12:
        return None
    return int(m.group(1))


def score_arith(response: str, answer: str) -> tuple[float, bool]:
    """(1.0 if the ``#<int>`` answer equals ``answer`` else 0.0, gradable).

    Only the final answer is checked, not the scratchpad; gradable is False when no
    ``#<int>`` can be parsed from the response.
    """
    pred = extract_answer(response)
    if pred is None:
        return 0.0, False
    return (1.0 if pred == int(answer) else 0.0), True
