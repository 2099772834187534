"""Multi-host set-up: one program on every host, each host feeding its share of the batch.

Call ``setup_distributed(config)`` first thing in ``main`` (before anything touches a
jax device). It

  * turns on ``jax_threefry_partitionable`` so random bits (sampled tokens, dropout) are
    a function of the key and the *global* shape only, not of the mesh: a run on 1 chip
    and on 256 chips samples the same tokens;
  * calls ``jax.distributed.initialize()`` when ``config.distributed.initialize`` is true
    or the environment shows a multi-host launch:
      - ``JAX_COORDINATOR_ADDRESS`` (host:port of process 0) with ``JAX_NUM_PROCESSES``
        and ``JAX_PROCESS_ID`` (read here and passed on): any cluster, e.g. multi-node GPU
        launched by hand or by a script;
      - SLURM (``SLURM_JOB_ID`` with ``SLURM_NTASKS`` > 1): jax reads the node list and
        task ids itself;
      - Open MPI (``OMPI_COMM_WORLD_SIZE`` > 1): jax's mpi4py-free OMPI detection;
      - Cloud TPU pod slices (``TPU_WORKER_HOSTNAMES`` with several hosts, or
        ``MEGASCALE_COORDINATOR_ADDRESS`` for multi-slice): jax asks the TPU metadata
        server for everything, no arguments needed.
    Explicit ``config.distributed.{coordinator_address,num_processes,process_id}``
    override the detection.

Feeding jitted steps: when every host holds the same full batch (the RL loop: prompts
come from a seeded order, rewards are computed everywhere), ``device_put_global`` makes
the global arrays, each host copying only the rows its devices own. For host-local data
(each host loaded ``host_slice(n)`` of a dataset) use ``host_local_to_global``.
Only ``is_main_process()`` writes metrics, plots and exported models; orbax
checkpoints must be saved/restored by *every* process (orbax coordinates them).
"""
from __future__ import annotations

import logging
import os
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

log = logging.getLogger(__name__)

_MULTIHOST_ENV_DOC = {
    "JAX_COORDINATOR_ADDRESS": "explicit coordinator host:port (all launches)",
    "SLURM_NTASKS": "SLURM job with more than one task",
    "OMPI_COMM_WORLD_SIZE": "Open MPI launch with more than one rank",
    "TPU_WORKER_HOSTNAMES": "Cloud TPU pod slice with more than one worker",
    "MEGASCALE_COORDINATOR_ADDRESS": "multi-slice TPU",
}


def _int_env(name: str, env: dict[str, str]) -> int:
    try:
        return int(env.get(name, "0") or 0)
    except ValueError:
        return 0


def detect_multihost(env: dict[str, str] | None = None) -> str | None:
    """Returns the reason a multi-host launch is detected (an env var), or None."""
    env = dict(os.environ if env is None else env)
    if env.get("JAX_COORDINATOR_ADDRESS"):
        return "JAX_COORDINATOR_ADDRESS"
    if env.get("SLURM_JOB_ID") and _int_env("SLURM_NTASKS", env) > 1:
        return "SLURM_NTASKS"
    if _int_env("OMPI_COMM_WORLD_SIZE", env) > 1:
        return "OMPI_COMM_WORLD_SIZE"
    hosts = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]
    if len(hosts) > 1:
        return "TPU_WORKER_HOSTNAMES"
    if env.get("MEGASCALE_COORDINATOR_ADDRESS"):
        return "MEGASCALE_COORDINATOR_ADDRESS"
    return None


def _get(cfg: Any, key: str, default: Any = None) -> Any:
    if cfg is None:
        return default
    if isinstance(cfg, dict):
        return cfg.get(key, default)
    try:
        return getattr(cfg, key)
    except (AttributeError, KeyError):
        return default


def setup_distributed(config: Any = None, *, env: dict[str, str] | None = None) -> bool:
    """Partitionable RNG on; ``jax.distributed.initialize()`` when asked or detected.

    Args:
      config: the run config (or None); reads ``config.distributed.initialize`` (bool)
        and optional ``coordinator_address`` / ``num_processes`` / ``process_id`` /
        ``local_device_ids``.
    Returns: True when ``jax.distributed`` is (now) initialised.
    """
    jax.config.update("jax_threefry_partitionable", True)
    dcfg = _get(config, "distributed")
    wanted = bool(_get(dcfg, "initialize", False))
    reason = "config.distributed.initialize" if wanted else detect_multihost(env)
    if reason is None:
        return False
    if jax.distributed.is_initialized():
        return True
    kwargs = {}
    for key in ("coordinator_address", "num_processes", "process_id", "local_device_ids"):
        v = _get(dcfg, key)
        unset = v is None or v == "" or (isinstance(v, int) and (
            v < 0 or (v == 0 and key == "num_processes")))
        if not unset:  # "", -1 and num_processes=0 mean "let jax detect it"
            kwargs[key] = v
    # jax itself reads JAX_COORDINATOR_ADDRESS but not these two; read them for it.
    environ = os.environ if env is None else env
    for key, var in (("num_processes", "JAX_NUM_PROCESSES"), ("process_id", "JAX_PROCESS_ID")):
        if key not in kwargs and str(environ.get(var, "")).strip():
            try:
                kwargs[key] = int(environ[var])
            except ValueError:
                raise ValueError(f"{var}={environ[var]!r} must be an integer") from None
    log.info("jax.distributed.initialize(%s) (reason: %s)", kwargs, reason)
    jax.distributed.initialize(**kwargs)
    log.info("process %d of %d, %d local / %d global devices", jax.process_index(),
             jax.process_count(), jax.local_device_count(), jax.device_count())
    return True


