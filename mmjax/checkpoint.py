"""Orbax checkpoints of the train state, saved asynchronously.

The data position needs no state of its own: the input pipeline is indexed
by step (global sample index = step * batch_size), so restoring the step
restores exactly the batches an uninterrupted run would have seen. It is
still written beside the state (a JSON item "data", with the data counters),
for people and tools reading checkpoints.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orbax.checkpoint as ocp


class Checkpointer:
    def __init__(self, directory: str | Path, *, max_to_keep: int = 3, async_save: bool = True):
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, create=True, enable_async_checkpointing=async_save
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options)

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

    def restore(self, step: int, abstract_state: Any) -> Any:
        """Restores onto the shardings carried by `abstract_state`'s ShapeDtypeStructs."""
        restored = self._manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))
        )
        return restored.state

    def restore_meta(self, step: int) -> dict:
        """The JSON written beside the state by save()."""
        restored = self._manager.restore(step, args=ocp.args.Composite(data=ocp.args.JsonRestore()))
        return dict(restored.data)

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()
