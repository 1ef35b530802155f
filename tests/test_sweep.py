"""Ablation sweeps (mmjax/sweep.py) through the CLI: run, skip, resume, print, refuse.

  .venv/bin/python -m pytest tests/test_sweep.py -p no:xdist

A sweep file written here has two tiny variants (seed 0 and seed 1) of configs/coca.py at
tests/runs.py's BASE settings (given as the sweep's common overrides), 4 steps of batch 16,
a checkpoint every 2 steps and one eval at the end on 32 examples.
"""

from __future__ import annotations

import json
import shlex
import shutil

import pytest

from mmjax.runtime.config import load_config
from mmjax.runtime.metric_writer import read_metrics
from mmjax.runtime.run_record import read_records
from mmjax.tools.sweep import load_sweep, mean_step_seconds, variant_overrides
from tests.runs import BASE, REPO, run

STEPS = 4
COMMON = [*BASE, "--config.checkpoint_every=2", "--config.data.eval_examples=32"]


def sweep_file(folder, variants: dict) -> str:
    path = folder / "tiny_sweep.py"
    path.write_text(
        "from mmjax.runtime.config import load_module\n\n\n"
        "def get_config(arg=None):\n"
        f"    return load_module({str(REPO / 'configs' / 'coca.py')!r}).get_config(arg)\n\n\n"
        "def get_sweep():\n"
        f"    return {variants!r}\n"
    )
    return f"{path}:size=tiny,batch=16,steps={STEPS}"


def sweep(spec, root, cache_dir, *extra, check=True):
    args = ["--config", spec, "--workdir", root, *extra, *COMMON]
    return run("mmjax.tools.sweep", args, cache_dir, check=check, timeout=900)


def summary_rows(root) -> dict[str, dict[str, str]]:
    lines = (root / "summary.md").read_text().splitlines()
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    rows = [
        dict(zip(header, (c.strip() for c in line.strip("|").split("|")))) for line in lines[2:]
    ]
    return {row["variant"]: row for row in rows}


@pytest.fixture(scope="module")
def swept(tmp_path_factory, cache_dir):
    folder = tmp_path_factory.mktemp("sweep")
    spec = sweep_file(folder, {"a": {"seed": 0}, "b": {"seed": 1}})
    root = folder / "root"
    return spec, root, sweep(spec, root, cache_dir)


@pytest.mark.slow
def test_sweep_trains_every_variant_and_summarises(swept):
    spec, root, proc = swept
    for name, seed in (("a", 0), ("b", 1)):
        config = json.loads((root / name / "config.json").read_text())
        assert config["seed"] == seed  # The variant's delta...
        assert config["checkpoint_every"] == 2  # ...and the common overrides reached the run.
        evals = [r for r in read_metrics(root / name) if "eval/i2t_r1" in r]
        assert [r["step"] for r in evals] == [STEPS]
        assert (root / name / "checkpoints" / str(STEPS)).is_dir()
        assert f"[{name}] [mmjax] done:" in proc.stdout  # Streamed with the variant's prefix.
        assert f"[{name}] finished" in proc.stdout
    rows = summary_rows(root)
    assert list(rows) == ["a", "b"]
    for name, row in rows.items():
        assert row["status"] == "finished"
        assert row["final step"] == str(STEPS)
        final_eval = [r for r in read_metrics(root / name) if "eval/i2t_r1" in r][-1]
        assert float(row["eval/i2t_r1"]) == pytest.approx(final_eval["eval/i2t_r1"], rel=1e-3)
        assert float(row["step s"]) > 0
        assert int(row["params"].replace(",", "")) > 100_000  # The tiny CoCa: ~0.4M.
    assert rows["a"]["params"] == rows["b"]["params"]  # Same model, different seed.
    assert rows["a"]["final loss"] != rows["b"]["final loss"]
    for plot in ("loss.png", "learning_rate.png", "eval.png"):
        assert (root / plot).stat().st_size > 1000


@pytest.mark.slow
def test_rerun_skips_finished_variants(swept, cache_dir):
    spec, root, _ = swept
    before = {name: (root / name / "metrics.jsonl").read_text() for name in ("a", "b")}
    proc = sweep(spec, root, cache_dir)
    assert "[a] skipped (finished)" in proc.stdout
    assert "[b] skipped (finished)" in proc.stdout
    assert "[mmjax]" not in proc.stdout  # No training process started.
    for name in ("a", "b"):
        assert len(read_records(root / name)) == 1
        assert (root / name / "metrics.jsonl").read_text() == before[name]
    assert set(summary_rows(root)) == {"a", "b"}


