"""Stop requests: SIGTERM or SIGINT means "finish this step, save it, exit 0".

`StopRequests` is installed by `Trainer.fit` for the duration of the run and
asked after every step whether to stop there. All processes of a job must
stop at the same step (they save one checkpoint together), which is decided
differently depending on how the job runs:

- One process: Python handlers for SIGTERM and SIGINT set a flag.
- Several processes under jax.distributed (the usual case): JAX's preemption
  sync manager decides. Its notifier (installed by jax.distributed.initialize)
  owns SIGTERM: when any process gets one, the processes agree in the
  background on the first step all of them can still reach, and
  `reached_preemption(step)` (orbax's `CheckpointManager.reached_preemption`)
  is True at that step on every process. A Python SIGTERM handler would
  replace that notifier, so only SIGINT gets one, which hands the signal to
  the notifier by sending this process a SIGTERM.
- Several processes without the sync manager (jax_enable_preemption_service
  off): the flags are OR-ed over processes after every step (one small
  collective per step).

Later signals while stopping are reported and ignored, so the final save
completes; SIGKILL still works, and leaves the last committed checkpoint.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable

import jax
import numpy as np
from jax.experimental import multihost_utils

SIGNALS = (signal.SIGTERM, signal.SIGINT)


def sync_manager_available(step: int) -> bool:
    """Whether JAX's preemption sync manager runs (several processes, service enabled).

    Asking it about `step` also tells it where this process is, which it needs
    before a notice arrives to pick a step everyone will still reach.
    """
    if jax.process_count() == 1:
        return False
    try:
        multihost_utils.reached_preemption_sync_point(step)
    except RuntimeError:  # jax_enable_preemption_service=False.
        return False
    return True


class StopRequests:
    """Turns SIGTERM / SIGINT into a stop at the end of a step; a context manager.

    `reached_preemption(step)`: orbax's agreement on the stop step (used when
    several processes run with JAX's sync manager). `verbose`: whether this
    process reports the signals it gets (on stderr).
    """

    def __init__(
        self,
        reached_preemption: Callable[[int], bool],
        *,
        first_step: int,
        verbose: bool = True,
    ):
        self._reached = reached_preemption
        self._first_step = first_step
        self._verbose = verbose
        self._previous: dict[int, object] = {}
        self.synced = False
        self.signal_name: str | None = None  # The first stop signal this process handled.
        self.stop_step: int | None = None

    def install(self) -> StopRequests:
        self.synced = sync_manager_available(self._first_step)
        if threading.current_thread() is not threading.main_thread():
            return self  # Python only delivers signals to the main thread.
        for sig in SIGNALS:
            if sig == signal.SIGTERM and self.synced:
                continue  # JAX's notifier handles it.
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        """Puts back the handlers that were there before install()."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def __enter__(self) -> StopRequests:
        return self.install()

    def __exit__(self, *exc_info) -> None:
        self.uninstall()

    def _say(self, message: str) -> None:
        # os.write, not print: the handler may interrupt a print to the same stream, and a
        # buffered stream entered twice raises "reentrant call".
        if self._verbose:
            try:
                os.write(2, f"[mmjax] {message}\n".encode())
            except OSError:  # A closed stderr must not turn into an exception mid-step.
                pass

    def _handle(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if self.signal_name is not None:
            where = f" at step {self.stop_step}" if self.stop_step is not None else ""
            self._say(f"{name} again: still stopping{where}, saving first (SIGKILL aborts)")
            return
        self.signal_name = name
        self._say(f"{name}: stopping after this step and saving a checkpoint")
        if self.synced:
            os.kill(os.getpid(), signal.SIGTERM)  # To JAX's notifier, which tells the others.

    def should_stop(self, step: int) -> bool:
        """Called by every process after every step, with increasing steps."""
        if self.synced:
            stop = self._reached(step)
        elif jax.process_count() > 1:
            flags = multihost_utils.process_allgather(
                np.asarray([int(self.signal_name is not None)], np.int32), tiled=True
            )
            stop = bool(np.any(np.asarray(flags)))
        else:
            stop = self.signal_name is not None
        if stop:
            self.stop_step = step
        return stop
