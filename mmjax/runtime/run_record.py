"""What a training run checks and records before it touches the workdir's state.

`start()` is called at the start of `Trainer.fit`, before the state is
restored or created. On process 0 (multi-process runs share the workdir):

1. Workdir lock: `WORKDIR/.lock` holds the holder's host, pid and start time,
   created atomically (O_EXCL). A second training in the same workdir refuses to
   start while the holder lives. A lock left behind by a dead process (SIGKILL,
   power loss) on this host is taken over with a note; one from another host
   cannot be checked, so the run refuses until the user removes the file. The
   lock is released when the process exits (also after an exception). On object
   storage the lock is created by a conditional write (GCS: ifGenerationMatch=0),
   and a stale one is taken over by delete-then-conditional-create, so of two runs
   taking it at once one wins.
2. Config check: when a checkpoint exists, the config must equal the one in
   `WORKDIR/config.json` except for the keys of `RESUMABLE_KEYS`; otherwise the
   differences are printed (`key: old -> new`, one per line) and the run refuses
   unless `allow_config_change=True`.
3. Run record: one JSON line per start appended to `WORKDIR/runs.jsonl`: git
   commit and dirtiness of the mmjax source tree, Python and package versions,
   devices, processes, mesh, start time, host, command line, config changes.

A refusal is a `RunRefused` (a ConfigError: exit code 2 from the CLI) on every
process, since process 0 tells the others.
"""

from __future__ import annotations

import atexit
import dataclasses
import fcntl
import fnmatch
import hashlib
import importlib.metadata
import json
import os
import platform
import shlex
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from mmjax import storage
from mmjax.models.config import LEGACY_KEYS, ModelConfig
from mmjax.runtime import log
from mmjax.runtime.config import ConfigError, to_json

LOCK_FILE = ".lock"
RECORDS_FILE = "runs.jsonl"
CONFIG_FILE = "config.json"

# Config keys that may differ between config.json and a resuming run without counting as a
# change (patterns for fnmatch). All leave the trained weights' math alone:
# - the topology (a feature: a checkpoint restores onto any mesh) and memory knobs one may
#   need on new hardware: same computation up to float summation order;
# - input-pipeline speed (the data position is the step, whatever the worker count);
# - evaluation, logging and checkpoint cadence and retention.
# Everything else counts, total_steps included: it re-stretches the learning-rate schedule.
RESUMABLE_KEYS = (
    "allow_config_change",
    "mesh.*",
    "sharding_rules",
    "model.remat",
    "model.vision.remat",
    "model.text.remat",
    "model.decoder.remat",
    "model.attention",
    "train.microbatches",
    "loss.caption_logits",
    "loss.caption_chunk",
    "loss.sharded_softmax",
    "optimizer.offload_state",
    "data.workers",
    "data.num_threads",
    "data.prefetch",
    "eval.*",
    "evals",
    "evals.*",
    "log_every",
    "eval_every",
    "checkpoint_every",
    "keep_checkpoints",
)
# Versions recorded in runs.jsonl (distribution names).
PACKAGES = (
    "jax",
    "jaxlib",
    "flax",
    "optax",
    "orbax-checkpoint",
    "grain",
    "numpy",
    "sentencepiece",
    "ml-collections",
    "pillow",
)
# Environment variables that change what XLA/JAX/mmjax do (recorded; nothing else is).
ENV_PREFIXES = ("XLA_FLAGS", "JAX_", "MMJAX_", "CUDA_VISIBLE_DEVICES", "TPU_", "GLIBC_TUNABLES")
GIT_TIMEOUT_S = 10
_ABSENT = object()


class RunRefused(ConfigError):
    """The run must not start in this workdir (lock held, config changed); one line."""


