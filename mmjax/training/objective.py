"""The training objective: the weighted CoCa loss and its gradients, with micro-batching.

Contrastive (softmax or sigmoid, sharded over the batch axes) plus captioning (next-token cross
entropy over the caption's real tokens), weighted by loss.contrastive_weight / caption_weight.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from mmjax.models.coca import CoCa
from mmjax.models.patch_dropout import keep_indices
from mmjax.text.tokenizer import PAD_ID
from mmjax.training.losses import caption_loss, chunked_caption_loss
from mmjax.training.sharded_losses import sharded_contrastive_loss

# loss.caption_logits: full = the [B, T, V] logits then cross-entropy; chunked = the LM head
# and cross-entropy CAPTION_CHUNK positions at a time, rematerialised (no [B, T, V] array);
# auto = chunked from CHUNKED_FROM_VOCAB up, where the logits outgrow the rest of the step.
CAPTION_LOGITS = ("auto", "full", "chunked")
CHUNKED_FROM_VOCAB = 32768
CAPTION_CHUNK = 16


def caption_chunk(loss_config: ml_collections.ConfigDict, cfg) -> int:
    """Positions per chunk of the caption loss (0: the full logits)."""
    mode = loss_config.get("caption_logits", "auto")
    if mode not in CAPTION_LOGITS:
        raise ValueError(f"loss.caption_logits={mode!r} is unknown; allowed: {CAPTION_LOGITS}")
    if mode == "full" or (mode == "auto" and cfg.vocab_size < CHUNKED_FROM_VOCAB):
        return 0
    chunk = int(loss_config.get("caption_chunk", CAPTION_CHUNK))
    # One chunk covering every position would only add the recomputation.
    return 0 if chunk >= cfg.context_length - 1 else chunk


def loss_and_grads(
    params,
    batch: dict[str, jax.Array],
    *,
    model: CoCa,
    loss_config: ml_collections.ConfigDict,
    microbatches: int = 1,
    batch_axes: tuple[str, ...] = (),
    rng: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array], Any]:
    """(loss, aux metrics, gradients) of the weighted CoCa loss on a global batch.

    With `microbatches` > 1 the batch is processed in that many slices, holding
    the activations of one slice at a time, and the result equals the one-batch
    computation: the embeddings of the whole batch are computed first (no
    gradient, as open_clip's accumulation does), then each slice is recomputed
    with gradient and its fresh embeddings replace their cached copies, so every
    slice's contrastive loss sees all the batch's negatives. The caption loss is
    a sum over tokens divided by the whole batch's token count.

    `batch_axes`: the mesh axes the batch is split over (under the current mesh).
    The contrastive loss then runs sharded (mmjax.training.sharded_losses: a ring for
    sigmoid, local logits for softmax), never holding B x B logits on a device.

    `rng`: the step's training key; with model.patch_dropout > 0 each image keeps the patch
    tokens mmjax.models.patch_dropout draws for its index in the batch (None: all patches).
    """
    images, tokens = batch["images"], batch["tokens"]
    caption_weight = loss_config.caption_weight
    contrastive_weight = loss_config.contrastive_weight
    with_captioning = caption_weight > 0
    chunk = caption_chunk(loss_config, model.cfg)
    num_tokens = jnp.maximum(jnp.sum(tokens[:, 1:] != PAD_ID), 1).astype(jnp.float32)
    example_ids = jnp.arange(images.shape[0])
    cfg = model.cfg

    def patch_keep(ids):
        if not cfg.patch_dropout or rng is None:
            return None
        return keep_indices(rng, ids, cfg.num_patches, cfg.kept_patches)

    def weighted_loss(params, images, tokens, ids, embeddings=None):
        """The loss given the pairs' embeddings (None: this batch's own)."""
        out = model.apply(
            {"params": params},
            images,
            tokens,
            with_captioning=with_captioning,
            caption_hidden=bool(chunk),
            patch_keep=patch_keep(ids),
        )
        image_emb, text_emb, scale, bias = (
            out["image_emb"],
            out["text_emb"],
            out["scale"],
            out["bias"],
        )
        if embeddings is not None:
            image_emb, text_emb, scale, bias = embeddings(image_emb, text_emb, scale, bias)
        con = sharded_contrastive_loss(
            loss_config.contrastive,
            image_emb,
            text_emb,
            scale,
            bias,
            batch_axes=batch_axes,
            softmax=loss_config.get("sharded_softmax", "gather"),
        )
        if with_captioning and chunk:
            head = nn.unbox(params["decoder"]["lm_head"])  # Boxed straight from model.init.
            mean, count = chunked_caption_loss(
                out["caption_hidden"], head["kernel"], head.get("bias"), tokens[:, 1:], PAD_ID,
                chunk=chunk, dtype=model.cfg.compute_dtype,
            )  # fmt: skip
            cap = mean * count.astype(jnp.float32) / num_tokens
        elif with_captioning:
            mean, count = caption_loss(out["logits"], tokens[:, 1:], PAD_ID)
            cap = mean * count.astype(jnp.float32) / num_tokens
        else:  # CLIP-only ablation: the decoder is not run at all.
            cap = jnp.zeros((), jnp.float32)
        loss = contrastive_weight * con + caption_weight * cap
        return loss, dict(
            contrastive_loss=con, caption_loss=cap, temperature=1.0 / scale, logit_bias=bias
        )

    grad_fn = jax.value_and_grad(weighted_loss, has_aux=True)
    if microbatches == 1:
        (loss, aux), grads = grad_fn(params, images, tokens, example_ids)
        return loss, aux, grads

    batch_size = images.shape[0]
    if batch_size % microbatches:
        raise ValueError(f"batch {batch_size} is not divisible by {microbatches} micro-batches")

    def split(x):
        # Slice m is rows m, m+M, m+2M, ...: every device keeps an equal share of
        # every slice (the batch dim is sharded in contiguous blocks).
        return x.reshape(batch_size // microbatches, microbatches, *x.shape[1:]).swapaxes(0, 1)

    def merge(x):  # [M, B/M, ...] -> [B, ...] in the original row order.
        return x.swapaxes(0, 1).reshape(batch_size, *x.shape[2:])

    def embed(slice_):
        slice_images, slice_tokens, slice_ids = slice_
        image_emb, _ = model.apply(
            {"params": params}, slice_images, patch_keep(slice_ids), method=CoCa.encode_image
        )
        text_emb, _ = model.apply({"params": params}, slice_tokens, method=CoCa.encode_text)
        return image_emb, text_emb

    slices = (split(images), split(tokens), split(example_ids))
    cached_images, cached_texts = jax.lax.stop_gradient(jax.lax.map(embed, slices))

    def accumulate(grads, xs):
        m, slice_images, slice_tokens, slice_ids = xs

        def embeddings(image_emb, text_emb, scale, bias):
            # The temperature and bias enter every slice's loss: only slice 0
            # passes their gradient, so it is counted once.
            first = m == 0
            scale = jnp.where(first, scale, jax.lax.stop_gradient(scale))
            bias = jnp.where(first, bias, jax.lax.stop_gradient(bias))
            image_all = merge(cached_images.at[m].set(image_emb.astype(cached_images.dtype)))
            text_all = merge(cached_texts.at[m].set(text_emb.astype(cached_texts.dtype)))
            return image_all, text_all, scale, bias

        (loss, aux), slice_grads = grad_fn(
            params, slice_images, slice_tokens, slice_ids, embeddings
        )
        grads = jax.tree.map(jnp.add, grads, slice_grads)
        return grads, (loss, aux)

    zeros = jax.tree.map(jnp.zeros_like, params)
    grads, (losses, auxes) = jax.lax.scan(accumulate, zeros, (jnp.arange(microbatches), *slices))
    # Every slice saw the same contrastive loss; caption losses are shares of the total.
    con = auxes["contrastive_loss"][0]
    cap = jnp.sum(auxes["caption_loss"])
    aux = dict(
        contrastive_loss=con,
        caption_loss=cap,
        temperature=auxes["temperature"][0],
        logit_bias=auxes["logit_bias"][0],
    )
    return contrastive_weight * con + caption_weight * cap, aux, grads
