"""mmjax.bench prints one JSON line with the contract's keys, computed from real timings."""

import json

import pytest

from mmjax.bench import main, synthetic_batch
from mmjax.config_loading import load_config
from mmjax.flops import train_flops_per_step
from mmjax.models.config import ModelConfig

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
