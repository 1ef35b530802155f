"""mmjax's train step side by side with open_clip's (or with itself), one step each in turn.

  mmjax bench --config configs/coca.py:size=bench --against open_clip [--pairs 24]
  mmjax bench --config configs/coca.py:size=bench --against mmjax      # resolution check

Each side runs in a warm worker process of its own (compiled or built, warmed up), and the
two step in turn, never at once: pair i times one step of each, the first side first in even
pairs and second in odd ones. The per-pair ratio (the other side's step time over this
side's: above 1 = mmjax faster) sees the same moment of a VM that drifts +-10% within
minutes, so its median resolves what separate runs cannot. Printed: one JSON line with each
side's examples/s (median step), the FLOPs each side counts (mmjax: its analytic count;
open_clip: torch's FlopCounterMode), the median ratio with a distribution-free 95%
confidence interval and the quartiles of the per-pair ratios.

The open_clip model is built from the config through the converter's mapping in reverse
(mmjax.interop.open_clip.open_clip_config); `layout_differences` lists the mmjax fields in
which open_clip's nearest model differs. The open_clip worker runs without the malloc
tunables mmjax's own CLIs add (mmjax.runtime.host_memory), as open_clip's users run it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tempfile
from typing import IO, Any

import numpy as np

from mmjax.interop.open_clip import ConversionError
from mmjax.runtime import cli
from mmjax.runtime.config import ConfigError, load_config, split_config_flags
from mmjax.runtime.host_memory import tune_host_memory, without_added_tunables

SIDES = ("mmjax", "open_clip")


def host_threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


# ---------------------------------------------------------------------------- the workers


def _serve(step, out: IO[str]) -> None:
    """Answer 'step' lines on stdin with one timed step each, until 'quit' or EOF."""
    for line in sys.stdin:
        if line.strip() != "step":
            break
        seconds, loss = step()
        out.write(json.dumps({"seconds": seconds, "loss": loss}) + "\n")
        out.flush()


def _mmjax_worker(config, warmup: int, out: IO[str]) -> None:
    from mmjax.benchmarks.step_timing import model_flops, prepare_step, timed_step, warm_up

    prepared = prepare_step(config)
    state, metrics = warm_up(prepared, warmup)
    out.write(json.dumps({
        "side": "mmjax",
        "flops_per_step": model_flops(config, prepared.model_cfg),
        "flops_counted_by": "mmjax.models.flops (analytic)",
        "xla_flops_per_step": prepared.xla_flops,
        "params": prepared.parameters,
        "setup_seconds": prepared.compile_seconds,
        "loss": float(metrics["loss"]),
    }) + "\n")  # fmt: skip
    out.flush()
    holder = {"state": state}

    def step():
        holder["state"], metrics, seconds = timed_step(prepared, holder["state"])
        return seconds, float(metrics["loss"])

    _serve(step, out)


def _open_clip_worker(config, warmup: int, threads: int, out: IO[str]) -> None:
    import time

    from mmjax.benchmarks.open_clip_step import OpenClipStep
    from mmjax.benchmarks.step_timing import synthetic_batch
    from mmjax.models.config import ModelConfig

    model_cfg = ModelConfig.from_mapping(config.model.to_dict())
    start = time.perf_counter()
    peer = OpenClipStep.build(config, model_cfg, synthetic_batch(config, model_cfg), threads)
    setup = time.perf_counter() - start
    flops = peer.counted_flops()  # Also the first warm-up pass.
    loss = float("nan")
    for _ in range(warmup):
        _, loss = peer.step()
    out.write(json.dumps({
        "side": "open_clip",
        "flops_per_step": flops,
        "flops_counted_by": "torch.utils.flop_counter.FlopCounterMode",
        "params": peer.params(),
        "setup_seconds": setup,
        "loss": loss,
        "threads": threads,
        "open_clip_config": peer.open_clip_config,
        "layout_differences": peer.differences,
    }) + "\n")  # fmt: skip
    out.flush()
    _serve(peer.step, out)


def worker_main(argv: list[str]) -> int:
    rest, overrides = split_config_flags(argv)
    parser = cli.ArgumentParser(prog="python -m mmjax.benchmarks.side_by_side")
    parser.add_argument("--worker", choices=SIDES, required=True)
    parser.add_argument("--config", required=True)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=host_threads())
    args = parser.parse_args(rest)
    # The protocol owns stdout; anything else a library prints goes to stderr.
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    config = load_config(args.config, overrides)
    if args.worker == "mmjax":
        _mmjax_worker(config, args.warmup, out)
    else:
        _open_clip_worker(config, args.warmup, args.threads, out)
    return 0


# ---------------------------------------------------------------------------- the parent


class WorkerFailed(RuntimeError):
    pass


@dataclasses.dataclass
class Worker:
    side: str
    proc: subprocess.Popen
    log: Any  # The worker's stderr, kept for the error message.
    info: dict[str, Any] = dataclasses.field(default_factory=dict)

    @classmethod
    def start(cls, side: str, config_path: str, overrides: list[str], warmup: int, threads: int):
        cmd = [sys.executable, "-m", "mmjax.benchmarks.side_by_side", "--worker", side,
               "--config", config_path, "--warmup", str(warmup), "--threads", str(threads),
               *(f"--config.{item}" for item in overrides)]  # fmt: skip
        env = dict(os.environ) if side == "mmjax" else without_added_tunables(os.environ)
        log = tempfile.TemporaryFile("w+")
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log,
                                text=True, env=env)  # fmt: skip
        return cls(side, proc, log)

    def _read(self) -> dict[str, Any]:
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            self.log.seek(0)
            tail = self.log.read().strip().splitlines()[-1:] or ["(no output)"]
            raise WorkerFailed(f"the {self.side} worker exited ({self.proc.returncode}): {tail[0]}")
        return json.loads(line)

    def ready(self) -> dict[str, Any]:
        self.info = self._read()
        return self.info

    def step(self) -> float:
        self.proc.stdin.write("step\n")
        self.proc.stdin.flush()
        return float(self._read()["seconds"])

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write("quit\n")
                self.proc.stdin.close()
                self.proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def median_interval(values, confidence: float = 0.95) -> tuple[float, float]:
    """A distribution-free confidence interval of the median: [x_(l), x_(n+1-l)] of the
    sorted values, l the largest rank with P(Binomial(n, 1/2) < l) <= (1 - confidence) / 2
    (the whole range when n is too small for that)."""
    from scipy.stats import binom

    x = np.sort(np.asarray(values, np.float64))
    n, tail = len(x), (1 - confidence) / 2
    ranks = [k for k in range(1, n // 2 + 1) if binom.cdf(k - 1, n, 0.5) <= tail]
    rank = max(ranks, default=1)
    return float(x[rank - 1]), float(x[n - rank])


def compare_sides(
    config_path: str,
    overrides: list[str],
    against: str,
    side: str = "mmjax",
    pairs: int = 24,
    warmup: int = 3,
    threads: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Alternate single train steps of `side` and `against`; see the module doc."""
    from tqdm import tqdm

    if side not in SIDES or against not in SIDES:
        raise ConfigError(f"sides are {', '.join(SIDES)}; got {side!r} against {against!r}")
    config = load_config(config_path, overrides)  # One-line errors before any worker starts.
    if "open_clip" in (side, against):
        from mmjax.benchmarks.open_clip_step import check_config
        from mmjax.models.config import ModelConfig

        check_config(config, ModelConfig.from_mapping(config.model.to_dict()))
    threads = threads or host_threads()
    workers = [Worker.start(s, config_path, overrides, warmup, threads) for s in (side, against)]
    try:
        for w in workers:
            w.ready()
        times: list[list[float]] = [[], []]
        for i in tqdm(range(pairs), desc=f"{side} vs {against}", unit="pair", disable=not progress):
            order = (0, 1) if i % 2 == 0 else (1, 0)  # Neither side always goes first.
            for k in order:
                times[k].append(workers[k].step())
    finally:
        for w in workers:
            w.close()
    a, b = (np.asarray(t) for t in times)
    ratios = b / a  # > 1: `side` takes less time per step.
    lo, hi = median_interval(ratios)
    result: dict[str, Any] = {
        "side": side,
        "against": against,
        "ratio": float(np.median(ratios)),
        "ratio_ci95": [lo, hi],
        "ratio_quartiles": [float(np.quantile(ratios, 0.25)), float(np.quantile(ratios, 0.75))],
        "pairs": pairs,
        "batch_size": config.batch_size,
        "threads": threads,
    }
    result["workers"] = [
        {
            "side": w.side,
            "examples_per_sec": config.batch_size / float(np.median(t)),
            "step_seconds": float(np.median(t)),
            "step_seconds_min": float(np.min(t)),
            "achieved_flops": w.info["flops_per_step"] / float(np.median(t)),
            **{k: v for k, v in w.info.items() if k != "side"},
        }
        for w, t in zip(workers, (a, b))
    ]
    return result


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--worker" in argv:
        return worker_main(argv)
    try:
        rest, overrides = split_config_flags(argv)
        parser = cli.ArgumentParser(prog="mmjax bench --against")
        parser.add_argument("--config", required=True)
        parser.add_argument("--against", choices=SIDES, required=True)
        parser.add_argument("--side", choices=SIDES, default="mmjax")
        parser.add_argument("--pairs", type=int, default=24)
        parser.add_argument("--warmup", type=int, default=3)
        parser.add_argument("--threads", type=int, default=0, help="per side (default: all)")
        args = parser.parse_args(rest)
        result = compare_sides(args.config, overrides, args.against, args.side, args.pairs,
                               args.warmup, args.threads or None)  # fmt: skip
    except (ConfigError, ConversionError, WorkerFailed, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    tune_host_memory()
    sys.exit(main())
