"""What a new user meets: failures that end in one clear line (the last one printed) with the
documented exit code. (tests/test_readme.py runs every README command, relative paths and
all, from a fresh tree.)

The slow tests copy the shared "straight" run (tests/runs.py) into a fresh copy of the tree
and run the CLIs there from its root, with relative paths.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.runs import REPO, env_for, train_args

NEEDS = {
    "test_damaged_checkpoints_end_in_one_line_without_tracebacks": ("straight",),
    "test_a_restore_that_fails_for_another_reason_sets_nothing_aside": ("straight",),
    "test_caption_names_every_bad_image_and_captions_the_rest": ("straight",),
}


def fresh_tree(destination: Path) -> Path:
    """The files a clone of this checkout would have (tracked and untracked-not-ignored, as
    they are in the working tree): no runs/, data/ or .venv."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    for name in filter(None, (n.decode() for n in listed)):
        source = REPO / name
        if source.is_file():
            target = destination / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    return destination


def run_cli(tree: Path, cache_dir, *args, timeout=600) -> subprocess.CompletedProcess:
    """`python -m ARGS...` from the root of `tree`, as a user types it there."""
    return subprocess.run(
        [sys.executable, "-m", *map(str, args)],
        cwd=tree,
        env=env_for(cache_dir),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def ok(proc):
    assert proc.returncode == 0, f"{proc.args}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc


def last_line(text: str) -> str:
    return text.strip().splitlines()[-1]


@pytest.fixture
def tree(tmp_path):
    return fresh_tree(tmp_path / "mmjax")


def copy_run(runs, tree: Path, name="straight") -> Path:
    source, _ = runs.get(name)
    target = tree / "runs" / name
    shutil.copytree(source, target)
    return target


@pytest.mark.parametrize(
    "module, args",
    [
        ("train", ["--config", "configs/coca.py:size=tiny"]),
        ("evaluate", []),
        ("caption", ["x.png"]),
        ("classify", ["--classes", "c.txt", "x.png"]),
        ("sweep", ["--config", "configs/ablations/losses.py:size=tiny"]),
    ],
)
def test_a_workdir_that_is_a_file_is_one_line(module, args, tmp_path, capsys, monkeypatch):
    import importlib

    monkeypatch.chdir(tmp_path)
    Path("c.txt").write_text("a\nb\n")
    Path("x.png").write_bytes(b"")
    Path("notes.txt").write_text("not a folder")
    main = importlib.import_module(f"mmjax.tools.{module}").main
    assert main([*args, "--workdir", "notes.txt"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert err.startswith("error: --workdir notes.txt ") and "is not a directory" in err


def test_a_workdir_without_a_run_is_one_line(tmp_path, capsys, monkeypatch):
    from mmjax import evaluate
    from mmjax.tools import caption

    monkeypatch.chdir(tmp_path)
    Path("x.png").write_bytes(b"")
    Path("empty").mkdir()
    assert evaluate.main(["--workdir", "missing"]) == 2
    assert capsys.readouterr().err == "error: --workdir missing does not exist\n"
    assert caption.main(["--workdir", "empty", "x.png"]) == 2
    err = capsys.readouterr().err
    assert err == "error: --workdir empty has no config.json: is it a training workdir?\n"


@pytest.mark.slow
def test_damaged_checkpoints_end_in_one_line_without_tracebacks(tree, runs, cache_dir):
    workdir = copy_run(runs, tree)
    checkpoints = "runs/straight/checkpoints"
    # Every array file garbled (inference reads the parameters only: a cut in the optimizer
    # state alone would not stop it).
    for path in (workdir / "checkpoints" / "8" / "state").rglob("d/*"):
        path.write_bytes(b"x" * path.stat().st_size)
    proc = ok(run_cli(tree, cache_dir, "mmjax.evaluate", "--workdir", "runs/straight",
                      "--only", "default"))  # fmt: skip
    output = proc.stdout + proc.stderr
    assert "Traceback" not in output and "Event loop is closed" not in output
    warning = [line for line in output.splitlines() if "unreadable" in line]
    assert len(warning) == 1 and warning[0].endswith("; using 4"), warning
    assert f"checkpoint 8 in {tree / checkpoints} is unreadable (" in warning[0]
    assert json.loads((workdir / "eval.json").read_text())["step"] == 4

    shutil.rmtree(workdir / "checkpoints" / "4" / "state")  # Now every checkpoint is damaged.
    proc = run_cli(tree, cache_dir, "mmjax.evaluate", "--workdir", "runs/straight")
    assert proc.returncode == 2
    assert "Traceback" not in proc.stdout + proc.stderr
    error = last_line(proc.stderr)
    assert error.startswith(f"error: no readable checkpoint in {tree / checkpoints}: 8 (")
    assert error.endswith("4 (item 'state' is missing)")
    assert len(proc.stderr.strip().splitlines()) <= 2, proc.stderr  # a warning + the error


@pytest.mark.slow
def test_a_restore_that_fails_for_another_reason_sets_nothing_aside(tree, runs, cache_dir):
    copy_run(runs, tree)
    # Another model under the same workdir (let through by allow_config_change): its
    # parameters do not fit the checkpoint, which is not damaged and must stay as it is.
    args = train_args("runs/straight", "--config.allow_config_change=True",
                      "--config.model.vision.mlp_dim=128")  # fmt: skip
    proc = run_cli(tree, cache_dir, "mmjax.train", *args)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stdout + proc.stderr
    error = last_line(proc.stderr)
    assert error.startswith(
        f"error: cannot restore checkpoint 8 in {tree / 'runs/straight/checkpoints'}: "
    ), error
    assert "shape" in error and error.endswith(
        "(the checkpoint is not damaged; nothing was set aside)"
    )
    names = sorted(p.name for p in (tree / "runs/straight/checkpoints").iterdir())
    assert names == ["4", "8"]


@pytest.mark.slow
def test_caption_names_every_bad_image_and_captions_the_rest(tree, runs, cache_dir):
    copy_run(runs, tree)
    (tree / "images").mkdir()
    Image.fromarray(np.full((20, 20, 3), 200, np.uint8)).save(tree / "images" / "good.png")
    (tree / "images" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    wd = ["--workdir", "runs/straight"]
    proc = run_cli(tree, cache_dir, "mmjax.tools.caption", *wd, "images/good.png", "a.jpg", "b.jpg")
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr == (
        "error: cannot read 2 of 3 images: a.jpg (no such file), b.jpg (no such file)\n"
    )
    proc = run_cli(tree, cache_dir, "mmjax.tools.caption", *wd, "images/broken.jpg", "images/good.png")
    assert proc.returncode == 2
    assert [line.split("\t")[0] for line in proc.stdout.splitlines()] == ["images/good.png"]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors[0].startswith("error: cannot read image images/broken.jpg: ")
    assert errors[-1] == (
        "error: 1 of 2 images could not be read (images/broken.jpg); the others are captioned"
    )
    assert last_line(proc.stderr) == errors[-1]


def test_paths_in_a_config_are_made_absolute(tmp_path, monkeypatch):
    from mmjax.runtime.config import load_config

    monkeypatch.chdir(tmp_path)
    config = load_config(
        str(REPO / "configs/coca.py") + ":size=tiny",
        [
            "data.train=[('csv:data/a.csv', 2), ('wds:shards/{000..009}.tar', 1)]",
            "data.eval=csv:data/eval.csv",
            "data.tokenizer=tok/t.model",
        ],
    )
    assert config.data.train == repr(
        [(f"csv:{tmp_path}/data/a.csv", 2.0), (f"wds:{tmp_path}/shards/{{000..009}}.tar", 1.0)]
    )
    assert config.data.eval == f"csv:{tmp_path}/data/eval.csv"
    assert config.data.tokenizer == f"{tmp_path}/tok/t.model"
    assert load_config(str(REPO / "configs/coca.py"), []).data.train == "shapes"
