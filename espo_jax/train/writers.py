"""Metric writers: metrics.jsonl (idempotent on resume), TensorBoard, the resolved config.

Only process 0 writes (multi-host runs call these on every host). All paths go through
``etils.epath``, so a workdir may be local or a bucket (``gs://...``).
"""
from __future__ import annotations

import json
import math
import os

import jax
from etils import epath


def workdir_path(workdir) -> epath.Path:
    """``--workdir`` as an epath.Path: URLs (gs://, s3://, ...) stay URLs, local paths
    become absolute (never ``pathlib.Path('gs://b').resolve()`` == ``$PWD/gs:/b``)."""
    s = os.fspath(workdir)
    if "://" in s:
        return epath.Path(s)
    return epath.Path(os.path.abspath(os.path.expanduser(s)))


def is_local(path) -> bool:
    return "://" not in os.fspath(path)


def _is_writer() -> bool:
    return jax.process_index() == 0


def _clean(v):
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN/inf; keep the information as a string
    return v


def read_metrics(path, *, events: bool = True) -> list[dict]:
    """The records of a metrics.jsonl (``[]`` if absent); ``events=False`` keeps step records
    only (drops ``{"event": ...}`` records such as ``resume``)."""
    p = epath.Path(path)
    if not p.exists():
        return []
    recs = [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
    return recs if events else [r for r in recs if "event" not in r]


class MetricWriter:
    """One JSON record per step in ``workdir/metrics.jsonl`` (+ TensorBoard scalars)."""

    def __init__(self, workdir, *, tensorboard: bool = True):
        self.path = epath.Path(workdir) / "metrics.jsonl"
        self._tb = None
        if _is_writer() and tensorboard and not is_local(self.path):
            # tensorboardX would os.makedirs() a URL into a local "gs:" directory
            print(f"WARNING: TensorBoard events are written for local workdirs only; "
                  f"metrics go to {self.path}", flush=True)
        elif _is_writer() and tensorboard:
            try:
                from tensorboardX import SummaryWriter  # noqa: PLC0415
                self._tb = SummaryWriter(os.fspath(epath.Path(workdir) / "tensorboard"))
            except Exception as e:  # noqa: BLE001 - TensorBoard is optional
                print(f"WARNING: TensorBoard disabled ({e})", flush=True)

    def truncate_after(self, step: int) -> None:
        """Drop records with ``step`` > ``step`` (a resumed run rewrites them identically)."""
        if not _is_writer() or not self.path.exists():
            return
        keep = [r for r in read_metrics(self.path) if r.get("step", 0) <= step]
        self._rewrite(keep)

    def _rewrite(self, records: list[dict]) -> None:
        tmp = self.path.parent / (self.path.name + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
        tmp.replace(self.path)

    def write(self, step: int, metrics: dict) -> None:
        """Append (or merge into an existing record of the same step, e.g. a final eval)."""
        if not _is_writer():
            return
        rec = {"step": int(step), **{k: _clean(v) for k, v in metrics.items()}}
        records = read_metrics(self.path)
        if records and records[-1].get("step") == step and "event" not in records[-1]:
            records[-1].update(rec)
            self._rewrite(records)
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._append(rec)
        if self._tb is not None:
            for k, v in rec.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self._tb.add_scalar(k, v, step)
            self._tb.flush()

    def _append(self, rec: dict) -> None:
        if is_local(self.path):
            with self.path.open("a") as f:
                f.write(json.dumps(rec) + "\n")
        else:  # object stores have no append: rewrite (metrics.jsonl stays small)
            self._rewrite(read_metrics(self.path) + [rec])

    def write_event(self, rec: dict) -> None:
        """A non-step record (e.g. ``{"step": k, "event": "resume", ...}``), appended as is."""
        if _is_writer():
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._append({k: _clean(v) for k, v in rec.items()})

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def write_config(workdir, config) -> None:
    """The resolved config as ``config.json`` (machine readable) and ``config.txt``."""
    if not _is_writer():
        return
    wd = epath.Path(workdir)
    wd.mkdir(parents=True, exist_ok=True)
    (wd / "config.json").write_text(config.to_json_best_effort(indent=2, sort_keys=True))
    (wd / "config.txt").write_text(str(config))
