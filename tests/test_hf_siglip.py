"""SigLIP in and out: a transformers SiglipModel directory and big_vision-named `.npz` weights
convert to mmjax with transformers' embeddings; a SigLIP run exports back to a SiglipModel that
transformers loads with every tensor equal. The big_vision weights reach transformers through
transformers' own SigLIP conversion script, so the two mappings are checked against each other.
"""

import io
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import sentencepiece as spm
from PIL import Image

from mmjax.interop.export import read_run
from mmjax.models.coca import CoCa
from mmjax.text.siglip import SiglipTokenizer
from tests.runs import REPO, mmjax_cli
from tests.test_open_clip_parity import TOL, max_err, torch  # noqa: F401 (skips without torch)

transformers = pytest.importorskip("transformers")

VOCAB, LENGTH, SIZE = 128, 12, 32
CAPTIONS = [
    "A photo of a Cat!",
    "two dogs, running on the grass.",
    "a red  car",
    "the big tree " * 6,  # Longer than the context: cut, still ending with EOS.
]


def _spiece(path):
    """A SentencePiece model in SigLIP's (T5's) id layout: pad 0, EOS 1, unk 2, no BOS."""
    words = "a photo of the cat dog dogs two red car running on grass blue small big tree".split()
    rng = np.random.default_rng(0)
    lines = [" ".join(rng.choice(words, 6)) for _ in range(400)]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, model_type="bpe",
        vocab_size=VOCAB, hard_vocab_limit=False, pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
        minloglevel=2,
    )  # fmt: skip
    path.write_bytes(model.getvalue())


def _config(vision=None, text=None):
    v = dict(hidden_size=32, intermediate_size=48, num_attention_heads=2, num_hidden_layers=2,
             image_size=SIZE, patch_size=8)  # fmt: skip
    t = dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=2,
             vocab_size=VOCAB, max_position_embeddings=LENGTH)  # fmt: skip
    return transformers.SiglipConfig(text_config={**t, **(text or {})},
                                     vision_config={**v, **(vision or {})})  # fmt: skip


def _perturb(model, seed=0):
    torch.manual_seed(seed)
    with torch.no_grad():  # Non-trivial biases and norms (transformers starts them at 0 / 1).
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name or name.startswith("logit"):
                p.add_(0.1 * torch.randn_like(p))
    return model


def _features(model, pixels, ids):
    x = pixels.astype(np.float32) / 255.0
    x = torch.from_numpy(((x - 0.5) / 0.5).transpose(0, 3, 1, 2).copy())
    with torch.no_grad():
        image = model.get_image_features(pixel_values=x)
        text = model.get_text_features(input_ids=torch.from_numpy(ids.astype(np.int64)))
    norm = lambda a: (a / a.norm(dim=-1, keepdim=True)).numpy()
    return norm(image), norm(text)


def _mmjax_features(workdir, pixels, ids):
    cfg, _, params = read_run(str(workdir))
    out = jax.jit(CoCa(cfg).apply)(
        {"params": params}, jnp.asarray(pixels), jnp.asarray(ids, jnp.int32)
    )
    return np.asarray(out["image_emb"]), np.asarray(out["text_emb"]), out


def _pixels(seed=0):
    shape = (len(CAPTIONS), SIZE, SIZE, 3)
    return np.random.default_rng(seed).integers(0, 256, shape, np.uint8)


def test_siglip_tokenizer_matches_transformers(tmp_path):
    _spiece(tmp_path / "spiece.model")
    ours = SiglipTokenizer.load(tmp_path / "spiece.model")
    theirs = transformers.SiglipTokenizer(str(tmp_path / "spiece.model"), model_max_length=LENGTH)
    want = theirs(CAPTIONS, padding="max_length", truncation=True, max_length=LENGTH)["input_ids"]
    rows = ours.encode_batch(CAPTIONS, LENGTH)
    np.testing.assert_array_equal(rows, np.asarray(want))
    assert ours.pad_id == ours.eos_id == 1 and rows[0, -1] == 1
    assert ours.encode(CAPTIONS[-1], LENGTH)[1]  # Cut, still ending with EOS.
    assert ours.decode(rows[0]) == "a photo of a cat"
    proc = mmjax_cli(tmp_path, "tokenizer", "encode", "spiece.model", CAPTIONS[0],
                     "--type", "siglip", "--context-length", str(LENGTH))  # fmt: skip
    end = want[0].index(1) + 1  # Up to and with the EOS; the EOS padding after it is left out.
    assert proc.stdout.split() == [str(i) for i in want[0][:end]], proc.stderr[-2000:]


