"""Shared machinery of the experiment sweeps: define, run (resumable, parallel), aggregate, plot, report.

Used by ``experiments/compare_objectives.py`` and ``experiments/ablations.py``. It drives the
runner like a user does, one subprocess per run::

    python -m espo_jax.main --config=CONFIG[:smoke,OBJECTIVE] --workdir=RUNS/<slug>/seed<k> \
        --config.seed=k [--config.num_steps=S] [--config.<key>=<value> ...]

so every run is an isolated process (the parent only loads the config files, to hash what
they resolve to).

Layout::

    RUNS/<slug>/seed<k>/      runner workdir (metrics.jsonl, config.json, run.log, ...)
        spec.json             the command this harness ran (identity of the run)
        done.json             written after a successful run (wall time, return code)
    OUT/report.md, OUT/*.png  the aggregate report (small files; commit these)

``<slug>`` is derived from the config (name + a hash of the resolved config and the policy
weights), objective, overrides and step count, so two
sweeps that ask for the same configuration (e.g. the comparison's ESPO and the ablation's
reference ESPO) share one set of runs.

Resume: a run whose ``done.json`` records the same command is not re-run; an unfinished
workdir is handed to the runner again, which resumes from its latest checkpoint. A
``.lock`` file (with the owner's pid) keeps two sweeps in parallel processes from running
the same workdir at once.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import json
import math
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterable, Sequence

import numpy as np

REPO = pathlib.Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = REPO / "configs" / "default.py"
DEFAULT_RUNS = REPO / "runs" / "experiments"
TRAIN_KEYS = ("clip_frac", "clip_frac_high", "clip_frac_low", "entropy_mean",
              "response_len_mean", "reward_mean")


# ------------------------------------------------------------------------- specs --
@dataclasses.dataclass(frozen=True)
class Variant:
    """One configuration of a sweep: an objective plus ``--config.*`` overrides."""
    name: str                       # label in tables and plots, e.g. "espo" or "alpha=0.05"
    objective: str                  # espo | grpo | dapo | gspo | gmpo | cispo
    overrides: tuple[tuple[str, Any], ...] = ()   # (("objective.espo.alpha", 0.05), ...)
    note: str = ""                  # one line for the report


@dataclasses.dataclass(frozen=True)
class Run:
    variant: Variant
    seed: int
    workdir: pathlib.Path
    argv: tuple[str, ...]           # the full command (also the run's identity)


def _fmt(v: Any) -> str:
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, float):
        return repr(v)
    return str(v)


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=+-]+", "_", s).strip("_")


# Keys that do not change what a run computes (logging, checkpoint cadence, dumps, set-up).
NEUTRAL_KEYS = ("log", "checkpoint", "dump", "distributed", "mesh")


@functools.lru_cache(maxsize=None)
def config_hash(config: pathlib.Path, arg: str = "",
                overrides: tuple[tuple[str, str], ...] = ()) -> str:
    """Short hash of what ``config:arg`` with ``overrides`` resolves to (``get_config(arg)``,
    overridden keys set to their text, minus NEUTRAL_KEYS) and of the policy weights it
    points at. An edited config or a new checkpoint gives new run directories; comment,
    cadence or overridden-key edits do not invalidate finished runs."""
    import importlib.util  # noqa: PLC0415

    spec = importlib.util.spec_from_file_location(f"_cfg_{abs(hash(str(config)))}", config)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    cfg = mod.get_config(arg or None).to_dict()
    for key, val in overrides:
        *path, last = key.split(".")
        node = cfg
        for part in path:
            node = node.setdefault(part, {})
        node[last] = val
    for k in NEUTRAL_KEYS:
        cfg.pop(k, None)
    h = hashlib.sha1(json.dumps(cfg, sort_keys=True, default=str).encode())
    model = pathlib.Path(str(cfg.get("model", {}).get("path", "")))
    if model.is_dir():
        for f in sorted(model.glob("*.safetensors")) + [model / "config.json"]:
            if f.is_file():
                h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()[:6]


def variant_slug(config: pathlib.Path, variant: Variant, *, smoke: bool, steps: int | None,
                 extra: Sequence[tuple[str, Any]] = ()) -> str:
    arg = ",".join((["smoke"] if smoke else []) + [variant.objective])
    ov = [(k, _fmt(v)) for k, v in list(variant.overrides) + list(extra)]
    if steps is not None:
        ov.append(("num_steps", str(steps)))
    parts = [config.stem + ("-smoke" if smoke else "") + "-" + config_hash(config, arg,
                                                                           tuple(sorted(ov))),
             variant.objective]
    for k, v in sorted(variant.overrides) + sorted(extra):
        parts.append(f"{k.split('.')[-1]}={_fmt(v)}")
    if steps is not None:
        parts.append(f"steps={steps}")
    return _slug("__".join(parts))


def make_runs(variants: Sequence[Variant], seeds: Sequence[int], *, runs_dir: pathlib.Path,
              config: pathlib.Path = DEFAULT_CONFIG, smoke: bool = False,
              steps: int | None = None, extra: Sequence[tuple[str, Any]] = (),
              dump_every: int = 0, dump_variant: str | None = None,
              python: str = sys.executable) -> list[Run]:
    """The runs of a sweep (variants x seeds), with their workdirs and commands.

    extra: overrides applied to every run (e.g. a smaller eval set to fit a CPU budget).
    dump_every > 0 turns on the runner's rollout dumps for ``dump_variant`` (seed 0 only).
    """
    runs = []
    for v in variants:
        wd_root = runs_dir / variant_slug(config, v, smoke=smoke, steps=steps, extra=extra)
        arg = ",".join((["smoke"] if smoke else []) + [v.objective])
        for seed in seeds:
            argv = [python, "-m", "espo_jax.main", f"--config={config}:{arg}",
                    f"--workdir={wd_root / f'seed{seed}'}", f"--config.seed={seed}",
                    "--config.log.progress=False", "--config.log.tensorboard=False"]
            if steps is not None:
                argv.append(f"--config.num_steps={steps}")
            for k, val in list(v.overrides) + list(extra):
                argv.append(f"--config.{k}={_fmt(val)}")
            if dump_every > 0 and v.name == dump_variant and seed == seeds[0]:
                argv.append(f"--config.dump.every={dump_every}")
            runs.append(Run(v, seed, wd_root / f"seed{seed}", tuple(argv)))
    # Seed-major order: a sweep cut short still has every variant at the first seeds.
    return sorted(runs, key=lambda r: seeds.index(r.seed))


# ------------------------------------------------------------------------ running --
def _identity(argv: Sequence[str]) -> list[str]:
    """The part of a command that defines the run: not the interpreter, not the workdir
    (derived from the rest, so run directories can be moved), not NEUTRAL_KEYS overrides
    (so the comparison's ESPO run with dumps is the ablation's reference run)."""
    neutral = tuple(f"--config.{k}." for k in NEUTRAL_KEYS) + ("--workdir=",)
    return [a for a in argv[1:] if not a.startswith(neutral)]


def is_finished(run: Run) -> bool:
    """True when ``done.json`` records this exact command and metrics.jsonl is there."""
    done = run.workdir / "done.json"
    if not done.is_file() or not (run.workdir / "metrics.jsonl").is_file():
        return False
    try:
        rec = json.loads(done.read_text())
    except json.JSONDecodeError:
        return False
    return rec.get("argv") == _identity(run.argv) and rec.get("returncode") == 0


def metrics_complete(wd: pathlib.Path) -> bool:
    """The workdir's metrics.jsonl reaches its config's num_steps with a final evaluation."""
    try:
        steps = int(json.loads((wd / "config.json").read_text())["num_steps"])
    except (OSError, KeyError, ValueError):
        return False
    recs = read_metrics(wd / "metrics.jsonl")
    return bool(recs) and recs[-1].get("step") == steps and "eval_accuracy" in recs[-1]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _acquire(lock: pathlib.Path) -> bool:
    """Create ``lock`` atomically; a stale lock (dead pid) is taken over."""
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                pid = int(lock.read_text().strip() or 0)
            except (OSError, ValueError):
                pid = 0
            if pid and _pid_alive(pid):
                return False
            lock.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        return True
    return False


def run_one(run: Run, *, keep_checkpoints: bool = False, timeout_s: float | None = None,
            env: dict | None = None) -> dict:
    """Run (or resume, or skip) one training run. Returns a status dict (never raises for a
    failed run: the status says ``failed`` and points at run.log)."""
    wd = run.workdir
    if is_finished(run):
        return {"run": str(wd), "status": "cached"}
    wd.mkdir(parents=True, exist_ok=True)
    spec = wd / "spec.json"
    ident = _identity(run.argv)
    if spec.is_file():
        old = json.loads(spec.read_text()).get("argv")
        if old != ident:
            raise RuntimeError(f"{wd} holds a different run (spec.json argv {old} != {ident}); "
                               "use another --runs_dir or delete the directory")
    lock = wd / ".lock"
    if not _acquire(lock):
        return {"run": str(wd), "status": "busy (locked by another process)"}
    try:
        spec.write_text(json.dumps({"argv": ident, "variant": run.variant.name,
                                    "seed": run.seed}, indent=1))
        t0 = time.time()
        with (wd / "run.log").open("a") as log:
            log.write(f"\n$ {' '.join(run.argv)}\n")
            log.flush()
            if _STOP.is_set():
                return {"run": str(wd), "status": "skipped (sweep stopping)"}
            proc = subprocess.Popen(run.argv, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                    env={**os.environ, **(env or {})})
            _CHILDREN.add(proc)
            try:
                rc = proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:  # SIGTERM: the runner checkpoints and exits
                proc.terminate()
                proc.wait()
                rc = -15
            finally:
                _CHILDREN.discard(proc)
        wall = time.time() - t0
        if rc != 0:
            tail = (wd / "run.log").read_text().splitlines()[-5:]
            return {"run": str(wd), "status": "failed", "returncode": rc, "wall_s": wall,
                    "log_tail": tail}
        if not metrics_complete(wd):  # e.g. stopped by SIGTERM (exit 0 after a checkpoint)
            return {"run": str(wd), "status": "interrupted (resumes on the next invocation)",
                    "wall_s": wall}
        if not keep_checkpoints:  # metrics are all a sweep needs; policies are ~3x model size
            for sub in ("checkpoints", "final_policy"):
                shutil.rmtree(wd / sub, ignore_errors=True)
        (wd / "done.json").write_text(json.dumps(
            {"argv": ident, "returncode": 0, "wall_s": wall, "finished": time.time()}, indent=1))
        return {"run": str(wd), "status": "done", "wall_s": wall}
    finally:
        lock.unlink(missing_ok=True)


def run_all(runs: Sequence[Run], *, jobs: int = 1, keep_checkpoints: bool = False,
            timeout_s: float | None = None, compile_cache: pathlib.Path | None = None,
            log=print) -> list[dict]:
    """Run every run not yet finished, ``jobs`` subprocesses at a time.

    compile_cache: a directory for JAX's persistent compilation cache, shared by the runs
    (seeds and objectives compile the same sampler / scoring programs: compile once).
    """
    todo = [r for r in runs if not is_finished(r)]
    log(f"{len(runs)} runs: {len(runs) - len(todo)} already finished, {len(todo)} to run "
        f"({jobs} at a time)")
    env = {}
    if compile_cache is not None and "JAX_COMPILATION_CACHE_DIR" not in os.environ:
        compile_cache.mkdir(parents=True, exist_ok=True)
        env["JAX_COMPILATION_CACHE_DIR"] = str(compile_cache)
        env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.5"
    if jobs > 1:  # several XLA processes on few cores: avoid oversubscribing thread pools
        env["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                            " --xla_cpu_multi_thread_eigen=false").strip()

    def one(r: Run) -> dict:
        log(f"  start {r.variant.name} seed {r.seed}")
        st = run_one(r, keep_checkpoints=keep_checkpoints, timeout_s=timeout_s, env=env)
        extra = f" in {st['wall_s']:.0f} s" if "wall_s" in st else ""
        log(f"  {st['status']}: {r.variant.name} seed {r.seed}{extra}"
            + (f" (see {r.workdir / 'run.log'})" if st["status"] == "failed" else ""))
        return st

    _STOP.clear()
    previous = _forward_signals()
    try:
        with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
            results = list(pool.map(one, runs))
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if _STOP.is_set():
        log("stopped: interrupted runs checkpointed; rerun the same command to resume")
    return results


_CHILDREN: set = set()
_STOP = threading.Event()


def _forward_signals() -> dict:
    """SIGTERM / SIGINT to the sweep: start no new run, pass SIGTERM to the running ones
    (the runner then checkpoints and exits) and let the pool wind down, so locks and
    workdirs stay consistent and the next invocation resumes them."""
    def handler(signum, frame):  # noqa: ARG001
        _STOP.set()
        for proc in list(_CHILDREN):
            if proc.poll() is None:
                proc.terminate()

    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, handler)
    return previous


# -------------------------------------------------------------------- aggregation --
def read_metrics(path: pathlib.Path) -> list[dict]:
    """Step records of a run's metrics.jsonl (resume events dropped); the harness does not
    import jax, so this does not reuse espo_jax.train.writers."""
    if not path.is_file():
        return []
    recs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in recs if "event" not in r]


def series(records: Sequence[dict], key: str, *, min_step: int = 0):
    """(steps int[n], values f64[n]) of the records that have a finite number under key."""
    xs, ys = [], []
    for r in records:
        v = r.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) \
                and r["step"] >= min_step:
            xs.append(int(r["step"]))
            ys.append(float(v))
    return np.asarray(xs, int), np.asarray(ys, float)


@dataclasses.dataclass
class VariantResult:
    variant: Variant
    records: list[list[dict]]       # per seed
    seeds: list[int]
    wall_s: list[float]

    def stack(self, key: str, *, min_step: int = 0):
        """(steps int[n], values f64[S, n]) over the steps every seed has (NaN-free)."""
        per = [dict(zip(*series(r, key, min_step=min_step))) for r in self.records]
        if not per:
            return np.zeros(0, int), np.zeros((0, 0))
        common = sorted(set.intersection(*(set(p) for p in per)))
        return np.asarray(common, int), np.asarray([[p[s] for s in common] for p in per])


def load_results(runs: Sequence[Run]) -> list[VariantResult]:
    """Finished runs grouped by variant (order of first appearance); unfinished skipped."""
    by: dict[str, VariantResult] = {}
    for r in runs:
        res = by.setdefault(r.variant.name, VariantResult(r.variant, [], [], []))
        if not is_finished(r):
            continue
        res.records.append(read_metrics(r.workdir / "metrics.jsonl"))
        res.seeds.append(r.seed)
        res.wall_s.append(float(json.loads((r.workdir / "done.json").read_text())["wall_s"]))
    return list(by.values())


def final_accuracy(records: Sequence[dict]) -> float:
    _, acc = series(records, "eval_accuracy")
    return float(acc[-1]) if len(acc) else float("nan")


def initial_accuracy(records: Sequence[dict]) -> float:
    x, acc = series(records, "eval_accuracy")
    return float(acc[0]) if len(acc) and x[0] == 0 else float("nan")


def steps_to_target(records: Sequence[dict], target: float) -> int | None:
    """First evaluated step (>= 1) whose eval accuracy reaches ``target``; None if never."""
    for s, a in zip(*series(records, "eval_accuracy", min_step=1)):
        if a >= target - 1e-9:
            return int(s)
    return None


def train_mean(records: Sequence[dict], key: str) -> float:
    """Mean of a per-update metric over the training steps (step >= 1)."""
    _, y = series(records, key, min_step=1)
    return float(y.mean()) if len(y) else float("nan")


def _ms(vals: Iterable[float], fmt: str = "{:.3f}") -> str:
    v = np.asarray([x for x in vals if x is not None and math.isfinite(x)], float)
    if not len(v):
        return "n/a"
    if len(v) == 1:
        return fmt.format(v[0])
    return f"{fmt.format(v.mean())} ± {fmt.format(v.std(ddof=1))}"


def summarize(res: VariantResult, target: float) -> dict:
    """Per-variant numbers for the table (lists are per seed)."""
    recs = res.records
    reach = [steps_to_target(r, target) for r in recs]
    _, ent = res.stack("entropy_mean", min_step=1)
    return {
        "name": res.variant.name,
        "n": len(recs),
        "initial": [initial_accuracy(r) for r in recs],
        "final": [final_accuracy(r) for r in recs],
        "best": [float(series(r, "eval_accuracy")[1].max()) if len(series(r, "eval_accuracy")[1])
                 else float("nan") for r in recs],
        "avg": [float(series(r, "eval_accuracy", min_step=1)[1].mean())
                if len(series(r, "eval_accuracy", min_step=1)[1]) else float("nan") for r in recs],
        "reach": reach,
        **{k: [train_mean(r, k) for r in recs] for k in TRAIN_KEYS},
        "entropy_first": float(ent[:, 0].mean()) if ent.size else float("nan"),
        "entropy_last": float(ent[:, -1].mean()) if ent.size else float("nan"),
        "wall_s": res.wall_s,
    }


def _reach_cell(reach: Sequence[int | None]) -> str:
    hit = [r for r in reach if r is not None]
    if not reach:
        return "n/a"
    if not hit:
        return f"never (0/{len(reach)})"
    return f"{np.mean(hit):.1f} ({len(hit)}/{len(reach)})"


def results_table(summaries: Sequence[dict]) -> list[str]:
    head = ("| config | seeds | eval acc step 0 | final eval acc | mean eval acc (steps ≥ 1) | "
            "best eval acc | steps to target "
            "(reached) | clip frac high | clip frac low | clip frac | entropy first→last | "
            "resp. len | min / run |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for s in summaries:
        if not s["n"]:
            lines.append(f"| {s['name']} | 0 | (no finished runs) |" + " |" * 10)
            continue
        lines.append(
            f"| {s['name']} | {s['n']} | {_ms(s['initial'])} | **{_ms(s['final'])}** | "
            f"{_ms(s['avg'])} | {_ms(s['best'])} | {_reach_cell(s['reach'])} | {_ms(s['clip_frac_high'], '{:.4f}')} | "
            f"{_ms(s['clip_frac_low'], '{:.4f}')} | {_ms(s['clip_frac'], '{:.4f}')} | "
            f"{s['entropy_first']:.3f}→{s['entropy_last']:.3f} | "
            f"{_ms(s['response_len_mean'], '{:.1f}')} | {np.mean(s['wall_s']) / 60:.1f} |")
    return lines


def default_target(results: Sequence[VariantResult], delta: float = 0.10) -> float:
    """Initial (step 0) eval accuracy averaged over all runs + ``delta`` (absolute)."""
    init = [initial_accuracy(r) for res in results for r in res.records]
    init = [a for a in init if math.isfinite(a)]
    return round(float(np.mean(init)) + delta, 3) if init else 0.5


# ------------------------------------------------------------------------- plots --
def _plt():
    import matplotlib  # noqa: PLC0415
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415
    return plt


def _colors(n: int):
    plt = _plt()
    cmap = plt.get_cmap("tab10")
    return [cmap(i % 10) for i in range(n)]


def smooth(ys: np.ndarray, window: int) -> np.ndarray:
    """Trailing moving average along the last axis (window 1 = unchanged)."""
    if window <= 1 or ys.shape[-1] < window:
        return ys
    c = np.cumsum(np.pad(ys, [(0, 0)] * (ys.ndim - 1) + [(1, 0)]), axis=-1)
    out = np.empty_like(ys)
    n = ys.shape[-1]
    for i in range(n):
        lo = max(0, i + 1 - window)
        out[..., i] = (c[..., i + 1] - c[..., lo]) / (i + 1 - lo)
    return out


def _band(ax, res: VariantResult, key: str, color, *, min_step: int = 0, label=None):
    """Seed mean with a min..max band; per-update series (min_step=1) of more than 40 steps
    are smoothed with a trailing moving average of len/20 steps (said in the label)."""
    x, ys = res.stack(key, min_step=min_step)
    if not len(x):
        return
    w = max(1, len(x) // 20) if min_step >= 1 and len(x) > 40 else 1
    ys = smooth(ys, w)
    if w > 1:
        label = f"{label or res.variant.name} (avg {w})"
    m = ys.mean(0)
    ax.plot(x, m, color=color, lw=1.6, label=label or res.variant.name,
            marker="o" if len(x) <= 12 else None, ms=3)
    if ys.shape[0] > 1:
        ax.fill_between(x, ys.min(0), ys.max(0), color=color, alpha=0.18, lw=0)


def plot_accuracy(results, path: pathlib.Path, *, target: float | None = None, title=""):
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4), dpi=90)
    for res, c in zip(results, _colors(len(results))):
        _band(ax, res, "eval_accuracy", c)
    if target is not None:
        ax.axhline(target, color="grey", ls=":", lw=1, label=f"target {target:.2f}")
    ax.set(xlabel="step", ylabel="greedy eval accuracy",
           title=title or "Eval accuracy (mean over seeds; band = min..max)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_clip(results, path: pathlib.Path, *, title=""):
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), dpi=90, sharey=False)
    for key, ax in zip(("clip_frac_high", "clip_frac_low"), axes):
        for res, c in zip(results, _colors(len(results))):
            _band(ax, res, key, c, min_step=1)
        ax.set(xlabel="step", ylabel=key.replace("_", " "),
               title=("high: A > 0, ratio above range" if key.endswith("high")
                      else "low: A < 0, ratio below range"))
        ax.set_yscale("symlog", linthresh=1e-3)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, ncol=2)
    fig.suptitle(title or "Clip fractions per update (mean over seeds; band = min..max)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_entropy_clip(res: VariantResult, path: pathlib.Path, *, title=""):
    """One variant's old-policy entropy and clip fraction over training on twin axes."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4), dpi=90)
    _band(ax, res, "entropy_mean", "tab:blue", min_step=1, label="entropy (nats/token)")
    ax.set(xlabel="step", ylabel="mean token entropy (nats)")
    ax.yaxis.label.set_color("tab:blue")
    ax2 = ax.twinx()
    _band(ax2, res, "clip_frac", "tab:red", min_step=1, label="clip fraction")
    ax2.set_ylabel("clip fraction")
    ax2.yaxis.label.set_color("tab:red")
    h = ax.get_legend_handles_labels()
    h2 = ax2.get_legend_handles_labels()
    ax.legend(h[0] + h2[0], h[1] + h2[1], fontsize=8, loc="upper center")
    ax.grid(alpha=0.3)
    ax.set_title(title or f"{res.variant.name}: entropy and clip fraction over training")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_groups(res: VariantResult, path: pathlib.Path, *, title="") -> pathlib.Path | None:
    """ESPO's per-group metrics (group<k>/clip_frac, group<k>/eps_mean) over training."""
    keys = sorted({k.split("/")[0] for rec in res.records for r in rec for k in r
                   if k.startswith("group") and "/" in k})
    if not keys:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), dpi=90)
    for g, c in zip(keys, _colors(len(keys))):
        _band(axes[0], res, f"{g}/clip_frac", c, min_step=1, label=g)
        _band(axes[1], res, f"{g}/eps_mean", c, min_step=1, label=g)
    axes[0].set(xlabel="step", ylabel="clip fraction", title="clip fraction by entropy group")
    axes[1].set(xlabel="step", ylabel="mean ε", title="adaptive clip range ε by group",
                yscale="log")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title or f"{res.variant.name}: per-group metrics (group 0 = highest entropy)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_length(results, path: pathlib.Path, *, title=""):
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4), dpi=90)
    for res, c in zip(results, _colors(len(results))):
        _band(ax, res, "response_len_mean", c, min_step=1)
    ax.set(xlabel="step", ylabel="mean response length (tokens)",
           title=title or "Response length (sampled, mean over seeds; band = min..max)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------ claims --
def trend(res: VariantResult, key: str) -> tuple[float, float]:
    """(slope per step of the seed-mean series over training, its first->last change)."""
    x, ys = res.stack(key, min_step=1)
    if len(x) < 2:
        return float("nan"), float("nan")
    m = ys.mean(0)
    slope = float(np.polyfit(x.astype(float), m, 1)[0])
    k = max(1, len(m) // 4)  # first / last quarter means: robust to one noisy step
    return slope, float(m[-k:].mean() - m[:k].mean())


def correlation(res: VariantResult, a: str, b: str) -> float:
    """Pearson correlation over (seed, step) pairs of two per-update metrics."""
    xa, ya = res.stack(a, min_step=1)
    xb, yb = res.stack(b, min_step=1)
    common = np.intersect1d(xa, xb)
    if len(common) < 3:
        return float("nan")
    va = ya[:, np.searchsorted(xa, common)].ravel()
    vb = yb[:, np.searchsorted(xb, common)].ravel()
    if va.std() == 0 or vb.std() == 0:
        return float("nan")
    return float(np.corrcoef(va, vb)[0, 1])


def verdict(ok: bool | None) -> str:
    return {True: "**holds**", False: "**does not hold**", None: "**inconclusive**"}[ok]


# --------------------------------------------------------------------------- CLI --
def add_common_args(p: argparse.ArgumentParser, *, default_out: str) -> None:
    p.add_argument("--out", default=default_out, help="report directory (report.md + PNGs)")
    p.add_argument("--runs_dir", default=str(DEFAULT_RUNS),
                   help="where run workdirs live (shared between sweeps; not committed)")
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="configs/*.py file to run")
    p.add_argument("--seeds", default="3", help="a count N (seeds 0..N-1) or a list '0,1,2'")
    p.add_argument("--jobs", type=int, default=1, help="runs in parallel (processes)")
    p.add_argument("--steps", type=int, default=None, help="override num_steps of every run")
    p.add_argument("--smoke", action="store_true",
                   help="the config's :smoke variant, 1 seed unless --seeds is given; for tests")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="extra --config.KEY=VALUE for every run (repeatable)")
    p.add_argument("--target", type=float, default=None,
                   help="accuracy target for 'steps to target' (default: mean step-0 accuracy "
                        "+ 0.10)")
    p.add_argument("--notes", default=None, help="markdown file appended to report.md")
    p.add_argument("--report_only", action="store_true", help="aggregate finished runs only")
    p.add_argument("--keep_checkpoints", action="store_true",
                   help="keep checkpoints/ and final_policy/ of finished runs")
    p.add_argument("--timeout", type=float, default=None, help="per-run wall limit (s)")
    p.add_argument("--no_compile_cache", action="store_true",
                   help="do not share JAX's persistent compilation cache (RUNS/.jax_cache)")