# --- the workdir lock ----------------------------------------------------------------------


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def _process_start_ticks(pid: int) -> int | None:
    """Start time of `pid` in clock ticks since boot (Linux), to tell a reused pid apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Fields after the parenthesised command name (which may hold spaces): state is first,
    # starttime is field 22 of the whole line.
    fields = stat.rsplit(")", 1)[-1].split()
    if len(fields) < 20 or not fields[19].isdigit():
        return None
    return -1 if fields[0] == "Z" else int(fields[19])  # A zombie has exited.


def holder_alive(holder: Mapping[str, Any]) -> bool:
    """Whether the process a lock names (on this host) still runs."""
    if holder.get("boot_id") and _boot_id() and holder["boot_id"] != _boot_id():
        return False  # Rebooted since: pids start over.
    pid = int(holder["pid"])
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # Exists, owned by another user.
    ticks = _process_start_ticks(pid)
    if ticks == -1:
        return False
    recorded = holder.get("process_start_ticks")
    return ticks is None or recorded is None or ticks == recorded


class WorkdirLock:
    """`WORKDIR/.lock`: one training per workdir; see the module docstring."""

    def __init__(self, path: str | Path):
        self.path = storage.path(path)
        self.token = uuid.uuid4().hex
        self.held = False
        self.content = json.dumps(
            {
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "start_time": _now(),
                "boot_id": _boot_id(),
                "process_start_ticks": _process_start_ticks(os.getpid()),
                "command": _command(),
                "token": self.token,
            }
        )

    def acquire(self) -> str | None:
        """Takes the lock; returns a note when a stale lock was taken over; raises RunRefused."""
        for _ in range(5):  # Retries only when the file changed under us.
            if storage.create_exclusive(self.path, self.content.encode()):
                self._held()
                return None
            raw, holder = self._read()
            if raw is None:
                continue  # Released meanwhile: create it again.
            if holder is None:
                raise RunRefused(
                    f"{self.path.parent} is locked by an unreadable lock file {self.path}; "
                    f"remove it if no training is using this workdir"
                )
            where = f"host {holder['host']} pid {holder['pid']}"
            since = f", since {holder['start_time']}" if holder.get("start_time") else ""
            if holder["host"] != socket.gethostname():
                raise RunRefused(
                    f"{self.path.parent} is in use by a training on {where}{since} (lock "
                    f"{self.path}); it cannot be checked from here: if that run is gone, "
                    f"remove the lock file"
                )
            ours = holder["pid"] == os.getpid()  # An earlier fit() of this process.
            if not ours and holder_alive(holder):
                raise RunRefused(
                    f"{self.path.parent} is in use by a training on {where}{since} (lock "
                    f"{self.path}); stop it or use another --workdir"
                )
            if self._replace(raw):
                return None if ours else f"took over the stale lock {self.path} of {where} (gone)"
        raise RunRefused(f"could not take the lock {self.path}: it keeps changing")

    def _read(self) -> tuple[str | None, dict | None]:
        """(raw text, parsed holder) of the lock file; (None, None) if it is gone."""
        for _ in range(20):  # A holder may be between creating and writing it.
            try:
                raw = storage.read_text(self.path)
            except FileNotFoundError:
                return None, None
            try:
                holder = json.loads(raw)
                if isinstance(holder, dict) and (
                    isinstance(holder.get("host"), str) and isinstance(holder.get("pid"), int)
                ):
                    return raw, holder
            except json.JSONDecodeError:
                pass
            time.sleep(0.05)
        return raw, None

    def _replace(self, seen: str) -> bool:
        """Overwrites the lock in place if it still reads `seen`. Under flock, so that of
        two runs taking over the same stale lock at once, the second sees the first. On
        object storage: deleted, then created only if absent, so of two runs taking over
        at once one creates it and the other finds it held."""
        if storage.is_remote(self.path):
            if storage.read_text(self.path) != seen:
                return False
            storage.retry(self.path.unlink, f"removing the stale lock {self.path}")
            if not storage.create_exclusive(self.path, self.content.encode()):
                return False
            self._held()
            return True
        try:
            f = open(self.path, "r+")
        except FileNotFoundError:
            return False
        with f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX)
            except OSError:
                pass  # No flock on this filesystem: the check below still narrows the race.
            if f.read() != seen:
                return False
            f.seek(0)
            f.truncate()
            f.write(self.content)
            f.flush()
            os.fsync(f.fileno())
            try:  # Still the file at the path (not one unlinked meanwhile)?
                if os.stat(self.path).st_ino != os.fstat(f.fileno()).st_ino:
                    return False
            except FileNotFoundError:
                return False
        self._held()
        return True

    def _held(self) -> None:
        self.held = True
        atexit.register(self.release)

    def release(self) -> None:
        """Removes the lock file if it is still ours (idempotent)."""
        if not self.held:
            return
        self.held = False
        atexit.unregister(self.release)
        try:
            holder = json.loads(storage.read_text(self.path))
            # The token is ours; the pid check keeps a forked child from releasing it.
            if holder.get("token") == self.token and holder.get("pid") == os.getpid():
                storage.retry(self.path.unlink, f"releasing {self.path}")
        except (OSError, ValueError):
            pass  # Gone or rewritten by another run: not ours to remove.


# --- the config check ----------------------------------------------------------------------


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}."""
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def resumable(key: str) -> bool:
    return any(fnmatch.fnmatchcase(key, pattern) for pattern in RESUMABLE_KEYS)


