"""Resume that checks: the new launch's config against the one the checkpoints were made with.

Changes to what defines the run (``PROTECTED``: the model, objective, advantage estimator,
task, mesh shape, seed) are refused with one line naming the keys, unless listed in
``--config.resume.allow_changes=key1,key2`` (a key or a prefix such as ``objective``).
Other changes (num_steps, eval, logging, ...) are allowed; they come back as a dict the
loop records in metrics.jsonl as a ``resume`` record.

Every launch's resolved config is kept: ``config.json`` (the first launch) plus
``config.<step>.json`` for a launch that resumed at ``step`` with a changed config; the
comparison is against the newest of them.
"""
from __future__ import annotations

import json
import re
from typing import Any

from etils import epath

PROTECTED = ("model", "objective", "advantage", "task", "mesh", "seed")
# Never a change worth recording: the override list itself.
IGNORED = ("resume",)


class ResumeError(ValueError):
    """A resumed run's config changes a protected key (a user error: exit 2)."""


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1} (lists are leaves)."""
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: tree}


def config_tree(config) -> dict:
    """The config as plain JSON data (what config.json holds)."""
    return json.loads(config.to_json_best_effort(sort_keys=True))


def allowed_changes(config) -> tuple[str, ...]:
    """``resume.allow_changes`` as key tuple; ValueError for an entry that names no key."""
    raw = str(config.resume.allow_changes or "")
    keys = tuple(k.strip() for k in raw.split(",") if k.strip())
    known = flatten(config_tree(config))
    for k in keys:
        if not any(name == k or name.startswith(k + ".") for name in known):
            raise ValueError(f"resume.allow_changes: {k!r} is not a config key or prefix "
                             f"(e.g. 'objective.espo.alpha', 'task', 'seed')")
    return keys


def _matches(key: str, prefixes: tuple[str, ...]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def diff(old: dict, new: dict) -> dict[str, tuple[Any, Any]]:
    """{dotted key: (old, new)} for every key whose value differs (or exists in one only)."""
    a, b = flatten(old), flatten(new)
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b))
            if a.get(k) != b.get(k) and not _matches(k, IGNORED)}


def saved_configs(workdir) -> list[tuple[int, epath.Path]]:
    """(step, path) of config.json (step 0) and every config.<step>.json, oldest first."""
    wd = epath.Path(workdir)
    out = []
    if (wd / "config.json").exists():
        out.append((0, wd / "config.json"))
    if wd.exists():
        for p in wd.glob("config.*.json"):
            m = re.fullmatch(r"config\.(\d+)\.json", p.name)
            if m:
                out.append((int(m.group(1)), p))
    return sorted(out, key=lambda t: t[0])


def check(workdir, config, step: int) -> dict[str, tuple[Any, Any]]:
    """Compare ``config`` with the newest saved config at or before ``step``.

    Returns the allowed changes ({key: (old, new)}, empty when none or nothing saved);
    raises ResumeError naming the protected keys that changed and are not allowed.
    """
    saved = [(s, p) for s, p in saved_configs(workdir) if s <= step]
    if not saved:
        return {}
    old = json.loads(saved[-1][1].read_text())
    changes = diff(old, config_tree(config))
    allow = allowed_changes(config)
    refused = [k for k in changes if _matches(k, PROTECTED) and not _matches(k, allow)]
    if refused:
        what = "; ".join(f"{k}: {changes[k][0]!r} -> {changes[k][1]!r}" for k in refused)
        raise ResumeError(
            f"resume: the workdir's checkpoint (step {step}) was made with a different "
            f"config ({what}); use a new --workdir, or allow it with "
            f"--config.resume.allow_changes={','.join(refused)}")
    return changes


def record(changes: dict[str, tuple[Any, Any]], step: int, saved_as: str | None) -> dict:
    """The metrics.jsonl ``resume`` record of a launch resuming at ``step``."""
    return {"step": int(step), "event": "resume", "config": saved_as,
            "changes": {k: {"old": a, "new": b} for k, (a, b) in changes.items()}}


def save_config(workdir, config, step: int | None) -> str | None:
    """Keep this launch's resolved config: config.json on a fresh start, config.<step>.json
    when resuming at ``step`` with a changed config. Returns the file name written (or None).
    Call on process 0 only."""
    wd = epath.Path(workdir)
    wd.mkdir(parents=True, exist_ok=True)
    name = "config.json" if step is None else f"config.{int(step)}.json"
    (wd / name).write_text(config.to_json_best_effort(indent=2, sort_keys=True))
    txt = "config.txt" if step is None else f"config.{int(step)}.txt"
    (wd / txt).write_text(str(config))
    return name
