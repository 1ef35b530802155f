"""Dry run: compile the train step for a mesh without allocating anything; size it.

  mmjax dryrun --config configs/coca.py:size=large --devices 64 \\
      [--hbm-gib 16] [--json] [--cpu] [--config.KEY=VALUE ...]
  mmjax dryrun --topology v5e:4x4 [--slices N] [--fit] --config ...

Prints the mesh, the parameter count, per-device bytes of parameters and optimizer
state (from their shardings), the compiled step's memory analysis per device,
model FLOPs per step and the largest tensors; with --hbm-gib, whether the step
fits. --json prints the same as one JSON object.

On CPU, --devices N simulates N devices (forced host devices, configured before
JAX starts its backend; when the backend is already up with another count, the
dry run re-runs itself in a fresh process). A config with DCN factors
(mesh.dcn_*) then treats consecutive blocks of devices as its slices. On TPU/GPU
the real devices are used and --devices must equal their count or be omitted;
--cpu simulates on the host instead. The state and batch are abstract
(jax.eval_shape / ShapeDtypeStruct): nothing is allocated, only compiled.

--topology NAME compiles with libtpu's XLA:TPU compiler for that TPU topology on any machine
(mmjax.tools.topology): the per-chip memory, whether it fits the chip's HBM (a table per
generation, or --hbm-gib), the collectives and custom calls of the compiled step. A compile
that runs out of HBM reports fits: false with the compiler's figure. --fit searches the
lightest model.remat and the largest batch that fit, and prints the overrides to use.
"""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
import time
from typing import Any

import jax
import numpy as np

from mmjax.models.config import REMAT_POLICIES
from mmjax.models.flops import train_flops_per_step
from mmjax.runtime import cli
from mmjax.runtime import sharding as shd
from mmjax.runtime.config import ConfigError, load_config, split_config_flags
from mmjax.tools import hlo_stats
from mmjax.tools import topology as topology_compile
from mmjax.training.setup import build_run
from mmjax.training.step import abstract_batch, batch_shardings

_REEXEC_ENV = "MMJAX_DRYRUN_REEXEC"  # Set in the re-run child: never re-run twice.
GIB = 2**30


def prepare_devices(num_devices: int | None, force_cpu: bool) -> bool:
    """Configures the backend for `num_devices`; False if this process cannot provide them.

    Must run before anything initialises JAX's backend to take effect in-process.
    """
    try:
        if force_cpu:
            jax.config.update("jax_platforms", "cpu")
        if num_devices is not None:  # Only the CPU backend reads it; accelerators ignore it.
            jax.config.update("jax_num_cpu_devices", num_devices)
    except RuntimeError:  # The backend is already up (e.g. called from Python).
        pass
    devices = jax.devices()
    if num_devices is None or len(devices) == num_devices:
        return True
    if devices[0].platform != "cpu":
        raise ConfigError(
            f"--devices={num_devices} but there are {len(devices)} {devices[0].platform} "
            f"devices; omit --devices, pass {len(devices)}, or add --cpu to simulate"
        )
    return False


def _rerun_in_fresh_process(argv: list[str], num_devices: int) -> int:
    env = dict(os.environ, JAX_PLATFORMS="cpu", **{_REEXEC_ENV: "1"})
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "device_count" not in f]
    env["XLA_FLAGS"] = " ".join([*flags, f"--xla_force_host_platform_device_count={num_devices}"])
    return subprocess.run([sys.executable, "-m", "mmjax.tools.dryrun", *argv], env=env).returncode


def _path_name(path) -> str:
    parts = []
    for entry in path:
        for attr in ("key", "name", "idx"):
            if hasattr(entry, attr):
                parts.append(str(getattr(entry, attr)))
                break
        else:
            parts.append(str(entry))
    return "/".join(parts)


def _spec(sharding) -> str:
    spec = getattr(sharding, "spec", None)
    return "P()" if spec is None else str(spec).replace("PartitionSpec", "P")