def config_changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Differences of two config dicts (as in config.json) by dotted key, sorted:
    {key, old, new, allowed}; a key missing on one side has the value '(absent)'."""
    flat_old, flat_new = flatten(old), flatten(new)
    changes = []
    for key in sorted(flat_old.keys() | flat_new.keys()):
        a, b = flat_old.get(key, _ABSENT), flat_new.get(key, _ABSENT)
        if a != b:
            shown = ["(absent)" if v is _ABSENT else v for v in (a, b)]
            changes.append(dict(key=key, old=shown[0], new=shown[1], allowed=resumable(key)))
    return changes


def format_change(change: Mapping[str, Any]) -> str:
    show = lambda v: v if v == "(absent)" else json.dumps(v)
    return f"{change['key']}: {show(change['old'])} -> {show(change['new'])}"


def check_config(
    workdir: Path, config: ml_collections.ConfigDict, checkpoint_step: int | None
) -> list[dict[str, Any]]:
    """Config differences from WORKDIR/config.json when resuming; raises RunRefused if any
    counts and allow_config_change is not set (after printing them to stderr)."""
    path = workdir / CONFIG_FILE
    if checkpoint_step is None or not storage.retry(path.is_file, f"reading {path}"):
        return []  # A fresh run (or one from before config.json): nothing to compare.
    allow = bool(config.get("allow_config_change", False))
    try:
        old = json.loads(storage.read_text(path))
        if not isinstance(old, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as e:
        if allow:
            return []
        raise RunRefused(
            f"{path} is unreadable ({e}), so the checkpoint's config cannot be compared; "
            f"pass --config.allow_config_change=True to resume with this config"
        ) from None
    if isinstance(old.get("model"), dict) and set(old["model"]) & set(LEGACY_KEYS):
        # Saved before the per-tower grouping: compare what that run's model was.
        try:
            model = ModelConfig.from_mapping(old["model"])
            old["model"] = json.loads(json.dumps(dataclasses.asdict(model)))
        except (TypeError, ValueError):
            pass  # Compared as saved: every model key then counts as changed.
    changes = config_changes(old, json.loads(to_json(config)))
    counted = [c for c in changes if not c["allowed"]]
    if counted and not allow:
        for change in counted:
            print(format_change(change), file=sys.stderr)
        raise RunRefused(
            f"{workdir} has a checkpoint (step {checkpoint_step}) of another config: the "
            f"{len(counted)} key(s) above differ from {path}; resume with the same config, use "
            f"a new --workdir, or pass --config.allow_config_change=True"
        )
    return changes


# --- the run record ------------------------------------------------------------------------


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _command() -> str:
    return shlex.join(getattr(sys, "orig_argv", [sys.executable, *sys.argv]))


def _git(source: Path, *args: str) -> str:
    proc = subprocess.run(
        ["git", "--no-optional-locks", "-C", str(source), *args],
        capture_output=True,
        text=True,
        timeout=GIT_TIMEOUT_S,
        check=True,
    )
    return proc.stdout


def git_state(source: Path | None = None) -> dict[str, Any]:
    """{commit, dirty, changed} of the git checkout holding the mmjax package; values are
    None when it is not one (an installed package), git is missing or too slow."""
    source = source or Path(__file__).resolve().parents[1]  # The mmjax package.
    state: dict[str, Any] = dict(commit=None, dirty=None, changed=None)
    try:  # The package must be tracked by that checkout, not merely lie inside some repo.
        _git(source, "ls-files", "--error-unmatch", "__init__.py")
        state["commit"] = _git(source, "rev-parse", "HEAD").strip()
        root = _git(source, "rev-parse", "--show-toplevel").strip()
        lines = _git(Path(root), "status", "--porcelain").splitlines()
    except (OSError, subprocess.SubprocessError):
        return state
    state["dirty"] = bool(lines)
    state["changed"] = [line[3:] for line in lines[:50]]
    return state


def package_versions() -> dict[str, str | None]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def run_record(
    config: ml_collections.ConfigDict,
    mesh,
    checkpoint_step: int | None,
    changes: list[dict[str, Any]],
) -> dict[str, Any]:
    """The runs.jsonl line of this start."""
    device = jax.devices()[0]
    return dict(
        start_time=_now(),
        host=socket.gethostname(),
        pid=os.getpid(),
        command=_command(),
        cwd=os.getcwd(),
        resumed_from_step=checkpoint_step,
        git=git_state(),
        python=platform.python_version(),
        packages=package_versions(),
        platform=device.platform,
        device_kind=device.device_kind,
        device_count=jax.device_count(),
        local_device_count=jax.local_device_count(),
        process_count=jax.process_count(),
        # False where mmjax.runtime.host_memory chose inline dispatch (XLA:CPU steps reuse memory).
        cpu_async_dispatch=jax.config.values.get("jax_cpu_enable_async_dispatch"),
        mesh={name: int(size) for name, size in mesh.shape.items()},
        seed=config.get("seed"),
        config_sha256=hashlib.sha256(to_json(config).encode()).hexdigest(),
        config_changes=changes,
        env={k: v for k, v in sorted(os.environ.items()) if k.startswith(ENV_PREFIXES)},
    )


def read_records(workdir: str | Path) -> list[dict[str, Any]]:
    path = storage.path(workdir) / RECORDS_FILE
    if not storage.retry(path.is_file, f"reading {path}"):
        return []
    return [json.loads(line) for line in storage.read_text(path).splitlines() if line.strip()]


def _append_record(path, line: str) -> None:
    """Appends one line; object storage has no append, so there the (small) file is
    rewritten whole, one atomic object."""
    if not storage.is_remote(path):
        with open(path, "a") as f:
            f.write(line)
        return
    old = storage.read_text(path) if storage.retry(path.exists, f"reading {path}") else ""
    storage.write_text(path, old + line)


# --- all of it at the start of a run -------------------------------------------------------


def _log(message: str) -> None:
    log.info(message)


def start(
    workdir: str | Path,
    config: ml_collections.ConfigDict,
    mesh,
    *,
    checkpoint_step: int | None,
) -> WorkdirLock | None:
    """Lock, config check and run record (see the module docstring); every process calls it.

    `checkpoint_step`: the checkpoint the run will resume from (None: a fresh run).
    Returns process 0's lock (released at exit, or by `release()`); raises RunRefused.
    """
    workdir = storage.path(workdir)
    lock, error = None, None
    if jax.process_index() == 0:
        try:
            lock = WorkdirLock(workdir / LOCK_FILE)
            note = lock.acquire()
            if note:
                _log(note)
            changes = check_config(workdir, config, checkpoint_step)
        except (RunRefused, OSError) as e:
            error = str(e) if isinstance(e, RunRefused) else f"cannot lock {workdir}: {e}"
            if lock is not None:
                lock.release()
        else:
            shown = [c for c in changes if c["key"] != "allow_config_change"]
            for allowed, why in ((True, "may change on resume"), (False, "allow_config_change")):
                if any(c["allowed"] == allowed for c in shown):
                    _log(
                        f"config differs from {CONFIG_FILE} ({why}): "
                        + "; ".join(format_change(c) for c in shown if c["allowed"] == allowed)
                    )
            record = run_record(config, mesh, checkpoint_step, changes)
            try:
                _append_record(workdir / RECORDS_FILE, json.dumps(record, sort_keys=True) + "\n")
            except OSError as e:  # A record is worth a note, not a lost run.
                _log(f"could not write {workdir / RECORDS_FILE}: {e}")
    if jax.process_count() > 1:  # Every process stops if process 0 refused.
        refused = multihost_utils.broadcast_one_to_all(np.int32(error is not None))
        if int(refused) and error is None:
            error = f"process 0 refused to start in {workdir} (see its error)"
    if error is not None:
        raise RunRefused(error)
    return lock
