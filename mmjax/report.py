"""Side-by-side report of several runs: loss, learning-rate and eval plots plus a summary table.

    python -m mmjax.report DIR [DIR...] [--out OUTDIR] [--names a,b]

Reads each DIR/metrics.jsonl and writes to OUTDIR (default ./report): `loss.png` (one panel per
training loss, one line per run), `learning_rate.png`, `eval.png` (one panel per `eval/...`
metric, runs overlaid) and `summary.md` (one row per run: final step, final training loss and
the final value of every eval metric, blank where a run has none), which is also printed.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # Files only: no display needed.
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402

from mmjax.metric_writer import METRICS_FILE, read_metrics  # noqa: E402
from mmjax.plot import series  # noqa: E402

LOSS_KEYS = ("loss", "contrastive_loss", "caption_loss")
# Bookkeeping an evaluator logs next to its metrics (also under eval/<name>/): not plotted.
_NOT_EVAL_METRICS = frozenset({"seconds", "num_examples", "skipped"})
_EVAL_COLUMNS = 4

Run = tuple[str, list[dict]]


def eval_keys(runs: Sequence[Run]) -> list[str]:
    """The eval metric keys any run logged, in the order they first appear."""
    keys: dict[str, None] = {}
    for _, records in runs:
        for record in records:
            for key in record:
                if key.startswith("eval/") and key.rsplit("/", 1)[1] not in _NOT_EVAL_METRICS:
                    keys.setdefault(key)
    return list(keys)


def write_report(
    run_dirs: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    names: Sequence[str] | None = None,
) -> Path:
    """Writes the plots and summary.md of `run_dirs` into `out_dir`; returns `out_dir`.

    Run names default to the directory names (the paths as given when two names collide).
    """
    run_dirs = [Path(d) for d in run_dirs]
    if not run_dirs:
        raise ValueError("no run directories given")
    if names is None:
        names = [d.resolve().name for d in run_dirs]
        if len(set(names)) < len(names):
            names = [str(d) for d in run_dirs]
    elif len(names) != len(run_dirs):
        raise ValueError(f"{len(names)} names for {len(run_dirs)} run directories")
    runs = []
    for name, run_dir in zip(names, run_dirs):
        records = read_metrics(run_dir)
        if not records:
            raise ValueError(f"{run_dir / METRICS_FILE} holds no records")
        runs.append((str(name), records))

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    keys = eval_keys(runs)
    losses = [k for k in LOSS_KEYS if any(series(records, k)[0] for _, records in runs)]
    _plot_panels(runs, losses or ["loss"], "Training loss", "log", out_dir / "loss.png")
    _plot_panels(runs, ["learning_rate"], "Learning rate", "linear", out_dir / "learning_rate.png")
    _plot_panels(runs, keys, "Evaluation", "linear", out_dir / "eval.png")
    (out_dir / "summary.md").write_text(summary_table(runs, keys))
    return out_dir


def _plot_panels(
    runs: Sequence[Run], keys: Sequence[str], title: str, scale: str, path: Path
) -> None:
    """One panel per key (a grid of at most 4 columns), one line per run in a fixed colour."""
    columns = max(1, min(_EVAL_COLUMNS, len(keys)))
    rows = max(1, math.ceil(len(keys) / columns))
    fig, axes = plt.subplots(
        rows,
        columns,
        figsize=(4.5 * columns, 3.5 * rows + 0.8),
        squeeze=False,
        layout="constrained",
    )
    for ax in axes.flat[len(keys) :]:
        ax.set_axis_off()
    if not keys:
        axes[0, 0].set_axis_on()
        axes[0, 0].text(0.5, 0.5, "no metrics logged", ha="center", va="center")
    for ax, key in zip(axes.flat, keys):
        values_drawn = []
        for index, (_, records) in enumerate(runs):
            steps, values = series(records, key)
            if steps:
                ax.plot(
                    steps, values, color=f"C{index % 10}", marker="o" if len(steps) < 30 else None
                )
                values_drawn += values
        ax.set_title(key, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if not values_drawn:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
        elif scale == "log" and min(values_drawn) > 0:
            ax.set_yscale("log")
    handles = [Line2D([], [], color=f"C{i % 10}") for i in range(len(runs))]
    names = [name for name, _ in runs]
    fig.legend(handles, names, loc="outside lower center", ncol=min(len(runs), 6))
    fig.suptitle(title)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _final(records: list[dict], key: str) -> float | None:
    """The value in the last record holding `key` (NaN and infinities included: a diverged
    loss should show as such), or None."""
    for record in reversed(records):
        value = record.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    return None


def _cell(value: float | None) -> str:
    return "" if value is None else f"{value:.4g}"


def summary_table(runs: Sequence[Run], keys: Sequence[str]) -> str:
    """Markdown table, one row per run: final step, final training loss, final eval values."""
    header = ["run", "final step", "final loss", *keys]
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join([":---"] + ["---:"] * (len(header) - 1)) + "|",
    ]
    for name, records in runs:
        step = max(r["step"] for r in records if isinstance(r.get("step"), int))
        row = [name.replace("|", "\\|"), str(step), _cell(_final(records, "loss"))]
        row += [_cell(_final(records, key)) for key in keys]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mmjax.report", description=__doc__.split("\n")[0]
    )
    parser.add_argument("dirs", nargs="+", metavar="DIR", help="run directories (metrics.jsonl)")
    parser.add_argument("--out", default="report", help="output directory (default: ./report)")
    parser.add_argument("--names", default=None, help="comma-separated run names, one per DIR")
    args = parser.parse_args(argv)
    names = args.names.split(",") if args.names is not None else None
    try:
        out = write_report(args.dirs, args.out, names)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    sys.stdout.write((out / "summary.md").read_text())
    print(f"wrote {out}/{{loss,learning_rate,eval}}.png and summary.md", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
