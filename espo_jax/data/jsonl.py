"""JSON-lines prompt files (SimpleRL / MATH500 style), with errors naming file and line."""
from __future__ import annotations

import json
import pathlib
from typing import Sequence

from espo_jax.data.example import Example


def load_jsonl(path: str | pathlib.Path, required: Sequence[str] = ("problem", "answer")) -> list[dict]:
    """Rows of a jsonl file; blank lines are skipped.

    Raises FileNotFoundError for a missing file, and ValueError naming ``file:line`` for
    malformed JSON, a row that is not an object, or a row missing a ``required`` field;
    ValueError("... empty dataset") when the file has no rows.
    """
    p = pathlib.Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"dataset file {p} does not exist")
    rows = []
    with p.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{p}:{lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{p}:{lineno}: expected a JSON object, got {type(row).__name__}")
            missing = [k for k in required if k not in row]
            if missing:
                raise ValueError(
                    f"{p}:{lineno}: missing field(s) {missing}; required {list(required)}, "
                    f"found {sorted(row)}"
                )
            rows.append(row)
    if not rows:
        raise ValueError(f"{p}: empty dataset (no JSON rows)")
    return rows


def rows_to_examples(
    rows: Sequence[dict], *, prompt_field: str = "problem", answer_field: str = "answer",
    id_prefix: str = "row",
) -> list[Example]:
    """Examples from jsonl rows; ``id`` is the row's own ``id``/``unique_id`` if any."""
    out = []
    for i, row in enumerate(rows):
        rid = row.get("id", row.get("unique_id", f"{id_prefix}-{i}"))
        out.append(Example(prompt=str(row[prompt_field]), answer=str(row[answer_field]), id=str(rid)))
    return out
