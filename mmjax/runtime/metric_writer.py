"""Scalar metrics to WORKDIR/metrics.jsonl (one JSON object per step) and to TensorBoard.

The JSON lines file is the record of a run that scripts and tests read back (`read_metrics`);
TensorBoard is for looking at it. Only one process of a multi-host job should write: pass
`enabled=jax.process_index() == 0`.

Non-finite values are written as the strings "NaN", "Infinity" and "-Infinity", which keeps the
file strict JSON (jq, JavaScript and pandas parse it; Python's default bare NaN token is not JSON)
without losing whether a diverged loss overflowed or hit 0/0, as null would. `read_metrics` turns
them back into floats.
"""

import json
import math
import operator
import os
import tempfile
import time
import uuid
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from tensorboardX.event_file_writer import EventsWriter
from tensorboardX.proto.event_pb2 import Event
from tensorboardX.proto.summary_pb2 import Summary

from mmjax import storage

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"

_NON_FINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def _to_float(key: str, value: Any) -> float:
    """A plain Python float from a Python / NumPy / JAX scalar (jax arrays are copied to host)."""
    array = np.asarray(value)
    # Kind, not issubdtype: bfloat16 (ml_dtypes) is kind 'V' and should pass; strings must not,
    # even when float() would parse them.
    if array.size != 1 or array.dtype.kind in "USOcMm":
        raise ValueError(
            f"metric {key!r} must be a real scalar, "
            f"got {type(value).__name__} {array.dtype} {array.shape}"
        )
    return float(array.reshape(()))


def _json_value(value: float) -> float | str:
    if math.isfinite(value):
        return value
    return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")


def _split_tail(path: Path) -> tuple[int, bytes]:
    """(offset just past the last newline, the bytes after it) of the file at `path`."""
    with open(path, "rb") as f:
        end = f.seek(0, os.SEEK_END)
        position, tail = end, b""
        # Read backwards a block at a time: the file grows with the run, the last line is short.
        while position > 0:
            step = min(1 << 16, position)
            position -= step
            f.seek(position)
            tail = f.read(step) + tail
            newline = tail.rfind(b"\n")
            if newline >= 0:
                return position + newline + 1, tail[newline + 1 :]
        return 0, tail


def _parse_line(line: bytes) -> dict[str, Any] | None:
    """The metrics dict a line holds, or None when it is not a complete JSON object."""
    try:
        record = json.loads(line)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(record, dict):
        return None
    return {
        key: _NON_FINITE.get(value, value) if isinstance(value, str) else value
        for key, value in record.items()
    }


