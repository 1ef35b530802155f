"""ViT image encoder followed by CoCa's attentional poolers."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.models.config import ModelConfig
from mmjax.models.layers import (
    Attention,
    Dense,
    EncoderBlock,
    LayerNorm,
    Stack,
    constrain,
    partitioned,
)

Array = jax.Array


def normalise_pixels(images: Array, cfg: ModelConfig) -> Array:
    """uint8 [B, H, W, 3] -> compute dtype, normalised on the device.

    Done here rather than in the input pipeline so hosts ship bytes, not floats.
    """
    x = images.astype(jnp.float32)
    if images.dtype == jnp.uint8:
        x = x / 255.0
    mean = jnp.asarray(cfg.image_mean, jnp.float32)
    std = jnp.asarray(cfg.image_std, jnp.float32)
    return ((x - mean) / std).astype(cfg.compute_dtype)


class AttentionalPooler(nn.Module):
    """`num_queries` learned queries cross-attend to the image tokens (CoCa sec. 3.2)."""

    cfg: ModelConfig
    num_queries: int

    @nn.compact
    def __call__(self, tokens: Array) -> Array:
        cfg = self.cfg
        width = tokens.shape[-1]
        queries = self.param(
            "queries",
            partitioned(nn.initializers.normal(width**-0.5), (None, "embed")),
            (self.num_queries, width),
            cfg.weights_dtype,
        )
        context = LayerNorm(cfg, name="ln_context")(tokens)
        # Batch of 1: the attention projects the shared queries once, then broadcasts.
        pooled = Attention(cfg, cfg.vit_heads, cross=True, name="attn")(
            queries.astype(cfg.compute_dtype)[None], context=context
        )
        return LayerNorm(cfg, name="ln_out")(pooled)


class ImageEncoder(nn.Module):
    """Patch embedding, learned positions, pre-LN blocks, then two poolers.

    Returns the contrastive vector [B, vit_width] (one-query pooler) and the
    caption tokens [B, caption_queries, vit_width] (N-query pooler).
    """

    cfg: ModelConfig

    @nn.compact
    def __call__(self, images: Array) -> tuple[Array, Array]:
        cfg = self.cfg
        x = normalise_pixels(images, cfg)
        b, h, w, c = x.shape
        p = cfg.patch_size
        if (h, w) != (cfg.image_size, cfg.image_size):
            raise ValueError(f"images are {h}x{w} but model.image_size={cfg.image_size}")
        # Patchify by reshape + one matmul (same as a stride-p convolution).
        x = x.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
        x = x.reshape(b, (h // p) * (w // p), p * p * c)
        x = Dense(cfg, cfg.vit_width, ("patch", "embed"), "patch_embed")(x)
        # std 1/sqrt(width), as CLIP: position is learned far sooner than with 0.02.
        pos = self.param(
            "pos_embed",
            partitioned(nn.initializers.normal(cfg.vit_width**-0.5), (None, "embed")),
            (cfg.num_patches, cfg.vit_width),
            cfg.weights_dtype,
        )
        x = constrain(x + pos.astype(x.dtype), ("batch", "length", "act_embed"))
        x = Stack(
            cfg,
            EncoderBlock,
            cfg.vit_layers,
            dict(num_heads=cfg.vit_heads, mlp_dim=cfg.vit_mlp_dim),
            remat=cfg.remat_for("vision"),
            name="blocks",
        )(x, None)
        x = LayerNorm(cfg, name="ln_final")(x)
        contrastive = AttentionalPooler(cfg, 1, name="contrastive_pool")(x)[:, 0]
        caption_tokens = AttentionalPooler(cfg, cfg.caption_queries, name="caption_pool")(x)
        return contrastive, caption_tokens
