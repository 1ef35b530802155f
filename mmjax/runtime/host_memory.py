"""Host memory for XLA:CPU steps: the CLIs restart once with glibc malloc tunables.

XLA:CPU takes each step's temporaries (activations, the scan's residual stacks, gradients)
as one block from malloc: ~0.8 GB for the `bench` step. glibc serves a block that large
with a fresh mmap and unmaps it on free, so every step faulted the whole block in again
and the kernel zeroed it page by page (~0.15 s of a 1.6 s step in system time). Two
changes make the block live on between steps:

- `glibc.malloc.mmap_max=0` and a huge `trim_threshold`: big blocks come from the heap
  and stay there when freed, so the next step reuses the same, already-mapped pages;
- XLA runs single-device CPU programs inline (`jax_cpu_enable_async_dispatch=False`):
  the block is then taken on the main thread, from glibc's main arena. A worker
  thread's arena cannot hold a block that large and maps it fresh whatever the tunables.

`glibc.malloc.hugetlb=1` (glibc >= 2.35, THP mode 'madvise') backs what is mapped with
transparent huge pages, so the first steps fault 2 MiB at a time. The price: memory a
process frees is kept for reuse rather than returned to the system. Measured on the
2-core dev machine, `bench` step: see BUILD_NOTES "Host memory".

glibc reads tunables only at process start, so `python -m mmjax.train` (and bench, sweep,
evaluate) re-executes itself once, same pid and arguments, with the missing ones added;
children inherit them. A tunable the user set keeps the user's value. Nothing happens on
another libc or with MMJAX_MALLOC_TUNING=0 (then dispatch stays asynchronous too).

All of this is for steps that run on the host's CPU. On a TPU or GPU host (an accelerator's
device node and JAX's plugin for it are both present, or JAX_PLATFORMS names an accelerator)
nothing is changed: the host only feeds the devices there, and malloc keeping every freed
block would only cost the input pipeline memory.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import platform
import sys
from collections.abc import Callable, Mapping

ENV = "MMJAX_MALLOC_TUNING"
THP_SETTING = "/sys/kernel/mm/transparent_hugepage/enabled"
KEEP_FREED = ("glibc.malloc.mmap_max", "0")  # The tunable that lets a step reuse its block.
TRIM_THRESHOLD = ("glibc.malloc.trim_threshold", str(1 << 40))
HUGE_PAGES = ("glibc.malloc.hugetlb", "1")
ADDED = "MMJAX_ADDED_TUNABLES"  # The tunables the restart added (names, ':'-separated).


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


# Accelerator kinds: (device nodes that show one is attached, JAX plugin modules that use it).
ACCELERATORS = {
    "tpu": (("/dev/accel[0-9]*", "/dev/vfio/[0-9]*"), ("libtpu",)),
    "gpu": (("/dev/nvidia[0-9]*",), ("jax_cuda12_plugin", "jax_cuda13_plugin")),
    "rocm": (("/dev/kfd",), ("jax_rocm60_plugin", "jax_rocm7_plugin")),
}


def _has_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def steps_run_on_cpu(
    environ: Mapping[str, str],
    devices: Callable[[str], list[str]] = glob.glob,
    has_module: Callable[[str], bool] = _has_module,
) -> bool:
    """Whether JAX will compute on this host's CPU, decided before JAX starts: JAX_PLATFORMS
    when set (its first entry is the one JAX prefers), else no accelerator whose device node
    and JAX plugin are both present."""
    chosen = [p.strip() for p in environ.get("JAX_PLATFORMS", "").split(",") if p.strip()]
    if chosen:
        return chosen[0] == "cpu"
    for nodes, plugins in ACCELERATORS.values():
        if any(devices(pattern) for pattern in nodes) and any(map(has_module, plugins)):
            return False
    return True


def _tunables(environ: Mapping[str, str]) -> dict[str, str]:
    pairs = (t.partition("=") for t in environ.get("GLIBC_TUNABLES", "").split(":") if t)
    return {name: value for name, _, value in pairs}


def _enabled(environ: Mapping[str, str]) -> bool:
    return environ.get(ENV, "1") != "0"


def missing_tunables(
    environ: Mapping[str, str], mode: str | None, glibc: tuple[int, ...] | None
) -> list[tuple[str, str]]:
    """The tunables to add to this environment (empty: no restart)."""
    if not _enabled(environ) or glibc is None or glibc < (2, 26):  # 2.26: tunables.
        return []
    wanted = [KEEP_FREED, TRIM_THRESHOLD]
    if mode == "madvise" and glibc >= (2, 35):  # 'always' has huge pages already.
        wanted.append(HUGE_PAGES)
    present = _tunables(environ)
    return [(name, value) for name, value in wanted if name not in present]


def with_tunables(environ: Mapping[str, str], tunables: list[tuple[str, str]]) -> dict[str, str]:
    env = dict(environ)
    own = [t for t in env.get("GLIBC_TUNABLES", "").split(":") if t]
    env["GLIBC_TUNABLES"] = ":".join([*own, *(f"{name}={value}" for name, value in tunables)])
    return env


def without_added_tunables(environ: Mapping[str, str]) -> dict[str, str]:
    """`environ` as it was before the restart added tunables (the user's own stay): for a
    child that should run as it would outside mmjax, such as a peer in a benchmark."""
    env = dict(environ)
    added = set(filter(None, env.pop(ADDED, "").split(":")))
    own = env.get("GLIBC_TUNABLES", "").split(":")
    kept = [t for t in own if t and t.partition("=")[0] not in added]
    if kept:
        env["GLIBC_TUNABLES"] = ":".join(kept)
    else:
        env.pop("GLIBC_TUNABLES", None)
    return env


def keeps_freed_memory(environ: Mapping[str, str]) -> bool:
    """Whether malloc in this process keeps big freed blocks (mmap_max=0 is in effect)."""
    return _tunables(environ).get(KEEP_FREED[0]) == KEEP_FREED[1]


def tune_host_memory() -> None:
    """On a host whose CPU runs the steps: re-executes this CLI with the missing tunables
    (see the module doc), else selects inline CPU dispatch when freed blocks are kept.
    Call first thing under `if __name__ == "__main__"`, before JAX starts its backend: it
    never returns when it restarts."""
    if not steps_run_on_cpu(os.environ):
        return
    missing = missing_tunables(os.environ, thp_mode(), glibc_version())
    if missing:
        sys.stdout.flush()
        sys.stderr.flush()
        env = with_tunables(os.environ, missing)
        env[ADDED] = ":".join(filter(None, [os.environ.get(ADDED, ""), *(n for n, _ in missing)]))
        os.execve(sys.executable, sys.orig_argv, env)
    if _enabled(os.environ) and keeps_freed_memory(os.environ):
        import jax

        jax.config.update("jax_cpu_enable_async_dispatch", False)
