"""Training runs shared by the end-to-end tests of every module (see conftest.py).

A test module declares which runs each of its tests reads in a module-level
`NEEDS = {test_name: (job, ...)}`; the session fixture `runs` starts those
jobs in the background, each at most once per pytest run (shared by the xdist
workers through a folder and file locks), ahead of the tests that read them.
Each run mostly compiles, on about one core, and all share a persistent XLA
compilation cache, so a program compiled by one run (e.g. the eval functions,
identical in every tiny run) is not compiled again by the next. Results are
unaffected: a cached executable is the same executable.

Shared settings (BASE): batch 16, a constant learning rate (no warmup, no
decay), log every step, checkpoint every 4 steps, eval only at the last step
on 64 examples. The constant rate matters for the resume test: the schedule
is a function of total_steps, so "4 steps, then extend to 8" equals "8 steps"
only when the schedule does not change with total_steps.
"""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BATCH = 16
STEPS = 8
BASE = [
    "--config.log_every=1",
    "--config.checkpoint_every=4",
    "--config.eval_every=1000",
    "--config.optimizer.warmup_steps=0",
    "--config.optimizer.end_learning_rate_factor=1.0",
    "--config.data.train_examples=256",
    "--config.data.eval_examples=64",
    "--config.eval.caption_examples=16",
    "--config.eval.batch_size=32",
    # The named evaluators of configs/coca.py on a few examples (their code paths run; the
    # figures of 8 steps mean nothing).
    "--config.evals.captioning.examples=16",
    "--config.evals.zeroshot.examples=32",
]
MESH_8 = ["--config.mesh.data=2", "--config.mesh.fsdp=2", "--config.mesh.tensor=2"]
MESH_FSDP_TENSOR = ["--config.mesh.data=1", "--config.mesh.fsdp=4", "--config.mesh.tensor=2"]
LOSS_KEYS = ("loss", "contrastive_loss", "caption_loss")
# Runs as `launch/multiprocess.sh 2 4 -- python ...`: 2 processes x 4 CPU devices (gloo).
TWO_PROCESSES = ["bash", "launch/multiprocess.sh", "2", "4", "--"]

# A run long enough to learn the corpus (test_learning.py and the inference tests read it):
# the tiny CoCa at its own config defaults, 800 steps of batch 64, one eval at the end.
LEARNED = [
    "--config",
    "configs/coca.py:size=tiny,steps=800",
    "--config.eval_every=800",
    "--config.checkpoint_every=800",
    "--config.log_every=100",
]

# The independent training runs, by name: train() keyword arguments, or `args` for a run that
# does not use the short BASE settings.
JOBS = {
    # First: the longest. 800 steps run faster than they compile: fully optimised.
    "learned": dict(args=LEARNED, timeout=1200, optimize=True),
    # The same run with FLIP patch dropout (half of the patches): test_learning.py.
    "learned_patch_dropout": dict(
        args=[*LEARNED, "--config.model.patch_dropout=0.5"], timeout=1200, optimize=True
    ),
    "straight": dict(),  # 8 steps on 1 device in one go.
    "eight": dict(extra=MESH_8, devices=8),
    "two_processes": dict(extra=MESH_8, launcher=TWO_PROCESSES, devices=None),
    # Continued on 4 devices by test_reproducibility.py (early: that continuation compiles too).
    "eight_fsdp": dict(extra=MESH_FSDP_TENSOR, devices=8),
    "nan": dict(
        extra=["--config.optimizer.learning_rate=1e30", "--config.checkpoint_every=1"], check=False
    ),
    "nan_skip": dict(extra=["--config.optimizer.learning_rate=1e30", "--config.train.on_nan=skip"]),
    "clip": dict(config="clip", steps=3),
    "captioning": dict(config="captioning", steps=3),
    "siglip": dict(config="siglip", steps=3),
    # Gradient accumulation and the ring sigmoid loss on the 8-device mesh.
    "eight_micro": dict(extra=[*MESH_8, "--config.train.microbatches=4"], devices=8),
    "siglip_eight": dict(config="siglip", steps=3, extra=MESH_8, devices=8),
    # test_reproducibility.py: "straight" again must give the same bits (last: it reuses the
    # compiled programs of "straight").
    "straight_again": dict(),
}


# Tests build many small programs and run each for a few steps, so compiling dominates, and most
# of a compile is LLVM optimising XLA:CPU's fused kernels. The suite (conftest.py) and its
# subprocesses therefore compile at -O0: same programs and semantics, rounding-level differences
# (~1e-5 in an 8-step loss), kernels about 2x slower. The long training runs opt back in.
FAST_COMPILE = "--xla_backend_optimization_level=0"


def xla_flags(devices: int, optimize: bool = False) -> str:
    """XLA_FLAGS of a test subprocess on `devices` forced CPU devices."""
    flags = f"--xla_force_host_platform_device_count={devices}"
    return flags if optimize else f"{FAST_COMPILE} {flags}"