def is_main_process() -> bool:
    """True on the host that writes metrics, plots, summaries and exports."""
    return jax.process_index() == 0


def host_slice(n: int, process_index: int | None = None,
               process_count: int | None = None) -> slice:
    """This host's contiguous share of ``n`` global rows (prompts, sequences).

    ``n`` must divide evenly: every host must contribute the same number of rows to a
    global batch.
    """
    pi = jax.process_index() if process_index is None else process_index
    pc = jax.process_count() if process_count is None else process_count
    if not 0 <= pi < pc:
        raise ValueError(f"host_slice: process_index {pi} not in [0, {pc})")
    if n % pc:
        raise ValueError(f"host_slice: {n} rows cannot be split evenly over {pc} processes; "
                         f"make the global batch a multiple of {pc}")
    k = n // pc
    return slice(pi * k, (pi + 1) * k)


def process_rows(n: int, mesh: Mesh) -> slice:
    """The rows of a global [n, ...] batch that this process's devices hold under
    ``batch_sharding(mesh)``, as one slice (raises if they are not contiguous)."""
    from espo_jax.train.mesh import batch_sharding

    idx = batch_sharding(mesh).addressable_devices_indices_map((n,))
    spans = sorted({(s[0].start or 0, n if s[0].stop is None else s[0].stop)
                    for s in idx.values()})
    lo, hi = spans[0][0], spans[0][1]
    for a, b in spans[1:]:
        if a > hi:
            raise ValueError(f"process {jax.process_index()} holds non-contiguous rows {spans} "
                             f"of the batch; use device_put_global (every host passes the "
                             f"full batch)")
        hi = max(hi, b)
    return slice(lo, hi)


def device_put_global(tree: Any, mesh: Mesh) -> Any:
    """Full host batch (the SAME numpy arrays on every host) -> global jax.Arrays with the
    leading dim over ("data", "fsdp"); 0-d leaves replicated.

    Each process copies only the rows its own devices hold (``make_array_from_callback``),
    so this is correct for any device order (TPU topologies interleave hosts) and costs no
    cross-host traffic. The simplest multi-host-safe way to feed a jitted step.
    """
    from espo_jax.train.mesh import batch_sharding, replicated

    bs, rep = batch_sharding(mesh), replicated(mesh)

    def one(x):
        x = np.asarray(x)
        sh = rep if x.ndim == 0 else bs
        return jax.make_array_from_callback(x.shape, sh, lambda index: x[index])

    return jax.tree.map(one, tree)


def host_local_to_global(tree: Any, mesh: Mesh) -> Any:
    """Host-local rows -> global jax.Arrays [B, ...] over ("data", "fsdp").

    For data that really is host-local (each host loaded only its share). The rows of
    this process must be ``process_rows(B, mesh)`` of the global batch: with
    ``make_mesh``'s device order on GPUs (devices sorted by process, "tensor" inside a
    host) that is ``host_slice(B)``; check with ``process_rows`` on other topologies, or
    use ``device_put_global`` when every host has the full batch. On one host this is a
    sharded ``device_put``. 0-d leaves must be identical on every host.
    """
    from espo_jax.train.mesh import batch_sharding, replicated

    bs, rep = batch_sharding(mesh), replicated(mesh)

    def one(x):
        x = np.asarray(x)
        if x.ndim == 0:
            return jax.device_put(x, rep)
        if jax.process_count() == 1:
            return jax.device_put(x, bs)
        return jax.make_array_from_process_local_data(bs, x)

    return jax.tree.map(one, tree)


def to_host(tree: Any) -> Any:
    """Global jax.Arrays -> full numpy arrays on *every* host (for rewards, decoding, dumps).

    ``np.asarray`` on an array sharded over other hosts' devices fails in a multi-host
    run; this all-gathers across processes first (a no-op copy on one host).
    """
    if jax.process_count() == 1:
        return jax.tree.map(np.asarray, jax.device_get(tree))
    from jax.experimental import multihost_utils

    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(x)

    return jax.tree.map(one, tree)