def test_hf_siglip_in_and_out(tmp_path):
    model = _perturb(transformers.SiglipModel(_config()).eval())
    model.save_pretrained(tmp_path / "hf")
    _spiece(tmp_path / "hf" / "spiece.model")
    proc = mmjax_cli(tmp_path, "convert", "hf", "--model-dir", "hf", "--out", "imported")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == f"wrote imported: SigLIP, image {SIZE}px, context {LENGTH}"
    config = json.loads((tmp_path / "imported" / "config.json").read_text())
    assert config["data"]["tokenizer_type"] == "siglip"
    assert config["loss"]["contrastive"] == "sigmoid"

    ids = SiglipTokenizer.load(tmp_path / "imported" / "spiece.model").encode_batch(
        CAPTIONS, LENGTH
    )
    pixels = _pixels()
    image, text, out = _mmjax_features(tmp_path / "imported", pixels, ids)
    want_image, want_text = _features(model, pixels, ids)
    assert max_err(image, want_image) <= TOL and max_err(text, want_text) <= TOL
    assert abs(float(out["scale"]) - float(model.logit_scale.detach().exp())) <= 1e-5
    assert abs(float(out["bias"]) - float(model.logit_bias)) <= 1e-6

    # `mmjax embed` tokenizes with the workdir's SigLIP tokenizer: the same numbers.
    (tmp_path / "imgs").mkdir()
    for i, image in enumerate(pixels):
        Image.fromarray(image).save(tmp_path / "imgs" / f"{i}.png")
    (tmp_path / "texts.txt").write_text("\n".join(CAPTIONS) + "\n")
    proc = mmjax_cli(tmp_path, "embed", "--workdir", "imported", "--images", "imgs",
                     "--texts", "texts.txt", "--out", "emb.npz")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = np.load(tmp_path / "emb.npz")
    assert max_err(got["image_emb"], want_image) <= TOL
    assert max_err(got["text_emb"], want_text) <= TOL
    assert abs(float(got["logit_bias"]) - float(model.logit_bias)) <= 1e-6

    proc = mmjax_cli(tmp_path, "export", "hf", "--workdir", "imported", "--out", "exported")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout)["model"] == "SiglipModel"
    back = transformers.AutoModel.from_pretrained(tmp_path / "exported").eval()
    assert type(back).__name__ == "SiglipModel"
    want = model.state_dict()
    for name, tensor in back.state_dict().items():
        assert torch.equal(tensor, want[name]), name
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "exported", use_fast=False)
    got = tok(CAPTIONS, padding="max_length", truncation=True, max_length=LENGTH)["input_ids"]
    np.testing.assert_array_equal(np.asarray(got), ids)


