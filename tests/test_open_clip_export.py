"""`mmjax export open_clip`: open_clip -> mmjax -> open_clip gives back open_clip's own model
(every tensor equal, the same embeddings), and importing the export gives back mmjax's
parameters; a model open_clip cannot build is refused by name."""

import json

import jax
import numpy as np
import pytest

from mmjax.interop.export import CONFIG_FILE, WEIGHTS_FILE, read_run
from mmjax.interop.open_clip import convert_open_clip, default_bpe_vocab, write_workdir
from mmjax.models.coca import CoCa
from mmjax.models.config import ModelConfig
from tests.runs import mmjax_cli
from tests.test_open_clip_parity import (
    TOL,
    _save,
    build,
    clip_config,
    coca_config,
    inputs,
    max_err,
    open_clip,
    torch,
    torch_images,
)


def _export(cwd, *args):
    return mmjax_cli(cwd, "export", *args)


def _load_exported(directory):
    model = open_clip.create_model(f"local-dir:{directory}").eval()
    model.output_dict = True  # A CLIP returns a tuple otherwise (as build() sets it).
    return model


@pytest.mark.parametrize("kind", ["coca", "clip"])
def test_open_clip_round_trip_is_exact(tmp_path, kind):
    if kind == "coca":
        config = coca_config(image=32, patch=8, vw=32, vl=2, hw=16, tw=32, th=2, tl=2, ctx=15,
                             embed=32, queries=5, dl=2)  # fmt: skip
        config["multimodal_cfg"]["vocab_size"] = 49408
    else:
        config = clip_config(image=32, patch=8, vw=48, vl=2, hw=16, tw=32, th=2, tl=2, ctx=16,
                             embed=24)  # fmt: skip
    config["text_cfg"]["vocab_size"] = 49408
    original = build(config, seed=7)
    cfg_path, ckpt = _save(original, config, tmp_path)
    convert_open_clip(cfg_path, ckpt, tmp_path / "imported", progress=False)

    proc = _export(tmp_path, "open_clip", "--workdir", "imported", "--out", "exported")
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads(proc.stdout)
    assert summary["model"] == ("CoCa" if kind == "coca" else "CLIP") and summary["step"] == 0
    if kind == "coca":  # Neither CLIPModel nor SiglipModel holds a CoCa's towers exactly.
        proc = _export(tmp_path, "hf", "--workdir", "imported", "--out", "as_hf")
        assert proc.returncode == 2
        (line,) = proc.stderr.strip().splitlines()
        assert line.startswith("error: a CoCa's towers have no exact transformers form")
        assert not (tmp_path / "as_hf").exists()

    exported = _load_exported(tmp_path / "exported")
    want = {k: v for k, v in original.state_dict().items() if k != "attn_mask"}
    got = exported.state_dict()
    assert set(want) <= set(got)
    for name, tensor in want.items():
        assert torch.equal(got[name], tensor), name  # Bit for bit: a rearrangement only.
    cfg = ModelConfig.from_mapping(
        json.loads((tmp_path / "imported/config.json").read_text())["model"]
    )
    images, text = inputs(cfg, 3, seed=2, text_len=cfg.context_length - int(cfg.captioning))
    with torch.no_grad():
        a = original(torch_images(images, cfg), torch.from_numpy(text))
        b = exported(torch_images(images, cfg), torch.from_numpy(text))
    assert max_err(a["image_features"], b["image_features"]) <= TOL
    assert max_err(a["text_features"], b["text_features"]) <= TOL

    # And back: importing the export gives mmjax's parameters again, exactly.
    convert_open_clip(tmp_path / "exported" / CONFIG_FILE, tmp_path / "exported" / WEIGHTS_FILE,
                      tmp_path / "again", progress=False)  # fmt: skip
    _, _, first = read_run(str(tmp_path / "imported"))
    _, _, second = read_run(str(tmp_path / "again"))
    jax.tree.map(np.testing.assert_array_equal, first, second)


def test_a_model_open_clip_cannot_build_is_refused_by_name(tmp_path):
    cfg = ModelConfig.sized("tiny", {"vocab_size": 49408})
    model = CoCa(cfg)
    images = np.zeros((1, cfg.image_size, cfg.image_size, 3), np.uint8)
    tokens = np.zeros((1, cfg.context_length), np.int32)
    params = jax.jit(model.init)(jax.random.key(0), images, tokens)["params"]
    import flax.linen as nn

    write_workdir(tmp_path / "native", nn.unbox(params), cfg, default_bpe_vocab())
    proc = _export(tmp_path, "open_clip", "--workdir", "native", "--out", "exported")
    assert proc.returncode == 2
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("error: open_clip has no model equal to this one; it would differ in ")
    assert "vision.pool: 'two_poolers' -> 'shared_queries'" in line
    assert not (tmp_path / "exported").exists()
