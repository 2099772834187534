"""Metric writers: metrics.jsonl (idempotent on resume), TensorBoard, the resolved config.

Only process 0 writes (multi-host runs call these on every host).
"""
from __future__ import annotations

import json
import math
import pathlib

import jax


def _is_writer() -> bool:
    return jax.process_index() == 0


def _clean(v):
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN/inf; keep the information as a string
    return v


def read_metrics(path: str | pathlib.Path) -> list[dict]:
    p = pathlib.Path(path)
    if not p.exists():
        return []
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


class MetricWriter:
    """One JSON record per step in ``workdir/metrics.jsonl`` (+ TensorBoard scalars)."""

    def __init__(self, workdir: str | pathlib.Path, *, tensorboard: bool = True):
        self.path = pathlib.Path(workdir) / "metrics.jsonl"
        self._tb = None
        if _is_writer() and tensorboard:
            try:
                from tensorboardX import SummaryWriter  # noqa: PLC0415
                self._tb = SummaryWriter(str(pathlib.Path(workdir) / "tensorboard"))
            except Exception as e:  # noqa: BLE001 - TensorBoard is optional
                print(f"WARNING: TensorBoard disabled ({e})", flush=True)

    def truncate_after(self, step: int) -> None:
        """Drop records with ``step`` > ``step`` (a resumed run rewrites them identically)."""
        if not _is_writer() or not self.path.exists():
            return
        keep = [r for r in read_metrics(self.path) if r.get("step", 0) <= step]
        self._rewrite(keep)

    def _rewrite(self, records: list[dict]) -> None:
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
        tmp.replace(self.path)

    def write(self, step: int, metrics: dict) -> None:
        """Append (or merge into an existing record of the same step, e.g. a final eval)."""
        if not _is_writer():
            return
        rec = {"step": int(step), **{k: _clean(v) for k, v in metrics.items()}}
        records = read_metrics(self.path)
        if records and records[-1].get("step") == step:
            records[-1].update(rec)
            self._rewrite(records)
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a") as f:
                f.write(json.dumps(rec) + "\n")
        if self._tb is not None:
            for k, v in rec.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self._tb.add_scalar(k, v, step)
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def write_config(workdir: str | pathlib.Path, config) -> None:
    """The resolved config as ``config.json`` (machine readable) and ``config.txt``."""
    if not _is_writer():
        return
    wd = pathlib.Path(workdir)
    wd.mkdir(parents=True, exist_ok=True)
    (wd / "config.json").write_text(config.to_json_best_effort(indent=2, sort_keys=True))
    (wd / "config.txt").write_text(str(config))
