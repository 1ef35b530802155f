"""Gradient accumulation and rematerialisation change memory, never the gradient."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from mmjax.models.coca import CoCa
from mmjax.models.config import REMAT_POLICIES, SIZES, ModelConfig
from mmjax.models.layers import EncoderBlock, Stack
from mmjax.runtime.config import ConfigError, load_config
from mmjax.training.objective import loss_and_grads

BATCH = 16


def _model(overrides=None):
    cfg = ModelConfig.sized("tiny", overrides)
    return CoCa(cfg)


def _batch(cfg, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (BATCH, cfg.image_size, cfg.image_size, 3), dtype=np.uint8)
    tokens = rng.integers(4, cfg.vocab_size, (BATCH, cfg.context_length)).astype(np.int32)
    tokens[:, 0] = 2  # BOS
    # Captions of different lengths: the caption loss must weight by tokens, not by slice.
    lengths = rng.integers(3, cfg.context_length, BATCH)
    for row, length in zip(tokens, lengths, strict=True):
        row[length] = 3  # EOS
        row[length + 1 :] = 0  # PAD
    return {"images": jnp.asarray(images), "tokens": jnp.asarray(tokens)}


def _loss_config(contrastive="softmax", caption_weight=2.0):
    return ml_collections.ConfigDict(
        dict(contrastive=contrastive, contrastive_weight=1.0, caption_weight=caption_weight)
    )


def _grad_fn(model, loss_config, microbatches=1):
    fn = jax.jit(
        lambda p, b: loss_and_grads(
            p, b, model=model, loss_config=loss_config, microbatches=microbatches
        )
    )
    return lambda params, batch: jax.device_get(fn(params, batch))


def _grads(model, params, batch, loss_config, microbatches=1):
    return _grad_fn(model, loss_config, microbatches)(params, batch)


def _assert_close(a, b, rtol):
    """Leaf-wise closeness relative to each leaf's largest entry (float sums reorder)."""
    leaves_a, tree_a = jax.tree.flatten(a)
    leaves_b, tree_b = jax.tree.flatten(b)
    assert tree_a == tree_b
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), leaves_b, strict=True):
        scale = float(np.max(np.abs(y))) or 1.0
        np.testing.assert_allclose(
            x, y, rtol=0, atol=rtol * scale + 1e-8, err_msg=jax.tree_util.keystr(path)
        )


@pytest.fixture(scope="module")
def setup():
    model = _model()
    batch = _batch(model.cfg)
    # Jitted: an eager init dispatches (and compiles) every random draw one by one, ~4x slower.
    params = jax.jit(model.init)(jax.random.key(0), batch["images"], batch["tokens"])
    return model, nn.unbox(params["params"]), batch


@pytest.mark.parametrize(
    "contrastive,caption_weight",
    [pytest.param("softmax", 2.0, marks=pytest.mark.slow), ("sigmoid", 0.5)],
)
def test_four_microbatches_match_the_large_batch(setup, contrastive, caption_weight):
    model, params, batch = setup
    config = _loss_config(contrastive, caption_weight)
    loss, aux, grads = _grads(model, params, batch, config)
    loss4, aux4, grads4 = _grads(model, params, batch, config, microbatches=4)
    np.testing.assert_allclose(loss4, loss, rtol=1e-5)
    for key in aux:
        np.testing.assert_allclose(aux4[key], aux[key], rtol=1e-5, err_msg=key)
    _assert_close(grads4, grads, rtol=1e-5)
    if contrastive != "softmax":
        return
    # Not vacuous: naive accumulation, where each slice sees only its own negatives,
    # gives a different gradient.
    one_slice = _grad_fn(model, config)
    naive = [one_slice(params, {k: v[m::4] for k, v in batch.items()})[2] for m in range(4)]
    naive_scale = np.mean([g["logit_scale"] for g in naive])
    assert not np.allclose(naive_scale, grads["logit_scale"], rtol=1e-2)


def test_microbatches_must_divide_the_batch(setup):
    model, params, batch = setup
    with pytest.raises(ValueError, match="not divisible by 3 micro-batches"):
        _grads(model, params, batch, _loss_config(), microbatches=3)
    with pytest.raises(ConfigError, match="train.microbatches=3"):
        load_config("configs/coca.py:size=tiny,batch=16", ["train.microbatches=3"])


def _stack_grads(cfg, policy, x):
    """Gradients (params and input) of a 2-layer encoder stack under a remat policy."""
    stack = Stack(
        cfg,
        EncoderBlock,
        2,
        dict(num_heads=cfg.vision.heads, mlp_dim=cfg.vision.mlp_dim),
        remat=policy,
    )
    params = nn.unbox(stack.init(jax.random.key(0), x, None))
    loss = lambda p, x: jnp.sum(stack.apply(p, x, None) ** 2)
    fn = jax.jit(jax.grad(loss, argnums=(0, 1)))
    return fn, params


@pytest.mark.parametrize("scan_layers", [True, False])
def test_every_remat_policy_gives_the_same_gradients(scan_layers):
    cfg = ModelConfig.sized("tiny", {"scan_layers": scan_layers})
    x = jax.random.normal(jax.random.key(1), (4, 8, cfg.vision.width))
    fn, params = _stack_grads(cfg, "none", x)
    reference = jax.device_get(fn(params, x))
    for policy in REMAT_POLICIES[1:]:
        fn, _ = _stack_grads(cfg, policy, x)
        _assert_close(jax.device_get(fn(params, x)), reference, rtol=1e-6)


def test_remat_changes_what_the_backward_pass_keeps():
    # The policies are real: full remat keeps less of the forward pass for the backward.
    cfg = ModelConfig.sized("tiny")
    x = jax.random.normal(jax.random.key(1), (16, 64, cfg.vision.width))

    def temp_bytes(policy):
        fn, params = _stack_grads(cfg, policy, x)
        return fn.lower(params, x).compile().memory_analysis().temp_size_in_bytes

    assert temp_bytes("full") < temp_bytes("none")


@pytest.mark.slow
def test_per_tower_remat_gives_the_same_model_gradients(setup):
    model, params, batch = setup
    reference = _grads(model, params, batch, _loss_config())
    mixed = _model(
        {"vision.remat": "full", "text.remat": "minimal", "decoder.remat": "dots-saveable"}
    )
    _assert_close(_grads(mixed, params, batch, _loss_config()), reference, rtol=1e-6)


def test_unknown_remat_policy_is_a_config_error():
    with pytest.raises(ConfigError, match=r"model.text.remat='dots'.*'dots-saveable'"):
        load_config("configs/coca.py:size=tiny", ["model.text.remat=dots"])