def tensor_table(tree, prefix: str) -> list[dict[str, Any]]:
    """One row per array of an abstract sharded tree: shape, spec, global/per-device bytes."""
    rows = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        itemsize = np.dtype(leaf.dtype).itemsize
        rows.append(
            {
                "name": f"{prefix}/{_path_name(path)}" if path else prefix,
                "shape": list(leaf.shape),
                "dtype": str(np.dtype(leaf.dtype)),
                "spec": _spec(leaf.sharding),
                "bytes": math.prod(leaf.shape) * itemsize,
                "bytes_per_device": shd.bytes_per_device(leaf),
            }
        )
    return rows


def _memory_stats(compiled) -> dict[str, int] | None:
    try:
        stats = compiled.memory_analysis()
    except NotImplementedError:
        return None
    if stats is None:
        return None
    out = {
        "argument_bytes": int(stats.argument_size_in_bytes),
        "output_bytes": int(stats.output_size_in_bytes),
        "alias_bytes": int(stats.alias_size_in_bytes),
        "temp_bytes": int(stats.temp_size_in_bytes),
        "generated_code_bytes": int(stats.generated_code_size_in_bytes),
    }
    # Donated state: outputs that alias arguments take no extra memory.
    out["peak_estimate_bytes"] = (
        out["argument_bytes"]
        + out["output_bytes"]
        - out["alias_bytes"]
        + out["temp_bytes"]
        + out["generated_code_bytes"]
    )
    return out


def dry_run(
    config,
    *,
    simulated: bool,
    hbm_gib: float | None = None,
    top: int = 10,
    devices: list | None = None,
    topology: str | None = None,
) -> dict:
    """Compiles the train step for `devices` (default: this process's) and returns the sizing
    report. With a `topology` (its abstract TPU devices), a compile that runs out of HBM
    gives `fits: false` with the compiler's own figures instead of an error."""
    devices = list(devices) if devices is not None else jax.devices()
    n = len(devices)
    dcn = math.prod(int(config.mesh.get(k, 1)) for k in shd.DCN_KEYS)
    granule_of = granules = None
    if simulated and dcn > 1:
        # One process with forced devices: consecutive blocks of devices stand in for slices.
        position = {d: i for i, d in enumerate(devices)}
        granule_of = lambda d: position[d] * dcn // n
        granules = ("process", dcn)
    # The run set-up training uses (optimizer.offload_state included), with abstract arrays.
    run = build_run(config, devices=devices, granule_of=granule_of, granules=granules)
    mesh, rules, model_cfg, abstract = run.mesh, run.rules, run.model_cfg, run.abstract_state
    start = time.perf_counter()
    oom = None
    try:
        compiled = run.compile_step()
    except Exception as e:  # noqa: BLE001 - XLA raises its own runtime error types.
        oom = topology_compile.compile_oom(e) if topology else None
        if oom is None:
            raise
        compiled = None
    compile_seconds = time.perf_counter() - start
    hlo = compiled.as_text() if compiled is not None else ""

    batch = abstract_batch(config.batch_size, model_cfg, batch_shardings(mesh, rules, model_cfg))
    tensors = (
        tensor_table(abstract.params, "params")
        + tensor_table(abstract.opt_state, "opt_state")
        + tensor_table(batch, "batch")
    )
    param_bytes = sum(r["bytes"] for r in tensors if r["name"].startswith("params/"))
    opt_bytes = sum(r["bytes"] for r in tensors if r["name"].startswith("opt_state"))
    params_dev = shd.bytes_per_device(abstract.params)
    opt_dev = shd.bytes_per_device(abstract.opt_state)
    flops = train_flops_per_step(
        model_cfg, config.batch_size, with_captioning=config.loss.caption_weight > 0
    )
    preset = config.sharding_rules
    rules_name = preset if isinstance(preset, str) and preset in shd.RULE_PRESETS else "custom"
    report = {
        "platform": devices[0].platform,
        "device_kind": devices[0].device_kind,
        "topology": topology,
        "simulated": simulated,
        "devices": n,
        "mesh": dict(mesh.shape),
        "mesh_dcn": {k: int(config.mesh.get(k, 1)) for k in shd.DCN_KEYS},
        "sharding_rules": rules_name,
        "batch_size": config.batch_size,
        "data_parallel": shd.data_parallel_size(mesh, rules),
        "dtype": model_cfg.dtype,
        "param_dtype": model_cfg.param_dtype,
        "remat": model_cfg.remat,
        "scan_layers": model_cfg.scan_layers,
        "offload_state": run.offload,
        "params": int(sum(math.prod(a.shape) for a in jax.tree.leaves(abstract.params))),
        "param_bytes": param_bytes,
        "opt_state_bytes": opt_bytes,
        "param_bytes_per_device": params_dev,
        "opt_state_bytes_per_device": opt_dev,
        # How far the sharded state is from a perfect 1/N split (1.0 = ideal).
        "state_vs_ideal": (params_dev + opt_dev) / ((param_bytes + opt_bytes) / n),
        "memory_per_device": _memory_stats(compiled) if compiled is not None else None,
        "compile_error": oom["message"] if oom else None,
        "collectives": hlo_stats.collectives(hlo) if compiled is not None else None,
        "custom_calls": hlo_stats.custom_calls(hlo) if compiled is not None else None,
        "kernels": hlo_stats.kernels(hlo_stats.custom_calls(hlo)) if compiled is not None else None,
        "flops_per_step": flops,
        "flops_per_device_per_step": flops / n,
        "compile_seconds": compile_seconds,
        "largest_tensors": sorted(tensors, key=lambda r: (-r["bytes_per_device"], -r["bytes"]))[
            :top
        ],
    }
    if hbm_gib is None and topology:
        hbm_gib = topology_compile.hbm_gib_of(devices[0].device_kind)
    if oom is not None:
        # The compiler's verdict; its figures stand in for the memory analysis.
        report["memory_per_device"] = {
            "temp_bytes": oom.get("temp_bytes"),
            "peak_estimate_bytes": oom.get("needed_bytes"),
        }
        report["hbm_gib"] = hbm_gib
        if oom.get("available_bytes"):
            report["hbm_compiler_bytes"] = oom["available_bytes"]
        report["fits"] = False
        needed = oom.get("needed_bytes")
        report["hbm_fraction"] = needed / (hbm_gib * GIB) if needed and hbm_gib else None
    elif hbm_gib is not None:
        memory = report["memory_per_device"]
        # An offloaded optimizer state lives in host memory, not HBM.
        state_hbm = params_dev + (0 if run.offload else opt_dev)
        need = memory["peak_estimate_bytes"] if memory else state_hbm
        report["hbm_gib"] = hbm_gib
        report["fits"] = need <= hbm_gib * GIB
        report["hbm_fraction"] = need / (hbm_gib * GIB)
    return report


