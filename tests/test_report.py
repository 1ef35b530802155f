"""mmjax.tools.report compares runs: PNG plots, a summary table of final values, clear errors."""

import json
import math
import struct

import pytest

from mmjax.tools.report import main, write_report


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
    """Header cells and {first cell: row cells} of the first Markdown table in `text`."""
    lines = [line for line in text.splitlines() if line.startswith("|")]
    block = []
    for line in lines:
        if block and line.startswith("|:") and len(block) > 1:
            break
        block.append(line)
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in block]
    header, body = rows[0], rows[2:]
    return header, {row[0]: row for row in body}


def _section(text, title):
    """The Markdown under `## title` (up to the next heading)."""
    return text.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]


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

    # The terminal gets the headline table, aligned: one line per run, no Markdown.
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].split() == ["run", "step", "loss", "i2t_r1", "caption_bleu4",
                                  "zeroshot/top1_accuracy"]  # fmt: skip
    assert printed[2].split() == ["base", "40", "0.1", "0.1", "0.1", "0.8"]
    assert printed[3].split() == ["wide", "40", "0.05", "0.2", "0.1"]  # No zero-shot: blank.
    assert len(printed) == 4 and len({len(line.rstrip()) for line in printed[:3]}) == 1

    summary = (out / "summary.md").read_text()
    header, rows = _table(_section(summary, "Headline metrics"))
    assert header == ["run", "final step", "final loss", "eval/i2t_r1", "eval/caption_bleu4",
                      "eval/zeroshot/top1_accuracy"]  # fmt: skip
    assert rows["base"][1:] == ["40", "0.1", "0.1", "0.1", "0.8"]
    assert rows["wide"][1:] == ["40", "0.05", "0.2", "0.1", ""]
    # Two runs, three metrics: the full table has one row per metric, one column per run.
    header, rows = _table(_section(summary, "All final values"))
    assert header == ["metric", "base", "wide"]
    assert rows["final step"][1:] == ["40", "40"]
    assert rows["eval/zeroshot/top1_accuracy"][1:] == ["0.8", ""]
    assert list(rows) == ["final step", "final loss", "eval/i2t_r1", "eval/caption_bleu4",
                          "eval/zeroshot/top1_accuracy"]  # fmt: skip


def test_many_runs_get_one_row_each(tmp_path):
    dirs = []
    for i in range(6):  # More runs than metrics (+ step and loss): the usual orientation.
        _write_run(tmp_path / f"r{i}", 1.0 + i, zeroshot=False)
        dirs.append(tmp_path / f"r{i}")
    summary = (write_report(dirs, tmp_path / "out") / "summary.md").read_text()
    header, rows = _table(_section(summary, "All final values"))
    assert header == ["run", "final step", "final loss", "eval/i2t_r1", "eval/caption_bleu4"]
    assert sorted(rows) == [f"r{i}" for i in range(6)]


def test_metrics_logged_once_are_a_table_not_single_dots(tmp_path):
    from mmjax.runtime.metric_writer import read_metrics
    from mmjax.tools.report import eval_keys, eval_layout

    once = tmp_path / "once"
    once.mkdir()
    records = [{"step": s, "loss": 1.0 / s, "learning_rate": 1e-3} for s in range(1, 11)]
    records.append({"step": 10, **{f"eval/m{i}": i / 10 for i in range(30)}})
    (once / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    _write_run(tmp_path / "twice", 2.0, zeroshot=False)
    runs = [("once", read_metrics(once)), ("twice", read_metrics(tmp_path / "twice"))]
    curves, table = eval_layout(runs, eval_keys(runs))
    assert curves == ["eval/i2t_r1", "eval/caption_bleu4"]  # Two points in "twice".
    assert table == [f"eval/m{i}" for i in range(30)]
    out = write_report([once], tmp_path / "out")
    width, height = _png_size(out / "eval.png")  # One table, not 30 panels of one dot each.
    assert width < 700 and height > 600


def test_write_report_with_names_and_a_diverged_loss(tmp_path):
    _write_run(tmp_path / "a" / "run", 4.0, zeroshot=False, last_loss=math.nan)
    _write_run(tmp_path / "b" / "run", 8.0, zeroshot=False)
    out = write_report([tmp_path / "a" / "run", tmp_path / "b" / "run"], tmp_path / "r", ["x", "y"])
    assert out == tmp_path / "r"
    _, rows = _table(_section((out / "summary.md").read_text(), "Headline metrics"))
    # The last loss is NaN: shown, not hidden behind the last finite value.
    assert rows["x"][1:3] == ["41", "nan"]
    assert rows["y"][1:4] == ["40", "0.2", "0.05"]
    # Same directory names without --names: the paths tell the runs apart.
    out = write_report([tmp_path / "a" / "run", tmp_path / "b" / "run"], tmp_path / "r2")
    _, rows = _table(_section((out / "summary.md").read_text(), "Headline metrics"))
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
