"""Per-device memory of the contrastive losses on a batch-sharded step, gathered vs sharded.

  python -m mmjax.benchmarks.loss [--devices 2,4,8] [--per-device-batch 256] [--dim 512] [--json]

For each device count (a subprocess with that many forced CPU devices, one `data` axis), compiles
value_and_grad (w.r.t. both embeddings, scale and bias) of:

- `sigmoid/gathered`: `losses.sigmoid_contrastive_loss` on batch-sharded inputs (XLA gathers);
- `sigmoid/chunked`: `sharded_losses.chunked_sigmoid_loss` (ring of B_local x B_local blocks);
- `softmax/gathered`: `losses.softmax_contrastive_loss` on batch-sharded inputs;
- `softmax/local`: `sharded_losses.local_softmax_loss` (B_local x B_global blocks);
- `softmax/ring`: `sharded_losses.ring_softmax_loss` (ring of B_local x B_local blocks with
  running log-sum-exps; what training uses);

and reports the compiled program's per-device temp, argument and output bytes
(`compiled.memory_analysis()`) and the compile time. Nothing is executed. Prints a table, or
one JSON object per line with --json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from mmjax.runtime import cli
from mmjax.training import losses, sharded_losses

VARIANTS = (
    "sigmoid/gathered",
    "sigmoid/chunked",
    "softmax/gathered",
    "softmax/local",
    "softmax/ring",
)


def _measure(per_device_batch: int, dim: int) -> list[dict]:
    """Runs inside the worker process, whose device count is already fixed."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    n = jax.device_count()
    mesh = Mesh(np.asarray(jax.devices()).reshape(n, 1, 1), ("data", "fsdp", "tensor"))
    axes = ("data",)
    rows = NamedSharding(mesh, P(axes, None))
    scalar = NamedSharding(mesh, P())
    emb = jax.ShapeDtypeStruct((n * per_device_batch, dim), jnp.float32, sharding=rows)
    num = jax.ShapeDtypeStruct((), jnp.float32, sharding=scalar)
    functions = {
        "sigmoid/gathered": losses.sigmoid_contrastive_loss,
        "sigmoid/chunked": lambda i, t, s, b: sharded_losses.chunked_sigmoid_loss(
            i, t, s, b, mesh=mesh, batch_axes=axes
        ),
        "softmax/gathered": lambda i, t, s, b: losses.softmax_contrastive_loss(i, t, s),
        "softmax/local": lambda i, t, s, b: sharded_losses.local_softmax_loss(
            i, t, s, mesh=mesh, batch_axes=axes
        ),
        "softmax/ring": lambda i, t, s, b: sharded_losses.ring_softmax_loss(
            i, t, s, mesh=mesh, batch_axes=axes
        ),
    }
    results = []
    for name in VARIANTS:
        step = jax.jit(
            jax.value_and_grad(functions[name], argnums=(0, 1, 2, 3)),
            out_shardings=(scalar, (rows, rows, scalar, scalar)),
        )
        start = time.perf_counter()
        compiled = step.lower(emb, emb, num, num).compile()
        seconds = time.perf_counter() - start
        memory = compiled.memory_analysis()
        results.append(
            dict(
                loss=name,
                devices=n,
                per_device_batch=per_device_batch,
                global_batch=n * per_device_batch,
                dim=dim,
                temp_bytes=int(memory.temp_size_in_bytes),
                argument_bytes=int(memory.argument_size_in_bytes),
                output_bytes=int(memory.output_size_in_bytes),
                compile_seconds=round(seconds, 3),
            )
        )
    return results


def measure(devices: int, per_device_batch: int, dim: int, timeout: float = 600) -> list[dict]:
    """The results for one device count, from a fresh process with that many CPU devices."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = (
        env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={devices}"
    ).strip()
    env["JAX_PLATFORMS"] = "cpu"
    command = [sys.executable, "-m", "mmjax.benchmarks.loss", "--worker"]
    command += ["--per-device-batch", str(per_device_batch), "--dim", str(dim)]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{devices} devices: worker failed: {proc.stderr.strip()[-2000:]}")
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def _mib(num_bytes: int) -> str:
    return f"{num_bytes / 2**20:.2f}"


def format_table(results: list[dict]) -> str:
    """A Markdown table: one row per (devices, loss)."""
    lines = [
        "| devices | global batch | loss | temp MiB/device | args MiB/device | "
        "out MiB/device | compile s |",
        "|---:|---:|---|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r['devices']} | {r['global_batch']} | {r['loss']} | {_mib(r['temp_bytes'])} | "
            f"{_mib(r['argument_bytes'])} | {_mib(r['output_bytes'])} | "
            f"{r['compile_seconds']:.2f} |"
        )
    return "\n".join(lines)


def _device_counts(text: str) -> list[int]:
    try:
        counts = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"--devices={text!r}: want positive integers, e.g. 2,4,8")
    return counts


def main(argv=None) -> int:
    parser = cli.ArgumentParser(prog="python -m mmjax.benchmarks.loss")
    parser.add_argument("--devices", type=_device_counts, default=[2, 4, 8])
    parser.add_argument("--per-device-batch", type=int, default=256)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.per_device_batch < 1 or args.dim < 1:
        parser.error("--per-device-batch and --dim must be positive")
    if args.worker:
        for result in _measure(args.per_device_batch, args.dim):
            print(json.dumps(result), flush=True)
        return 0
    results = []
    for devices in args.devices:
        rows = measure(devices, args.per_device_batch, args.dim)
        results.extend(rows)
        if args.json:
            for row in rows:
                print(json.dumps(row), flush=True)
    if not args.json:
        print(format_table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