def mmjax_cli(cwd, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """`python -m mmjax ARGS...` run from `cwd` as a user types it (relative paths work)."""
    return subprocess.run(
        [sys.executable, "-m", "mmjax", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def shared_dir(tmp_path_factory) -> Path:
    """A folder shared by all xdist workers of this pytest run (or this process's temp root)."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent
    path = root / "mmjax_training_runs"
    path.mkdir(exist_ok=True)
    return path


def env_for(cache_dir, devices: int | None = 1, optimize=False, **extra) -> dict[str, str]:
    """The environment of a run; devices=None leaves the device count to a launcher (the
    -O0 flag still goes through: launch/multiprocess.sh appends to XLA_FLAGS)."""
    env = dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        XLA_FLAGS=xla_flags(devices, optimize),
        JAX_COMPILATION_CACHE_DIR=str(cache_dir),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
    )
    if devices is None:
        env["XLA_FLAGS"] = "" if optimize else FAST_COMPILE
    if optimize:  # A long run: worth the CLI's restart for malloc tuning (mmjax/host_memory.py).
        env.pop("MMJAX_MALLOC_TUNING", None)
    for key in ("MMJAX_COORDINATOR", "MMJAX_NUM_PROCESSES", "MMJAX_PROCESS_ID"):
        env.pop(key, None)  # A launcher sets them where it wants them.
    env.update(extra)
    return env


def run(
    module, args, cache_dir, *, devices=1, check=True, launcher=(), timeout=600, optimize=False
):
    proc = subprocess.run(
        [*launcher, sys.executable, "-m", module, *map(str, args)],
        cwd=REPO,
        env=env_for(cache_dir, devices, optimize),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check:
        check_exit(proc)
    return proc


def run_with_devices(code: str, devices: int = 8, timeout: float = 300) -> dict:
    """Runs Python `code` in a fresh process on `devices` forced CPU devices; returns the JSON
    object it prints as its last stdout line."""
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=REPO,
        env=dict(os.environ, XLA_FLAGS=xla_flags(devices), JAX_PLATFORMS="cpu"),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, f"subprocess failed:\n{proc.stderr[-4000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def check_exit(proc):
    assert proc.returncode == 0, (
        f"{proc.args} exited {proc.returncode}\n"
        f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    )


def train_args(workdir, *extra, config="coca", steps=STEPS) -> list:
    return [
        "--config",
        f"configs/{config}.py:size=tiny,batch={BATCH},steps={steps}",
        "--workdir",
        workdir,
        *BASE,
        *extra,
    ]


def train(workdir, cache_dir, *extra, config="coca", steps=STEPS, devices=1, check=True, **kw):
    args = train_args(workdir, *extra, config=config, steps=steps)
    return run("mmjax.train", args, cache_dir, devices=devices, check=check, **kw)


class Runs:
    """Runs each job of JOBS at most once per pytest run, ahead of the tests that read it.

    Without xdist, two background threads run the jobs the selected tests need,
    two at a time; under xdist (`pytest -n 2`) each worker has one such thread
    and the workers share the jobs through a folder and file locks, so no job
    runs twice. `get(name)` waits for a job (running it now if nobody has
    started it) and returns (workdir, CompletedProcess).
    """

    def __init__(self, root: Path, cache_dir: Path, names):
        self._root, self._cache_dir = root, cache_dir
        self._pending = [name for name in JOBS if name in names]  # In JOBS order.
        self._stop = threading.Event()
        threads = 1 if os.environ.get("PYTEST_XDIST_WORKER") else 2
        self._threads = [
            threading.Thread(target=self._prefetch, daemon=True) for _ in range(threads)
        ]
        for thread in self._threads:
            thread.start()

    def _ensure(self, name: str, block: bool) -> bool:
        """Runs job `name` unless it has run; False if another thread or worker is on it."""
        with open(self._root / f"{name}.lock", "w") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | (0 if block else fcntl.LOCK_NB))
            except BlockingIOError:
                return False
            result = self._root / f"{name}.json"
            if not result.exists():
                kwargs = dict(JOBS[name], check=False)
                if "args" in kwargs:
                    args = [*kwargs.pop("args"), "--workdir", self._root / name]
                    proc = run("mmjax.train", args, self._cache_dir, **kwargs)
                else:
                    extra = kwargs.pop("extra", ())
                    proc = train(self._root / name, self._cache_dir, *extra, **kwargs)
                tmp = result.with_suffix(".tmp")
                tmp.write_text(
                    json.dumps(
                        dict(
                            args=proc.args,
                            returncode=proc.returncode,
                            stdout=proc.stdout,
                            stderr=proc.stderr,
                        )
                    )
                )
                tmp.rename(result)
            return True

    def _prefetch(self):
        while not self._stop.is_set():
            busy = [name for name in list(self._pending) if not self._ensure(name, block=False)]
            self._pending = busy
            if not busy:
                return
            self._stop.wait(0.5)  # The rest are running elsewhere; check back.

    def get(self, name: str):
        self._ensure(name, block=True)
        saved = json.loads((self._root / f"{name}.json").read_text())
        proc = subprocess.CompletedProcess(**saved)
        if JOBS[name].get("check", True):
            check_exit(proc)
        return self._root / name, proc

    def close(self):
        self._stop.set()
        for thread in self._threads:
            thread.join()  # Waits for a run in progress (their subprocesses have a timeout).


def train_lines(workdir):
    from mmjax.runtime.metric_writer import read_metrics

    return [r for r in read_metrics(workdir) if "loss" in r]
