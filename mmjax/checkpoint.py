"""Orbax checkpoints of the train state, saved asynchronously, restored defensively.

The data position needs no state of its own: the input pipeline is indexed
by step (global sample index = step * batch_size), so restoring the step
restores exactly the batches an uninterrupted run would have seen. It is
still written beside the state (a JSON item "data", with the data counters),
for people and tools reading checkpoints.

Crash safety comes from orbax's commit protocol, checked against orbax 0.12.8:
a save writes `DIR/<step>.orbax-checkpoint-tmp/`, writes `commit_success.txt`
into it and renames it to `DIR/<step>` (one atomic rename on POSIX); only
then are the checkpoints beyond `max_to_keep` deleted. A process killed at any
moment therefore leaves the previous checkpoints intact plus at most one
unfinished tmp directory, which orbax never lists as a step and which
`remove_incomplete()` deletes. A checkpoint that is damaged afterwards (a
truncated file, a missing item, no commit marker) is found by
`restore_latest()`, reported in one line, and the next older one is used.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from mmjax import distributed

COMMIT_MARKER = "commit_success.txt"  # Written by orbax just before the commit rename.
ITEMS = ("state", "data")


class CheckpointError(RuntimeError):
    """No usable checkpoint where one was expected (one-line message)."""


class UnreadableCheckpoint(CheckpointError):
    def __init__(self, directory: Path, step: int, reason: str):
        super().__init__(f"checkpoint {step} in {directory} is unreadable ({reason})")
        self.step, self.reason = step, reason


def _reason(error: BaseException) -> str:
    """The most specific line of an exception chain (TensorStore wraps the real cause)."""
    chain = [error]
    while (nxt := chain[-1].__cause__ or chain[-1].__context__) is not None and len(chain) < 8:
        chain.append(nxt)
    for exc in reversed(chain):  # Innermost first: e.g. "OUT_OF_RANGE: ... value of size N".
        text = str(exc).strip()
        if text:
            line = text.splitlines()[0]
            return f"{type(exc).__name__}: {line[:300]}"
    return type(error).__name__


def _all_processes_agree(ok: bool) -> bool:
    """True when `ok` holds on every process (a collective when there are several)."""
    if jax.process_count() == 1:
        return ok
    distributed.align_processes("agree")
    flags = multihost_utils.process_allgather(np.asarray([int(ok)], np.int32), tiled=True)
    return bool(np.all(np.asarray(flags)))


class _Manager(ocp.CheckpointManager):
    """orbax's manager, except that its own preemption queries do not reach JAX's sync manager.

    orbax asks `reached_preemption(step)` inside save() and again from its finalize thread,
    with the step being saved, which may be behind the training loop by then. JAX's sync
    manager takes each query's step as this process's position, so a SIGTERM just after such
    a late query sets the stop at a step the loop has already passed, and the stop never comes
    (seen with jax 0.10.2). Only `sync_preemption`, called by the loop with increasing steps,
    asks JAX; orbax's queries get the answer it found.
    """

    preemption_step: int | None = None

    def sync_preemption(self, step: int) -> bool:
        reached = super().reached_preemption(step)
        if reached:
            self.preemption_step = step
        return reached

    def reached_preemption(self, step: int) -> bool:
        return step == self.preemption_step


class Checkpointer:
    def __init__(self, directory: str | Path, *, max_to_keep: int = 3, async_save: bool = True):
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, create=True, enable_async_checkpointing=async_save
        )
        self._manager = _Manager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(
        self,
        step: int,
        state: Any,
        *,
        batch_size: int,
        extra_meta: dict | None = None,
        force: bool = False,
    ) -> bool:
        meta = {"step": int(step), "global_sample_index": int(step) * int(batch_size)}
        meta.update(extra_meta or {})
        return self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(meta)
            ),
            force=force,
        )

    def check(self, step: int) -> str | None:
        """Why checkpoint `step` is incomplete on disk, or None when it looks whole.

        Cheap (no array data is read) and the same on every process of a shared
        filesystem; a truncated array file is only found by restoring.
        """
        path = self.directory / str(step)
        if not (path / COMMIT_MARKER).is_file():
            return f"no {COMMIT_MARKER}: its save did not finish"
        for item in ITEMS:
            if not (path / item).is_dir():
                return f"item '{item}' is missing"
        try:
            json.loads((path / "_CHECKPOINT_METADATA").read_text())
        except (OSError, ValueError) as e:
            return f"_CHECKPOINT_METADATA: {_reason(e)}"
        return None

    def restore(self, step: int, abstract_state: Any) -> Any:
        """Restores onto the shardings carried by `abstract_state`'s ShapeDtypeStructs.

        Raises UnreadableCheckpoint (one line) when the checkpoint is damaged.
        """
        reason = self.check(step)
        if reason is None:
            try:
                restored = self._manager.restore(
                    step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))
                )
                return restored.state
            except Exception as e:  # TensorStore, JSON, missing files: all mean "unreadable".
                reason = _reason(e)
        raise UnreadableCheckpoint(self.directory, step, reason)

    def restore_meta(self, step: int) -> dict:
        """The JSON written beside the state by save()."""
        try:
            restored = self._manager.restore(
                step, args=ocp.args.Composite(data=ocp.args.JsonRestore())
            )
        except Exception as e:
            raise UnreadableCheckpoint(self.directory, step, _reason(e)) from None
        return dict(restored.data)

    def restore_latest(
        self, abstract_state: Any, warn: Callable[[str], None] = print
    ) -> tuple[int, Any, dict, list[int]]:
        """(step, state, meta, unreadable newer steps) of the newest checkpoint that restores.

        Tries the steps newest to oldest; each one skipped is reported through
        `warn` in one line. All processes take the same decision. Raises
        CheckpointError when there is no checkpoint or none is readable.
        """
        steps = sorted(self.all_steps(), reverse=True)
        if not steps:
            raise CheckpointError(f"no checkpoint in {self.directory}")
        failures: list[UnreadableCheckpoint] = []
        for step in steps:
            state = meta = None
            try:
                state = self.restore(step, abstract_state)
                meta = self.restore_meta(step)
            except UnreadableCheckpoint as e:
                failure = e
            else:
                failure = None
            # A file damaged in one process's shards fails only there: everyone moves on.
            agreed = _all_processes_agree(failure is None)
            if failure is None and not agreed:
                failure = UnreadableCheckpoint(self.directory, step, "unreadable on another host")
            if failure is None:
                for bad in failures:
                    warn(f"{bad}; using {step}")
                return step, state, meta, [bad.step for bad in failures]
            failures.append(failure)
        raise CheckpointError(
            f"no readable checkpoint in {self.directory}: "
            + "; ".join(f"{bad.step} ({bad.reason})" for bad in failures)
        )

    def set_aside(self, step: int) -> Path:
        """Renames checkpoint `step` to `<step>.unreadable[.N]` (kept for inspection, never
        listed as a step), so that the run can save that step again."""
        self._sync(f"mmjax_set_aside_{step}_start")  # Every process picks the same name.
        target = self.directory / f"{step}.unreadable"
        n = 1
        while target.exists():
            n += 1
            target = self.directory / f"{step}.unreadable.{n}"
        self._sync(f"mmjax_set_aside_{step}_named")
        if jax.process_index() == 0:
            os.rename(self.directory / str(step), target)
        self._sync(f"mmjax_set_aside_{step}_done")
        self._manager.reload()
        return target

    def remove_incomplete(self) -> list[str]:
        """Deletes tmp directories of saves that never committed (a killed process leaves
        one); returns their names. Only for the one process group that trains here: a save
        in progress elsewhere would lose its directory."""
        names = []
        for tmp in ocp.path.step.all_temporary_paths(self.directory):
            path = Path(tmp.get())
            names.append(path.name)
            if jax.process_index() == 0:
                shutil.rmtree(path, ignore_errors=True)
        self._sync("mmjax_remove_incomplete")  # Unconditional: others may list after the delete.
        return names

    def reached_preemption(self, step: int) -> bool:
        """True at the step on which all processes stop after a SIGTERM (JAX's preemption sync
        manager, when jax.distributed runs it; always False for one process). Call it after
        every step, with increasing steps."""
        return self._manager.sync_preemption(step)

    @staticmethod
    def _sync(name: str) -> None:
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(name)

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()
