"""End to end on files: a generated JPEG corpus as CSV, webdataset and ArrayRecord.

Goes through the command lines a user runs (tokenizer, convert, train,
evaluate) in subprocesses, on a corpus the test writes itself with a few bad
samples mixed in.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mmjax.data.image_corpus import write_image_corpus, write_wds_shards
from mmjax.data.records import REASONS
from mmjax.runtime.metric_writer import read_metrics
from tests.runs import xla_flags

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

COMMON = [
    "--config.log_every=1",
    "--config.checkpoint_every=100",
    "--config.eval_every=1000",
    "--config.eval.batch_size=32",
    "--config.eval.caption_examples=8",
    "--config.data.tokenizer_vocab_size=96",
]
# Bad rows appended to the training CSV (5 of 165 rows: under the 5% threshold).
BAD_ROWS = ["empty_file", "missing_file", "unknown_format", "caption_not_utf8", "empty_caption"]


def _run(args, cache_dir, module="mmjax.train"):
    env = dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        XLA_FLAGS=xla_flags(1),
        JAX_COMPILATION_CACHE_DIR=str(cache_dir),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
    )
    return subprocess.run(
        [sys.executable, "-m", module, *map(str, args)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def _ok(proc):
    assert proc.returncode == 0, f"{proc.args}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    train_csv = write_image_corpus(root, num_examples=160, image_size=40, split="train")
    eval_csv = write_image_corpus(root, num_examples=48, image_size=40, split="eval")
    bad = root / "images" / "bad"
    bad.mkdir()
    (bad / "empty.jpg").write_bytes(b"")
    (bad / "text.jpg").write_text("not an image")
    good = "images/train/000000.jpg"
    rows = [
        b"images/bad/empty.jpg,a small red circle",
        b"images/bad/nowhere.jpg,a small red circle",
        b"images/bad/text.jpg,a small red circle",
        good.encode() + b",caf\xe9 circle",
        good.encode() + b",   ",
    ]
    with open(train_csv, "ab") as f:
        f.write(b"\n".join(rows) + b"\n")
    return root, train_csv, eval_csv


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("jax_cache")


def _config(steps=10):
    return ["--config", f"configs/coca.py:size=tiny,batch=16,steps={steps}"]


def test_csv_corpus_tokenizer_cli_train_and_evaluate(corpus, cache_dir, tmp_path):
    root, train_csv, eval_csv = corpus
    tok = tmp_path / "tok.model"
    proc = _ok(
        _run(
            ["train", f"csv:{train_csv}", "--vocab-size", "96", "--out", tok],
            cache_dir,
            module="mmjax.tools.tokenizer",
        )
    )
    assert tok.is_file() and "from 163 captions" in proc.stdout  # 2 bad captions left out.

    workdir = tmp_path / "run"
    args = [
        *_config(),
        "--workdir",
        workdir,
        *COMMON,
        f"--config.data.train=csv:{train_csv}",
        f"--config.data.eval=csv:{eval_csv}",
        f"--config.data.tokenizer={tok}",
    ]
    proc = _ok(_run(args, cache_dir))
    last = [r for r in read_metrics(workdir) if "loss" in r][-1]
    skipped = {reason: last[f"data/skipped_{reason}"] for reason in REASONS}
    assert sum(skipped.values()) == last["data/skipped"] > 0
    assert set(reason for reason, n in skipped.items() if n) <= set(BAD_ROWS)
    assert last["data/used"] == 10 * 16
    assert "data: csv:" in proc.stdout  # The end-of-run summary.
    eval_line = [r for r in read_metrics(workdir) if "eval/i2t_r1" in r][-1]
    assert eval_line["eval/num_examples"] == 48 and eval_line["eval/skipped"] == 0

    _ok(_run(["--workdir", workdir], cache_dir, module="mmjax.evaluate"))
    result = json.loads((workdir / "eval.json").read_text())
    for key in ("eval/i2t_r1", "eval/t2i_r10", "eval/caption_bleu4", "eval/caption_exact"):
        assert 0.0 <= result[key] <= 1.0, key
    assert result["eval/num_examples"] == 48


def test_wds_and_arrayrecord_mixture_trains_with_its_own_tokenizer(corpus, cache_dir, tmp_path):
    root, train_csv, eval_csv = corpus
    wds = write_wds_shards(train_csv, root / "wds", shard_size=64)
    out = tmp_path / "eval_ar"
    proc = _ok(
        _run([f"csv:{eval_csv}", out, "--shards", "2"], cache_dir, module="mmjax.tools.data")
    )
    assert f"arrayrecord:{out}" in proc.stdout
    workdir = tmp_path / "run"
    mixture = f"[('wds:{wds}', 3.0), ('arrayrecord:{out}/*.array_record', 1.0)]"
    args = [
        *_config(steps=8),
        "--workdir",
        workdir,
        *COMMON,
        f"--config.data.train={mixture}",
        f"--config.data.eval=arrayrecord:{out}/*.array_record",
    ]
    _ok(_run(args, cache_dir))
    assert (workdir / "tokenizer.model").is_file()  # Trained from the mixture's captions.
    assert json.loads((workdir / "config.json").read_text())["data"]["train"] == mixture
    last = [r for r in read_metrics(workdir) if "loss" in r][-1]
    assert last["data/used"] == 8 * 16
    eval_line = [r for r in read_metrics(workdir) if "eval/i2t_r1" in r][-1]
    assert eval_line["eval/num_examples"] == 48
    # The index of the shards was cached beside them, not extracted.
    assert sorted(p.suffix for p in (root / "wds").iterdir()) == [".json"] * 3 + [".tar"] * 3


def _bad_fraction_args(corpus, workdir, *extra):
    root, train_csv, eval_csv = corpus
    return [
        *_config(),
        "--workdir",
        workdir,
        *COMMON,
        "--config.log_every=1000",  # No log step before the end: the stop is checked per step.
        f"--config.data.train=csv:{train_csv}",
        f"--config.data.eval=csv:{eval_csv}",
        "--config.data.max_skip_fraction=0.001",
        *extra,
    ]


def test_too_many_bad_samples_stop_the_run_at_that_step(corpus, cache_dir, tmp_path):
    workdir = tmp_path / "run"
    args = _bad_fraction_args(
        corpus, workdir, "--config.data.min_samples_for_skip_check=16", "--config.data.workers=1"
    )
    proc = _run(args, cache_dir)
    assert proc.returncode == 4, proc.stderr[-3000:]
    error = proc.stderr.strip().splitlines()[-1]  # Last: no grain worker warning after it.
    assert error.startswith(f"error: source csv:{corpus[1]}:"), error
    assert "commonest reason:" in error and "data.max_skip_fraction=0.001" in error
    (line,) = [r for r in read_metrics(workdir) if "loss" in r]  # The steps it trained.
    assert 1 <= line["step"] < 10 and line["data/skipped"] >= 1
    assert line["data/used"] + line["data/skipped"] >= 16 * line["step"]


def test_bad_samples_below_the_judging_count_are_a_loud_warning(corpus, cache_dir, tmp_path):
    workdir = tmp_path / "run"
    args = _bad_fraction_args(corpus, workdir, "--config.data.min_samples_for_skip_check=100000")
    proc = _ok(_run(args, cache_dir))
    warnings = [line for line in proc.stdout.splitlines() if "WARNING: source csv:" in line]
    assert warnings and "> data.max_skip_fraction=0.001" in warnings[0]
    assert "fewer than data.min_samples_for_skip_check=100000 were read" in warnings[0]
    assert "WARNING: source" in proc.stdout.strip().splitlines()[-1]  # Repeated at the end.
    (line,) = [r for r in read_metrics(workdir) if "loss" in r]
    assert line["data/over_skip_fraction"] == line["data/skipped"] / (
        line["data/skipped"] + line["data/used"]
    )


def test_a_source_without_usable_samples_stops_before_compiling(corpus, cache_dir, tmp_path):
    root, train_csv, eval_csv = corpus
    broken = tmp_path / "broken.csv"
    broken.write_text("filepath,caption\n" + "".join(f"gone/{i}.jpg,a cat\n" for i in range(80)))
    mixture = f"[('csv:{train_csv}', 0.9), ('csv:{broken}', 0.1)]"
    args = [*_config(), "--workdir", tmp_path / "run", *COMMON, f"--config.data.train={mixture}",
            f"--config.data.eval=csv:{eval_csv}"]  # fmt: skip
    proc = _run(args, cache_dir)
    assert proc.returncode == 4, proc.stderr[-3000:]
    assert proc.stderr.count("\n") == 1 and "compiled" not in proc.stdout
    assert proc.stderr == (
        f"error: data.train: source csv:{broken} has no usable sample: the 64 read, spread over "
        "its 80, were all bad (commonest reason: missing_file, 64)\n"
    )
    # A shard whose member names no sample can be made of: one line, exit 2.
    import io
    import tarfile

    shard = tmp_path / "dots.tar"
    with tarfile.open(shard, "w") as tar:
        for name in ("a.v1.jpg", "a.v1.txt"):
            info = tarfile.TarInfo(name)
            info.size = 1
            tar.addfile(info, io.BytesIO(b"x"))
    args[args.index(f"--config.data.train={mixture}")] = f"--config.data.train=wds:{shard}"
    proc = _run(args, cache_dir)
    assert proc.returncode == 2, proc.stderr[-3000:]
    error = proc.stderr.strip().splitlines()[-1]
    assert error.startswith(f"error: data.train: wds:{shard}: no samples in 1 shard(s): 2 members")
    assert "'a.v1.jpg' has extension 'v1.jpg'" in error
