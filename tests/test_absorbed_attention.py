"""Cross-attention in the absorbed form (no key/value projection of the context) is the same
attention as the projected form, and is chosen exactly where it needs fewer FLOPs."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.models import layers
from mmjax.models.config import ModelConfig
from mmjax.models.layers import Attention
from mmjax.models.matmul_flops import absorbed_cross, cross, projected_cross


def _plain_attention(q, k, v, mask, kernel):
    """softmax(q k^T / sqrt(D)) v in the inputs' dtype (jax.nn.dot_product_attention takes
    the softmax in f32 even for f64 inputs, which would hide a real difference)."""
    scores = jnp.einsum("bthd,bshd->bhts", q, k) / jnp.sqrt(q.shape[-1]).astype(q.dtype)
    return jnp.einsum("bhts,bshd->bthd", jax.nn.softmax(scores, axis=-1), v)


@pytest.fixture
def x64():
    jax.config.update("jax_enable_x64", True)
    try:
        yield
    finally:
        jax.config.update("jax_enable_x64", False)


def _setup(queries, keys, width, heads, dtype, batch=3, query_batch=None):
    cfg = ModelConfig().replace({"dtype": dtype, "param_dtype": dtype, "attention": "xla"})
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(query_batch or batch, queries, width)), dtype)
    context = jnp.asarray(rng.normal(size=(batch, keys, width)), dtype)
    module = Attention(cfg, heads, cross=True)
    params = nn.unbox(module.init(jax.random.key(0), x, context=context)["params"])
    # Non-zero biases everywhere: the absorbed form drops the key bias and moves the value
    # bias after the mix, so both must be exercised.
    leaves, tree = jax.tree.flatten(params)
    keys_ = jax.random.split(jax.random.key(1), len(leaves))
    params = tree.unflatten(
        [p + 0.3 * jax.random.normal(k, p.shape, p.dtype) for p, k in zip(leaves, keys_)]
    )
    return module, params, x, context


def _both(monkeypatch, module, params, x, context, plain=False):
    def run():
        def f(p, x, c):
            y = module.apply({"params": p}, x, context=c)
            return jnp.sum(jnp.sin(y)), y

        (_, y), grads = jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True)(params, x, context)
        return y, grads

    absorbed = run()
    monkeypatch.setattr(Attention, "_absorbs_keys_values", lambda self, q, c: False)
    if plain:
        monkeypatch.setattr(layers, "attend", _plain_attention)
    projected = run()
    return absorbed, projected


@pytest.mark.parametrize("query_batch", [None, 1])  # Shared learned queries: a batch of 1.
def test_absorbed_equals_projected_in_value_and_gradients(x64, monkeypatch, query_batch):
    module, params, x, context = _setup(5, 24, 32, 2, "float64", query_batch=query_batch)
    assert module.bind({"params": params})._absorbs_keys_values(
        jnp.zeros((3, 5, 2, 16)), context
    )  # This shape takes the absorbed form ...
    (ya, ga), (yp, gp) = _both(monkeypatch, module, params, x, context, plain=True)
    np.testing.assert_allclose(ya, yp, rtol=1e-12, atol=1e-12)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(ga), jax.tree.leaves(gp)):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-11, err_msg=jax.tree_util.keystr(path))
    # ... and the key bias, which softmax cannot see, gets no gradient in either form.
    np.testing.assert_allclose(ga[0]["kv_bias"][0], 0.0, atol=1e-12)
    np.testing.assert_allclose(gp[0]["kv_bias"][0], 0.0, atol=1e-12)


def test_absorbed_matches_in_float32_at_the_caption_decoders_shape(monkeypatch):
    """The bench decoder's cross-attention: 31 text positions, 256 caption tokens, width
    256, 4 heads (the shape the form was made for)."""
    module, params, x, context = _setup(31, 256, 256, 4, "float32", batch=2)
    (ya, _), (yp, _) = _both(monkeypatch, module, params, x, context)
    np.testing.assert_allclose(ya, yp, rtol=1e-4, atol=1e-4 * float(jnp.abs(yp).max()))


def test_the_form_with_fewer_flops_is_chosen():
    # Caption decoder (few queries over many tokens): absorbed, 46% fewer FLOPs.
    assert absorbed_cross(31, 256, 256, 4, 64) < 0.55 * projected_cross(31, 256, 256, 4, 64)
    # The caption pooler (256 queries over 64 image tokens): projected.
    assert absorbed_cross(256, 64, 256, 4, 64, True) > projected_cross(256, 64, 256, 4, 64)
    # The analytic count takes the form that runs.
    projections = 2 * 2 * 31 * 256 * 256  # Queries in, output out.
    assert cross(31, 256, 256, 256, heads=4) == projections + absorbed_cross(31, 256, 256, 4, 64)
    cfg = ModelConfig().replace({"attention": "xla"})
    context = jnp.zeros((2, 64, 256))
    bound = Attention(cfg, 4, cross=True)
    assert bound._absorbs_keys_values(jnp.zeros((2, 1, 4, 64)), context)  # One query.
    assert not bound._absorbs_keys_values(jnp.zeros((2, 256, 4, 64)), context)
    assert not Attention(cfg, 4, cross=True, decode=True)._absorbs_keys_values(
        jnp.zeros((2, 1, 4, 64)), context
    )  # Decoding caches projected keys and values.
    splash = Attention(cfg.replace({"attention": "splash"}), 4, cross=True)
    assert not splash._absorbs_keys_values(jnp.zeros((2, 1, 4, 64)), context)
