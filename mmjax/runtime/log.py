"""mmjax's messages: the `mmjax` Python logger, one line each, as `[mmjax] message`.

They go to standard output (the stream a run's log is read from); the inference commands,
whose standard output is their result, call `to_stderr()` first and report on standard
error. Processes other than 0 of a multi-process run keep warnings and errors only
(`distributed.initialize` sets that once it knows its process id); MMJAX_LOG_ALL_PROCESSES=1
keeps every process's info.
Applications embedding mmjax can attach their own handlers to the `mmjax` logger.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator

logger = logging.getLogger("mmjax")


_use_stderr = False


@contextlib.contextmanager
def to_stderr() -> Iterator[None]:
    """Inside, mmjax's messages go to standard error (commands whose output is data)."""
    global _use_stderr
    before, _use_stderr = _use_stderr, True
    try:
        yield
    finally:
        _use_stderr = before


class _StandardOutput(logging.StreamHandler):
    """Writes to whatever sys.stdout (or sys.stderr, after `to_stderr`) is when a message is
    emitted (pytest and notebooks replace it), not the stream of the moment the handler was
    made."""

    def __init__(self):
        super().__init__()

    @property
    def stream(self):
        return sys.stderr if _use_stderr else sys.stdout

    @stream.setter
    def stream(self, _):
        pass


def _handler() -> logging.Handler:
    handler = _StandardOutput()
    handler.setFormatter(logging.Formatter("[mmjax] %(message)s"))
    return handler


if not logger.handlers:
    logger.addHandler(_handler())
    logger.setLevel(logging.INFO)
    logger.propagate = False  # One line per message, also under an application's root set-up.


def set_process(process_id: int) -> None:
    """Non-zero processes keep warnings and errors only (unless MMJAX_LOG_ALL_PROCESSES=1)."""
    if process_id != 0 and os.environ.get("MMJAX_LOG_ALL_PROCESSES", "0") != "1":
        logger.setLevel(logging.WARNING)


def info(message: str) -> None:
    logger.info(message)
    _flush()


def warning(message: str) -> None:
    """A message the reader must see; the text says "WARNING" itself where it should."""
    logger.warning(message)
    _flush()


def _flush() -> None:
    for handler in logger.handlers:
        handler.flush()
