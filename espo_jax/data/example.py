"""The unit of RL data: a prompt and its gold answer."""
from __future__ import annotations

import dataclasses
from typing import Any, Iterable


@dataclasses.dataclass(frozen=True)
class Example:
    """One prompt. ``answer`` is what the verifier compares against; ``id`` is stable."""

    prompt: str
    answer: str
    id: str


def _prompt_of(item: Any) -> str:
    if isinstance(item, Example):
        return item.prompt
    if isinstance(item, str):
        return item
    if isinstance(item, dict):
        for key in ("prompt", "problem", "question"):
            if key in item:
                return str(item[key])
    raise TypeError(f"check_disjoint: expected Example, str or dict rows, got {type(item).__name__}")


def _norm(text: str) -> str:
    return " ".join(text.split())


def check_disjoint(train: Iterable[Any], eval: Iterable[Any]) -> None:
    """Raise ValueError when any eval prompt (whitespace-normalised) is also a train prompt.

    Items are Examples, prompt strings or jsonl rows with a prompt/problem/question field.
    """
    seen = {_norm(_prompt_of(x)) for x in train}
    evals = [_norm(_prompt_of(x)) for x in eval]
    overlap = [p for p in evals if p in seen]
    if overlap:
        raise ValueError(
            f"eval split overlaps train: {len(overlap)} of {len(evals)} eval prompts also "
            f"appear in the training data, e.g. {overlap[0][:200]!r}"
        )
