"""Side-by-side report of several runs: loss, learning-rate and eval plots plus a summary table.

    python -m mmjax.tools.report DIR [DIR...] [--out OUTDIR] [--names a,b]

Reads each DIR/metrics.jsonl and writes to OUTDIR (default ./report): `loss.png` (one panel per
training loss, one line per run), `learning_rate.png`, `eval.png` (one panel per `eval/...`
metric logged at two steps or more, runs overlaid; metrics logged once are drawn as a table of
values instead of panels of one dot) and `summary.md`: the headline metrics (final loss,
retrieval R@1/R@5 both ways, caption BLEU-4 and CIDEr, zero-shot accuracy) per run, then every
final eval value, one row per run, or one row per metric when there are fewer runs than
metrics. The headline table is printed, aligned for a terminal.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # Files only: no display needed.
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402

from mmjax.runtime import cli
from mmjax.runtime.metric_writer import METRICS_FILE, read_metrics  # noqa: E402
from mmjax.tools.plot import series  # noqa: E402

LOSS_KEYS = ("loss", "contrastive_loss", "caption_loss")
# The headline columns, in order: exact keys, then one column per group of suffixes, for the
# first eval key logged that ends with one of them (a named evaluator's CIDEr, accuracy).
HEADLINE_KEYS = ("eval/i2t_r1", "eval/i2t_r5", "eval/t2i_r1", "eval/t2i_r5", "eval/caption_bleu4")
HEADLINE_SUFFIXES = (("/cider",), ("/accuracy", "/top1_accuracy"))
# Bookkeeping an evaluator logs next to its metrics (also under eval/<name>/): not plotted.
_NOT_EVAL_METRICS = frozenset({"seconds", "num_examples", "skipped"})
_EVAL_COLUMNS = 4

Run = tuple[str, list[dict]]


def _names(run_dirs: Sequence[str | os.PathLike], names: Sequence[str] | None) -> list[str]:
    """Run names: as given, else the directory names (the paths when two collide)."""
    if names is None:
        names = [Path(d).resolve().name for d in run_dirs]
        if len(set(names)) < len(names):
            names = [str(d) for d in run_dirs]
    elif len(names) != len(run_dirs):
        raise ValueError(f"{len(names)} names for {len(run_dirs)} run directories")
    return list(names)


def eval_keys(runs: Sequence[Run]) -> list[str]:
    """The eval metric keys any run logged, in the order they first appear."""
    keys: dict[str, None] = {}
    for _, records in runs:
        for record in records:
            for key in record:
                if key.startswith("eval/") and key.rsplit("/", 1)[1] not in _NOT_EVAL_METRICS:
                    keys.setdefault(key)
    return list(keys)


def eval_layout(runs: Sequence[Run], keys: Sequence[str]) -> tuple[list[str], list[str]]:
    """(keys drawn as curves: logged at two steps or more by some run, keys shown in the table
    of values: logged once at most by every run)."""
    curves = [k for k in keys if any(len(series(records, k)[0]) > 1 for _, records in runs)]
    return curves, [k for k in keys if k not in curves]


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
    names = _names(run_dirs, names)
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
    curves, singles = eval_layout(runs, keys)
    _plot_panels(runs, curves, "Evaluation", "linear", out_dir / "eval.png", table_keys=singles)
    (out_dir / "summary.md").write_text(summary_markdown(runs, keys))
    return out_dir


def _plot_panels(
    runs: Sequence[Run],
    keys: Sequence[str],
    title: str,
    scale: str,
    path: Path,
    table_keys: Sequence[str] = (),
) -> None:
    """One panel per key (a grid of at most 4 columns), one line per run in a fixed colour;
    `table_keys` (metrics logged once) are drawn below as a table of final values."""
    columns = max(1, min(_EVAL_COLUMNS, len(keys)))
    rows = math.ceil(len(keys) / columns)
    table_rows = len(table_keys) + 1
    table_height = 0.25 * table_rows + 0.4 if table_keys else 0.0
    heights = [3.5] * rows + ([table_height] if table_keys else [])
    if not heights:
        heights = [3.5]
    fig = plt.figure(
        figsize=(max(4.5 * columns, 3 + 1.6 * len(runs)), sum(heights) + 0.8),
        layout="constrained",
    )
    grid = fig.add_gridspec(len(heights), columns, height_ratios=heights)
    axes = [fig.add_subplot(grid[i // columns, i % columns]) for i in range(len(keys))]
    if table_keys:
        _draw_table(fig.add_subplot(grid[-1, :]), runs, table_keys)
    elif not keys:
        ax = fig.add_subplot(grid[0, 0])
        ax.set_axis_off()
        ax.text(0.5, 0.5, "no metrics logged", ha="center", va="center")
    for ax, key in zip(axes, keys):
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


def _draw_table(ax, runs: Sequence[Run], keys: Sequence[str]) -> None:
    """A table of the final value of each key (rows) per run (columns), on `ax`."""
    ax.set_axis_off()
    cells = [[_cell(_final(records, key)) for _, records in runs] for key in keys]
    table = ax.table(
        cellText=cells,
        rowLabels=list(keys),
        colLabels=[name for name, _ in runs],
        colColours=[f"C{i % 10}" for i in range(len(runs))],
        cellLoc="right",
        bbox=[0.3, 0.0, 0.7, 1.0],  # Row labels take the 30% on the left.
    )
    table.auto_set_font_size(False)
    table.set_fontsize(9)
    for (row, _), cell in table.get_celld().items():
        if row == 0:
            cell.get_text().set_color("white")
    ax.set_title("logged once (final values)", fontsize=10)


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


def headline_keys(runs: Sequence[Run], keys: Sequence[str]) -> list[str]:
    """The headline eval keys the runs logged: HEADLINE_KEYS, then for each group of suffixes
    the first eval key that ends with one of them."""
    out = [k for k in HEADLINE_KEYS if k in keys]
    for suffixes in HEADLINE_SUFFIXES:
        match = next((k for k in keys if k.endswith(suffixes)), None)
        if match is not None:
            out.append(match)
    return out


def _rows(runs: Sequence[Run], keys: Sequence[str]) -> list[list[str]]:
    """Per run: name, final step, final loss and the final value of each key."""
    out = []
    for name, records in runs:
        step = max(r["step"] for r in records if isinstance(r.get("step"), int))
        row = [name, str(step), _cell(_final(records, "loss"))]
        out.append(row + [_cell(_final(records, key)) for key in keys])
    return out


def _short(key: str) -> str:
    return key.removeprefix("eval/")


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    escape = lambda cell: str(cell).replace("|", "\\|")
    lines = [
        "| " + " | ".join(map(escape, header)) + " |",
        "|" + "|".join([":---"] + ["---:"] * (len(header) - 1)) + "|",
    ]
    lines += ["| " + " | ".join(map(escape, row)) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def text_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Aligned columns for a terminal: the first left-aligned, the rest right-aligned."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    fmt = lambda row: "  ".join(
        str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(row, widths))
    )
    return "\n".join([fmt(header), "  ".join("-" * w for w in widths), *map(fmt, rows)]) + "\n"


def headline_table(runs: Sequence[Run], keys: Sequence[str]) -> str:
    """The terminal table: run, final step, final loss, headline metrics."""
    heads = headline_keys(runs, keys)
    return text_table(["run", "step", "loss", *map(_short, heads)], _rows(runs, heads))


def summary_markdown(runs: Sequence[Run], keys: Sequence[str]) -> str:
    """summary.md: the headline table, then every final eval value (one row per run, or one
    row per metric when there are fewer runs than metrics)."""
    heads = headline_keys(runs, keys)
    parts = [
        "## Headline metrics\n",
        markdown_table(["run", "final step", "final loss", *heads], _rows(runs, heads)),
        "\n## All final values\n",
    ]
    rows = _rows(runs, keys)
    if len(runs) >= len(keys) + 2:
        parts.append(markdown_table(["run", "final step", "final loss", *keys], rows))
    else:  # Transposed: metrics down the side, one column per run.
        names = [row[0] for row in rows]
        labels = ["final step", "final loss", *keys]
        body = [[label] + [row[1 + i] for row in rows] for i, label in enumerate(labels)]
        parts.append(markdown_table(["metric", *names], body))
    return "".join(parts)


def main(argv=None) -> int:
    parser = cli.ArgumentParser(
        prog="python -m mmjax.tools.report", description=__doc__.split("\n")[0]
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
    runs = [(name, read_metrics(d)) for name, d in zip(_names(args.dirs, names), args.dirs)]
    sys.stdout.write(headline_table(runs, eval_keys(runs)))
    print(f"wrote {out}/{{loss,learning_rate,eval}}.png and summary.md", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
