"""Checkpoint costs: save and restore seconds, size on disk, async overhead, preemption latency.

  python -m mmjax.benchmarks.checkpoint --config configs/coca.py:size=small [--steps N] [--dir DIR]
  python -m mmjax.benchmarks.checkpoint --preemption --config configs/coca.py:size=base,batch=8

The first form prints one JSON line for the train state of the config (synthetic
batch, one process): `save_blocking_seconds` (until save() returns: the state is
copied off the devices), `save_seconds` (until the checkpoint is committed),
`restore_seconds`, `disk_bytes`, and, in one run, the mean step time without
saves and with an async save after every step (`async_overhead` is their ratio;
the plain phase runs before and after the saving one, against drift).

`--preemption` runs the real CLI (`python -m mmjax.train`) in a fresh workdir,
sends SIGTERM once step 2 is logged (so a step is in flight, after the first
one), and prints the step time, the seconds from SIGTERM to exit, the part of
it after the stop step is logged (the save and the exit), and the exit code.
Extra `--config.KEY=VALUE` flags go to the training run.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

from mmjax.benchmarks.step_timing import prepare_step, warm_up
from mmjax.runtime import cli
from mmjax.runtime.checkpoint import Checkpointer
from mmjax.runtime.config import ConfigError, load_config, split_config_flags


def disk_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _median(values: list[float]) -> float:
    return float(np.median(values))


def measure(config, steps: int, directory: Path, repeats: int = 3) -> dict:
    """Save/restore times and sizes, and the step time with and without saves."""
    prepared = prepare_step(config)
    abstract, compiled, batch = prepared.abstract, prepared.step, prepared.batch
    state, _ = warm_up(prepared)

    # One save at a time, nothing else running: the latency of a checkpoint.
    blocking, total, restoring = [], [], []
    for i in range(repeats):
        checkpointer = Checkpointer(directory / f"single_{i}", max_to_keep=1)
        start = time.perf_counter()
        checkpointer.save(1, state, batch_size=config.batch_size)
        blocking.append(time.perf_counter() - start)
        checkpointer.wait()
        total.append(time.perf_counter() - start)
        start = time.perf_counter()
        restored = checkpointer.restore(1, abstract)
        jax.block_until_ready(restored)
        restoring.append(time.perf_counter() - start)
        checkpointer.close()
        del restored
    size = disk_bytes(directory / "single_0" / "1")

    def timed_steps(checkpointer: Checkpointer | None, first: int) -> list[float]:
        nonlocal state
        times = []
        for step in range(first, first + steps):
            start = time.perf_counter()
            state, metrics = compiled(state, batch)
            jax.block_until_ready(metrics)  # The loop reads the loss every logged step.
            if checkpointer is not None:
                checkpointer.save(step, state, batch_size=config.batch_size)
            times.append(time.perf_counter() - start)
        return times

    plain = timed_steps(None, 0)
    checkpointer = Checkpointer(directory / "every_step", max_to_keep=2)
    saving = timed_steps(checkpointer, 1000)
    start = time.perf_counter()
    checkpointer.close()
    final_wait = time.perf_counter() - start
    plain += timed_steps(None, 2000)
    state_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))
    return {
        "params": prepared.parameters,
        "state_bytes": int(state_bytes),
        "disk_bytes": size,
        "save_blocking_seconds": _median(blocking),
        "save_seconds": _median(total),
        "restore_seconds": _median(restoring),
        "step_seconds": float(np.mean(plain)),
        "step_seconds_saving": float(np.mean(saving)),
        "async_overhead": float(np.mean(saving) / np.mean(plain)),
        "final_wait_seconds": final_wait,
        "steps": steps,
        "batch_size": config.batch_size,
        "devices": jax.device_count(),
        "platform": jax.devices()[0].platform,
    }


def _logged(workdir: Path) -> list[dict]:
    try:
        lines = (workdir / "metrics.jsonl").read_text().splitlines(keepends=True)
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in lines if line.endswith("\n")]


def preemption(config_arg: str, overrides: list[str], workdir: Path, timeout: float) -> dict:
    """SIGTERM to a real training run once step 2 is logged; seconds until it exits."""
    command = [
        sys.executable,
        "-m",
        "mmjax.train",
        "--config",
        config_arg,
        "--workdir",
        str(workdir),
        "--config.total_steps=1000",
        "--config.log_every=1",
        "--config.eval_every=100000",
        "--config.checkpoint_every=100000",
        *(f"--config.{item}" for item in overrides),
    ]
    started = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while not any(r["step"] >= 2 for r in _logged(workdir)):
        if proc.poll() is not None or time.perf_counter() - started > timeout:
            proc.kill()
            out, err = proc.communicate()
            raise RuntimeError(
                f"training ended before step 2 (rc {proc.returncode}): {err[-2000:]}"
            )
        time.sleep(0.01)
    signalled = time.perf_counter()
    proc.send_signal(signal.SIGTERM)
    stop_logged = None  # When the step it stops at is logged: what follows is save + exit.
    while proc.poll() is None:
        if stop_logged is None and any(r["step"] > 2 for r in _logged(workdir)):
            stop_logged = time.perf_counter()
        time.sleep(0.01)
    out, err = proc.communicate()
    exited = time.perf_counter()
    records = _logged(workdir)
    stopped = max(r["step"] for r in records)
    checkpoint = workdir / "checkpoints" / str(stopped)
    return {
        "config": config_arg,
        "step_seconds": next(r["step_seconds"] for r in records if r["step"] == 2),
        "sigterm_to_exit_seconds": exited - signalled,
        "stop_step_logged_to_exit_seconds": exited - (stop_logged or exited),
        "start_to_step_2_seconds": signalled - started,
        "exit_code": proc.returncode,
        "stopped_at": stopped,
        "checkpoint_bytes": disk_bytes(checkpoint) if checkpoint.is_dir() else 0,
        "message": next((line for line in out.splitlines() if "preempted" in line), ""),
    }


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    rest, overrides = split_config_flags(argv)
    parser = cli.ArgumentParser(prog="python -m mmjax.benchmarks.checkpoint")
    parser.add_argument("--config", required=True)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per phase")
    parser.add_argument("--dir", default=None, help="scratch folder (default: a temp folder)")
    parser.add_argument("--preemption", action="store_true", help="SIGTERM latency of the CLI")
    parser.add_argument("--timeout", type=float, default=3600)
    args = parser.parse_args(rest)
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="mmjax_ckpt_bench_") as scratch:
        if args.preemption:
            result = preemption(args.config, overrides, Path(scratch) / "run", args.timeout)
        else:
            try:
                config = load_config(args.config, overrides)
            except ConfigError as e:
                print(f"error: {e}", file=sys.stderr)
                return 2
            result = measure(config, args.steps, Path(scratch))
            result["config"] = args.config
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