def _big_vision_params(cfg, seed=0):
    """Random weights named and shaped as big_vision's SigLIP writes them (unscanned)."""
    rng = np.random.default_rng(seed)
    v, t = cfg.vision_config, cfg.text_config
    r = lambda *shape: rng.normal(0, 0.2, shape).astype(np.float32)
    p = {}

    def block(prefix, d, heads, mlp):
        k = d // heads
        p.update({f"{prefix}/LayerNorm_0/scale": 1 + r(d), f"{prefix}/LayerNorm_0/bias": r(d),
                  f"{prefix}/LayerNorm_1/scale": 1 + r(d), f"{prefix}/LayerNorm_1/bias": r(d),
                  f"{prefix}/MlpBlock_0/Dense_0/kernel": r(d, mlp),
                  f"{prefix}/MlpBlock_0/Dense_0/bias": r(mlp),
                  f"{prefix}/MlpBlock_0/Dense_1/kernel": r(mlp, d),
                  f"{prefix}/MlpBlock_0/Dense_1/bias": r(d)})  # fmt: skip
        a = f"{prefix}/MultiHeadDotProductAttention_0"
        for name in ("query", "key", "value"):
            p[f"{a}/{name}/kernel"], p[f"{a}/{name}/bias"] = r(d, heads, k), r(heads, k)
        p[f"{a}/out/kernel"], p[f"{a}/out/bias"] = r(heads, k, d), r(d)

    d, pt = v.hidden_size, v.patch_size
    p["params/img/embedding/kernel"], p["params/img/embedding/bias"] = r(pt, pt, 3, d), r(d)
    p["params/img/pos_embedding"] = r(1, (v.image_size // pt) ** 2, d)
    for i in range(v.num_hidden_layers):
        block(f"params/img/Transformer/encoderblock_{i}", d, v.num_attention_heads,
              v.intermediate_size)  # fmt: skip
    p["params/img/Transformer/encoder_norm/scale"] = 1 + r(d)
    p["params/img/Transformer/encoder_norm/bias"] = r(d)
    block("params/img/MAPHead_0", d, v.num_attention_heads, v.intermediate_size)
    for name in ("LayerNorm_1/scale", "LayerNorm_1/bias"):  # The head has one LayerNorm.
        del p[f"params/img/MAPHead_0/{name}"]
    p["params/img/MAPHead_0/probe"] = r(1, 1, d)
    w = t.hidden_size
    p["params/txt/Embed_0/embedding"] = r(t.vocab_size, w)
    p["params/txt/pos_embedding"] = r(1, t.max_position_embeddings, w)
    for i in range(t.num_hidden_layers):
        block(f"params/txt/Encoder_0/encoderblock_{i}", w, t.num_attention_heads,
              t.intermediate_size)  # fmt: skip
    p["params/txt/Encoder_0/encoder_norm/scale"] = 1 + r(w)
    p["params/txt/Encoder_0/encoder_norm/bias"] = r(w)
    p["params/txt/head/kernel"], p["params/txt/head/bias"] = r(w, w), r(w)
    p["params/t"], p["params/b"] = np.asarray([2.3], np.float32), np.asarray([-3.0], np.float32)
    return p


def _through_conversion_script(params, cfg):
    """transformers' SiglipModel loaded from big_vision-named weights by its own script."""
    from transformers.models.siglip import convert_siglip_to_hf as script

    state = dict(params)
    for src, dest in script.create_rename_keys(cfg):
        script.rename_key(state, src, dest, cfg)
    script.read_in_q_k_v_head(state, cfg)
    model = transformers.SiglipModel(cfg).eval()
    model.load_state_dict(state)
    return model


@pytest.mark.slow
def test_big_vision_npz_imports_with_transformers_parity(tmp_path):
    # Ti/8 (width 192, 12 layers, 3 heads, MLP 768) at 32 px; a small text tower of the
    # same width (SiglipModel's text head keeps the width).
    cfg = _config(
        vision=dict(hidden_size=192, intermediate_size=768, num_attention_heads=3,
                    num_hidden_layers=12),
        text=dict(hidden_size=192, intermediate_size=384, num_attention_heads=3),
    )  # fmt: skip
    params = _big_vision_params(cfg)
    np.savez(tmp_path / "siglip.npz", **params)
    scanned = {k: v for k, v in params.items() if "encoderblock_" not in k}
    for tower, depth in (("img/Transformer", 12), ("txt/Encoder_0", 2)):
        names = {k.split("/", 4)[4] for k in params if f"{tower}/encoderblock_0/" in k}
        for name in names:
            layers = [params[f"params/{tower}/encoderblock_{i}/{name}"] for i in range(depth)]
            scanned[f"params/{tower}/encoderblock/{name}"] = np.stack(layers)
    np.savez(tmp_path / "scanned.npz", **scanned)
    _spiece(tmp_path / "c4.model")
    model = _through_conversion_script(params, cfg)

    ids = SiglipTokenizer.load(tmp_path / "c4.model").encode_batch(CAPTIONS, LENGTH)
    pixels = _pixels()
    want_image, want_text = _features(model, pixels, ids)
    for npz in ("siglip.npz", "scanned.npz"):
        out = npz.replace(".npz", "_w")
        proc = mmjax_cli(tmp_path, "convert", "big_vision", npz, "--variant", "Ti/8",
                         "--tokenizer", "c4.model", "--out", out)  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-2000:]
    image, text, result = _mmjax_features(tmp_path / "siglip_w", pixels, ids)
    assert max_err(image, want_image) <= TOL and max_err(text, want_text) <= TOL
    assert abs(float(result["scale"]) - float(np.exp(2.3))) <= 1e-4
    assert abs(float(result["bias"]) + 3.0) <= 1e-6
    # The scanned layout gives the same parameters, hence the same embeddings.
    _, _, unrolled = read_run(str(tmp_path / "siglip_w"))
    _, _, scanned = read_run(str(tmp_path / "scanned_w"))
    jax.tree.map(np.testing.assert_array_equal, unrolled, scanned)

    proc = mmjax_cli(tmp_path, "convert", "big_vision", "siglip.npz", "--variant", "S/8",
                     "--tokenizer", "c4.model", "--out", "wrong")  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: checkpoint is not a S/8 image tower: width 192 (variant: 384), "
        "mlp_dim 768 (variant: 1536), heads 3 (variant: 6)"
    ]


