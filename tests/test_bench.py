"""mmjax.benchmarks.train_step prints one JSON line with the contract's keys, computed from real timings."""

import json

import pytest

from mmjax.benchmarks.step_timing import synthetic_batch
from mmjax.benchmarks.train_step import main
from mmjax.models.config import ModelConfig
from mmjax.models.flops import train_flops_per_step
from mmjax.runtime.config import load_config, model_size

CONTRACT_KEYS = (
    "examples_per_sec",
    "step_seconds",
    "compile_seconds",
    "flops_per_step",
    "peak_flops",
    "mfu",
)


@pytest.mark.slow
def test_bench_prints_contract_json(capsys):
    assert main(["--config", "configs/coca.py:size=tiny", "--steps", "3"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1
    result = json.loads(out[0])
    for key in CONTRACT_KEYS:
        assert result[key] > 0, key
    config = load_config("configs/coca.py:size=tiny")
    model_cfg = ModelConfig.from_mapping(config.model.to_dict())
    assert result["flops_per_step"] == train_flops_per_step(model_cfg, config.batch_size)
    assert result["examples_per_sec"] == pytest.approx(config.batch_size / result["step_seconds"])
    assert result["mfu"] == pytest.approx(
        result["flops_per_step"] / result["step_seconds"] / result["peak_flops"]
    )
    assert 0 < result["mfu"] < 1.5
    assert result["loss"] == result["loss"]  # Finite: the step really ran.


@pytest.mark.slow
def test_compile_depths_reports_each_depth(capsys):
    argv = ["--config", "configs/coca.py:size=tiny", "--compile-depths", "1,2"]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(result["compile_seconds"]) == {"1", "2"}
    assert all(v > 0 for v in result["compile_seconds"].values())
    assert result["scan_layers"] is True


def test_synthetic_batch_has_caption_layout():
    config = load_config("configs/coca.py:size=tiny")
    model_cfg = ModelConfig.from_mapping(config.model.to_dict())
    batch = synthetic_batch(config, model_cfg)
    tokens = batch["tokens"]
    assert batch["images"].dtype.name == "uint8"
    assert (tokens[:, 0] == 2).all()  # BOS
    for row in tokens:
        eos = list(row).index(3)
        assert (row[eos + 1 :] == 0).all() and (row[1:eos] >= 4).all()


@pytest.mark.parametrize("size", ["tiny", "bench", "small", "base", "large"])
def test_config_file_keeps_what_the_size_chose(size):
    """configs/coca.py sets dtypes only: a size's layout choice (bench unrolled) reaches the run."""
    model = load_config(f"configs/coca.py:size={size}").model.to_dict()
    chosen = model_size(size)
    differ = {k for k in chosen if model[k] != chosen[k]}
    assert differ <= {"dtype", "param_dtype"}, differ


def test_bench_size_is_the_contract_shape():
    model = load_config("configs/coca.py:size=bench").model
    assert (model.image_size, model.vision.patch_size, model.vision.caption_queries) == (64, 8, 256)
    assert (model.vision.width, model.vision.layers, model.vision.heads) == (256, 4, 4)
    assert (model.text.width, model.text.layers, model.text.heads) == (256, 4, 4)
    assert (model.context_length, model.vocab_size, model.decoder.layers) == (32, 4000, 2)
    assert model.embed_dim == 256 and model.dtype == "float32"
    assert load_config("configs/coca.py:size=bench").batch_size == 64
    # Unrolled for the CPU benchmark (see SIZES['bench']); every other size scans.
    assert not model.scan_layers and model.remat == "none"


@pytest.mark.slow
def test_compare_times_each_variant_against_the_first(capsys):
    argv = ["--config", "configs/coca.py:size=tiny", "--steps", "1"]
    assert main([*argv, "--compare", "", "batch_size=32,log_every=7"]) == 0
    first, second = (json.loads(line) for line in capsys.readouterr().out.strip().splitlines())
    assert (first["variant"], second["variant"]) == ("", "batch_size=32,log_every=7")
    assert first["step_ratio_to_first"] == 1.0
    assert second["step_ratio_to_first"] == pytest.approx(
        second["step_seconds"] / first["step_seconds"]
    )
    # Each variant's own config counts: the second one trains 32 examples per step.
    assert first["examples_per_sec"] == pytest.approx(64 / first["step_seconds"])
    assert second["examples_per_sec"] == pytest.approx(32 / second["step_seconds"])
    assert 0 < second["mfu"] < first["mfu"] * 4 and first["peak_flops"] == second["peak_flops"]


def test_compare_names_a_bad_variant_before_compiling(capsys):
    argv = ["--config", "configs/coca.py:size=tiny", "--compare", "", "model.nope=1"]
    assert main(argv) == 2
    assert "model.nope" in capsys.readouterr().err
