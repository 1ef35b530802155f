"""Attention masks, checked by perturbation on the tiny CoCa (random init, f32).

Each test changes one input (a token, a patch, the embedding of PAD) and checks which outputs
may move and which must not: the text encoder and the decoder are causal, padding is invisible
to every real position and to the CLS embedding, the ViT is bidirectional, and examples in a
batch never see each other.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.models.coca import CoCa
from mmjax.models.config import SIZES, ModelConfig

PAD, BOS, EOS = 0, 1, 2
EXACT = dict(rtol=0, atol=1e-6)  # Masked keys get zero weight, so "unchanged" is near exact.


@pytest.fixture(scope="module")
def setup():
    cfg = ModelConfig.sized("tiny", {"dtype": "float32"})
    model = CoCa(cfg)
    rng = np.random.default_rng(0)
    b, length = 4, cfg.context_length
    images = rng.integers(0, 256, (b, cfg.image_size, cfg.image_size, 3), dtype=np.uint8)
    # Full-length captions: every position is a real token.
    full = rng.integers(3, cfg.vocab_size, (b, length)).astype(np.int32)
    full[:, 0] = BOS
    full[:, -1] = EOS
    # Padded captions with EOS at different positions.
    padded = full.copy()
    eos_at = [3, 6, 10, 14]
    for row, e in enumerate(eos_at):
        padded[row, e] = EOS
        padded[row, e + 1 :] = PAD
    params = nn.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), images, full)["params"])
    return dict(
        model=model,
        cfg=cfg,
        params=params,
        images=images,
        full=full,
        padded=padded,
        eos_at=eos_at,
        encode_text=jax.jit(functools.partial(model.apply, method=CoCa.encode_text)),
        forward=jax.jit(model.apply),
        encode_image=jax.jit(
            functools.partial(
                model.apply,
                method=CoCa.encode_image,
                capture_intermediates=lambda mdl, _: mdl.path == ("image_encoder", "blocks"),
            )
        ),
    )


def _text(s, params, tokens):
    emb, features = s["encode_text"]({"params": params}, jnp.asarray(tokens))
    return np.asarray(emb), np.asarray(features)


def _logits(s, params, images, tokens):
    return np.asarray(
        s["forward"]({"params": params}, jnp.asarray(images), jnp.asarray(tokens))["logits"]
    )


def _replace_token(tokens, j, rng):
    out = tokens.copy()
    new = rng.integers(3, 256, out.shape[0]).astype(np.int32)
    new = np.where(new == out[:, j], 3 + (new - 2) % 253, new)  # Guaranteed different.
    out[:, j] = new
    return out


@pytest.mark.parametrize("j", [1, 4, 9, 14])
def test_text_encoder_is_causal(setup, j):
    s, rng = setup, np.random.default_rng(j)
    emb, feats = _text(s, s["params"], s["full"])
    assert feats.shape == (4, s["cfg"].context_length - 1, s["cfg"].text.width)
    emb2, feats2 = _text(s, s["params"], _replace_token(s["full"], j, rng))
    np.testing.assert_allclose(feats2[:, :j], feats[:, :j], **EXACT)
    # The changed position and everything after it see the new token, and so does CLS.
    assert np.all(np.abs(feats2[:, j:] - feats[:, j:]).max(axis=-1) > 1e-4)
    assert np.all(np.abs(emb2 - emb).max(axis=-1) > 1e-4)


def test_last_token_is_only_a_target(setup):
    """tokens[:, -1] is predicted, never read: changing it changes no model output."""
    s = setup
    changed = _replace_token(s["full"], s["cfg"].context_length - 1, np.random.default_rng(1))
    out = s["forward"]({"params": s["params"]}, s["images"], s["full"])
    out2 = s["forward"]({"params": s["params"]}, s["images"], changed)
    for key in ("text_emb", "image_emb", "logits"):
        np.testing.assert_allclose(np.asarray(out2[key]), np.asarray(out[key]), **EXACT)


def _perturb_pad_embedding(params, seed=0):
    emb = params["text_encoder"]["token_embed"]["embedding"]
    noise = 5.0 * jax.random.normal(jax.random.PRNGKey(seed), emb.shape[1:], emb.dtype)
    new = jax.tree.map(lambda x: x, params)
    new["text_encoder"]["token_embed"]["embedding"] = emb.at[PAD].add(noise)
    return new


def test_padding_is_invisible_to_cls_and_real_positions(setup):
    """Changing what PAD embeds to changes nothing a real position or CLS computes. A mask that
    let any real query (or CLS) attend to padding keys would move them."""
    s = setup
    perturbed = _perturb_pad_embedding(s["params"])
    emb, feats = _text(s, s["params"], s["padded"])
    emb2, feats2 = _text(s, perturbed, s["padded"])
    np.testing.assert_allclose(emb2, emb, **EXACT)
    logits = _logits(s, s["params"], s["images"], s["padded"])
    logits2 = _logits(s, perturbed, s["images"], s["padded"])
    for row, e in enumerate(s["eos_at"]):
        np.testing.assert_allclose(feats2[row, : e + 1], feats[row, : e + 1], **EXACT)
        # Logits at positions <= EOS (all positions the caption loss uses) are unchanged.
        np.testing.assert_allclose(logits2[row, : e + 1], logits[row, : e + 1], **EXACT)
        # The perturbation is real: the padded positions themselves do change.
        if e + 1 < feats.shape[1]:
            assert np.abs(feats2[row, e + 1 :] - feats[row, e + 1 :]).max() > 1e-3


def test_real_tokens_do_reach_cls(setup):
    """Positive control for the padding test: the same perturbation applied to a token that is
    in every caption moves the CLS embedding of every row."""
    s = setup
    emb, _ = _text(s, s["params"], s["padded"])
    table = s["params"]["text_encoder"]["token_embed"]["embedding"]
    params = jax.tree.map(lambda x: x, s["params"])
    params["text_encoder"]["token_embed"]["embedding"] = table.at[EOS].add(
        5.0 * jax.random.normal(jax.random.PRNGKey(0), table.shape[1:])
    )
    emb2, _ = _text(s, params, s["padded"])
    assert np.all(np.abs(emb2 - emb).max(axis=-1) > 1e-3)


@pytest.mark.parametrize("j", [1, 5, 13])
def test_decoder_is_causal(setup, j):
    s, rng = setup, np.random.default_rng(10 + j)
    logits = _logits(s, s["params"], s["images"], s["full"])
    assert logits.shape == (4, s["cfg"].context_length - 1, s["cfg"].vocab_size)
    logits2 = _logits(s, s["params"], s["images"], _replace_token(s["full"], j, rng))
    # logits[:, i] predicts tokens[:, i + 1] from tokens[:, :i + 1].
    np.testing.assert_allclose(logits2[:, :j], logits[:, :j], **EXACT)
    assert np.all(np.abs(logits2[:, j] - logits[:, j]).max(axis=-1) > 1e-4)


def test_decoder_sees_the_whole_image_from_the_first_position(setup):
    s = setup
    images = s["images"].copy()
    images[:, -4:, -4:] = 255 - images[:, -4:, -4:]  # Last patch only.
    logits = _logits(s, s["params"], s["images"], s["full"])
    logits2 = _logits(s, s["params"], images, s["full"])
    assert np.all(np.abs(logits2[:, 0] - logits[:, 0]).max(axis=-1) > 1e-4)


def _vit_tokens(s, images):
    """Token features after the ViT blocks, [B, patches, width], plus the image embedding."""
    (emb, _), state = s["encode_image"]({"params": s["params"]}, jnp.asarray(images))
    (tokens,) = state["intermediates"]["image_encoder"]["blocks"]["__call__"]
    return np.asarray(tokens), np.asarray(emb)


@pytest.mark.parametrize("corner", ["first", "last"])
def test_image_encoder_is_bidirectional(setup, corner):
    s = setup
    p = s["cfg"].vision.patch_size
    images = s["images"].copy()
    if corner == "last":
        images[:, -p:, -p:] = 255 - images[:, -p:, -p:]
        watched = 0  # A causal encoder would leave the first token unchanged.
    else:
        images[:, :p, :p] = 255 - images[:, :p, :p]
        watched = -1  # An anti-causal one would leave the last token unchanged.
    tokens, emb = _vit_tokens(s, s["images"])
    tokens2, emb2 = _vit_tokens(s, images)
    assert tokens.shape == (4, s["cfg"].num_patches, s["cfg"].vision.width)
    assert np.all(np.abs(tokens2[:, watched] - tokens[:, watched]).max(axis=-1) > 1e-4)
    assert np.all(np.abs(emb2 - emb).max(axis=-1) > 1e-5)


def test_examples_in_a_batch_are_independent(setup):
    """Masks broadcast per example: changing example 1 leaves example 0's outputs alone."""
    s = setup
    images, tokens = s["images"].copy(), s["padded"].copy()
    images[1:] = 255 - images[1:]
    tokens[1:] = _replace_token(tokens, 2, np.random.default_rng(3))[1:]
    out = s["forward"]({"params": s["params"]}, s["images"], s["padded"])
    out2 = s["forward"]({"params": s["params"]}, images, tokens)
    for key in ("image_emb", "text_emb", "logits"):
        np.testing.assert_allclose(np.asarray(out2[key])[0], np.asarray(out[key])[0], **EXACT)
        assert np.abs(np.asarray(out2[key])[1] - np.asarray(out[key])[1]).max() > 1e-5
