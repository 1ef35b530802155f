"""Train-step benchmark on synthetic data: throughput, compile time, MFU.

  mmjax bench --config configs/coca.py:size=bench [--steps N] [--config.KEY=VALUE ...]
  python -m mmjax.benchmarks.train_step --config configs/coca.py:size=bench --compile-depths 2,12 \
      --config.model.scan_layers=True
  python -m mmjax.benchmarks.train_step --config configs/coca.py:size=bench --compare '' \
      model.scan_layers=True model.remat=none,model.scan_layers=True
  mmjax bench --config configs/coca.py:size=bench --against open_clip   # side_by_side.py

--compare times variants of the config (each a comma-separated list of KEY=VALUE overrides,
'' for the config as given) in one process, one step of each in turn, so that a noisy
machine slows them alike; it prints one JSON line per variant, with its median step time
as a ratio to the first variant's.

Prints one JSON line. MFU = analytic model FLOPs per step (see mmjax/flops.py)
/ step time / peak, where the peak is a data-sheet figure on known
accelerators and a measured matmul rate elsewhere (the CPU).
"""

from __future__ import annotations

import json
import os
import sys
import time

import jax
import numpy as np

from mmjax.benchmarks.step_timing import model_flops, prepare_step, timed_step, warm_up
from mmjax.models.flops import peak_flops
from mmjax.runtime import cli
from mmjax.runtime.config import ConfigError, load_config, split_config_flags
from mmjax.runtime.host_memory import tune_host_memory
from mmjax.training.setup import build_run


def _peak_after_steps(dtype: str, peak: float, source: str) -> tuple[float, str]:
    """A measured peak is measured again after the timed steps and the higher (steady-state)
    rate kept, so a slow moment of this VM can only lower the MFU, never inflate it."""
    if not source.startswith("measured"):
        return peak, source
    peak = max(peak, peak_flops(dtype, fresh=True)[0])
    return peak, source + ", best of before and after the timed steps"


def run(config, steps: int, warmup: int = 2) -> dict:
    prepared = prepare_step(config)
    model_cfg, mesh = prepared.model_cfg, prepared.mesh
    state, metrics = warm_up(prepared, warmup)
    peak, peak_source = peak_flops(model_cfg.dtype, fresh=True)
    times = []
    for _ in range(steps):  # Per-step times; the median resists this machine's noise.
        state, metrics, seconds = timed_step(prepared, state)
        times.append(seconds)
    peak, peak_source = _peak_after_steps(model_cfg.dtype, peak, peak_source)
    step_seconds = float(np.median(times))
    flops = model_flops(config, model_cfg)
    return {
        "examples_per_sec": config.batch_size / step_seconds,
        "step_seconds": step_seconds,
        "step_seconds_min": float(np.min(times)),
        "compile_seconds": prepared.compile_seconds,
        "flops_per_step": flops,
        "xla_flops_per_step": prepared.xla_flops,
        "peak_flops": peak,
        "peak_source": peak_source,
        "mfu": flops / step_seconds / peak,
        "achieved_flops": flops / step_seconds,
        "steps": steps,
        "batch_size": config.batch_size,
        "devices": jax.device_count(),
        "platform": jax.devices()[0].platform,
        "mesh": dict(mesh.shape),
        "dtype": model_cfg.dtype,
        "scan_layers": model_cfg.scan_layers,
        "remat": model_cfg.remat,
        # mmjax.runtime.host_memory's doing (or the user's): malloc reuse and inline CPU dispatch.
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
        "cpu_async_dispatch": jax.config.values.get("jax_cpu_enable_async_dispatch"),
        "params": prepared.parameters,
        "loss": float(metrics["loss"]),
    }


def compare(config_path: str, overrides: list[str], variants: list[str], steps: int) -> list:
    """Step-interleaved timing of config variants: one step of each in turn, `steps` rounds.

    Separate runs on a shared VM drift by more than the differences worth measuring
    (+-10% within minutes here); interleaving exposes every variant to the same drift.
    """
    configs = [
        load_config(config_path, [*overrides, *(item for item in variant.split(",") if item)])
        for variant in variants
    ]  # All loaded (and validated) before the first compilation.
    prepared = [prepare_step(variant_config) for variant_config in configs]
    states = [warm_up(p)[0] for p in prepared]
    dtype = configs[0].model.dtype
    peak, peak_source = peak_flops(dtype, fresh=True)
    times = [[] for _ in variants]
    for _ in range(steps):
        for i, p in enumerate(prepared):
            states[i], _, seconds = timed_step(p, states[i])
            times[i].append(seconds)
    peak, _ = _peak_after_steps(dtype, peak, peak_source)
    medians = [float(np.median(t)) for t in times]
    return [
        {
            "variant": variant,
            "step_seconds": median,
            "step_seconds_min": float(np.min(t)),
            "examples_per_sec": config.batch_size / median,
            "mfu": model_flops(config, p.model_cfg) / median / peak,
            "step_ratio_to_first": median / medians[0],
            "compile_seconds": p.compile_seconds,
            "peak_flops": peak,
            "steps": steps,
        }
        for variant, config, p, median, t in zip(variants, configs, prepared, medians, times)
    ]


def compile_scaling(config, depths: list[int]) -> dict:
    """Compile seconds of the train step at several depths (all towers scaled alike).

    With scan over layers the compiled program holds one copy of each block,
    so compile time should stay nearly flat in depth.
    """
    seconds = {}
    for depth in depths:
        cfg = config.copy_and_resolve_references()
        cfg.model.vision.layers = cfg.model.text.layers = cfg.model.decoder.layers = depth
        run = build_run(cfg)
        start = time.perf_counter()
        run.compile_step()
        seconds[depth] = time.perf_counter() - start
    return {
        "compile_seconds": seconds,
        "scan_layers": config.model.scan_layers,
        "ratio_deepest_to_shallowest": seconds[max(depths)] / seconds[min(depths)],
    }


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a == "--against" or a.startswith("--against=") for a in argv):
        from mmjax.benchmarks import side_by_side

        return side_by_side.main(argv)
    try:
        rest, overrides = split_config_flags(argv)
        parser = cli.ArgumentParser(prog="python -m mmjax.benchmarks.train_step")
        parser.add_argument("--config", required=True)
        parser.add_argument("--steps", type=int, default=10)
        parser.add_argument(
            "--compile-depths",
            type=str,
            default="",
            help="e.g. 2,12: report compile time at these depths instead",
        )
        parser.add_argument(
            "--compare",
            nargs="+",
            metavar="VARIANT",
            help="time these variants (KEY=VALUE,... each; '' = as given) step by step in turn",
        )
        args = parser.parse_args(rest)
        if args.compare:
            for line in compare(args.config, overrides, args.compare, args.steps):
                print(json.dumps(line))
            return 0
        config = load_config(args.config, overrides)
        if args.compile_depths:
            result = compile_scaling(config, [int(d) for d in args.compile_depths.split(",")])
        else:
            result = run(config, args.steps)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    tune_host_memory()
    sys.exit(main())
