"""`mmjax bench data`: mmjax's pipeline against a plain loop and against open_clip's own
webdataset pipeline, on a corpus it writes, from a relative folder."""

import json

import pytest

from tests.runs import mmjax_cli


def _bench(cwd, *args):
    return mmjax_cli(cwd, "bench", "data", *args)


@pytest.mark.slow
def test_bench_data_against_open_clip_times_both_pipelines_on_the_same_shards(tmp_path):
    pytest.importorskip("webdataset")
    proc = _bench(tmp_path, "--make-corpus", "corpus", "--corpus-examples", "256",
                  "--examples", "128", "--batch-size", "32", "--workers", "1",
                  "--against", "open_clip", "--rounds", "1")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [json.loads(line) for line in proc.stdout.strip().splitlines()]
    assert len(lines) == 1  # --against keeps the webdataset form only.
    result = lines[0]
    assert result["spec"].startswith("wds:corpus/wds/")
    mine, theirs = (
        result["workers1_examples_per_sec"],
        result["open_clip_workers1_examples_per_sec"],
    )
    assert mine > 0 and theirs > 0
    assert result["workers1_vs_open_clip"] == pytest.approx(mine / theirs, abs=1e-3)  # Rounded.
    assert (tmp_path / "corpus" / "train.csv").is_file()


def test_against_open_clip_refuses_a_source_that_is_not_webdataset(tmp_path):
    proc = _bench(tmp_path, "csv:train.csv", "--against", "open_clip")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: --against open_clip reads webdataset shards only; csv:train.csv is not wds:"
    ]
