"""Invalid configs fail fast through the real CLI: exit code 2, one `error:` line
naming the key and what is allowed, and nothing compiled or written.

Cases that need no forced devices call `mmjax.train.main` in this process (it is
the CLI's entry point; the same argv) with the compile and state-creation steps
booby-trapped; the ones that need 8 devices run `python -m mmjax.train` in a
subprocess with XLA_FLAGS set.
"""

import os
import subprocess
import sys
import time
from pathlib import Path

import jax
import pytest

from mmjax import train
from mmjax.training.setup import Run
from mmjax.training.trainer import Trainer
from tests.runs import xla_flags

REPO = Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "configs" / "coca.py")
FAST_SECONDS = 40.0  # Generous (loaded CI): failing runs take seconds; compiles are trapped.


@pytest.fixture
def no_compile(monkeypatch):
    """Any attempt to build a train state or compile a step fails the test."""

    def forbidden(*args, **kwargs):
        raise AssertionError("a config error must be reported before any state or compilation")

    monkeypatch.setattr(Trainer, "compile_step", forbidden)
    monkeypatch.setattr(Run, "create_state", forbidden)
    monkeypatch.setattr(Run, "compile_step", forbidden)


def _single_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if "error:" in line]
    assert len(lines) == 1, f"want exactly one error: line on stderr, got:\n{stderr}"
    assert lines[0].startswith("error: "), lines[0]
    return lines[0]


def _check_in_process(capsys, tmp_path, argv_tail, *fragments, config=CONFIG + ":size=tiny"):
    workdir = tmp_path / "run"
    start = time.perf_counter()
    code = train.main(["--config", config, "--workdir", str(workdir), *argv_tail])
    elapsed = time.perf_counter() - start
    out, err = capsys.readouterr()
    assert code == 2, f"exit code {code}; stderr:\n{err}"
    line = _single_error_line(err)
    for fragment in fragments:
        assert fragment in line, f"{fragment!r} not in {line!r}"
    assert elapsed < FAST_SECONDS, f"took {elapsed:.1f}s: not failing fast"
    assert not (workdir / "checkpoints").exists()
    assert not (workdir / "metrics.jsonl").exists()
    assert "compiled in" not in out
    return line


def test_mesh_product_differs_from_device_count(capsys, tmp_path, no_compile):
    n = jax.device_count()  # 1 under a plain pytest; robust to a forced count.
    _check_in_process(
        capsys,
        tmp_path,
        [f"--config.mesh.data={n + 2}"],
        f"mesh.data={n + 2}",
        "mesh.fsdp=1",
        "mesh.tensor=1",
        f"multiply to {n + 2}",
        f"there are {n} devices",
        "-1",
    )


def test_unknown_model_key(capsys, tmp_path, no_compile):
    line = _check_in_process(
        capsys, tmp_path, ["--config.model.foo=1"], "'model.foo'", "under 'model'"
    )
    for allowed in ("vision", "text", "decoder", "vocab_size"):
        assert f"'{allowed}'" in line


def test_unknown_key_in_a_model_group(capsys, tmp_path, no_compile):
    line = _check_in_process(
        capsys, tmp_path, ["--config.model.vision.widht=1"], "'model.vision.widht'", "under"
    )
    for allowed in ("width", "heads", "patch_size"):
        assert f"'{allowed}'" in line


@pytest.mark.parametrize(
    "old, new",
    [("vit_width", "vision.width"), ("fusion", "decoder.fusion"), ("video_frames", "video.frames")],
)
def test_flat_model_key_names_its_new_name(old, new, capsys, tmp_path, no_compile):
    """Keys from before the per-tower grouping fail in one line naming the grouped key."""
    _check_in_process(
        capsys, tmp_path, [f"--config.model.{old}=1"], f"'model.{old}' was renamed 'model.{new}'"
    )


def test_unknown_top_level_key(capsys, tmp_path, no_compile):
    line = _check_in_process(capsys, tmp_path, ["--config.fooo=1"], "'fooo'", "at the top level")
    for allowed in ("batch_size", "total_steps", "model", "optimizer"):
        assert f"'{allowed}'" in line


def test_unknown_contrastive_loss(capsys, tmp_path, no_compile):
    _check_in_process(
        capsys,
        tmp_path,
        ["--config.loss.contrastive=hinge"],
        "loss.contrastive='hinge'",
        "'softmax'",
        "'sigmoid'",
    )


def test_unknown_data_source(capsys, tmp_path, no_compile):
    _check_in_process(
        capsys, tmp_path, ["--config.data.train=laion:/x"], "data.train", "'laion'", "'csv'"
    )


