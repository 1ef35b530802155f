"""mmjax.report compares runs: PNG plots, a summary table of final values, clear errors."""

import json
import math
import struct

import pytest

from mmjax.report import main, write_report


def _write_run(run_dir, loss_scale, zeroshot, last_loss=None):
    run_dir.mkdir(parents=True)
    lines = []
    for step in range(1, 41):
        loss = loss_scale / step
        lines.append(
            {
                "step": step,
                "loss": loss,
                "contrastive_loss": loss / 2,
                "caption_loss": loss / 2,
                "learning_rate": 1e-3 * min(1.0, step / 10),
            }
        )
        if step % 20 == 0:
            record = {
                "step": step,
                "eval/i2t_r1": step / (100 * loss_scale),
                "eval/caption_bleu4": step / 400,
                "eval/seconds": 12.5,
                "eval/num_examples": 256.0,
                "eval/skipped": 0.0,
            }
            if zeroshot:
                record |= {"eval/zeroshot/top1_accuracy": step / 50, "eval/zeroshot/seconds": 3.0}
            lines.append(record)
    if last_loss is not None:
        lines.append({"step": 41, "loss": last_loss})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))


def _png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG file"
    assert len(data) > 10_000, f"{path} is nearly empty"
    return struct.unpack(">II", data[16:24])


def _table(text):
    """Header cells and {run name: row cells} of a Markdown table."""
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in text.splitlines()]
    header, body = rows[0], rows[2:]
    return header, {row[0]: row for row in body}


def test_report_of_two_runs(tmp_path, capsys):
    _write_run(tmp_path / "base", 4.0, zeroshot=True)
    _write_run(tmp_path / "wide", 2.0, zeroshot=False)
    out = tmp_path / "out"
    assert main([str(tmp_path / "base"), str(tmp_path / "wide"), "--out", str(out)]) == 0

    # One panel per loss key and per eval metric (bookkeeping keys skipped): 3 loss panels side by
    # side, one learning-rate panel, three eval panels.
    loss_w, loss_h = _png_size(out / "loss.png")
    lr_w, lr_h = _png_size(out / "learning_rate.png")
    eval_w, _ = _png_size(out / "eval.png")
    assert loss_w > 2.5 * loss_h and lr_w < 1.5 * lr_h and eval_w == loss_w

    summary = (out / "summary.md").read_text()
    assert capsys.readouterr().out == summary  # The table also goes to stdout.
    header, rows = _table(summary)
    assert header == [
        "run", "final step", "final loss",
        "eval/i2t_r1", "eval/caption_bleu4", "eval/zeroshot/top1_accuracy",
    ]  # fmt: skip
    assert set(rows) == {"base", "wide"} and len(summary.splitlines()) == 4
    base, wide = rows["base"], rows["wide"]
    assert base[1:] == ["40", "0.1", "0.1", "0.1", "0.8"]
    assert wide[1:] == ["40", "0.05", "0.2", "0.1", ""]  # No zero-shot eval in this run: blank.


def test_write_report_with_names_and_a_diverged_loss(tmp_path):
    _write_run(tmp_path / "a" / "run", 4.0, zeroshot=False, last_loss=math.nan)
    _write_run(tmp_path / "b" / "run", 8.0, zeroshot=False)
    out = write_report([tmp_path / "a" / "run", tmp_path / "b" / "run"], tmp_path / "r", ["x", "y"])
    assert out == tmp_path / "r"
    _, rows = _table((out / "summary.md").read_text())
    # The last loss is NaN: shown, not hidden behind the last finite value.
    assert rows["x"][1:3] == ["41", "nan"]
    assert rows["y"][1:4] == ["40", "0.2", "0.05"]
    # Same directory names without --names: the paths tell the runs apart.
    out = write_report([tmp_path / "a" / "run", tmp_path / "b" / "run"], tmp_path / "r2")
    _, rows = _table((out / "summary.md").read_text())
    assert set(rows) == {str(tmp_path / "a" / "run"), str(tmp_path / "b" / "run")}


def test_missing_metrics_is_a_clear_error(tmp_path, capsys):
    _write_run(tmp_path / "good", 1.0, zeroshot=False)
    (tmp_path / "empty_run").mkdir()
    assert main([str(tmp_path / "good"), str(tmp_path / "empty_run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(tmp_path / "empty_run") in err
    assert len(err.strip().splitlines()) == 1
    assert main([str(tmp_path / "good"), "--names", "a,b", "--out", str(tmp_path / "o")]) == 2
    assert "2 names for 1 run directories" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="empty_run"):
        write_report([tmp_path / "empty_run"], tmp_path / "o")
