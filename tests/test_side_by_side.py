"""`mmjax bench --against`: the converter's mapping in reverse, the median's confidence
interval, and the side-by-side run of two worker processes from the command line."""

import json

import numpy as np
import pytest

from mmjax.benchmarks.side_by_side import median_interval
from mmjax.interop.open_clip import ConversionError, model_config, open_clip_config
from mmjax.models.config import ModelConfig
from tests.runs import REPO, mmjax_cli


def _open_clip_config(coca=True):
    oc = dict(
        embed_dim=48,
        vision_cfg=dict(image_size=32, layers=2, width=64, patch_size=8, head_width=32),
        text_cfg=dict(context_length=16, vocab_size=300, width=48, heads=2, layers=2),
    )
    if coca:
        oc["vision_cfg"].update(attentional_pool=True, attn_pooler_queries=9, attn_pooler_heads=2)
        oc["text_cfg"].update(embed_cls=True)
        oc["multimodal_cfg"] = dict(context_length=16, vocab_size=300, width=48, heads=2, layers=1)
    return oc


@pytest.mark.parametrize("coca", [True, False])
def test_a_converted_model_maps_back_to_the_same_open_clip_model(coca):
    cfg = model_config(_open_clip_config(coca))
    oc, differences = open_clip_config(cfg)
    assert differences == []
    assert model_config(oc) == cfg
    assert oc["embed_dim"] == 48 and oc["vision_cfg"]["head_width"] == 32
    if coca:
        assert oc["text_cfg"]["context_length"] == 16  # mmjax's context is one longer.
        assert oc["vision_cfg"]["attn_pooler_queries"] == 9


def test_the_nearest_open_clip_model_names_what_its_layout_changes():
    cfg = ModelConfig.sized("bench")
    oc, differences = open_clip_config(cfg)
    changed = {d.split(":")[0] for d in differences}
    assert changed == {
        "decoder.block", "mlp_activation", "norm_eps", "text.mask", "vision.class_token",
        "vision.ln_pre", "vision.pool",
    }, differences  # fmt: skip
    assert "vision.pool: 'two_poolers' -> 'shared_queries'" in differences
    # The shape itself is the same: widths, depths, heads, queries, vocabulary.
    assert oc["vision_cfg"]["width"] == 256 and oc["vision_cfg"]["layers"] == 4
    assert oc["vision_cfg"]["attn_pooler_queries"] == cfg.vision.caption_queries + 1
    assert oc["multimodal_cfg"]["layers"] == cfg.decoder.layers
    with_dropout = open_clip_config(cfg.replace({"patch_dropout": 0.5}))[0]
    assert with_dropout["vision_cfg"]["patch_dropout"] == 0.5


def test_what_open_clip_cannot_build_is_refused_by_name():
    resnet = ModelConfig.sized("tiny", {"vision.encoder": "resnet"})
    with pytest.raises(ConversionError, match="model.vision.encoder='resnet'"):
        open_clip_config(resnet)
    early = ModelConfig.sized("tiny", {"decoder.fusion": "early"})
    with pytest.raises(ConversionError, match="model.decoder.fusion='early'"):
        open_clip_config(early)


def test_median_interval_covers_the_median_as_often_as_it_claims():
    rng = np.random.default_rng(0)
    hits = 0
    for _ in range(400):
        lo, hi = median_interval(rng.normal(1.0, 0.1, 24))
        hits += lo <= 1.0 <= hi
    assert 0.95 <= hits / 400 <= 1.0
    assert median_interval(list(range(24))) == (6.0, 17.0)  # Ranks 7 and 18 of 24.
    assert median_interval([3.0, 1.0]) == (1.0, 3.0)  # Too few: the whole range.


def _bench(*args):
    return mmjax_cli(REPO, "bench", *args)


@pytest.mark.slow
def test_bench_against_open_clip_steps_both_sides_in_turn():
    pytest.importorskip("torch")
    proc = _bench("--config", "configs/coca.py:size=tiny", "--against", "open_clip",
                  "--pairs", "4", "--warmup", "1", "--config.batch_size=32")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["side"] == "mmjax" and result["against"] == "open_clip"
    mmjax, peer = result["workers"]
    assert (mmjax["side"], peer["side"]) == ("mmjax", "open_clip")
    for w in (mmjax, peer):
        assert w["examples_per_sec"] == pytest.approx(32 / w["step_seconds"])
        assert w["flops_per_step"] > 1e9 and np.isfinite(w["loss"])
    # Both sides train the same shape: FLOPs and parameters within a few percent.
    assert peer["flops_per_step"] == pytest.approx(mmjax["flops_per_step"], rel=0.15)
    assert peer["params"] == pytest.approx(mmjax["params"], rel=0.15)
    assert "vision.pool: 'two_poolers' -> 'shared_queries'" in peer["layout_differences"]
    ratio = mmjax["step_seconds"] / peer["step_seconds"]  # Medians of 4: near the pairs'.
    lo, hi = result["ratio_ci95"]
    assert lo <= result["ratio"] <= hi and 0.2 < result["ratio"] < 5 and 0.2 < 1 / ratio < 5


def test_what_the_open_clip_side_cannot_train_is_refused_before_any_worker_starts():
    proc = _bench("--config", "configs/coca.py:size=tiny", "--against", "open_clip",
                  "--pairs", "1", "--config.loss.contrastive=sigmoid")  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: loss.contrastive='sigmoid': open_clip's CoCa trains with the softmax loss only"
    ]
    proc = _bench("--config", "configs/coca.py:size=tiny", "--against", "open_clip",
                  "--config.model.vision.encoder=resnet")  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: open_clip has no model with model.vision.encoder='resnet'"
    ]
