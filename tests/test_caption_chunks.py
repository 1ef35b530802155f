"""loss.caption_logits=chunked: the LM head and cross-entropy a chunk of positions at a time
give the full computation's loss and gradients, and the step no longer holds [B, T, V]."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from mmjax.models.coca import CoCa
from mmjax.models.config import ModelConfig
from mmjax.training.losses import caption_loss, chunked_caption_loss
from mmjax.training.objective import caption_chunk, loss_and_grads


@pytest.mark.parametrize("chunk", [1, 4, 7, 64])  # Dividing T or not; one chunk past T.
def test_chunked_loss_and_gradients_equal_the_full_logits(chunk):
    b, t, w, v = 3, 13, 16, 50
    k = jax.random.split(jax.random.key(0), 4)
    hidden = jax.random.normal(k[0], (b, t, w))
    kernel = jax.random.normal(k[1], (w, v)) * 0.3
    bias = jax.random.normal(k[2], (v,))
    labels = jax.random.randint(k[3], (b, t), 1, v)
    labels = labels.at[0, 9:].set(0).at[2, 2:].set(0)  # Padding is ignored by both.

    def full(h, kern, bi):
        return caption_loss(h @ kern + bi, labels, 0)

    def chunked(h, kern, bi):
        return chunked_caption_loss(h, kern, bi, labels, 0, chunk=chunk)

    (want, want_count), (got, got_count) = full(hidden, kernel, bias), chunked(hidden, kernel, bias)
    assert int(got_count) == int(want_count) == 3 * 13 - 4 - 11
    np.testing.assert_allclose(got, want, rtol=1e-6)
    grad_full = jax.grad(lambda *a: full(*a)[0], (0, 1, 2))(hidden, kernel, bias)
    grad_chunked = jax.grad(lambda *a: chunked(*a)[0], (0, 1, 2))(hidden, kernel, bias)
    for a, b_ in zip(grad_chunked, grad_full):
        np.testing.assert_allclose(a, b_, rtol=1e-5, atol=1e-7)


def _batch(cfg, n=8, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, cfg.image_size, cfg.image_size, 3), dtype=np.uint8)
    tokens = rng.integers(4, cfg.vocab_size, (n, cfg.context_length)).astype(np.int32)
    tokens[:, 0] = 2
    for row, length in zip(tokens, rng.integers(3, cfg.context_length - 1, n)):
        row[length] = 3
        row[length + 1 :] = 0
    return {"images": jnp.asarray(images), "tokens": jnp.asarray(tokens)}


def _loss_config(mode, chunk=4):
    return ml_collections.ConfigDict(
        dict(contrastive="softmax", contrastive_weight=1.0, caption_weight=2.0,
             caption_logits=mode, caption_chunk=chunk)
    )  # fmt: skip


@pytest.mark.slow
def test_the_models_loss_and_gradients_are_unchanged(microbatches=2):
    """The default decoder with gradient accumulation (each micro-batch's caption loss is a
    share of the whole batch's token count)."""
    cfg = ModelConfig.sized("tiny", {"vision.layers": 1, "text.layers": 1, "decoder.layers": 1})
    model = CoCa(cfg)
    batch = _batch(cfg)
    params = model.init(jax.random.key(0), batch["images"], batch["tokens"])["params"]
    results = {}
    for mode in ("full", "chunked"):
        fn = jax.jit(
            lambda p, b, mode=mode: loss_and_grads(
                p, b, model=model, loss_config=_loss_config(mode), microbatches=microbatches
            )
        )
        results[mode] = jax.device_get(fn(params, batch))
    (loss_f, aux_f, grads_f), (loss_c, aux_c, grads_c) = results["full"], results["chunked"]
    np.testing.assert_allclose(loss_c, loss_f, rtol=1e-6)
    np.testing.assert_allclose(aux_c["caption_loss"], aux_f["caption_loss"], rtol=1e-6)
    for a, b in zip(jax.tree.leaves(grads_c), jax.tree.leaves(grads_f)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6 * float(np.max(np.abs(b))) + 1e-9)


def test_auto_chunks_from_a_large_vocabulary_and_bad_values_are_refused():
    small, large = ModelConfig.sized("tiny"), ModelConfig.sized("tiny", {"vocab_size": 65536})
    assert caption_chunk(_loss_config("auto", 8), small) == 0
    assert caption_chunk(_loss_config("auto", 8), large) == 8
    assert caption_chunk(_loss_config("full"), large) == 0
    assert caption_chunk(_loss_config("chunked", 3), small) == 3
    assert caption_chunk(_loss_config("chunked", 15), small) == 0  # One chunk: the full path.
    from mmjax.runtime.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"^loss.caption_logits='tiled' is unknown; allowed"):
        load_config("configs/coca.py:size=tiny", ["loss.caption_logits=tiled"])


@pytest.mark.slow
def test_the_compiled_step_no_longer_holds_the_full_logits():
    """XLA's own memory analysis of the gradient step, vocabulary 65536: chunked saves at
    least the [B, T, V] f32 logits the full computation keeps for its backward pass."""
    cfg = ModelConfig.sized("tiny", {"vocab_size": 65536, "vision.layers": 1,
                                     "text.layers": 1, "decoder.layers": 1})  # fmt: skip
    model = CoCa(cfg)
    batch = _batch(cfg, n=16)
    params = jax.eval_shape(
        lambda: model.init(jax.random.key(0), batch["images"], batch["tokens"])["params"]
    )
    temp = {}
    for mode in ("full", "chunked"):
        fn = jax.jit(
            lambda p, b, mode=mode: loss_and_grads(
                p, b, model=model, loss_config=_loss_config(mode, chunk=5)
            )
        )
        compiled = fn.lower(params, batch).compile()
        temp[mode] = compiled.memory_analysis().temp_size_in_bytes
    logits_bytes = 16 * (cfg.context_length - 1) * cfg.vocab_size * 4
    assert temp["full"] - temp["chunked"] > logits_bytes, temp
