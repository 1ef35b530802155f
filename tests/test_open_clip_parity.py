"""open_clip checkpoints converted by mmjax.interop.open_clip reproduce open_clip's outputs.

  .venv/bin/python -m pytest -p no:xdist tests/test_open_clip_parity.py

Needs the `openclip` extra (torch, open_clip); skipped with the reason when it is absent.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.interop.open_clip import (
    ConversionError,
    convert_open_clip,
    convert_state_dict,
    model_config,
)
from mmjax.interop.torch_import import MissingExtra, import_open_clip
from mmjax.models.coca import CoCa

ROOT = Path(__file__).resolve().parent.parent


def _import_open_clip():
    try:
        return import_open_clip()
    except MissingExtra as e:
        pytest.skip(str(e), allow_module_level=True)


torch, open_clip = _import_open_clip()
from open_clip.coca_model import CoCa as OcCoCa  # noqa: E402
from open_clip.model import CLIP as OcCLIP  # noqa: E402

TOL = 1e-4


def clip_config(image=32, patch=8, vw=64, vl=2, hw=32, tw=48, th=2, tl=2, ctx=16, embed=32):
    return dict(
        embed_dim=embed,
        vision_cfg=dict(image_size=image, layers=vl, width=vw, patch_size=patch, head_width=hw),
        text_cfg=dict(context_length=ctx, vocab_size=300, width=tw, heads=th, layers=tl),
    )


def coca_config(queries=9, pool_heads=2, dl=1, **kw):
    cfg = clip_config(**kw)
    cfg["vision_cfg"].update(
        attentional_pool=True, attn_pooler_queries=queries, attn_pooler_heads=pool_heads,
        output_tokens=True,
    )  # fmt: skip
    cfg["text_cfg"].update(embed_cls=True, output_tokens=True)
    text = cfg["text_cfg"]
    cfg["multimodal_cfg"] = dict(
        context_length=text["context_length"], vocab_size=text["vocab_size"],
        width=text["width"], heads=text["heads"], layers=dl,
    )  # fmt: skip
    return cfg


def build(config: dict, seed: int = 0):
    torch.manual_seed(seed)
    cls = OcCoCa if "multimodal_cfg" in config else OcCLIP
    kwargs = {k: v for k, v in config.items() if k not in ("custom_text",)}
    model = cls(**kwargs).eval()
    model.output_dict = True  # CLIP returns a tuple otherwise; CoCa always a dict.
    with torch.no_grad():  # open_clip leaves biases at zero and the decoder head uninitialised.
        for name, p in model.named_parameters():
            if name == "text_decoder.text_projection":  # torch.empty: garbage, maybe NaN.
                p.copy_(torch.randn_like(p) * p.shape[0] ** -0.5)
            elif name.endswith("bias") or "ln_" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def convert(model, config):
    cfg = model_config(config)
    state = {k: v.float().numpy() for k, v in model.state_dict().items()}
    return cfg, jax.tree.map(jnp.asarray, convert_state_dict(state, cfg))


def inputs(cfg, batch=3, seed=0, text_len=None):
    rng = np.random.default_rng(seed)
    images = rng.random((batch, cfg.image_size, cfg.image_size, 3), dtype=np.float32)
    n = text_len or cfg.context_length
    text = np.zeros((batch, n), np.int64)
    for i in range(batch):
        length = int(rng.integers(3, n + 1))  # Rows of several lengths, one may fill the row.
        text[i, :length] = rng.integers(1, cfg.vocab_size - 2, length)
        text[i, 0], text[i, length - 1] = cfg.vocab_size - 2, cfg.vocab_size - 1
    return images, text


def torch_images(images, cfg):
    x = (images - np.asarray(cfg.image_mean, np.float32)) / np.asarray(cfg.image_std, np.float32)
    return torch.from_numpy(x.transpose(0, 3, 1, 2).copy())


def max_err(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def check_parity(config, seed=0, batch=3):
    oc = build(config, seed)
    cfg, params = convert(oc, config)
    model = CoCa(cfg)
    coca = cfg.captioning
    images, text = inputs(cfg, batch, seed, cfg.context_length - 1 if coca else None)
    # mmjax's CoCa reads tokens[:, :-1] (the last slot is the CLS's); open_clip all tokens.
    tokens = np.concatenate([text, np.zeros((batch, 1), np.int64)], 1) if coca else text
    out = jax.jit(model.apply)(
        {"params": params}, jnp.asarray(images), jnp.asarray(tokens, jnp.int32)
    )
    with torch.no_grad():
        ref = oc(torch_images(images, cfg), torch.from_numpy(text))
    errors = {
        "image": max_err(out["image_emb"], ref["image_features"]),
        "text": max_err(out["text_emb"], ref["text_features"]),
        "scale": max_err(out["scale"], ref["logit_scale"]),
    }
    if coca:  # open_clip predicts text[:, 1:] from text[:, :-1]: mmjax's first L-2 rows.
        errors["logits"] = max_err(out["logits"][:, : text.shape[1] - 1], ref["logits"])
        # Pad positions differ between mask conventions only; real ones are what counts.
        assert np.abs(np.asarray(ref["logits"])).max() > 0.1
    assert max(errors.values()) <= TOL, errors
    return oc, cfg, params


@pytest.mark.parametrize(
    "kw",
    [
        dict(),
        dict(image=48, patch=16, vw=96, vl=3, hw=32, tw=64, th=4, tl=1, ctx=12, embed=40),
        dict(image=28, patch=7, vw=32, vl=1, hw=16, tw=32, th=1, tl=3, ctx=20, embed=24),
    ],
)
def test_clip_parity(kw):
    check_parity(clip_config(**kw))


def test_clip_quick_gelu_parity():
    config = clip_config()
    config["quick_gelu"] = True
    check_parity(config, seed=3)


@pytest.mark.parametrize(
    "kw",
    [
        dict(embed=48),  # Pooler width 48 != vision width 64: separate q/k/v weights.
        dict(embed=64, tw=64, queries=5, pool_heads=4, dl=2, th=4),  # Equal: fused in_proj.
        dict(image=48, patch=12, vw=48, vl=1, hw=24, tw=32, th=2, tl=2, ctx=10, embed=32, dl=3),
    ],
)
def test_coca_parity(kw):
    check_parity(coca_config(**kw), seed=1)


def test_mask_convention_matters():
    """The open_clip mask option is not a no-op: the default convention changes the text
    embedding of padded captions, so parity above really tests it."""
    config = coca_config(embed=48)
    oc = build(config, 2)
    cfg, params = convert(oc, config)
    images, text = inputs(cfg, 3, 2, cfg.context_length - 1)
    text[:, -1] = 0  # Every row padded.
    tokens = jnp.asarray(np.concatenate([text, np.zeros((3, 1), np.int64)], 1), jnp.int32)
    import dataclasses

    a = jax.jit(CoCa(cfg).apply)({"params": params}, jnp.asarray(images), tokens)["text_emb"]
    other = cfg.replace({"text.mask": "pad_keys"})
    b = jax.jit(CoCa(other).apply)({"params": params}, jnp.asarray(images), tokens)["text_emb"]
    assert max_err(a, b) > 1e-3


def torch_greedy(oc, images, cfg, bos, eos, pad, steps):
    """Greedy tokens from open_clip's forward (its generate needs `transformers`), banning
    pad and BOS as mmjax.inference.generate does."""
    with torch.no_grad():
        latent, embs = oc._encode_image(images)
        text = torch.full((images.shape[0], 1), bos, dtype=torch.long)
        done = torch.zeros(images.shape[0], dtype=torch.bool)
        for _ in range(steps):
            logits = oc(images, text, image_latent=latent, image_embs=embs, output_labels=False)[
                "logits"
            ][:, -1]
            logits[:, [pad, bos]] = -float("inf")
            token = torch.where(
                done, torch.full_like(done, pad, dtype=torch.long), logits.argmax(-1)
            )
            text = torch.cat([text, token[:, None]], 1)
            done |= token == eos
    return text.numpy()


def test_greedy_captions_match():
    from mmjax.inference.generate import GenerateOptions, generate

    config = coca_config(ctx=12, queries=5, dl=2, embed=48)
    config["text_cfg"]["vocab_size"] = config["multimodal_cfg"]["vocab_size"] = 40
    oc = build(config, 4)
    cfg, params = convert(oc, config)
    images, _ = inputs(cfg, 4, 4)
    bos, eos, pad = 38, 39, 0
    # The text tower's positions hold context_length - 1 = 12 tokens: 11 generated.
    ref = torch_greedy(oc, torch_images(images, cfg), cfg, bos, eos, pad, cfg.context_length - 2)
    got = np.asarray(
        generate(CoCa(cfg), params, jnp.asarray(images), bos_id=bos, eos_id=eos, pad_id=pad)
    )
    assert (got[:, : ref.shape[1]] == ref).all(), (got, ref)
    assert len({tuple(r) for r in ref}) > 1  # Different images, different captions.

    # open_clip's own generate (needs transformers): top_k=1 sampling is greedy. It bans EOS
    # while the sequence (with BOS) is shorter than min_seq_len, and with
    # fixed_output_length ends every row with EOS at seq_len: compare the tokens before that.
    pytest.importorskip("transformers")
    length = cfg.context_length - 1
    with torch.no_grad():
        theirs = oc.generate(
            torch_images(images, cfg),
            generation_type="top_k",
            top_k=1,
            seq_len=length,
            max_seq_len=length,
            sot_token_id=bos,
            eos_token_id=eos,
            pad_token_id=pad,
            min_seq_len=2,
            fixed_output_length=True,
        ).numpy()
    ours = np.asarray(
        generate(
            CoCa(cfg),
            params,
            jnp.asarray(images),
            bos_id=bos,
            eos_id=eos,
            pad_id=pad,
            options=GenerateOptions(min_length=1),
        )
    )
    assert theirs.shape == (4, length) and (theirs[:, -1] == eos).all()
    assert (ours[:, : length - 1] == theirs[:, :-1]).all(), (ours, theirs)


def test_clip_tokenizer_matches_open_clip():
    from mmjax.interop.open_clip import default_bpe_vocab
    from mmjax.text.clip_bpe import ClipBpeTokenizer

    tok = ClipBpeTokenizer.load(default_bpe_vocab())
    texts = ["a photo of a cat.", "Two DOGS playing  in the snow!!", "naïve café, 123 &amp; x"]
    want = open_clip.get_tokenizer("ViT-B-32")(texts).numpy()
    assert (tok.encode_batch(texts, 77) == want).all()
    assert tok.decode_batch(want) == ["a photo of a cat .", "two dogs playing in the snow !!",
                                      "naïve café , 1 2 3 & x"]  # fmt: skip
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id) == (49408, 49406, 49407, 0)


def _save(oc, config, tmp_path, name="model"):
    torch.save(oc.state_dict(), tmp_path / f"{name}.pt")
    (tmp_path / f"{name}.json").write_text(json.dumps(config))
    return tmp_path / f"{name}.json", tmp_path / f"{name}.pt"


def test_converter_errors(tmp_path):
    config = clip_config()
    with pytest.raises(ConversionError, match=r"unknown keys in vision_cfg: \['warp'\]"):
        model_config(dict(config, vision_cfg=dict(config["vision_cfg"], warp=1)))
    with pytest.raises(ConversionError, match=r"unknown keys in the top level: \['foo'\]"):
        model_config(dict(config, foo=1))
    oc = build(config)
    cfg = model_config(config)
    state = {k: v.numpy() for k, v in oc.state_dict().items()}
    broken = dict(state, extra_tensor=np.zeros(2))
    del broken["visual.ln_pre.bias"], broken["ln_final.weight"]
    with pytest.raises(
        ConversionError,
        match=r"missing tensors \['ln_final.weight', 'visual.ln_pre.bias'\]; "
        r"unexpected tensors \['extra_tensor'\]",
    ):
        convert_state_dict(broken, cfg)
    bad = dict(state, **{"visual.proj": np.zeros((64, 31), np.float32)})
    with pytest.raises(
        ConversionError, match=r"tensor visual.proj: expected shape \(64, 32\), found \(64, 31\)"
    ):
        convert_state_dict(bad, cfg)
    # The command line reports the same in one line.
    cfg_path, ckpt = _save(oc, dict(config, embed_dim=33), tmp_path)
    run = subprocess.run(
        [sys.executable, "-m", "mmjax", "convert", "open_clip", "--model-config", str(cfg_path),
         "--checkpoint", str(ckpt), "--out", str(tmp_path / "out")],
        capture_output=True, text=True, cwd=ROOT,
    )  # fmt: skip
    assert run.returncode == 2
    assert run.stderr.startswith("error: tensor ") and "expected shape" in run.stderr


@pytest.mark.slow
def test_converted_workdir_predicts_and_fine_tunes(tmp_path):
    from mmjax.inference.predictor import Predictor

    config = coca_config(image=32, patch=8, vw=32, vl=1, hw=16, tw=32, th=2, tl=1, ctx=15,
                         embed=32, queries=5, dl=1)  # fmt: skip
    config["text_cfg"]["vocab_size"] = config["multimodal_cfg"]["vocab_size"] = 49408
    oc = build(config, 5)
    cfg_path, ckpt = _save(oc, config, tmp_path)
    out = tmp_path / "converted"
    cfg = convert_open_clip(cfg_path, ckpt, out, progress=False)
    predictor = Predictor.from_workdir(out)
    texts = ["a red circle", "a blue square at the top"]
    tokens = predictor.tokenizer.encode_batch(texts, cfg.context_length - 1)
    with torch.no_grad():
        want = oc.encode_text(torch.from_numpy(tokens.astype(np.int64)), normalize=True).numpy()
    assert max_err(predictor.embed_texts(texts), want) <= TOL
    assert len(predictor.caption([np.zeros((32, 32, 3), np.uint8)])) == 1
    # Stopped by max_length before EOS: the rest of the row is padding, CLIP BPE's id 0, which
    # is also the token "!"; it must not be decoded (it was: 'preferred !!!!!!!!!!').
    from mmjax.inference.generate import GenerateOptions

    image = np.random.default_rng(1).integers(0, 255, (32, 32, 3), np.uint8)
    (short,) = predictor.caption([image], options=GenerateOptions(max_length=4))
    (full,) = predictor.caption([image])
    assert short and not short.endswith("!!") and len(short.split()) <= 4, short
    assert full.replace(" ", "").startswith(short.replace(" ", "")), (short, full)

    workdir = tmp_path / "finetune"
    run = subprocess.run(
        [sys.executable, "-m", "mmjax.train", "--config", "configs/coca.py:size=tiny",
         "--workdir", str(workdir), f"--config.init_from={out}", "--config.total_steps=20",
         "--config.batch_size=16", "--config.eval_every=1000", "--config.log_every=1",
         "--config.checkpoint_every=20", "--config.optimizer.warmup_steps=2",
         "--config.optimizer.learning_rate=0.001", "--config.data.eval_examples=32",
         "--config.eval.batch_size=16", "--config.eval.caption_examples=8"],
        capture_output=True, text=True, cwd=ROOT,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    assert "initialised the parameters from" in run.stderr + run.stdout
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    saved = json.loads((workdir / "config.json").read_text())
    assert saved["model"]["decoder"]["block"] == "split"
    assert saved["data"]["tokenizer_type"] == "clip_bpe"
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:3]), losses


def test_evaluate_reads_a_converted_clip(tmp_path):
    """mmjax.evaluate restores parameters only (a converted directory has no optimizer
    state) and skips captioning for a plain CLIP (no decoder)."""
    config = clip_config(image=32, patch=8, vw=32, vl=1, hw=16, tw=32, th=2, tl=1, ctx=16, embed=32)
    config["text_cfg"]["vocab_size"] = 49408
    cfg_path, ckpt = _save(build(config, 3), config, tmp_path)
    out = tmp_path / "clip"
    convert_open_clip(cfg_path, ckpt, out, progress=False)
    run = subprocess.run(
        [sys.executable, "-m", "mmjax.evaluate", "--workdir", str(out),
         "--config.data.eval_examples=40", "--config.eval.batch_size=16"],
        capture_output=True, text=True, cwd=ROOT,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    assert "evals.captioning: skipped, the model has no decoder" in run.stdout
    result = json.loads((out / "eval.json").read_text())
    assert result["step"] == 0 and result["eval/num_examples"] == 40
    assert 0 <= result["eval/i2t_r1"] <= 1 and "eval/caption_bleu4" not in result
    assert result["eval/zeroshot/num_examples"] == 40


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ViT-B-32", "coca_ViT-B-32"])
def test_full_size_b32_parity(name):
    config = json.loads(
        (Path(open_clip.__file__).parent / "model_configs" / f"{name}.json").read_text()
    )
    check_parity(config, seed=6, batch=2)
