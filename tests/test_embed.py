"""`mmjax embed`: a converted open_clip model's embeddings, written by the command from a
relative folder, equal open_clip's own on the same pixels and texts."""

import json
import math

import numpy as np
import pytest
from PIL import Image

from mmjax.interop.open_clip import convert_open_clip
from tests.runs import mmjax_cli
from tests.test_open_clip_parity import (
    TOL,
    _save,
    build,
    clip_config,
    coca_config,
    max_err,
    open_clip,
    torch,
    torch_images,
)

TEXTS = ["a red circle", "two dogs playing in the snow", "a photo of a cat ."]


def _embed(cwd, *args):
    return mmjax_cli(cwd, "embed", *args)


def _inputs(tmp_path, size):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (3, size, size, 3), np.uint8)
    (tmp_path / "imgs").mkdir()
    for i, image in enumerate(pixels):  # Named so that name order differs from writing order.
        Image.fromarray(image).save(tmp_path / "imgs" / f"{'cba'[i]}.png")
    (tmp_path / "texts.txt").write_text("\n".join(TEXTS) + "\n")
    return pixels[::-1]  # a.png, b.png, c.png


@pytest.mark.parametrize("kind", ["coca", "siglip"])
def test_embeddings_equal_open_clips(tmp_path, kind):
    if kind == "coca":
        config = coca_config(image=32, patch=8, vw=32, vl=1, hw=16, tw=32, th=2, tl=1, ctx=15,
                             embed=32, queries=5, dl=1)  # fmt: skip
        config["multimodal_cfg"]["vocab_size"] = 49408
    else:  # A CLIP with a learnt logit bias: converted as a sigmoid (SigLIP-style) model.
        config = clip_config(image=32, patch=8, vw=32, vl=1, hw=16, tw=32, th=2, tl=1, ctx=16,
                             embed=32)  # fmt: skip
        config.update(init_logit_scale=math.log(10), init_logit_bias=-10.0)
    config["text_cfg"]["vocab_size"] = 49408
    oc = build(config, seed=4)
    cfg_path, ckpt = _save(oc, config, tmp_path)
    cfg = convert_open_clip(cfg_path, ckpt, tmp_path / "converted", progress=False)
    pixels = _inputs(tmp_path, cfg.image_size)

    proc = _embed(tmp_path, "--workdir", "converted", "--images", "imgs", "--texts", "texts.txt",
                  "--out", "out/emb.npz")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "wrote out/emb.npz: 3 images, 3 texts, 32-d embeddings"
    got = np.load(tmp_path / "out" / "emb.npz")
    assert list(got["images"]) == ["imgs/a.png", "imgs/b.png", "imgs/c.png"]
    assert list(got["texts"]) == TEXTS

    tokenizer = open_clip.tokenizer.SimpleTokenizer(
        context_length=cfg.context_length - int(cfg.captioning)
    )
    with torch.no_grad():
        want_images = oc.encode_image(
            torch_images(pixels.astype(np.float32) / 255.0, cfg), normalize=True
        )
        want_texts = oc.encode_text(tokenizer(TEXTS), normalize=True)
    assert got["image_emb"].shape == (3, 32) and got["text_emb"].shape == (3, 32)
    assert max_err(got["image_emb"], want_images) <= TOL
    assert max_err(got["text_emb"], want_texts) <= TOL
    np.testing.assert_allclose(np.linalg.norm(got["image_emb"], axis=1), 1.0, rtol=1e-5)
    assert got["logit_scale"] == pytest.approx(float(oc.logit_scale.detach().exp()), rel=1e-5)
    if kind == "siglip":
        assert got["logit_bias"] == pytest.approx(float(oc.logit_bias.detach()), rel=1e-5)
        saved = json.loads((tmp_path / "converted" / "config.json").read_text())
        assert saved["loss"]["contrastive"] == "sigmoid"
    else:
        assert "logit_bias" not in got


def test_bad_inputs_are_one_line(tmp_path):
    config = clip_config(image=32, patch=8, vw=32, vl=1, hw=16, tw=32, th=2, tl=1, ctx=16, embed=32)
    config["text_cfg"]["vocab_size"] = 49408
    cfg_path, ckpt = _save(build(config, 1), config, tmp_path)
    convert_open_clip(cfg_path, ckpt, tmp_path / "converted", progress=False)
    (tmp_path / "empty").mkdir()
    cases = {
        ("--images", "missing.png"): "error: cannot read image missing.png: no such file",
        ("--images", "empty"): "error: --images empty: no image files in this folder",
        ("--texts", "nothing.txt"): "error: cannot read nothing.txt: No such file or directory",
        (): "error: nothing to embed: give --images and/or --texts",
    }
    for args, line in cases.items():
        proc = _embed(tmp_path, "--workdir", "converted", *args, "--out", "e.npz")
        assert proc.returncode == 2, (args, proc.stderr)
        assert proc.stderr.strip().splitlines() == [line], args
    assert not (tmp_path / "e.npz").exists()
