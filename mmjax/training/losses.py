"""CoCa training losses: a contrastive term (CLIP softmax or SigLIP sigmoid) and a captioning term.

Everything here is pure jax.numpy and jit-able. Inputs may be bf16 (mixed-precision activations);
each loss casts to f32 first, because log-sum-exp over a batch-sized row and token means over a
whole batch lose too many bits in bf16.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

# The similarity matrix feeds a softmax with scale up to 100, so TF32 / bf16 passes on accelerators
# would visibly move the loss; the matmul is only [B, D] x [D, B], so full precision is cheap.
_PRECISION = jax.lax.Precision.HIGHEST


def _pair_logits(image_emb: jax.Array, text_emb: jax.Array) -> jax.Array:
    """Dot products [B_image, B_text] in f32 (cosines for normalised inputs), after checking the
    two batches line up."""
    image_emb, text_emb = jnp.asarray(image_emb), jnp.asarray(text_emb)
    if image_emb.ndim != 2 or text_emb.ndim != 2:
        raise ValueError(
            f"contrastive loss wants [batch, dim] embeddings, got image {image_emb.shape} "
            f"and text {text_emb.shape}"
        )
    if image_emb.shape != text_emb.shape:
        raise ValueError(
            f"image and text embeddings must have the same shape (pair i is image i with text i), "
            f"got {image_emb.shape} and {text_emb.shape}"
        )
    image = image_emb.astype(jnp.float32)
    text = text_emb.astype(jnp.float32)
    return jnp.einsum("id,jd->ij", image, text, precision=_PRECISION)


def softmax_contrastive_loss(
    image_emb: jax.Array, text_emb: jax.Array, scale: jax.Array
) -> jax.Array:
    """CLIP loss: mean of image->text and text->image cross-entropy with the diagonal as targets.

    `image_emb`, `text_emb`: [B, D], already L2-normalised. `scale`: the logit multiplier, i.e.
    exp(learned log-temperature), clipped by the caller. Returns an f32 scalar.
    """
    logits = jnp.asarray(scale, jnp.float32) * _pair_logits(image_emb, text_emb)
    # Row i of log_softmax(axis=1) is image i over all texts; column j of axis=0 is text j over all
    # images. The correct pair sits on the diagonal in both.
    image_to_text = -jnp.mean(jnp.diagonal(jax.nn.log_softmax(logits, axis=1)))
    text_to_image = -jnp.mean(jnp.diagonal(jax.nn.log_softmax(logits, axis=0)))
    return 0.5 * (image_to_text + text_to_image)


def sigmoid_contrastive_loss(
    image_emb: jax.Array, text_emb: jax.Array, scale: jax.Array, bias: jax.Array
) -> jax.Array:
    """SigLIP loss: every (image, text) pair is an independent binary match / no-match decision.

    -sum_ij log sigmoid(z_ij * (scale * <I_i, T_j> + bias)) / B, with z = +1 on the diagonal and
    -1 elsewhere. Dividing by B (not B^2) follows the paper: per image, summed over all texts.
    """
    logits = jnp.asarray(scale, jnp.float32) * _pair_logits(image_emb, text_emb)
    logits = logits + jnp.asarray(bias, jnp.float32)
    batch = logits.shape[0]
    signs = 2.0 * jnp.eye(batch, dtype=jnp.float32) - 1.0
    # log_sigmoid stays finite for large |logits|, where log(sigmoid(x)) would hit log(0).
    return -jnp.sum(jax.nn.log_sigmoid(signs * logits)) / batch


def caption_loss(
    logits: jax.Array, labels: jax.Array, pad_id: int = 0
) -> tuple[jax.Array, jax.Array]:
    """Token cross-entropy averaged over the label positions that are not padding.

    `logits`: [..., V]; `labels`: integer [...] (the shifted targets, tokens[1:]). Returns
    (mean_loss, num_tokens): an f32 scalar and the int32 count of non-pad labels, so callers can
    re-weight when combining micro-batches. A batch with no real tokens gives loss 0, not NaN.
    """
    logits, labels = jnp.asarray(logits), jnp.asarray(labels)
    if logits.shape[:-1] != labels.shape:
        raise ValueError(
            f"caption logits {logits.shape} must be labels {labels.shape} plus a vocab axis"
        )
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise ValueError(f"caption labels must be integer token ids, got dtype {labels.dtype}")
    per_token = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
    is_token = labels != pad_id
    # `where`, not multiply: a non-finite logit at a pad position must not leak in (inf * 0 = NaN).
    total = jnp.sum(jnp.where(is_token, per_token, 0.0))
    num_tokens = jnp.sum(is_token, dtype=jnp.int32)
    return total / jnp.maximum(num_tokens, 1).astype(jnp.float32), num_tokens


def chunked_caption_loss(
    hidden: jax.Array,
    kernel: jax.Array,
    bias: jax.Array | None,
    labels: jax.Array,
    pad_id: int = 0,
    *,
    chunk: int = 16,
    dtype=jnp.float32,
) -> tuple[jax.Array, jax.Array]:
    """`caption_loss` of the logits `hidden @ kernel + bias` without ever holding them whole.

    hidden [B, T, W] (the LM head's input), kernel [W, V], bias [V] or None, labels [B, T]. The
    positions are taken `chunk` at a time in a scan whose body is rematerialised: the forward
    pass keeps one chunk's [B, chunk, V] logits at a time and the backward pass recomputes
    them, so no [B, T, V] array exists in either (the largest tensor of a step with a 256k
    vocabulary). The head is computed in `dtype` as the model's Dense would; the softmax in f32.
    Same (mean, count) as `caption_loss` on the full logits, to float rounding.
    """
    batch, length, width = hidden.shape
    if labels.shape != (batch, length):
        raise ValueError(f"caption labels {labels.shape} must be hidden {hidden.shape} less W")
    pieces = -(-length // chunk)
    padded = pieces * chunk
    hidden = jnp.pad(hidden, ((0, 0), (0, padded - length), (0, 0)))
    labels = jnp.pad(labels, ((0, 0), (0, padded - length)), constant_values=pad_id)
    hidden = hidden.reshape(batch, pieces, chunk, width).swapaxes(0, 1)
    labels = labels.reshape(batch, pieces, chunk).swapaxes(0, 1)

    @jax.checkpoint
    def piece_loss(h, ids):
        logits = jnp.einsum("bcw,wv->bcv", h.astype(dtype), kernel.astype(dtype))
        if bias is not None:  # None: a head without bias (open_clip's).
            logits = logits + bias.astype(dtype)
        per_token = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), ids)
        return jnp.sum(jnp.where(ids != pad_id, per_token, 0.0))

    def body(total, xs):
        return total + piece_loss(*xs), None

    total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), (hidden, labels))
    num_tokens = jnp.sum(labels != pad_id, dtype=jnp.int32)
    return total / jnp.maximum(num_tokens, 1).astype(jnp.float32), num_tokens


def _softmax_with_unused_bias(image_emb, text_emb, scale, bias):
    # The softmax loss is invariant to a shared additive bias, so it has none; the registry's
    # uniform signature lets the train step call either loss the same way.
    del bias
    return softmax_contrastive_loss(image_emb, text_emb, scale)


# Contrastive losses by config name (loss.contrastive); all take (image_emb, text_emb, scale, bias).
LOSSES: dict[str, Callable[..., jax.Array]] = {
    "softmax": _softmax_with_unused_bias,
    "sigmoid": sigmoid_contrastive_loss,
}


def contrastive_loss(
    name: str,
    image_emb: jax.Array,
    text_emb: jax.Array,
    scale: jax.Array,
    bias: jax.Array | None = None,
) -> jax.Array:
    """The contrastive loss called `name`; `bias` is used by 'sigmoid' only (and required there)."""
    if name not in LOSSES:
        allowed = ", ".join(repr(k) for k in sorted(LOSSES))
        raise ValueError(f"loss.contrastive={name!r} is unknown; allowed: {allowed}")
    if name == "sigmoid" and bias is None:
        raise ValueError("loss.contrastive='sigmoid' needs a bias (SigLIP learns one, init -10)")
    return LOSSES[name](image_emb, text_emb, scale, bias)
