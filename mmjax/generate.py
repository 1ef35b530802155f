"""Caption generation with a KV cache, in one jitted decode loop.

The image is encoded once; its caption tokens are projected to keys/values
once per decoder layer (on the first decode call) and reused; every later
step runs the text towers on a single new token against cached keys/values
of all earlier positions, so a caption of L tokens costs O(L) token-steps
instead of open_clip's O(L^2) re-runs of both towers.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from mmjax.models.coca import CoCa


def _initial_cache(decoder: CoCa, batch: int, caption_tokens: jax.Array):
    """Zeroed cache variables sized for `context_length` positions."""
    length = decoder.cfg.context_length
    shapes = jax.eval_shape(
        lambda: decoder.init(
            jax.random.PRNGKey(0),
            jnp.zeros((batch, length), jnp.int32),
            caption_tokens,
            method=CoCa.decode_step,
        )
    )["cache"]
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def greedy_generate(
    model: CoCa, params, images: jax.Array, *, bos_id: int, eos_id: int, pad_id: int = 0
) -> jax.Array:
    """-> tokens [B, context_length]: BOS, generated tokens, EOS, then padding.

    Call under jit (see `make_generate_fn`). Stops early once every row has
    produced EOS.
    """
    length = model.cfg.context_length
    batch = images.shape[0]
    decoder = model.clone(decode=True)
    _, caption_tokens = model.apply({"params": params}, images, method=CoCa.encode_image)

    # PAD and BOS are never generated: a PAD inside a caption would be masked
    # as padding by the text encoder.
    banned = jnp.zeros((model.cfg.vocab_size,), bool).at[jnp.array([pad_id, bos_id])].set(True)

    def step(token, cache, context):
        logits, updated = decoder.apply(
            {"params": params, "cache": cache},
            token,
            context,
            method=CoCa.decode_step,
            mutable=["cache"],
        )
        logits = logits[:, -1].astype(jnp.float32)
        return jnp.where(banned, -jnp.inf, logits), updated["cache"]

    cache = _initial_cache(decoder, batch, caption_tokens)
    bos = jnp.full((batch, 1), bos_id, jnp.int32)
    logits, cache = step(bos, cache, caption_tokens)  # Also caches the image keys/values.
    tokens = jnp.full((batch, length), pad_id, jnp.int32).at[:, 0].set(bos_id)
    done = jnp.zeros((batch,), bool)

    def cond(carry):
        t, _, _, _, done = carry
        return (t < length) & ~jnp.all(done)

    def body(carry):
        t, tokens, cache, logits, done = carry
        nxt = jnp.where(done, pad_id, jnp.argmax(logits, axis=-1).astype(jnp.int32))
        tokens = tokens.at[:, t].set(nxt)
        done = done | (nxt == eos_id)
        # Position t is fed even on the last step: the cache has `length` slots.
        logits, cache = step(nxt[:, None], cache, None)
        return t + 1, tokens, cache, logits, done

    _, tokens, _, _, _ = jax.lax.while_loop(cond, body, (jnp.int32(1), tokens, cache, logits, done))
    return tokens


def make_generate_fn(model: CoCa, *, bos_id: int, eos_id: int, pad_id: int = 0):
    """A jitted (params, images) -> tokens function."""
    return jax.jit(
        functools.partial(greedy_generate, model, bos_id=bos_id, eos_id=eos_id, pad_id=pad_id)
    )