def test_siglip_refusals_are_one_line(tmp_path):
    model = transformers.SiglipModel(_config(vision=dict(hidden_size=48))).eval()
    model.save_pretrained(tmp_path / "hf")
    _spiece(tmp_path / "hf" / "spiece.model")
    proc = mmjax_cli(tmp_path, "convert", "hf", "--model-dir", "hf", "--out", "x")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: config.json: the text head's output (32) must equal the image tower's width "
        "(48): SigLIP's image embedding is its pooled vector"
    ]
    model = transformers.SiglipModel(_config()).eval()
    model.save_pretrained(tmp_path / "hf2")
    proc = mmjax_cli(tmp_path, "convert", "hf", "--model-dir", "hf2", "--out", "y")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: SigLIP tokenizer hf2/spiece.model not found: pass --tokenizer PATH (its "
        "SentencePiece model)"
    ]


@pytest.mark.slow
def test_a_fine_tuned_siglip_exports_to_transformers(tmp_path):
    """Converted, fine-tuned with the sigmoid loss (configs/siglip.py without its caption
    loss), exported: transformers loads the changed weights and gives mmjax's embeddings."""
    model = _perturb(transformers.SiglipModel(_config()).eval())
    model.save_pretrained(tmp_path / "hf")
    _spiece(tmp_path / "hf" / "spiece.model")
    assert (
        mmjax_cli(tmp_path, "convert", "hf", "--model-dir", "hf", "--out", "conv").returncode == 0
    )
    proc = mmjax_cli(
        tmp_path, "train", "--config", f"{REPO}/configs/siglip.py:size=tiny", "--workdir", "ft",
        "--config.init_from=conv", "--config.loss.caption_weight=0", "--config.total_steps=10",
        "--config.batch_size=16", "--config.eval_every=1000", "--config.checkpoint_every=10",
        "--config.data.eval_examples=32", "--config.eval.batch_size=16",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = mmjax_cli(tmp_path, "export", "hf", "--workdir", "ft", "--out", "exported")
    assert proc.returncode == 0, proc.stderr[-3000:]
    back = transformers.AutoModel.from_pretrained(tmp_path / "exported").eval()
    before = model.state_dict()
    changed = [n for n, t in back.state_dict().items() if not torch.equal(t, before[n])]
    assert "text_model.head.bias" in changed and len(changed) > 40, changed
    ids = SiglipTokenizer.load(tmp_path / "conv" / "spiece.model").encode_batch(CAPTIONS, LENGTH)
    pixels = _pixels(1)
    image, text, _ = _mmjax_features(tmp_path / "ft", pixels, ids)
    want_image, want_text = _features(back, pixels, ids)
    assert max_err(image, want_image) <= TOL and max_err(text, want_text) <= TOL
