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
Only evidence of damage counts: any other failure (a tree that does not match the
config, permissions, an I/O error, memory) is a `RestoreFailed` that stops the
caller with its real message and sets nothing aside.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from mmjax import storage
from mmjax.runtime import distributed

COMMIT_MARKER = "commit_success.txt"  # Written by orbax just before the commit rename.
ITEMS = ("state", "data")


class CheckpointError(RuntimeError):
    """No usable checkpoint where one was expected (one-line message)."""


class UnreadableCheckpoint(CheckpointError):
    """Evidence that a checkpoint is damaged (a missing or truncated file, no commit marker,
    a parse or decompression failure): it may be set aside and an older one used."""

    def __init__(self, directory: Path, step: int, reason: str):
        super().__init__(f"checkpoint {step} in {directory} is unreadable ({reason})")
        self.step, self.reason = step, reason


class RestoreFailed(CheckpointError):
    """A restore that failed for a reason other than damage (a tree that does not match the
    config, permissions, an I/O error, memory): the run stops and nothing is set aside."""

    def __init__(self, directory: Path, step: int, reason: str):
        super().__init__(
            f"cannot restore checkpoint {step} in {directory}: {reason} "
            "(the checkpoint is not damaged; nothing was set aside)"
        )
        self.step, self.reason = step, reason


def _chain(error: BaseException) -> list[BaseException]:
    chain = [error]
    while (nxt := chain[-1].__cause__ or chain[-1].__context__) is not None and len(chain) < 8:
        chain.append(nxt)
    return chain


def _reason(error: BaseException) -> str:
    """The most specific line of an exception chain (TensorStore wraps the real cause)."""
    for exc in reversed(_chain(error)):  # Innermost first: "OUT_OF_RANGE: ... value of size N".
        text = str(exc).strip()
        if text:
            line = text.splitlines()[0]
            return f"{type(exc).__name__}: {line[:300]}"
    return type(error).__name__


# What TensorStore and the decompressors say when bytes on disk are missing or wrong.
_DAMAGE_CODES = ("DATA_LOSS", "OUT_OF_RANGE")
_DAMAGE_WORDS = ("Truncated", "truncated", "decompress", "Unknown frame descriptor", "corrupt")


def damage_reason(error: BaseException, step_dir: Path) -> str | None:
    """The reason when `error` (raised while restoring from `step_dir`) is evidence of damage,
    else None: only missing or cut files, undecodable bytes and unparsable metadata count."""
    inside = str(step_dir)
    for exc in _chain(error):
        text = str(exc)
        if isinstance(exc, json.JSONDecodeError):
            return f"unparsable metadata: {_reason(exc)}"
        if isinstance(exc, FileNotFoundError) and inside in str(exc.filename or text):
            return f"missing file: {_reason(exc)}"
        if "NOT_FOUND" in text and inside in text:
            return f"missing file: {_reason(exc)}"
        if any(code in text for code in _DAMAGE_CODES) or any(w in text for w in _DAMAGE_WORDS):
            return _reason(exc)
    return None


def _is_restore_echo(unraisable) -> bool:
    """Whether an unraisable exception is an echo of a restore that already failed: orbax's
    sibling reads of the failed array, garbage-collected with their exceptions, and
    TensorStore completing reads after orbax's event loop closed ('Event loop is closed')."""
    value, obj = unraisable.exc_value, unraisable.object
    if isinstance(value, RuntimeError) and str(value) == "Event loop is closed":
        return True
    code = getattr(obj, "cr_code", None)  # A coroutine object.
    return code is not None and "orbax" in code.co_filename


def _quiet_restore_echoes() -> None:
    """A failed restore leaves hundreds of such echoes, each printed as a traceback through
    sys.unraisablehook: they bury the one line saying what happened, so they are dropped
    (the failure itself is raised and reported). Other unraisable exceptions still print."""
    previous = sys.unraisablehook
    if getattr(previous, "_mmjax_quiet", False):
        return

    def hook(unraisable):
        if not _is_restore_echo(unraisable):
            previous(unraisable)

    hook._mmjax_quiet = True
    sys.unraisablehook = hook


