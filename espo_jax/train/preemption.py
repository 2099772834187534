"""Preemption on every host: all processes agree on the step at which to stop.

A SIGTERM reaches the hosts of a pod at different times (or only one of them), while the
checkpoint save that follows is collective: if host A saves at step 7 and host B goes on to
step 8, both hang. ``StopSignal.agree(step)`` is called by every process once per step; it
returns the same answer everywhere:

  * the local flag (set by this process's SIGTERM handler), OR-ed with
    ``jax.experimental.multihost_utils.reached_preemption_sync_point(step)`` when JAX's
    preemption service runs (cluster notices that do not come as a SIGTERM),
  * all-reduced over processes (``process_allgather`` of one int: any host stopping stops
    everyone at this step).

One process: just the local flag, no collective.
"""
from __future__ import annotations

import signal

import jax
import numpy as np


class StopSignal:
    """Context manager: SIGTERM -> finish the current step; ``agree(step)`` -> stop now?"""

    def __init__(self, *, signals=(signal.SIGTERM,)):
        self.requested = False   # this process got a signal
        self.agreed = False      # all processes decided to stop
        self._signals = tuple(signals)
        self._old: dict = {}
        self._sync_point = jax.process_count() > 1  # disabled on first failure

    def __enter__(self):
        def handler(signum, frame):  # noqa: ARG001
            if not self.requested:
                print(f"\n{signal.Signals(signum).name} received: finishing the current step, "
                      "then checkpointing.", flush=True)
            self.requested = True

        for s in self._signals:
            try:
                self._old[s] = signal.signal(s, handler)
            except ValueError:  # not the main thread: no handler
                pass
        return self

    def __exit__(self, *exc):
        for s, old in self._old.items():
            signal.signal(s, old)
        self._old = {}

    def _service_notice(self, step: int) -> bool:
        if not self._sync_point:
            return False
        try:
            from jax.experimental import multihost_utils  # noqa: PLC0415
            return bool(multihost_utils.reached_preemption_sync_point(int(step)))
        except Exception:  # noqa: BLE001 - the service is off (e.g. CPU): the flag suffices
            self._sync_point = False
            return False

    def agree(self, step: int) -> bool:
        """True on every process iff any process wants to stop at ``step``. Collective:
        every process must call it once per step, with the same ``step``."""
        local = self.requested or self._service_notice(step)
        if jax.process_count() == 1:
            self.agreed = local
            return local
        from jax.experimental import multihost_utils  # noqa: PLC0415
        flags = multihost_utils.process_allgather(np.asarray([int(local)], np.int32))
        self.agreed = bool(np.asarray(flags).any())
        if self.agreed and not local:
            print(f"\nanother process is stopping: stopping at step {step} too, then "
                  "checkpointing.", flush=True)
        return self.agreed
