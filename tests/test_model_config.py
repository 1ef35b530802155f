"""ModelConfig grouped per tower: sized/replace, the per-tower keys, and configs saved before
the grouping (flat keys such as model.vit_width) still loading as the same model."""

from __future__ import annotations

import dataclasses
import json

import pytest

from mmjax.models.config import LEGACY_KEYS, SIZES, ModelConfig, upgrade_legacy_keys
from mmjax.runtime.config import ConfigError, from_json_file, load_config


def legacy_flat(model: dict) -> dict:
    """A grouped model mapping written the way configs were before the grouping."""
    flat = {k: v for k, v in model.items() if not isinstance(v, dict)}
    for old, new in LEGACY_KEYS.items():
        group, name = new.split(".")
        if name in model.get(group, {}):
            flat[old] = model[group][name]
    return flat


@pytest.mark.parametrize("size", list(SIZES))
def test_legacy_flat_mapping_gives_the_same_model(size):
    grouped = dataclasses.asdict(ModelConfig.sized(size))
    flat = legacy_flat(grouped)
    assert "vit_width" in flat and "vision" not in flat
    assert ModelConfig.from_mapping(flat) == ModelConfig.sized(size)


def test_legacy_video_run_keeps_its_temporal_mlp_width():
    """Video runs used the frame encoder's MLP width for the temporal blocks; the default is
    now 4 x the width, so an old run whose MLP differed keeps its own width."""
    flat = dict(input_kind="video", vit_width=64, vit_mlp_dim=96, video_frames=4)
    assert ModelConfig.from_mapping(flat).video.mlp_dim == 96
    assert ModelConfig.from_mapping(dict(flat, vit_mlp_dim=256)).video.mlp_dim == 0  # 4 x 64
    shared = dict(flat, vit_pool="shared_queries", pool_width=32)  # Ran at 32: 4 x 32 then.
    assert ModelConfig.from_mapping(shared).video.mlp_dim == 0


def test_conflicting_old_and_new_names_are_refused():
    with pytest.raises(ValueError, match=r"model\.vit_width=32 .* model\.vision\.width=64"):
        upgrade_legacy_keys({"vit_width": 32, "vision": {"width": 64}})


def test_saved_legacy_config_json_loads_grouped(tmp_path):
    config = load_config("configs/coca.py:size=tiny", ["model.vision.width=32"])
    saved = json.loads(json.dumps(config.to_dict()))
    saved["model"] = legacy_flat(saved["model"])
    (tmp_path / "config.json").write_text(json.dumps(saved))
    loaded = from_json_file(tmp_path / "config.json")
    assert loaded.model.vision.width == 32
    assert ModelConfig.from_mapping(loaded.model.to_dict()) == ModelConfig.from_mapping(
        config.model.to_dict()
    )


def test_replace_and_sized_take_dotted_names():
    cfg = ModelConfig.sized("tiny", {"decoder.fusion": "late", "vision.width": 32, "remat": "full"})
    assert (cfg.decoder.fusion, cfg.vision.width, cfg.remat) == ("late", 32, "full")
    assert not cfg.caption_tokens_from_tower
    assert cfg.replace({"text.remat": "minimal"}).remat_for("text") == "minimal"
    assert cfg.remat_for("vision") == "full"
    with pytest.raises(ValueError, match=r"model\.vit_width was renamed model\.vision\.width"):
        cfg.replace({"vit_width": 8})
    with pytest.raises(ValueError, match=r"model\.vision\.widht is not a model field"):
        cfg.replace({"vision.widht": 8})


def test_decoder_and_video_widths_are_their_own_settings():
    cfg = ModelConfig.sized("tiny", {"decoder.heads": 4, "decoder.mlp_dim": 128})
    assert (cfg.decoder_heads, cfg.decoder_mlp_dim) == (4, 128)
    assert (ModelConfig.sized("tiny").decoder_heads, ModelConfig.sized("tiny").decoder_mlp_dim) == (
        2,
        256,
    )
    with pytest.raises(ConfigError, match=r"model\.decoder\.heads=3 does not divide its width 64"):
        load_config("configs/coca.py:size=tiny", ["model.decoder.heads=3"])


def test_a_key_given_twice_keeps_its_last_value():
    config = load_config(
        "configs/coca.py:size=tiny",
        [
            "model.vision.resnet_blocks=(1, 1, 1, 1)",
            "batch_size=8",
            "model.vision.resnet_blocks=(2, 2)",
        ],
    )
    assert tuple(config.model.vision.resnet_blocks) == (2, 2) and config.batch_size == 8