def parse_seeds(s: str, smoke: bool, given: bool) -> list[int]:
    if smoke and not given:
        return [0]
    if "," in s:
        return [int(x) for x in s.split(",") if x.strip()]
    return list(range(int(s)))


def parse_sets(items: Sequence[str]) -> list[tuple[str, str]]:
    out = []
    for it in items:
        if "=" not in it:
            raise SystemExit(f"--set expects KEY=VALUE (a config key without 'config.'), got {it!r}")
        k, v = it.split("=", 1)
        out.append((k.removeprefix("--").removeprefix("config."), v))
    return out


def seeds_given(argv: Sequence[str]) -> bool:
    return any(a == "--seeds" or a.startswith("--seeds=") for a in argv)


def write_report(out: pathlib.Path, *, title: str, intro: Sequence[str],
                 results: Sequence[VariantResult], target: float, claims: Sequence[str],
                 plots: Sequence[tuple[str, str]], setup: Sequence[str],
                 notes: str | None = None) -> pathlib.Path:
    summaries = [summarize(r, target) for r in results]
    lines = [f"# {title}", "", *intro, "", "## Setup", "", *setup, "",
             "## Results", "",
             f"Final eval accuracy = greedy accuracy on the held-out split after the last step "
             f"(mean ± sample std over seeds); mean eval acc = the mean of the evaluations after "
             f"step 0 (less noisy than one evaluation). Steps to target = first evaluated step with "
             f"accuracy ≥ {target:.3f} (mean over the seeds that reached it). Clip fractions and "
             "entropy are per-update training metrics averaged over all steps.", "",
             *results_table(summaries), ""]
    lines += ["## Claims of the paper at this scale", "", *claims, ""]
    lines += ["## Plots", ""]
    for fname, caption in plots:
        lines += [f"**{caption}**", "", f"![{caption}]({fname})", ""]
    if notes:
        lines += ["## Notes", "", notes.strip(), ""]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def describe_config(config: pathlib.Path, smoke: bool, steps: int | None,
                    extra: Sequence[tuple[str, Any]], seeds: Sequence[int],
                    results: Sequence[VariantResult]) -> list[str]:
    """Setup lines: the command pattern and the resolved key settings of one finished run."""
    lines = [f"- config: `{config.relative_to(REPO) if config.is_relative_to(REPO) else config}`"
             + (" (`:smoke`)" if smoke else "") + f"; seeds {list(seeds)}"
             + (f"; num_steps overridden to {steps}" if steps is not None else "")]
    if extra:
        lines.append("- extra overrides for every run: "
                     + ", ".join(f"`{k}={v}`" for k, v in extra))
    lines.append("- per-variant overrides: " + "; ".join(
        f"{r.variant.name}: " + (", ".join(f"`{k}={_fmt(v)}`" for k, v in r.variant.overrides)
                                 or "defaults") for r in results))
    lines.append(f"- total training wall time: "
                 f"{sum(sum(r.wall_s) for r in results) / 60:.1f} min over "
                 f"{sum(len(r.wall_s) for r in results)} runs")
    return lines


