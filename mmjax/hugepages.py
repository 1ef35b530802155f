"""Transparent huge pages for XLA:CPU's buffers: the CLIs restart once with glibc's tunable.

XLA:CPU allocates a step's large temporaries (scan residual stacks, gradients, activations)
with malloc, which serves blocks this big with fresh mmap'd memory, so every step faults its
buffers in again 4 KiB at a time. With `GLIBC_TUNABLES=glibc.malloc.hugetlb=1` (glibc >= 2.35)
malloc asks for transparent huge pages on those mappings, which the kernel honours when its
THP mode is 'madvise'. On the 2-core dev machine the `bench` step went from 2.05 to 1.85 s
(scanned) and from 1.79 to 1.58-1.67 s (unrolled); see BUILD_NOTES "Huge pages".

glibc reads the tunable only at process start, so `python -m mmjax.train` (and bench, sweep,
evaluate) re-executes itself once, same pid and arguments, with it added; children inherit
it. Nothing happens when the tunable is already set, when THP is 'always' (huge pages
already) or 'never' (the advice is ignored), on another libc, or with MMJAX_MALLOC_HUGEPAGES=0.
"""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Mapping

ENV = "MMJAX_MALLOC_HUGEPAGES"
TUNABLE = "glibc.malloc.hugetlb"
THP_SETTING = "/sys/kernel/mm/transparent_hugepage/enabled"


def thp_mode(path: str = THP_SETTING) -> str | None:
    """The kernel's THP mode ('always', 'madvise' or 'never'), None if unknown."""
    try:
        with open(path) as f:
            words = f.read().split()
    except OSError:
        return None
    chosen = [w.strip("[]") for w in words if w.startswith("[")]
    return chosen[0] if chosen else None


def glibc_version() -> tuple[int, ...] | None:
    lib, version = platform.libc_ver()
    if lib != "glibc" or not version:
        return None
    return tuple(int(part) for part in version.split(".") if part.isdigit())


def restart_wanted(
    environ: Mapping[str, str], mode: str | None, glibc: tuple[int, ...] | None
) -> bool:
    if environ.get(ENV, "1") == "0" or TUNABLE in environ.get("GLIBC_TUNABLES", ""):
        return False
    return mode == "madvise" and glibc is not None and glibc >= (2, 35)


def with_tunable(environ: Mapping[str, str]) -> dict[str, str]:
    env = dict(environ)
    tunables = [t for t in env.get("GLIBC_TUNABLES", "").split(":") if t]
    env["GLIBC_TUNABLES"] = ":".join([*tunables, f"{TUNABLE}=1"])
    return env


def restart_with_huge_pages() -> None:
    """Re-executes this CLI process with the tunable when that helps (see the module doc).
    Call first thing under `if __name__ == "__main__"`: it never returns when it restarts."""
    if not restart_wanted(os.environ, thp_mode(), glibc_version()):
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, sys.orig_argv, with_tunable(os.environ))