def test_unknown_model_size(capsys, tmp_path, no_compile):
    _check_in_process(
        capsys,
        tmp_path,
        [],
        "size='huge'",
        "'tiny'",
        "'base'",
        "'large'",
        config=CONFIG + ":size=huge",
    )


def test_malformed_value(capsys, tmp_path, no_compile):
    _check_in_process(
        capsys, tmp_path, ["--config.batch_size=abc"], "config.batch_size='abc'", "not a valid int"
    )


def _run_cli(tmp_path, *overrides, devices=8):
    workdir = tmp_path / "run"
    env = dict(
        os.environ,
        XLA_FLAGS=xla_flags(devices),
        JAX_PLATFORMS="cpu",
    )
    start = time.perf_counter()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "mmjax.train",
            "--config",
            CONFIG + ":size=tiny",
            "--workdir",
            str(workdir),
            *overrides,
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    elapsed = time.perf_counter() - start
    assert proc.returncode == 2, f"exit code {proc.returncode}; stderr:\n{proc.stderr}"
    assert elapsed < FAST_SECONDS, f"took {elapsed:.1f}s: not failing fast"
    assert not (workdir / "checkpoints").exists()
    assert "compiled in" not in proc.stdout
    return _single_error_line(proc.stderr), proc.stderr


def test_mesh_product_differs_from_8_devices(tmp_path):
    line, _ = _run_cli(
        tmp_path, "--config.mesh.data=2", "--config.mesh.fsdp=2", "--config.mesh.tensor=1"
    )
    for fragment in (
        "mesh.data=2",
        "mesh.fsdp=2",
        "mesh.tensor=1",
        "multiply to 4",
        "there are 8 devices",
        "-1",
    ):
        assert fragment in line, f"{fragment!r} not in {line!r}"


def test_batch_not_divisible_by_data_parallel_size(tmp_path):
    # Default mesh data=-1 fills the 8 devices: data-parallel size 8.
    line, _ = _run_cli(tmp_path, "--config.batch_size=6")
    for fragment in ("batch_size=6", "data-parallel size 8", "mesh.data=8", "mesh.fsdp=1"):
        assert fragment in line, f"{fragment!r} not in {line!r}"


def test_subprocess_exit_code_and_clean_stderr(tmp_path):
    """The `python -m` path itself: exit status 2 and stderr is exactly the one error line."""
    line, stderr = _run_cli(tmp_path, "--config.model.foo=1", devices=1)
    assert "'model.foo'" in line
    assert stderr.strip().splitlines() == [line]


def test_missing_csv_names_the_key_and_the_file(capsys, tmp_path, no_compile):
    missing = tmp_path / "nowhere.csv"
    _check_in_process(
        capsys, tmp_path, [f"--config.data.train=csv:{missing}"], "data.train", str(missing)
    )


def test_csv_without_the_caption_column_names_it(capsys, tmp_path, no_compile):
    table = tmp_path / "t.csv"
    table.write_text("filepath,text\na.jpg,a cat\n")
    _check_in_process(
        capsys, tmp_path, [f"--config.data.train=csv:{table}"], "data.train", "'caption'"
    )


def test_mixture_weight_must_be_positive(capsys, tmp_path, no_compile):
    mixture = "[('shapes', 1.0), ('csv:/x.csv', -2)]"
    _check_in_process(
        capsys, tmp_path, [f"--config.data.train={mixture}"], "data.train", "csv:/x.csv"
    )


def test_eval_source_cannot_be_a_mixture(capsys, tmp_path, no_compile):
    _check_in_process(
        capsys, tmp_path, ["--config.data.eval=[('shapes', 1.0)]"], "data.eval", "one source"
    )


def test_bad_crop_scale_names_it(capsys, tmp_path, no_compile):
    _check_in_process(capsys, tmp_path, ["--config.data.crop_scale=(0.5, 2.0)"], "crop_scale")


def test_mixture_literal_round_trips_through_config_json(tmp_path):
    from mmjax.data.sources import parse_mixture
    from mmjax.runtime.config import from_json_file, load_config, to_json

    mixture = "[('shapes', 3.0), ('csv:/data/b.csv', 1.0)]"
    config = load_config(CONFIG + ":size=tiny", [f"data.train={mixture}"])
    assert parse_mixture(config.data.train) == [("shapes", 3.0), ("csv:/data/b.csv", 1.0)]
    (tmp_path / "config.json").write_text(to_json(config))
    assert parse_mixture(from_json_file(tmp_path / "config.json").data.train) == [
        ("shapes", 3.0),
        ("csv:/data/b.csv", 1.0),
    ]
