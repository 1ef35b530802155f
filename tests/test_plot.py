"""mmjax.tools.plot draws a run's curves into a real PNG and fails clearly without metrics."""

import struct

from mmjax.runtime.metric_writer import MetricWriter
from mmjax.tools.plot import main, plot_run, series


def _png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG file"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def test_plot_writes_png_with_all_panels(tmp_path):
    with MetricWriter(tmp_path) as writer:
        for step in range(1, 41):
            writer.write(
                step,
                {
                    "loss": 10 / step,
                    "contrastive_loss": 4 / step,
                    "caption_loss": 3 / step,
                    "learning_rate": 1e-3,
                },
            )
            if step % 10 == 0:
                writer.write(step, {"eval/i2t_r1": step / 50, "eval/caption_exact": step / 60})
    out = plot_run(tmp_path)
    assert out == tmp_path / "curves.png"
    width, height = _png_size(out)
    assert width > 4 * height  # Four panels side by side.
    # Eval values are read from the eval lines only, in step order.
    steps, values = series(
        [
            {"step": 1, "loss": 1.0},
            {"step": 10, "eval/i2t_r1": 0.2},
            {"step": 20, "eval/i2t_r1": 0.4},
        ],
        "eval/i2t_r1",
    )
    assert steps == [10, 20] and values == [0.2, 0.4]


def test_plot_without_metrics_is_a_one_line_error(tmp_path, capsys):
    assert main(["--workdir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "metrics.jsonl" in err[0]
