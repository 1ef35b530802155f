"""Patch dropout (model.patch_dropout, FLIP): what is kept, that the rest is really dropped,
that micro-batching and evaluation are unaffected, and the one-line refusals."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from mmjax.models.coca import CoCa
from mmjax.models.config import ModelConfig
from mmjax.models.flops import train_flops_per_step
from mmjax.models.patch_dropout import keep_indices
from mmjax.runtime.config import ConfigError, load_config
from mmjax.training.objective import loss_and_grads

BATCH = 8


def _cfg(**overrides):
    return ModelConfig.sized("tiny", overrides)


def _batch(cfg, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (BATCH, cfg.image_size, cfg.image_size, 3), dtype=np.uint8)
    tokens = rng.integers(4, cfg.vocab_size, (BATCH, cfg.context_length)).astype(np.int32)
    tokens[:, 0], tokens[:, -1] = 2, 3
    return jnp.asarray(images), jnp.asarray(tokens)


def _params(cfg, images, tokens):
    return nn.unbox(jax.jit(CoCa(cfg).init)(jax.random.key(0), images, tokens)["params"])


def test_each_example_keeps_distinct_patches_drawn_from_its_own_index():
    key = jax.random.key(3)
    keep = np.asarray(keep_indices(key, jnp.arange(8), 64, 16))
    assert keep.shape == (8, 16) and keep.min() >= 0 and keep.max() < 64
    assert all(len(set(row)) == 16 for row in keep)
    assert len({tuple(sorted(row)) for row in keep}) == 8  # Every image its own subset.
    # A slice of the batch (a micro-batch, a shard) draws the same subsets for its examples.
    np.testing.assert_array_equal(keep_indices(key, jnp.arange(8)[5:], 64, 16), keep[5:])
    other = np.asarray(keep_indices(jax.random.key(4), jnp.arange(8), 64, 16))
    assert not np.array_equal(np.sort(other, 1), np.sort(keep, 1))  # Next step: new subsets.


@pytest.mark.parametrize("class_token", [False, True])
def test_all_patches_in_any_order_give_the_plain_model(class_token):
    """Kept tokens carry their own positions: keeping every patch, shuffled, changes
    nothing (the towers and poolers are order-free), so the gather and the positions are
    right, the class token's included."""
    overrides = {"vision.class_token": True, "vision.ln_pre": True} if class_token else {}
    cfg = _cfg(**overrides)
    images, tokens = _batch(cfg)
    params = _params(cfg, images, tokens)
    model = CoCa(cfg)
    perm = jnp.stack(
        [jax.random.permutation(jax.random.key(i), cfg.num_patches) for i in range(BATCH)]
    )
    plain = model.apply({"params": params}, images, method=CoCa.encode_image)
    shuffled = model.apply({"params": params}, images, perm, method=CoCa.encode_image)
    for a, b in zip(plain, shuffled, strict=True):
        np.testing.assert_allclose(a, b, atol=2e-5)


def test_dropped_patches_get_no_gradient_and_kept_ones_do():
    cfg = _cfg(patch_dropout=0.75)
    images, tokens = _batch(cfg)
    params = _params(cfg, images, tokens)
    keep = keep_indices(jax.random.key(1), jnp.arange(BATCH), cfg.num_patches, cfg.kept_patches)
    assert keep.shape == (BATCH, cfg.num_patches // 4)

    def embedding_sum(pixels):
        emb, tokens_ = CoCa(cfg).apply({"params": params}, pixels, keep, method=CoCa.encode_image)
        return jnp.sum(emb) + jnp.sum(tokens_)

    grad = jax.grad(embedding_sum)(images.astype(jnp.float32) / 255.0)
    p, side = cfg.vision.patch_size, cfg.image_size // cfg.vision.patch_size
    per_patch = np.abs(np.asarray(grad)).reshape(BATCH, side, p, side, p, 3).sum((2, 4, 5))
    per_patch = per_patch.reshape(BATCH, -1)
    kept = np.zeros_like(per_patch, bool)
    np.put_along_axis(kept, np.asarray(keep), True, axis=1)
    assert np.all(per_patch[~kept] == 0.0)
    assert np.all(per_patch[kept] > 0.0)


def _loss_config():
    return ml_collections.ConfigDict(
        dict(contrastive="softmax", contrastive_weight=1.0, caption_weight=2.0)
    )


def test_micro_batches_draw_the_same_patches_as_the_whole_batch():
    cfg = _cfg(patch_dropout=0.5)
    images, tokens = _batch(cfg)
    params = _params(cfg, images, tokens)
    batch = {"images": images, "tokens": tokens}
    key = jax.random.key(7)

    def run(microbatches, rng):
        fn = jax.jit(lambda p, b: loss_and_grads(
            p, b, model=CoCa(cfg), loss_config=_loss_config(), microbatches=microbatches, rng=rng
        ))  # fmt: skip
        return jax.device_get(fn(params, batch))

    whole, sliced, plain = run(1, key), run(4, key), run(1, None)
    np.testing.assert_allclose(whole[0], sliced[0], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(whole[2]), jax.tree.leaves(sliced[2]), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5 * (np.abs(b).max() + 1e-8) + 1e-7)
    assert abs(float(whole[0]) - float(plain[0])) > 1e-3  # Dropout did change the loss.


def test_evaluation_sees_every_patch():
    """The model never drops patches by itself: only the training objective passes a
    subset, so a patch-dropout model evaluates exactly as the same model without it."""
    cfg = _cfg(patch_dropout=0.5)
    images, tokens = _batch(cfg)
    params = _params(cfg, images, tokens)
    a = CoCa(cfg).apply({"params": params}, images, tokens)
    b = CoCa(cfg.replace({"patch_dropout": 0.0})).apply({"params": params}, images, tokens)
    for key in ("image_emb", "text_emb", "logits"):
        np.testing.assert_array_equal(a[key], b[key])


def test_flops_follow_the_kept_tokens():
    cfg = _cfg()
    half = cfg.replace({"patch_dropout": 0.5})
    assert half.kept_patches == cfg.num_patches // 2
    full, dropped = train_flops_per_step(cfg, 64), train_flops_per_step(half, 64)
    assert dropped < full
    # Only the image tower's blocks and poolers shrink: the text side is untouched.
    no_image = cfg.replace({"vision.layers": 0})
    assert full - dropped < full - train_flops_per_step(no_image, 64)


@pytest.mark.parametrize(
    "override,culprit",
    [
        ("model.patch_dropout=1.0", "model.patch_dropout=1.0 must be in [0, 1)"),
        ("model.patch_dropout=-0.1", "must be in [0, 1)"),
    ],
)
def test_bad_rates_are_refused_in_one_line(override, culprit):
    with pytest.raises(ConfigError, match=culprit.replace("[", r"\[").replace(")", r"\)")):
        load_config("configs/coca.py:size=tiny", [override])


def test_a_resnet_tower_refuses_patch_dropout():
    with pytest.raises(ConfigError, match="model.patch_dropout=0.5 needs the ViT tower"):
        load_config(
            "configs/coca.py:size=tiny", ["model.patch_dropout=0.5", "model.vision.encoder=resnet"]
        )
