"""Hugging Face CLIPModel directories: `mmjax convert hf` gives transformers' embeddings,
`mmjax export hf` gives back transformers' own model, both from relative paths."""

import gzip
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.interop.export import read_run
from mmjax.models.coca import CoCa
from tests.runs import mmjax_cli
from tests.test_open_clip_parity import TOL, max_err, open_clip, torch  # noqa: F401 (skips)

transformers = pytest.importorskip("transformers")


def _hf_model(act="quick_gelu", seed=0):
    config = transformers.CLIPConfig(
        text_config=dict(hidden_size=32, intermediate_size=64, num_attention_heads=2,
                         num_hidden_layers=2, vocab_size=49408, max_position_embeddings=16,
                         hidden_act=act),
        vision_config=dict(hidden_size=48, intermediate_size=96, num_attention_heads=3,
                           num_hidden_layers=2, image_size=32, patch_size=8, hidden_act=act),
        projection_dim=24,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = transformers.CLIPModel(config).eval()
    with torch.no_grad():  # Non-trivial biases and norms (transformers starts them at 0 / 1).
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def _inputs(seed=0, batch=3, length=16, size=32):
    rng = np.random.default_rng(seed)
    pixels = rng.random((batch, size, size, 3), dtype=np.float32)
    ids = np.zeros((batch, length), np.int64)
    for i, n in enumerate([5, 16, 9][:batch]):
        ids[i, :n] = rng.integers(1, 49405, n)
        ids[i, 0], ids[i, n - 1] = 49406, 49407
    return pixels, ids


def _hf_features(model, pixels, ids, mean, std):
    x = torch.from_numpy(((pixels - mean) / std).transpose(0, 3, 1, 2).copy())
    with torch.no_grad():
        image = model.get_image_features(pixel_values=x)
        text = model.get_text_features(input_ids=torch.from_numpy(ids))
    norm = lambda a: (a / a.norm(dim=-1, keepdim=True)).numpy()
    return norm(image), norm(text)


@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
def test_hf_clip_in_and_out(tmp_path, act):
    model = _hf_model(act)
    model.save_pretrained(tmp_path / "hf")
    proc = mmjax_cli(tmp_path, "convert", "hf", "--model-dir", "hf", "--out", "imported")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "wrote imported: CLIP, image 32px, context 16"

    cfg, _, params = read_run(str(tmp_path / "imported"))
    mean, std = np.asarray(cfg.image_mean, np.float32), np.asarray(cfg.image_std, np.float32)
    pixels, ids = _inputs()
    out = jax.jit(CoCa(cfg).apply)(
        {"params": params}, jnp.asarray(pixels), jnp.asarray(ids, jnp.int32)
    )
    want_image, want_text = _hf_features(model, pixels, ids, mean, std)
    assert max_err(out["image_emb"], want_image) <= TOL
    assert max_err(out["text_emb"], want_text) <= TOL

    proc = mmjax_cli(tmp_path, "export", "hf", "--workdir", "imported", "--out", "exported")
    assert proc.returncode == 0, proc.stderr[-2000:]
    back = transformers.AutoModel.from_pretrained(tmp_path / "exported").eval()
    assert type(back).__name__ == "CLIPModel"
    want = model.state_dict()
    for name, tensor in back.state_dict().items():
        assert torch.equal(tensor, want[name]), name
    got_image, got_text = _hf_features(back, pixels, ids, mean, std)
    assert max_err(got_image, want_image) <= TOL and max_err(got_text, want_text) <= TOL
    processor = json.loads((tmp_path / "exported" / "preprocessor_config.json").read_text())
    assert processor["crop_size"] == {"height": 32, "width": 32}


def test_what_mmjax_cannot_represent_is_refused_in_one_line(tmp_path):
    model = _hf_model()
    model.save_pretrained(tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    config["text_config"]["hidden_act"] = "relu"
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    proc = mmjax_cli(tmp_path, "convert", "hf", "--model-dir", "hf", "--out", "x")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: config.json: hidden_act ['quick_gelu', 'relu'] is not supported (both towers "
        "one of ['gelu', 'quick_gelu'])"
    ]
    proc = mmjax_cli(tmp_path, "convert", "hf", "--model-dir", "nowhere", "--out", "x")
    assert proc.stderr.strip().splitlines() == ["error: --model-dir nowhere: no config.json"]


def test_a_model_directorys_tokenizer_files_are_its_tokenizer(tmp_path):
    """merges.txt + vocab.json as transformers saves them (CLIP's BPE) become the workdir's
    tokenizer, copied into it; a vocab.json that disagrees with the merges is refused."""
    from mmjax.interop.open_clip import default_bpe_vocab
    from mmjax.text.registry import load_tokenizer

    merges = gzip.decompress(default_bpe_vocab().read_bytes()).decode().split("\n")[1 : 48894 + 1]
    # open_clip's own names for the special tokens -> CLIP's (transformers' vocab.json).
    special = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    vocab = {special.get(k, k): v for k, v in open_clip.tokenizer.SimpleTokenizer().encoder.items()}
    _hf_model().save_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    (tmp_path / "hf" / "vocab.json").write_text(json.dumps(vocab))
    proc = mmjax_cli(tmp_path, "convert", "hf", "--model-dir", "hf", "--out", "imported")
    assert proc.returncode == 0, proc.stderr[-2000:]
    config = json.loads((tmp_path / "imported" / "config.json").read_text())
    assert Path(config["data"]["tokenizer"]) == (tmp_path / "imported" / "merges.txt").resolve()
    ours = load_tokenizer(config["data"]["tokenizer"], config["data"]["tokenizer_type"])
    theirs = transformers.CLIPTokenizer(str(tmp_path / "hf" / "vocab.json"),
                                        str(tmp_path / "hf" / "merges.txt"))  # fmt: skip
    for text in ["a photo of a cat", "two dogs running on grass", "naïve café"]:
        want = theirs(text)["input_ids"]
        assert ours.encode(text, 16)[0][: len(want)].tolist() == want, text

    vocab["a</w>"] += 1
    (tmp_path / "hf" / "vocab.json").write_text(json.dumps(vocab))
    proc = mmjax_cli(tmp_path, "convert", "hf", "--model-dir", "hf", "--out", "again")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: hf/vocab.json disagrees with merges.txt on 1 pieces (first: 'a</w>'); not "
        "CLIP's byte-level BPE"
    ]
