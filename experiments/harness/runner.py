"""Running a sweep: one runner subprocess per run, resumable (done.json), parallel, locked
(.lock with the owner's pid), SIGTERM forwarded to the children."""
from __future__ import annotations

import json
import os
import pathlib
import shutil
import signal
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence

from harness.specs import NEUTRAL_KEYS, REPO, Run


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
            on_finished: Callable[[Run], object] | None = None, log=print) -> list[dict]:
    """Run every run not yet finished, ``jobs`` subprocesses at a time.

    on_finished: called with each run that finishes here (e.g. to archive it at once, so a
    sweep cut off between runs loses nothing that finished).

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
        if on_finished is not None and is_finished(r):
            on_finished(r)
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


def read_metrics(path: pathlib.Path) -> list[dict]:
    """Step records of a run's metrics.jsonl (resume events dropped); the harness does not
    import jax, so this does not reuse espo_jax.train.writers."""
    if not path.is_file():
        return []
    recs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in recs if "event" not in r]


# What a finished run's report needs; everything else (plots, logs, tensorboard) is remade.
ARCHIVED_FILES = ("spec.json", "done.json", "config.json", "metrics.jsonl")


def _archived(run: Run, runs_dir: pathlib.Path, archive: pathlib.Path) -> pathlib.Path:
    return archive / run.workdir.relative_to(runs_dir)


def restore_archived(runs: Sequence[Run], runs_dir: pathlib.Path, archive: pathlib.Path,
                     log=print) -> int:
    """Copy archived finished runs into ``runs_dir`` where it has none, so a sweep started on
    a fresh machine skips them (``is_finished``) and its report includes them. Returns the
    number restored."""
    n = 0
    for run in runs:
        src = _archived(run, runs_dir, archive)
        if is_finished(run) or not (src / "done.json").is_file():
            continue
        if (run.workdir / "spec.json").is_file():  # a partial run of its own: keep it
            continue
        run.workdir.mkdir(parents=True, exist_ok=True)
        for name in ARCHIVED_FILES:
            if (src / name).is_file():
                shutil.copy2(src / name, run.workdir / name)
        n += is_finished(run)
    if n:
        log(f"restored {n} finished runs from {archive}")
    return n


def archive_finished(runs: Sequence[Run], runs_dir: pathlib.Path, archive: pathlib.Path) -> int:
    """Copy the small files of every finished run (ARCHIVED_FILES, ~60-100 KB a run) to
    ``archive`` (e.g. a committed results folder), so the sweep survives the machine."""
    n = 0
    for run in runs:
        if not is_finished(run):
            continue
        dst = _archived(run, runs_dir, archive)
        dst.mkdir(parents=True, exist_ok=True)
        for name in ARCHIVED_FILES:
            if (run.workdir / name).is_file():
                shutil.copy2(run.workdir / name, dst / name)
        n += 1
    return n
