"""Transient storage errors retried with backoff, and counted.

Connection refused or reset, timeouts and HTTP 429/5xx are retried with exponential backoff
for up to `RETRY_SECONDS` in all, then the last error stops the caller; missing files,
permissions and bad requests raise at once. Every retry is counted (`retries()`: the run's
metrics report it as storage_retries) and logged in one line. gcsfs retries inside its own
calls first (6 tries over about 30 s): those are counted too, from the debug line it logs for
each. TensorStore (so orbax's checkpoint I/O) also retries inside its calls, uncounted.
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


class _CountLibraryRetries(logging.Handler):
    """Counts the retries gcsfs makes inside its calls: it logs each at DEBUG. The "gcsfs"
    logger is opened to DEBUG for that and stops propagating; this handler passes on to the
    root logger only what the logger let through before (records of its child loggers too),
    so nothing else of gcsfs's debug output appears."""

    def __init__(self, threshold: int):
        super().__init__(logging.DEBUG)
        self.threshold = threshold

    def emit(self, record: logging.LogRecord) -> None:
        global _retries
        if "retrying after exception" in record.getMessage():
            _retries += 1
            _logger.warning(f"storage: gcsfs {record.getMessage()}")
        if record.levelno >= self.threshold:
            logging.getLogger().handle(record)


def _count_gcsfs_retries() -> None:
    library = logging.getLogger("gcsfs")
    if any(isinstance(h, _CountLibraryRetries) for h in library.handlers):
        return
    library.addHandler(_CountLibraryRetries(library.getEffectiveLevel()))
    library.setLevel(logging.DEBUG)
    library.propagate = False


_count_gcsfs_retries()


def retries() -> int:
    """How many storage calls were retried in this process so far."""
    return _retries