def resolved_settings(runs: Sequence[Run]) -> list[str]:
    """Key settings read from the first finished run's config.json."""
    for r in runs:
        p = r.workdir / "config.json"
        if is_finished(r) and p.is_file():
            c = json.loads(p.read_text())
            ro, tr, ev = c.get("rollout", {}), c.get("train", {}), c.get("eval", {})
            model = pathlib.Path(c.get("model", {}).get("path", ""))
            weights = sorted(model.glob("*.safetensors")) if model.is_dir() else []
            digest = hashlib.sha1(b"".join(w.read_bytes() for w in weights)).hexdigest()[:10]
            try:
                head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                                      capture_output=True, text=True).stdout.strip()
            except OSError:
                head = ""
            shown = model.relative_to(REPO) if model.is_relative_to(REPO) else model
            return [f"- code: git `{head or '?'}`; policy `{shown}` (safetensors sha1 "
                    f"`{digest}`)",
                    f"- resolved (from `{r.workdir.name}` of `{r.variant.name}`): "
                    f"task `{c.get('task', {}).get('name')}`, {c.get('num_steps')} steps, "
                    f"{ro.get('prompts_per_step')} prompts x G={ro.get('group_size')}, "
                    f"max {ro.get('max_new_tokens')} new tokens, T={ro.get('temperature')}, "
                    f"{tr.get('num_epochs')} epoch(s) x {tr.get('num_minibatches')} minibatches, "
                    f"lr {tr.get('lr')}, eval every {ev.get('every')} steps on "
                    f"{ev.get('num_examples')} held-out problems"]
    return []