def _all_processes_max(value: int) -> int:
    """The largest `value` over all processes (a collective when there are several)."""
    if jax.process_count() == 1:
        return value
    distributed.align_processes("agree")
    values = multihost_utils.process_allgather(np.asarray([value], np.int32), tiled=True)
    return int(np.max(np.asarray(values)))


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


def _copy_tree(source, target) -> None:
    for item in source.iterdir():
        if item.is_dir():
            _copy_tree(item, target / item.name)
        else:
            (target / item.name).write_bytes(item.read_bytes())


class Checkpointer:
    def __init__(self, directory: str | Path, *, max_to_keep: int = 3, async_save: bool = True):
        self.directory = storage.path(directory)  # orbax takes absolute paths only
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, create=True, enable_async_checkpointing=async_save
        )
        _quiet_restore_echoes()
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
        filesystem: the commit marker, both items and the metadata files that orbax
        needs to make sense of the arrays (without them it fails with misleading tree
        errors); a truncated array file is only found by restoring.
        """
        path = self.directory / str(step)
        if not (path / COMMIT_MARKER).is_file():
            return f"no {COMMIT_MARKER}: its save did not finish"
        for item in ITEMS:
            if not (path / item).is_dir():
                return f"item '{item}' is missing"
        metadata = {}
        for name in ("_CHECKPOINT_METADATA", "state/_METADATA", "data/metadata"):
            try:
                metadata[name] = json.loads((path / name).read_text())
            except FileNotFoundError:
                return f"{name} is missing"
            except (OSError, ValueError) as e:
                return f"{name}: {_reason(e)}"
        state_meta = metadata["state/_METADATA"]
        if isinstance(state_meta, dict) and state_meta.get("use_ocdbt"):
            if not (path / "state" / "manifest.ocdbt").is_file():
                return "state/manifest.ocdbt is missing"
        return None

    def _restore(self, step: int, read: Callable[[Path], Any]) -> Any:
        """read(step directory) with the failure classified: UnreadableCheckpoint for
        evidence of damage, RestoreFailed for anything else (the real message kept)."""
        reason = self.check(step)
        if reason is not None:
            raise UnreadableCheckpoint(self.directory, step, reason)
        path = self.directory / str(step)
        try:
            return read(path)
        except Exception as e:  # Classified, never swallowed: MemoryError included.
            damage = damage_reason(e, path)
            if damage is not None:
                raise UnreadableCheckpoint(self.directory, step, damage) from None
            raise RestoreFailed(self.directory, step, _reason(e)) from None

    def restore(self, step: int, abstract_state: Any) -> Any:
        """Restores onto the shardings carried by `abstract_state`'s ShapeDtypeStructs.

        Raises UnreadableCheckpoint (one line) when the checkpoint is damaged, RestoreFailed
        when it is not but cannot be restored (e.g. a tree that does not match the config).
        """

        def read(_):
            restored = self._manager.restore(
                step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))
            )
            return restored.state

        return self._restore(step, read)

    def restore_params(self, step: int, abstract_params: Any) -> Any:
        """Only the parameters of checkpoint `step` (no optimizer state is read): also
        reads mmjax.interop.open_clip's parameters-only checkpoints."""

        def read(path):
            item = {"params": abstract_params}
            restored = ocp.PyTreeCheckpointer().restore(
                path / "state",
                args=ocp.args.PyTreeRestore(
                    item=item,
                    restore_args=ocp.checkpoint_utils.construct_restore_args(item),
                    partial_restore=True,
                ),
            )
            params = restored["params"]
            # A partial restore hands back what the checkpoint lacks as the abstract leaf.
            missing = [
                jax.tree_util.keystr(path)
                for path, leaf in jax.tree_util.tree_leaves_with_path(params)
                if isinstance(leaf, jax.ShapeDtypeStruct)
            ]
            if missing:
                raise ValueError(
                    f"the checkpoint has no parameter {missing[0]} ({len(missing)} missing): "
                    "it is not of this model"
                )
            return params

        return self._restore(step, read)

    def restore_meta(self, step: int) -> dict:
        """The JSON written beside the state by save()."""

        def read(_):
            restored = self._manager.restore(
                step, args=ocp.args.Composite(data=ocp.args.JsonRestore())
            )
            return dict(restored.data)

        return self._restore(step, read)

    def restore_latest(
        self,
        abstract: Any,
        warn: Callable[[str], None] = print,
        *,
        step: int | None = None,
        params_only: bool = False,
    ) -> tuple[int, Any, dict, list[int]]:
        """(step, state, meta, unreadable newer steps) of the newest checkpoint that restores
        (or of `step`); with `params_only`, `abstract` is the params tree and so is the result.

        Tries the steps newest to oldest, past damaged ones only; each one skipped is
        reported through `warn` in one line, with the step used. All processes take the same
        decision. Raises RestoreFailed at once for a failure that is not damage, and
        CheckpointError when there is no checkpoint or none is readable.
        """
        steps = sorted(self.all_steps(), reverse=True)
        if step is not None:
            if step not in steps:
                raise CheckpointError(
                    f"no checkpoint {step} in {self.directory}; there are {steps}"
                )
            steps = [step]
        if not steps:
            raise CheckpointError(f"no checkpoint in {self.directory}")
        failures: list[UnreadableCheckpoint] = []
        for candidate in steps:
            state = meta = failure = None
            error: RestoreFailed | None = None
            try:
                if params_only:
                    state, meta = self.restore_params(candidate, abstract), {}
                else:
                    state = self.restore(candidate, abstract)
                    meta = self.restore_meta(candidate)
            except UnreadableCheckpoint as e:
                failure = e
            except RestoreFailed as e:
                error = e
            # A file damaged in one process's shards fails only there: everyone moves on;
            # a failure that is not damage stops every process.
            verdict = _all_processes_max(2 if error else 1 if failure else 0)
            if verdict == 2:
                raise error or RestoreFailed(
                    self.directory, candidate, "it failed on another process"
                )
            if verdict == 1 and failure is None:
                failure = UnreadableCheckpoint(
                    self.directory, candidate, "unreadable on another host"
                )
            if failure is None:
                for bad in failures:
                    warn(f"{bad}; using {candidate}")
                return candidate, state, meta, [bad.step for bad in failures]
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
            source = self.directory / str(step)
            if storage.is_remote(source):  # No folder rename on object storage: copy, delete.
                storage.retry(lambda: _copy_tree(source, target), f"setting aside {source}")
                storage.retry(source.rmtree, f"removing {source}")
            else:
                os.rename(source, target)
        self._sync(f"mmjax_set_aside_{step}_done")
        self._manager.reload()
        return target

    def remove_incomplete(self) -> list[str]:
        """Deletes tmp directories of saves that never committed (a killed process leaves
        one); returns their names. Only for the one process group that trains here: a save
        in progress elsewhere would lose its directory."""
        names = []
        for tmp in ocp.path.step.all_temporary_paths(self.directory):
            path = tmp.get()
            names.append(path.name)
            if jax.process_index() == 0:
                if storage.is_remote(path):
                    storage.retry(path.rmtree, f"removing {path}")
                else:
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


def read_params(
    checkpoints: str | os.PathLike, abstract: Any, step: int | None = None, warn=None
) -> tuple[int, Any]:
    """(step, params) of checkpoint `step`, or of the newest readable one; only the params.

    Raises CheckpointError (one line) when the step is missing or nothing is readable.
    """
    directory = storage.path(checkpoints)
    if not storage.retry(directory.is_dir, f"reading {directory}"):
        raise CheckpointError(f"no checkpoint directory {directory}")
    checkpointer = Checkpointer(directory, async_save=False)
    try:
        found, params, _, _ = checkpointer.restore_latest(
            abstract, warn or (lambda _: None), step=step, params_only=True
        )
        return found, params
    finally:
        checkpointer.close()