class MetricWriter:
    """Appends `{"step": step, **metrics}` lines to WORKDIR/metrics.jsonl and scalars to
    WORKDIR/tensorboard. Locally every write is flushed to the OS, so a crashed process
    loses nothing (a machine crash can still lose what the OS had not synced).

    On object storage, which has no append, both files are kept in memory and rewritten
    whole (one atomic object each) by `flush()`: at most every `remote_flush_seconds`
    from `write`, at `close`, and whenever the caller needs them durable. The trainer
    flushes before every checkpoint save, so a run killed at any moment has every line up to
    its newest checkpoint stored, and its resumption writes the rest again."""

    def __init__(
        self,
        workdir: str | os.PathLike,
        enabled: bool = True,
        resume_step: int | None = None,
        *,
        remote_flush_seconds: float = 30.0,
    ):
        """`resume_step`: the checkpoint a resumed run restarts from. Records of later steps
        come from the interrupted run past that checkpoint; the resumed run writes them again,
        so they are dropped to keep one record per step."""
        self.enabled = enabled
        self._closed = False
        if not enabled:
            return
        workdir = storage.path(workdir)
        self.path = workdir / METRICS_FILE
        self.remote = storage.is_remote(workdir)
        self._flush_every = remote_flush_seconds
        self._last_flush = time.monotonic()
        suffix = f".{os.getpid()}.{uuid.uuid4().hex[:8]}"
        if self.remote:
            old = b""
            if storage.retry(self.path.exists, f"reading {self.path}"):
                old = storage.read_bytes(self.path)
            self._lines = _complete_records(old, self.path, resume_step)
            self._dirty = False
            # Events go to a local file first; flush() uploads it under the same name.
            self._staging = tempfile.TemporaryDirectory(prefix="mmjax-events-")
            events_base = Path(self._staging.name) / "events"
            self._events_remote = workdir / TENSORBOARD_DIR
        else:
            workdir.mkdir(parents=True, exist_ok=True)
            if self.path.exists():
                self._repair_tail()
                if resume_step is not None:
                    self._drop_after(resume_step)
            self._file = open(self.path, "a", encoding="utf-8")
            (workdir / TENSORBOARD_DIR).mkdir(exist_ok=True)
            events_base = workdir / TENSORBOARD_DIR / "events"
        self._events = EventsWriter(str(events_base), filename_suffix=suffix)

    def _repair_tail(self) -> None:
        offset, tail = _split_tail(self.path)
        if not tail:
            return
        if _parse_line(tail) is not None:
            with open(self.path, "ab") as f:
                f.write(b"\n")
            return
        warnings.warn(
            f"{self.path}: dropping a truncated last line ({len(tail)} bytes) left by a crash",
            stacklevel=3,  # point at the MetricWriter(...) call
        )
        with open(self.path, "r+b") as f:
            f.truncate(offset)

    def _drop_after(self, step: int) -> None:
        lines = self.path.read_bytes().splitlines(keepends=True)
        kept = [line for line in lines if (_parse_line(line) or {}).get("step", 0) <= step]
        if len(kept) == len(lines):
            return
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_bytes(b"".join(kept))
        os.replace(tmp, self.path)

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Records `metrics` (scalars: Python, NumPy or JAX) at `step`."""
        if not self.enabled:
            return  # Not even converting: a disabled process may not hold the values' data.
        if self._closed:
            raise ValueError(f"MetricWriter for {self.path} is closed")
        step = operator.index(step)
        if "step" in metrics:
            raise ValueError("metrics may not contain a key named 'step'; it is the record's step")
        values = {str(key): _to_float(key, value) for key, value in metrics.items()}
        record = {"step": step, **{key: _json_value(value) for key, value in values.items()}}
        line = json.dumps(record, allow_nan=False) + "\n"
        summary = Summary(
            value=[Summary.Value(tag=key, simple_value=value) for key, value in values.items()]
        )
        self._events.write_event(Event(wall_time=time.time(), step=step, summary=summary))
        self._events.flush()
        if self.remote:
            self._lines.append(line.encode("utf-8"))
            self._dirty = True
            if time.monotonic() - self._last_flush >= self._flush_every:
                self.flush()
        else:
            self._file.write(line)
            self._file.flush()

    def flush(self) -> None:
        """Makes every record written so far durable (object storage: one upload each of
        metrics.jsonl and the events file; locally they already are)."""
        if not self.enabled or self._closed or not self.remote:
            return
        self._last_flush = time.monotonic()
        if not self._dirty:
            return
        storage.write_bytes(self.path, b"".join(self._lines))
        for local in Path(self._staging.name).iterdir():
            storage.write_bytes(self._events_remote / local.name, local.read_bytes())
        self._dirty = False

    def close(self) -> None:
        if not self.enabled or self._closed:
            return
        self._events.close()
        if self.remote:
            self._dirty = True  # The events file's last bytes came with close().
            self.flush()
            self._staging.cleanup()
        else:
            self._file.close()
        self._closed = True

    def __enter__(self) -> "MetricWriter":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def _complete_records(data: bytes, path, resume_step: int | None) -> list[bytes]:
    """The lines of a stored metrics file that a writer keeps: complete records (a cut last
    line dropped with a warning), none past `resume_step`."""
    lines = data.splitlines(keepends=True)
    if lines and not lines[-1].endswith(b"\n"):
        if _parse_line(lines[-1]) is None:
            warnings.warn(
                f"{path}: dropping a truncated last line ({len(lines[-1])} bytes)",
                stacklevel=4,
            )
            lines = lines[:-1]
        else:
            lines[-1] += b"\n"
    if resume_step is not None:
        lines = [line for line in lines if (_parse_line(line) or {}).get("step", 0) <= resume_step]
    return lines


def read_metrics(workdir: str | os.PathLike) -> list[dict[str, Any]]:
    """All records of WORKDIR/metrics.jsonl in file order (non-finite strings back to floats).

    A last line cut off by a crash is skipped with a warning; a bad line anywhere else is an error.
    """
    path = storage.path(workdir) / METRICS_FILE
    if not storage.retry(path.exists, f"reading {path}"):
        raise FileNotFoundError(f"no {METRICS_FILE} in {workdir}")
    records = []
    lines = storage.read_bytes(path).split(b"\n")
    # Every complete line ends with a newline, so the piece after the last one is '' or truncated.
    complete, tail = lines[:-1], lines[-1]
    for number, line in enumerate(complete, start=1):
        record = _parse_line(line)
        if record is None:
            raise ValueError(f"{path}:{number}: not a JSON object: {line[:80]!r}")
        records.append(record)
    if tail:
        record = _parse_line(tail)
        if record is None:
            warnings.warn(
                f"{path}: skipped 1 truncated last line ({len(tail)} bytes), probably from a crash",
                stacklevel=2,
            )
        else:
            records.append(record)
    return records