def run_sweep(runs: Sequence[Run], args) -> list[dict]:
    """run_all with the CLI options of add_common_args (nothing when --report_only)."""
    if args.report_only:
        return []
    cache = None if args.no_compile_cache else pathlib.Path(args.runs_dir) / ".jax_cache"
    return run_all(runs, jobs=args.jobs, keep_checkpoints=args.keep_checkpoints,
                   timeout_s=args.timeout, compile_cache=cache)


def finish(args, *, out: pathlib.Path, config: pathlib.Path, runs: Sequence[Run],
           statuses: Sequence[dict], results: Sequence[VariantResult], seeds: Sequence[int],
           extra: Sequence[tuple[str, Any]], ref_name: str, title: str, script: str,
           intro: str, claims: Sequence[str], target: float, ref_caption: str,
           acc_title: str = "", clip_title: str = "", ref_title: str = "") -> int:
    """Plots + report.md for a finished sweep; prints failed runs; returns the exit code.

    ``ref_name`` is the variant whose entropy/clip and per-group curves are plotted;
    the report opens with "Generated by `script`" and ``intro``.
    """
    done = [r for r in results if r.records]
    plots = [
        ("accuracy.png", "Greedy eval accuracy vs step (mean over seeds, band = min..max)"),
        ("clip_fraction.png", "Clip fraction high (A > 0) and low (A < 0) per update"),
        ("espo_entropy_clip.png", ref_caption),
        ("response_length.png", "Sampled response length vs step"),
    ]
    plot_accuracy(done, out / "accuracy.png", target=target, title=acc_title)
    plot_clip(done, out / "clip_fraction.png", title=clip_title)
    ref = next((r for r in done if r.variant.name == ref_name), None)
    if ref is not None:
        plot_entropy_clip(ref, out / "espo_entropy_clip.png", title=ref_title)
    else:
        plots = [pl for pl in plots if pl[0] != "espo_entropy_clip.png"]
    plot_length(done, out / "response_length.png")
    if ref is not None and plot_groups(ref, out / "espo_groups.png"):
        plots.append(("espo_groups.png", "ESPO: clip fraction and ε per entropy group"))
    notes = pathlib.Path(args.notes).read_text() if args.notes else None
    report = write_report(
        out, title=title,
        intro=[f"Generated by `{script}`"
               + (" --smoke (a plumbing check, not a result)" if args.smoke else "") + intro],
        results=results, target=target, claims=claims, plots=plots,
        setup=describe_config(config, args.smoke, args.steps, extra, seeds, results)
        + resolved_settings(runs), notes=notes)
    failed = [s for s in statuses if s["status"] == "failed"]
    print(f"report: {report}")
    for s in failed:
        print(f"FAILED: {s['run']} (rc {s['returncode']}): " + " | ".join(s["log_tail"]))
    return 1 if failed else 0
