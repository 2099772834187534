"""Orbax checkpoints of the TrainState plus a small JSON record of the loop's host state.

- Atomic: orbax writes into a temporary directory and renames it when complete, so a run
  killed mid-save leaves the previous checkpoint intact (the partial one is ignored).
- Asynchronous: ``save`` returns once the arrays are copied to host memory and the write
  overlaps the next steps; ``wait()`` (and ``close()``) block until it is on disk, so the
  loop waits before it exits (a preemption notice is ~30 s).
- Keep the last ``keep``; the loop always saves one at the end (and on SIGTERM).
- Any directory ``etils.epath`` / orbax accept: local or ``gs://``.
- Restore walks checkpoints newest first; one that fails to load (corrupt or truncated) is
  skipped with a loud warning. If none loads, a clear error: never a silent restart.
- Sharded and multi-host safe: arrays restore directly into the shardings of the freshly
  initialised state that is passed as the target.
"""
from __future__ import annotations

import logging
import os
import warnings

import jax
import orbax.checkpoint as ocp
from etils import epath

log = logging.getLogger(__name__)


def _key_str(k) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def _pytree(state) -> dict:
    """The arrays of a TrainState as a plain pytree (Variables and namedtuples are not
    serialisable as such); the structure comes back from the target on restore."""
    return {"params": state.params, "opt_state": state.opt_state, "step": state.step,
            "rest": state.rest, "ref_params": state.ref_params}


def _to_nested(tree) -> dict:
    out: dict = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        names = [_key_str(k) for k in path]
        node = out
        for n in names[:-1]:
            node = node.setdefault(n, {})
        if names[-1] in node:
            raise ValueError(f"checkpoint: duplicate leaf path {'/'.join(names)}")
        node[names[-1]] = leaf
    return out


def _from_nested(tree, nested: dict):
    paths, treedef = jax.tree_util.tree_flatten_with_path(tree)
    leaves = []
    for path, _ in paths:
        node = nested
        for k in path:
            node = node[_key_str(k)]
        leaves.append(node)
    return jax.tree_util.tree_unflatten(treedef, leaves)


def _abstract(leaf):
    return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=getattr(leaf, "sharding", None))


class CheckpointError(RuntimeError):
    """Checkpoints exist but none can be restored (reported as a one-line user error)."""


class Checkpointer:
    """``save(step, state, meta)``, ``restore(target_state) -> (step, state, meta) | None``."""

    def __init__(self, directory, *, keep: int = 2, async_save: bool = True):
        d = os.fspath(directory)
        self.directory = epath.Path(d if "://" in d else os.path.abspath(d))
        opts = ocp.CheckpointManagerOptions(max_to_keep=max(1, int(keep)), create=True,
                                            enable_async_checkpointing=bool(async_save),
                                            cleanup_tmp_directories=True)
        self._mgr = ocp.CheckpointManager(self.directory, options=opts,
                                          item_names=("state", "meta"))
        self._saved: set[int] = set()  # steps saved by this process (an async one may be
        #                                in flight and not yet listed by all_steps)

    def all_steps(self) -> list[int]:
        return sorted(set(self._mgr.all_steps()) | self._saved)

    def latest_step(self) -> int | None:
        steps = self.all_steps()
        return steps[-1] if steps else None

    def save(self, step: int, state, meta: dict) -> None:
        """Start saving ``step`` (every process calls it); returns before the write ends."""
        if step in self.all_steps():
            return
        self._mgr.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(_to_nested(_pytree(state))),
            meta=ocp.args.JsonSave(dict(meta, step=int(step)))), force=True)
        self._saved.add(int(step))

    def wait(self) -> None:
        """Block until every started save is on disk."""
        self._mgr.wait_until_finished()

    def restore(self, target_state):
        """Newest loadable checkpoint into ``target_state``'s structure and shardings, or
        None when the directory has no checkpoint. Raises RuntimeError when checkpoints
        exist but none can be loaded."""
        self.wait()
        steps = sorted(self._mgr.all_steps())
        if not steps:
            return None
        tree = _pytree(target_state)
        abstract = jax.tree.map(_abstract, _to_nested(tree))
        errors = []
        for step in reversed(steps):
            try:
                out = self._mgr.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
                restored = _from_nested(tree, out["state"])
            except Exception as e:  # noqa: BLE001 - any load failure: try the previous one
                msg = (f"checkpoint {self.directory}/{step} could not be restored "
                       f"({type(e).__name__}: {str(e)[:300]}); falling back to an older one")
                log.error(msg)
                warnings.warn(msg, RuntimeWarning, stacklevel=2)
                print(f"WARNING: {msg}", flush=True)
                errors.append((step, e))
                continue
            if errors:
                print(f"WARNING: resumed from checkpoint step {step} instead of the newest "
                      f"{steps[-1]} (unreadable: {[s for s, _ in errors]})", flush=True)
            state = target_state.replace(
                params=restored["params"], opt_state=restored["opt_state"],
                step=restored["step"], rest=restored["rest"], ref_params=restored["ref_params"])
            return step, state, dict(out["meta"])
        last = str(errors[-1][1]).splitlines()[0][:200] if str(errors[-1][1]) else ""
        raise CheckpointError(
            f"checkpoint directory {self.directory} has checkpoints {steps} but none could be "
            f"restored (last error: {type(errors[-1][1]).__name__}: {last}); refusing to "
            "restart from scratch: fix or remove the directory (or use a new --workdir)")

    def close(self) -> None:
        self._mgr.wait_until_finished()
        self._mgr.close()
