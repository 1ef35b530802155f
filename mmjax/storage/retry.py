"""Transient storage errors retried with backoff, and counted.

Connection refused or reset, timeouts and HTTP 429/5xx are retried with exponential backoff
for up to `RETRY_SECONDS` in all, then the last error stops the caller; missing files,
permissions and bad requests raise at once. Every retry is counted (`retries()`: the run's
metrics report it as storage_retries) and logged in one line. gcsfs and TensorStore (so
orbax) also retry inside their own calls.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from typing import TypeVar

RETRY_SECONDS = 120.0  # The longest outage a run rides out before the error stops it.
T = TypeVar("T")
_logger = logging.getLogger("mmjax")  # mmjax.runtime.log formats it.
_retries = 0


class StorageError(OSError):
    """A storage problem explained in one line (missing bucket, unsupported scheme...)."""


def transient(error: BaseException) -> bool:
    """Whether `error` may go away on its own: a connection or timeout problem, or an HTTP
    429/5xx from the server. Missing files, permissions and bad requests are not."""
    if isinstance(
        error,
        (FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError,
         NotADirectoryError, StorageError),
    ):  # fmt: skip
        return False
    if isinstance(error, (ConnectionError, TimeoutError)):
        return True
    name = type(error).__name__
    if any(word in name for word in ("Connect", "Timeout", "ServerDisconnected", "Transport")):
        return True
    code = getattr(error, "code", None) or getattr(error, "status", None)
    if isinstance(code, int) and (code == 429 or code >= 500):
        return True
    text = str(error)
    return any(
        word in text
        for word in (
            "Connection refused",
            "Cannot connect",
            "Connection reset",
            "Service Unavailable",
            "Bad Gateway",
            "Too Many Requests",
        )
    ) or (isinstance(error.__cause__, Exception) and transient(error.__cause__))


def retry(fn: Callable[[], T], what: str, *, budget: float = RETRY_SECONDS) -> T:
    """fn(), retried on transient errors with exponential backoff (0.5 s doubling, capped at
    10 s, with jitter) for at most `budget` seconds; other errors and the last one raise."""
    global _retries
    deadline = time.monotonic() + budget
    delay = 0.5
    while True:
        try:
            return fn()
        except Exception as e:  # Classified: only transient errors are retried.
            if not transient(e) or time.monotonic() + delay > deadline:
                raise
            _retries += 1
            _logger.warning(f"{what}: {type(e).__name__}: {e}; retrying in {delay:.1f} s")
            time.sleep(delay * (0.75 + 0.5 * random.random()))
            delay = min(delay * 2, 10.0)


def retries() -> int:
    """How many storage calls were retried in this process so far."""
    return _retries
