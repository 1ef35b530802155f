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
    width: int = 0  # Query (and output) width; 0 = the tokens' width.
    heads: int = 0  # 0 = model.vit_heads.
    norm_queries: bool = False  # open_clip normalises the queries (ln_q).

    @nn.compact
    def __call__(self, tokens: Array) -> Array:
        cfg = self.cfg
        width = self.width or tokens.shape[-1]
        queries = self.param(
            "queries",
            partitioned(nn.initializers.normal(width**-0.5), (None, "embed")),
            (self.num_queries, width),
            cfg.weights_dtype,
        )
        context = LayerNorm(cfg, name="ln_context")(tokens)
        queries = queries.astype(cfg.compute_dtype)
        if self.norm_queries:
            queries = LayerNorm(cfg, name="ln_queries")(queries)
        # Batch of 1: the attention projects the shared queries once, then broadcasts.
        pooled = Attention(cfg, self.heads or cfg.vit_heads, cross=True, name="attn")(
            queries[None], context=context
        )
        return LayerNorm(cfg, name="ln_out")(pooled)


class ImageEncoder(nn.Module):
    """Patch embedding, learned positions, pre-LN blocks, then the pooling of model.vit_pool.

    Returns the contrastive vector [B, W] and the caption tokens [B, caption_queries, W]
    (None for class_token pooling); W is vit_width, or pool_width for shared_queries.
    With model.fusion='late' the decoder reads the pooled vector only, so no caption pooler
    is built and the caption tokens are None (every image tower follows this rule).
    """

    cfg: ModelConfig

    @nn.compact
    def __call__(self, images: Array) -> tuple[Array, Array | None]:
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
        if cfg.vit_class_token:
            cls = self.param(
                "cls_token",
                partitioned(nn.initializers.normal(cfg.vit_width**-0.5), ("embed",)),
                (cfg.vit_width,),
                cfg.weights_dtype,
            )
            cls = jnp.broadcast_to(cls.astype(x.dtype), (b, 1, cfg.vit_width))
            x = jnp.concatenate([cls, x], axis=1)
        # std 1/sqrt(width), as CLIP: position is learned far sooner than with 0.02.
        pos = self.param(
            "pos_embed",
            partitioned(nn.initializers.normal(cfg.vit_width**-0.5), (None, "embed")),
            (cfg.vit_positions, cfg.vit_width),
            cfg.weights_dtype,
        )
        x = constrain(x + pos.astype(x.dtype), ("batch", "length", "act_embed"))
        if cfg.vit_ln_pre:
            x = LayerNorm(cfg, name="ln_pre")(x)
        x = Stack(
            cfg,
            EncoderBlock,
            cfg.vit_layers,
            dict(num_heads=cfg.vit_heads, mlp_dim=cfg.vit_mlp_dim),
            remat=cfg.remat_for("vision"),
            name="blocks",
        )(x, None)
        if cfg.vit_pool == "class_token":
            return LayerNorm(cfg, name="ln_post")(x[:, 0]), None
        late = cfg.fusion == "late"  # No caption tokens: the N caption queries would be unused.
        if cfg.vit_pool == "shared_queries":
            pooled = AttentionalPooler(
                cfg,
                1 if late else cfg.caption_queries + 1,
                width=cfg.pool_width,
                heads=cfg.pool_heads,
                norm_queries=True,
                name="pool",
            )(x)
            return pooled[:, 0], None if late else pooled[:, 1:]
        x = LayerNorm(cfg, name="ln_final")(x)
        contrastive = AttentionalPooler(cfg, 1, name="contrastive_pool")(x)[:, 0]
        if late:
            return contrastive, None
        caption_tokens = AttentionalPooler(cfg, cfg.caption_queries, name="caption_pool")(x)
        return contrastive, caption_tokens