@pytest.mark.slow
def test_interrupted_variant_resumes(swept, cache_dir):
    spec, root, _ = swept
    # What a kill after step 3 leaves: checkpoints 2 (and none at 4), metrics up to step 3.
    shutil.rmtree(root / "b" / "checkpoints" / str(STEPS))
    path = root / "b" / "metrics.jsonl"
    kept = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= 3]
    path.write_text("\n".join(kept) + "\n")
    proc = sweep(spec, root, cache_dir, "--only", "b")
    assert "[a]" not in proc.stdout  # Not selected: not even checked.
    assert "[b] [mmjax] resumed from" in proc.stdout and "checkpoints/2" in proc.stdout
    assert "[b] finished" in proc.stdout
    assert [r["resumed_from_step"] for r in read_records(root / "b")] == [None, 2]
    steps = [r["step"] for r in read_metrics(root / "b") if "loss" in r]
    assert steps == [1, 2, 3, 4]  # One record per step: the resumed run replaced step 3.
    rows = summary_rows(root)  # Still every variant, the unselected one included.
    assert [rows[n]["status"] for n in ("a", "b")] == ["finished", "finished"]
    assert rows["b"]["final step"] == str(STEPS)


def test_print_lists_one_command_per_variant(tmp_path, cache_dir):
    spec = sweep_file(tmp_path, {"a": {"seed": 0}, "b": {"seed": 1, "loss.contrastive": "sigmoid"}})
    root = tmp_path / "root"
    proc = sweep(spec, root, cache_dir, "--print")
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 2
    commands = [shlex.split(line) for line in lines]
    for command, name in zip(commands, ("a", "b")):
        assert command[:3] == ["python", "-m", "mmjax.train"]
        assert command[command.index("--config") + 1] == spec
        assert command[command.index("--workdir") + 1] == str(root / name)
        assert "--config.checkpoint_every=2" in command
    assert "--config.seed=1" in commands[1] and "--config.loss.contrastive=sigmoid" in commands[1]
    assert "--config.seed=0" in commands[0] and "--config.seed=1" not in commands[0]
    assert not root.exists()  # Printing runs nothing.
    only = sweep(spec, root, cache_dir, "--print", "--only", "b")
    assert len(only.stdout.strip().splitlines()) == 1 and "/b " in only.stdout


@pytest.mark.parametrize(
    "variants, extra, named",
    [
        ({"a": {"seed": 0}, "bad": {"loss.nope": 1.0}}, [], ("'bad'", "loss.nope")),
        ({"../up": {"seed": 0}}, [], ("'../up'",)),
        ({"a": {"seed": 0}}, ["--only", "zzz"], ("'zzz'",)),
    ],
)
def test_bad_sweep_exits_2_naming_the_culprit(tmp_path, cache_dir, variants, extra, named):
    spec = sweep_file(tmp_path, variants)
    root = tmp_path / "root"
    proc = sweep(spec, root, cache_dir, *extra, check=False)
    assert proc.returncode == 2, proc.stderr
    message = proc.stderr.strip()
    assert message.startswith("error: ") and "\n" not in message
    for text in named:
        assert text in message
    assert not root.exists()  # Refused before anything ran, even the good variant.


def test_failing_variant_is_reported_and_the_sweep_goes_on(tmp_path, cache_dir):
    # Both configs are valid but their trainings stop at start-up (no such tokenizer file).
    missing = {"data.tokenizer": str(tmp_path / "missing.model")}
    spec = sweep_file(tmp_path, {"a": missing, "b": {**missing, "seed": 1}})
    root = tmp_path / "root"
    proc = sweep(spec, root, cache_dir, check=False)
    assert proc.returncode == 1, proc.stderr
    assert "[a] failed: exit code 2" in proc.stdout and "[b] failed: exit code 2" in proc.stdout
    assert "missing.model" in proc.stdout  # The training's own error, streamed.
    assert proc.stderr.strip() == "error: variants failed: a, b"
    rows = summary_rows(root)
    assert [rows[n]["status"] for n in ("a", "b")] == ["failed: exit code 2"] * 2


def test_mean_step_seconds_leaves_out_each_starts_first_window(tmp_path):
    # Start at 0 and a resume from checkpoint 2: the windows at steps 1 and 3 include warm-up.
    windows = {1: 5.0, 2: 0.1, 3: 4.0, 4: 0.3}
    (tmp_path / "metrics.jsonl").write_text(
        "".join(json.dumps({"step": s, "step_seconds": v}) + "\n" for s, v in windows.items())
        + json.dumps({"step": 4, "eval/i2t_r1": 0.5})
        + "\n"
    )
    (tmp_path / "runs.jsonl").write_text(
        json.dumps({"resumed_from_step": None}) + "\n" + json.dumps({"resumed_from_step": 2}) + "\n"
    )
    assert mean_step_seconds(tmp_path) == pytest.approx(0.2)


@pytest.mark.parametrize(
    "variant, equivalent",
    [
        ("coca", "coca"),
        ("clip_only", "clip"),
        ("captioning_only", "captioning"),
        ("sigmoid", "siglip"),
    ],
)
def test_losses_ablation_variants_match_the_single_configs(variant, equivalent):
    # What the sweep hands mmjax.train (base + the variant's overrides as command-line text)
    # must be exactly the config of the matching stand-alone file.
    spec = "configs/ablations/losses.py:size=tiny,steps=800"
    deltas = load_sweep(spec)[variant]
    swept = load_config(spec, variant_overrides(deltas, ["batch_size=32"]))
    single = load_config(f"configs/{equivalent}.py:size=tiny,steps=800", ["batch_size=32"])
    assert swept.to_dict() == single.to_dict()
