"""Training curves of a run as one PNG: losses, learning rate, retrieval and captioning.

    python -m mmjax.tools.plot --workdir DIR [--out DIR/curves.png]

Reads DIR/metrics.jsonl; the trainer's launcher calls it at the end of a run.
"""

from __future__ import annotations

import io
import math
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # Files only: no display needed.
import matplotlib.pyplot as plt  # noqa: E402

from mmjax import storage
from mmjax.runtime import cli
from mmjax.runtime.metric_writer import read_metrics  # noqa: E402

PANELS = (
    ("Training loss", ("loss", "contrastive_loss", "caption_loss"), "log"),
    ("Learning rate", ("learning_rate",), "linear"),
    (
        "Retrieval (held-out)",
        ("eval/i2t_r1", "eval/t2i_r1", "eval/i2t_r1_samecap", "eval/i2t_r5"),
        "linear",
    ),
    ("Captioning (held-out)", ("eval/caption_bleu4", "eval/caption_exact"), "linear"),
)


def series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    points = [
        (r["step"], r[key])
        for r in records
        if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])
    ]
    return [s for s, _ in points], [v for _, v in points]


def plot_run(workdir: str | Path, out: str | Path | None = None) -> Path:
    """Writes the curves of `workdir` to `out` (default WORKDIR/curves.png); returns the path."""
    workdir = storage.path(workdir)
    records = read_metrics(workdir)
    if not records:
        raise ValueError(f"{workdir}/metrics.jsonl holds no records yet")
    out = storage.path(out) if out else workdir / "curves.png"
    fig, axes = plt.subplots(1, len(PANELS), figsize=(5 * len(PANELS), 4), constrained_layout=True)
    for ax, (title, keys, scale) in zip(axes, PANELS):
        drawn = False
        for key in keys:
            steps, values = series(records, key)
            if steps:
                ax.plot(steps, values, marker="o" if len(steps) < 30 else None, label=key)
                drawn = True
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if drawn:
            ax.set_yscale(
                scale if all(v > 0 for line in ax.lines for v in line.get_ydata()) else "linear"
            )
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "no data yet", ha="center", va="center", transform=ax.transAxes)
    fig.suptitle(str(workdir))
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=100)
    plt.close(fig)
    storage.write_bytes(out, png.getvalue())
    return out


def main(argv=None) -> int:
    parser = cli.ArgumentParser(
        prog="python -m mmjax.tools.plot", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--out", default=None, help="PNG path (default: WORKDIR/curves.png)")
    args = parser.parse_args(argv)
    try:
        out = plot_run(args.workdir, args.out)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
