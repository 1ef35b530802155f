"""Losses against float64 NumPy references written out loop by loop, plus invariances."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.training import losses

# Jitted once per input shape: eager dispatch compiles every primitive separately and is slower.
_softmax = jax.jit(losses.softmax_contrastive_loss)
_sigmoid = jax.jit(losses.sigmoid_contrastive_loss)
_caption = jax.jit(losses.caption_loss, static_argnames="pad_id")


def _normalised(rng, batch, dim):
    x = rng.normal(size=(batch, dim))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _logsumexp(values):
    top = max(values)
    return top + math.log(sum(math.exp(v - top) for v in values))


def _reference_softmax(image, text, scale):
    batch = image.shape[0]
    sims = [[scale * float(np.dot(image[i], text[j])) for j in range(batch)] for i in range(batch)]
    i2t = sum(_logsumexp(sims[i]) - sims[i][i] for i in range(batch)) / batch
    t2i = (
        sum(_logsumexp([sims[i][j] for i in range(batch)]) - sims[j][j] for j in range(batch))
        / batch
    )
    return 0.5 * (i2t + t2i)


def _log_sigmoid(x):
    # log(1 / (1 + e^-x)), written in the two stable branches.
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def _reference_sigmoid(image, text, scale, bias):
    batch = image.shape[0]
    total = 0.0
    for i in range(batch):
        for j in range(batch):
            z = 1.0 if i == j else -1.0
            total += _log_sigmoid(z * (scale * float(np.dot(image[i], text[j])) + bias))
    return -total / batch


def _reference_caption(logits, labels, pad_id):
    total, count = 0.0, 0
    for index in np.ndindex(labels.shape):
        if labels[index] == pad_id:
            continue
        row = logits[index].astype(np.float64)
        total += _logsumexp(list(row)) - row[labels[index]]
        count += 1
    return (total / count if count else 0.0), count


@pytest.mark.parametrize("batch", [1, 2, 7, 32])
@pytest.mark.parametrize("scale", [1.0, 14.3, 100.0])
def test_softmax_matches_reference(batch, scale):
    rng = np.random.default_rng(batch)
    image, text = _normalised(rng, batch, 16), _normalised(rng, batch, 16)
    got = _softmax(jnp.asarray(image, jnp.float32), jnp.asarray(text, jnp.float32), scale)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(
        float(got), _reference_softmax(image, text, scale), rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("batch", [1, 2, 7, 32])
@pytest.mark.parametrize("scale,bias", [(10.0, -10.0), (1.0, 0.0), (50.0, 3.0)])
def test_sigmoid_matches_reference(batch, scale, bias):
    rng = np.random.default_rng(100 + batch)
    image, text = _normalised(rng, batch, 16), _normalised(rng, batch, 16)
    got = _sigmoid(jnp.asarray(image, jnp.float32), jnp.asarray(text, jnp.float32), scale, bias)
    want = _reference_sigmoid(image, text, scale, bias)
    np.testing.assert_allclose(float(got), want, rtol=1e-5, atol=1e-5)


def test_softmax_is_symmetric_in_image_and_text():
    rng = np.random.default_rng(0)
    image, text = _normalised(rng, 9, 8), _normalised(rng, 9, 8)
    forward = _softmax(image, text, 5.0)
    swapped = _softmax(text, image, 5.0)
    np.testing.assert_allclose(float(forward), float(swapped), rtol=1e-6)
    # A one-directional implementation would still pass the symmetry check on symmetric data, so
    # also check that the two directions genuinely differ on this data and are both included.
    sims = 5.0 * image @ text.T
    i2t = np.mean(np.log(np.exp(sims).sum(1)) - np.diag(sims))
    t2i = np.mean(np.log(np.exp(sims).sum(0)) - np.diag(sims))
    assert abs(i2t - t2i) > 1e-3
    np.testing.assert_allclose(float(forward), 0.5 * (i2t + t2i), rtol=1e-5)


def test_aligned_embeddings_give_near_zero_loss():
    # Orthonormal pairs, image i == text i: the correct pair has similarity 1, all others 0.
    embeddings = np.eye(8, dtype=np.float32)
    assert float(_softmax(embeddings, embeddings, 100.0)) < 1e-6
    assert float(_sigmoid(embeddings, embeddings, 100.0, -50.0)) < 1e-6
    # And a mismatched pairing with the same large scale is heavily penalised.
    shuffled = embeddings[::-1]
    assert float(_softmax(embeddings, shuffled, 100.0)) > 50.0
    assert float(_sigmoid(embeddings, shuffled, 100.0, -50.0)) > 50.0


def test_gradients_are_finite():
    rng = np.random.default_rng(3)
    image = jnp.asarray(_normalised(rng, 16, 8), jnp.float32)
    text = jnp.asarray(_normalised(rng, 16, 8), jnp.float32)

    grads = jax.jit(jax.grad(losses.softmax_contrastive_loss, argnums=(0, 1, 2)))(
        image, text, 100.0
    )
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in grads)
    grads = jax.jit(jax.grad(losses.sigmoid_contrastive_loss, argnums=(0, 1, 2, 3)))(
        image, text, 100.0, -10.0
    )
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in grads)

    logits = jnp.asarray(rng.normal(size=(2, 5, 11)) * 30, jnp.float32)
    labels = jnp.asarray(rng.integers(0, 11, size=(2, 5)), jnp.int32)
    grad = jax.jit(jax.grad(lambda x: losses.caption_loss(x, labels)[0]))(logits)
    assert bool(jnp.all(jnp.isfinite(grad)))


def test_losses_jit():
    rng = np.random.default_rng(4)
    image = jnp.asarray(_normalised(rng, 6, 8), jnp.float32)
    text = jnp.asarray(_normalised(rng, 6, 8), jnp.float32)
    for name in ("softmax", "sigmoid"):
        fn = jax.jit(lambda i, t, s, b, name=name: losses.contrastive_loss(name, i, t, s, b))
        eager = losses.contrastive_loss(name, image, text, 10.0, -10.0)
        np.testing.assert_allclose(float(fn(image, text, 10.0, -10.0)), float(eager), rtol=1e-6)


@pytest.mark.parametrize("shape", [(4, 9), (1, 1), (3, 2, 5)])
def test_caption_loss_matches_reference(shape):
    rng = np.random.default_rng(sum(shape))
    vocab = 13
    logits = rng.normal(size=shape + (vocab,)) * 3
    labels = rng.integers(0, vocab, size=shape)
    labels.flat[0] = 5  # at least one real token
    loss, count = _caption(jnp.asarray(logits, jnp.float32), jnp.asarray(labels, jnp.int32))
    want, want_count = _reference_caption(logits, labels, pad_id=0)
    assert int(count) == want_count
    np.testing.assert_allclose(float(loss), want, rtol=1e-5, atol=1e-6)


def test_caption_loss_ignores_pad_positions():
    rng = np.random.default_rng(5)
    logits = rng.normal(size=(3, 6, 10)).astype(np.float32)
    labels = np.array([[4, 2, 7, 1, 1, 1], [3, 3, 1, 1, 1, 1], [9, 8, 7, 6, 5, 1]])
    loss, count = _caption(jnp.asarray(logits), jnp.asarray(labels), pad_id=1)
    assert int(count) == 3 + 2 + 5

    changed = logits.copy()
    changed[labels == 1] = rng.normal(size=changed[labels == 1].shape) * 100
    changed[0, 4] = np.inf  # even a non-finite logit at a pad position must not matter
    changed_loss, _ = _caption(jnp.asarray(changed), jnp.asarray(labels), pad_id=1)
    assert float(changed_loss) == pytest.approx(float(loss), rel=1e-6)

    want, _ = _reference_caption(logits, labels, pad_id=1)
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)


def test_caption_loss_is_token_mean_not_sequence_mean():
    # Sequence 0 has 1 token with loss ~0, sequence 1 has 3 tokens with large loss: a mean of
    # per-sequence means would give a different answer than the mean over the 4 tokens.
    vocab = 4
    logits = np.zeros((2, 3, vocab), np.float32)
    logits[0, 0, 2] = 50.0
    labels = np.array([[2, 0, 0], [1, 1, 1]])
    loss, count = _caption(jnp.asarray(logits), jnp.asarray(labels))
    assert int(count) == 4
    np.testing.assert_allclose(float(loss), 3 * math.log(vocab) / 4, rtol=1e-5)


def test_caption_loss_with_no_tokens_is_zero_not_nan():
    logits = jnp.ones((2, 3, 5))
    labels = jnp.zeros((2, 3), jnp.int32)
    loss, count = _caption(logits, labels)
    assert int(count) == 0 and float(loss) == 0.0
    grad = jax.jit(jax.grad(lambda x: losses.caption_loss(x, labels)[0]))(logits)
    assert bool(jnp.all(grad == 0))


def test_bf16_inputs_match_f32():
    rng = np.random.default_rng(6)
    image, text = _normalised(rng, 16, 32), _normalised(rng, 16, 32)
    image_bf16, text_bf16 = jnp.asarray(image, jnp.bfloat16), jnp.asarray(text, jnp.bfloat16)
    # The reference sees the same bf16-rounded embeddings, so only the loss arithmetic is compared.
    image_r, text_r = np.asarray(image_bf16, np.float64), np.asarray(text_bf16, np.float64)

    got = _softmax(image_bf16, text_bf16, jnp.bfloat16(20.0))
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(float(got), _reference_softmax(image_r, text_r, 20.0), rtol=1e-5)

    got = _sigmoid(image_bf16, text_bf16, jnp.bfloat16(10.0), jnp.bfloat16(-10.0))
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(
        float(got), _reference_sigmoid(image_r, text_r, 10.0, -10.0), rtol=1e-5
    )

    logits = jnp.asarray(rng.normal(size=(4, 8, 50)) * 4, jnp.bfloat16)
    labels = rng.integers(0, 50, size=(4, 8))
    got, _ = _caption(logits, jnp.asarray(labels))
    assert got.dtype == jnp.float32
    want, _ = _reference_caption(np.asarray(logits, np.float64), labels, pad_id=0)
    np.testing.assert_allclose(float(got), want, rtol=1e-5)


def test_registry_and_unknown_name():
    assert set(losses.LOSSES) == {"softmax", "sigmoid"}
    rng = np.random.default_rng(7)
    image, text = _normalised(rng, 5, 4), _normalised(rng, 5, 4)
    np.testing.assert_allclose(
        float(losses.contrastive_loss("softmax", image, text, 3.0, None)),
        float(_softmax(image, text, 3.0)),
        rtol=1e-6,
    )
    np.testing.assert_allclose(
        float(losses.contrastive_loss("sigmoid", image, text, 3.0, -1.0)),
        float(_sigmoid(image, text, 3.0, -1.0)),
        rtol=1e-6,
    )
    with pytest.raises(
        ValueError, match=r"^loss.contrastive='xyz' is unknown; allowed: 'sigmoid', 'softmax'$"
    ):
        losses.contrastive_loss("xyz", image, text, 3.0, 0.0)
    with pytest.raises(ValueError, match="needs a bias"):
        losses.contrastive_loss("sigmoid", image, text, 3.0)


def test_bad_shapes_are_rejected():
    with pytest.raises(ValueError, match="same shape"):
        _softmax(jnp.ones((4, 3)), jnp.ones((5, 3)), 1.0)
    with pytest.raises(ValueError, match=r"\[batch, dim\]"):
        _sigmoid(jnp.ones((4,)), jnp.ones((4,)), 1.0, 0.0)
    with pytest.raises(ValueError, match="vocab axis"):
        _caption(jnp.ones((2, 3, 5)), jnp.ones((2, 4), jnp.int32))
    with pytest.raises(ValueError, match="integer"):
        _caption(jnp.ones((2, 3, 5)), jnp.ones((2, 3)))