def _human(n: float) -> str:
    for unit, scale in (("GiB", GIB), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


def _flops(n: float) -> str:
    unit, scale = ("TFLOP", 1e12) if n >= 1e12 else ("GFLOP", 1e9)
    return f"{n / scale:.2f} {unit}"


def format_report(r: dict) -> str:
    mesh = " ".join(f"{k}={v}" for k, v in r["mesh"].items())
    dcn = ", ".join(f"{k}={v}" for k, v in r["mesh_dcn"].items() if v > 1) or "none"
    where = "simulated " if r["simulated"] else ""
    state_dev = r["param_bytes_per_device"] + r["opt_state_bytes_per_device"]
    ideal = (r["param_bytes"] + r["opt_state_bytes"]) / r["devices"]
    kind = r.get("device_kind") or r["platform"]
    topology = f", topology {r['topology']}" if r.get("topology") else ""
    lines = [
        f"devices:     {r['devices']} {where}{r['platform']} ({kind}{topology})",
        f"mesh:        {mesh} (DCN: {dcn}); rules {r['sharding_rules']}; "
        f"batch {r['batch_size']} over {r['data_parallel']} data-parallel shards",
        f"model:       {r['params'] / 1e6:.1f}M params; dtype {r['dtype']}, params "
        f"{r['param_dtype']}; remat {r['remat']}; scan_layers {r['scan_layers']}",
        f"state:       params {_human(r['param_bytes'])}, optimizer {_human(r['opt_state_bytes'])}"
        " in total",
        f"per device:  params {_human(r['param_bytes_per_device'])} + optimizer "
        f"{_human(r['opt_state_bytes_per_device'])}"
        + (" (in host memory)" if r.get("offload_state") else "")
        + f" = {_human(state_dev)} "
        f"({r['state_vs_ideal']:.3f}x the ideal total/{r['devices']} = {_human(ideal)})",
    ]
    memory = r["memory_per_device"]
    if r.get("compile_error"):
        needed = memory.get("peak_estimate_bytes") if memory else None
        lines.append(
            "compiled:    does not fit: the compiler needs "
            + (_human(needed) if needed else "more than the HBM")
            + f" per chip ({r['compile_error'][:200]})"
        )
        memory = None
    elif memory:
        lines.append(
            f"compiled:    per device: arguments {_human(memory['argument_bytes'])}, outputs "
            f"{_human(memory['output_bytes'])} (aliased with donated arguments "
            f"{_human(memory['alias_bytes'])}), temp {_human(memory['temp_bytes'])}, code "
            f"{_human(memory['generated_code_bytes'])}; peak estimate "
            f"{_human(memory['peak_estimate_bytes'])}"
        )
    elif not r.get("compile_error"):
        lines.append("compiled:    memory analysis unavailable on this backend")
    if r.get("collectives"):
        used = [
            f"{kind} {c['count']} ({_human(c['bytes'])})"
            for kind, c in r["collectives"].items()
            if c["count"]
        ]
        lines.append(f"collectives: {', '.join(used) or 'none'} (instructions; loop bodies once)")
    if r.get("custom_calls") is not None:
        kernels = ", ".join(f"{t} x{c}" for t, c in r["kernels"].items()) or "none"
        others = sum(r["custom_calls"].values()) - sum(r["kernels"].values())
        lines.append(f"kernels:     {kernels} (+ {others} other custom calls of the compiler)")
    lines.append(
        f"flops:       {_flops(r['flops_per_step'])}/step (model, analytic), "
        f"{_flops(r['flops_per_device_per_step'])} per device"
    )
    lines.append(f"compile:     {r['compile_seconds']:.1f} s")
    if "fits" in r:
        verdict = "yes" if r["fits"] else "NO"
        hbm = f"{r['hbm_gib']:g} GiB" if r.get("hbm_gib") else "the chip's"
        share = (
            f" ({100 * r['hbm_fraction']:.0f}% of it"
            f"{'' if memory or r.get('compile_error') else ', state only: no memory analysis'})"
            if r.get("hbm_fraction") is not None
            else ""
        )
        lines.append(f"fits in {hbm} HBM? {verdict}{share}")
    lines.append("largest tensors (per device):")
    width = max(len(t["name"]) for t in r["largest_tensors"])
    for t in r["largest_tensors"]:
        shape = "x".join(map(str, t["shape"])) or "scalar"
        lines.append(
            f"  {_human(t['bytes_per_device']):>11}  {t['name']:<{width}}  "
            f"{t['dtype']}[{shape}]  {t['spec']}"
        )
    return "\n".join(lines)


def fit_search(
    config, *, devices: list, topology: str | None, hbm_gib: float | None, max_compiles: int = 8
) -> dict:
    """The lightest model.remat that fits at config.batch_size, then the largest batch (in
    multiples of the data-parallel size) that fits with it: doubling, then bisection, at
    most `max_compiles` compiles in all. Every compile is listed under 'tried'."""
    tried: list[dict] = []
    reports: dict[tuple[str, int], dict] = {}

    def attempt(remat: str, batch: int) -> dict:
        candidate = copy.deepcopy(config)
        candidate.model.remat = remat
        candidate.batch_size = batch
        report = dry_run(
            candidate, simulated=False, hbm_gib=hbm_gib, devices=devices, topology=topology
        )
        memory = report["memory_per_device"] or {}
        tried.append(
            dict(
                remat=remat,
                batch_size=batch,
                fits=bool(report.get("fits")),
                peak_estimate_bytes=memory.get("peak_estimate_bytes"),
                compile_seconds=round(report["compile_seconds"], 1),
            )
        )
        reports[remat, batch] = report
        return report

    batch = config.batch_size
    chosen = None
    for remat in REMAT_POLICIES:  # Lightest first: "none" recomputes nothing.
        if len(tried) >= max_compiles:
            break
        report = attempt(remat, batch)
        if "fits" not in report:
            raise ConfigError("--fit needs the chip's HBM: pass --hbm-gib (unknown device kind)")
        if report["fits"]:
            chosen = (remat, report["data_parallel"])
            break
    if chosen is None:
        return dict(fits=False, tried=tried, overrides=[])
    remat, step = chosen
    good, bad = batch, None
    while len(tried) < max_compiles:
        if bad is None:
            candidate = good * 2
        else:
            candidate = (good + bad) // 2 // step * step
            if candidate <= good:
                break
        if attempt(remat, candidate)["fits"]:
            good = candidate
        else:
            bad = candidate
        if bad is not None and bad - good <= step:
            break
    return dict(
        fits=True,
        remat=remat,
        batch_size=good,
        batch_per_chip=good / len(devices),
        overrides=[f"--config.model.remat={remat}", f"--config.batch_size={good}"],
        tried=tried,
        report=reports[remat, good],  # The dry run of the proposed config.
    )


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        rest, overrides = split_config_flags(argv)
        parser = cli.ArgumentParser(
            prog="python -m mmjax.tools.dryrun", description=__doc__.split("\n")[0]
        )
        parser.add_argument("--config", required=True, help="configs/FILE.py[:ARG]")
        parser.add_argument("--devices", type=int, default=None, help="device count (CPU: forced)")
        parser.add_argument("--hbm-gib", type=float, default=None, help="memory per device, GiB")
        parser.add_argument("--json", action="store_true", help="print one JSON object")
        parser.add_argument("--cpu", action="store_true", help="simulate on CPU devices")
        parser.add_argument("--top", type=int, default=10, help="how many largest tensors")
        parser.add_argument(
            "--topology",
            default=None,
            help="compile for this TPU topology with libtpu (v5e:4x4, v5p:4x4x4, v6e:8x8, ...)",
        )
        parser.add_argument("--slices", type=int, default=1, help="--topology: DCN slices")
        parser.add_argument(
            "--fit",
            action="store_true",
            help="search the lightest model.remat and the largest batch that fit the HBM",
        )
        parser.add_argument(
            "--fit-max-compiles", type=int, default=8, help="--fit: compiles at most"
        )
        args = parser.parse_args(rest)
        if args.devices is not None and args.devices < 1:
            raise ConfigError(f"--devices={args.devices} must be >= 1")
        if args.topology and (args.devices is not None or args.cpu):
            raise ConfigError("--topology sets the devices: drop --devices / --cpu")
        config = load_config(args.config, overrides)
        if args.topology:
            devices = topology_compile.topology_devices(args.topology, args.slices)
        else:
            if args.slices != 1:
                raise ConfigError("--slices needs --topology")
            if not prepare_devices(args.devices, args.cpu):
                if os.environ.get(_REEXEC_ENV):
                    raise ConfigError(
                        f"--devices={args.devices}: could not force the CPU device count"
                    )
                return _rerun_in_fresh_process(argv, args.devices)
            devices = jax.devices()
        simulated = not args.topology and devices[0].platform == "cpu"
        if args.fit:
            result = fit_search(
                config,
                devices=devices,
                topology=args.topology,
                hbm_gib=args.hbm_gib,
                max_compiles=args.fit_max_compiles,
            )
            print(json.dumps(result) if args.json else format_fit(result), flush=True)
            return 0 if result["fits"] else 1
        report = dry_run(
            config,
            simulated=simulated,
            hbm_gib=args.hbm_gib,
            top=args.top,
            devices=devices,
            topology=args.topology,
        )
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(report) if args.json else format_report(report), flush=True)
    return 0


def format_fit(result: dict) -> str:
    lines = [
        f"  remat={t['remat']:<14} batch={t['batch_size']:<7} "
        f"{'fits' if t['fits'] else 'does not fit'}"
        + (f" (peak {_human(t['peak_estimate_bytes'])})" if t["peak_estimate_bytes"] else "")
        + f", compiled in {t['compile_seconds']:.0f} s"
        for t in result["tried"]
    ]
    if not result["fits"]:
        return "\n".join(["nothing tried fits:", *lines])
    return "\n".join(
        [
            "tried:",
            *lines,
            f"fits: model.remat={result['remat']}, batch_size={result['batch_size']} "
            f"({result['batch_per_chip']:g} per chip); use:",
            "  " + " ".join(result["overrides"]),
        ]
    )


if __name__ == "__main__":
    sys.exit(main())
