"""ViT image encoder followed by CoCa's attentional poolers."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.models import matmul_flops
from mmjax.models.config import ModelConfig
from mmjax.models.layers import (
    Attention,
    Dense,
    EncoderBlock,
    LayerNorm,
    Mlp,
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
    heads: int = 0  # 0 = model.vision.heads.
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
        pooled = Attention(cfg, self.heads or cfg.vision.heads, cross=True, name="attn")(
            queries[None], context=context
        )
        return LayerNorm(cfg, name="ln_out")(pooled)


class MapHead(nn.Module):
    """Multihead attention pooling (SigLIP, big_vision's MAPHead): one learned probe attends
    to the tokens, then a residual MLP on its LayerNorm'd output -> [B, W]."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, tokens: Array) -> Array:
        cfg = self.cfg
        width = tokens.shape[-1]
        probe = self.param(
            "probe",
            partitioned(nn.initializers.normal(width**-0.5), (None, "embed")),
            (1, width),
            cfg.weights_dtype,
        ).astype(cfg.compute_dtype)
        # Batch of 1: the attention projects the probe once, then broadcasts.
        x = Attention(cfg, cfg.vision.pool_heads or cfg.vision.heads, cross=True, name="attn")(
            probe[None], context=tokens
        )
        x = x + Mlp(cfg, cfg.vision.mlp_dim, name="mlp")(LayerNorm(cfg, name="ln")(x))
        return x[:, 0]


def pooler_flops(cfg: ModelConfig, tokens: int, with_captioning: bool) -> float:
    """The contrastive pooler, plus the caption pooler when a decoder reads its tokens
    (unused, XLA drops it)."""
    width, heads = cfg.vision.width, cfg.vision.pool_heads or cfg.vision.heads
    if cfg.vision.pool == "class_token":
        return 0.0
    flops = matmul_flops.cross(1, tokens, width, width, heads=heads, shared_queries=True)
    if cfg.vision.pool == "map":
        return flops + 2 * matmul_flops.dense(1, width, cfg.vision.mlp_dim)
    if with_captioning and cfg.caption_tokens_from_tower:
        queries = cfg.vision.caption_queries
        flops += matmul_flops.cross(queries, tokens, width, width, heads=heads, shared_queries=True)
    return flops


class ImageEncoder(nn.Module):
    """Patch embedding, learned positions, pre-LN blocks, then the pooling of model.vision.pool.

    Returns the contrastive vector [B, W] and the caption tokens [B, caption_queries, W]
    (None for class_token pooling); W is vision.width, or pool_width for shared_queries.
    With model.decoder.fusion='late' the decoder reads the pooled vector only, so no caption pooler
    is built and the caption tokens are None (every image tower follows this rule).
    """

    cfg: ModelConfig

    @staticmethod
    def forward_flops(
        cfg: ModelConfig, with_captioning: bool = True, training: bool = False
    ) -> tuple[float, int]:
        """Forward FLOPs for one image (poolers included) -> (FLOPs, caption tokens). In
        `training` the blocks and poolers see the tokens patch dropout keeps."""
        tokens, width = cfg.vit_positions, cfg.vision.width
        if training:
            tokens = cfg.kept_patches + int(cfg.vision.class_token)
        flops = matmul_flops.dense(cfg.num_patches, cfg.vision.patch_size**2 * 3, width)
        flops += cfg.vision.layers * matmul_flops.block(tokens, width, cfg.vision.mlp_dim, tokens)
        return flops + pooler_flops(cfg, tokens, with_captioning), cfg.vision.caption_queries

    @nn.compact
    def __call__(
        self, images: Array, patch_keep: Array | None = None
    ) -> tuple[Array, Array | None]:
        """`patch_keep` [B, K]: the patch tokens each image keeps (patch dropout; see
        mmjax.models.patch_dropout), None for all of them."""
        cfg = self.cfg
        x = normalise_pixels(images, cfg)
        b, h, w, c = x.shape
        p = cfg.vision.patch_size
        if (h, w) != (cfg.image_size, cfg.image_size):
            raise ValueError(f"images are {h}x{w} but model.image_size={cfg.image_size}")
        # Patchify by reshape + one matmul (same as a stride-p convolution).
        x = x.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
        x = x.reshape(b, (h // p) * (w // p), p * p * c)
        x = Dense(cfg, cfg.vision.width, ("patch", "embed"), "patch_embed", cfg.vision.patch_bias)(
            x
        )
        # std 1/sqrt(width), as CLIP: position is learned far sooner than with 0.02.
        pos = self.param(
            "pos_embed",
            partitioned(nn.initializers.normal(cfg.vision.width**-0.5), (None, "embed")),
            (cfg.vit_positions, cfg.vision.width),
            cfg.weights_dtype,
        ).astype(x.dtype)
        first = int(cfg.vision.class_token)  # The class token's position comes first.
        x = x + pos[first:]
        if patch_keep is not None:  # After the positions: a kept token keeps its place.
            x = jnp.take_along_axis(x, patch_keep[..., None], axis=1)
        if cfg.vision.class_token:
            cls = self.param(
                "cls_token",
                partitioned(nn.initializers.normal(cfg.vision.width**-0.5), ("embed",)),
                (cfg.vision.width,),
                cfg.weights_dtype,
            )
            cls = cls.astype(x.dtype) + pos[0]
            x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, cfg.vision.width)), x], axis=1)
        x = constrain(x, ("batch", "length", "act_embed"))
        if cfg.vision.ln_pre:
            x = LayerNorm(cfg, name="ln_pre")(x)
        x = Stack(
            cfg,
            EncoderBlock,
            cfg.vision.layers,
            dict(num_heads=cfg.vision.heads, mlp_dim=cfg.vision.mlp_dim),
            remat=cfg.remat_for("vision"),
            name="blocks",
        )(x, None)
        if cfg.vision.pool == "class_token":
            return LayerNorm(cfg, name="ln_post")(x[:, 0]), None
        if cfg.vision.pool == "map":
            return MapHead(cfg, name="map_head")(LayerNorm(cfg, name="ln_post")(x)), None
        late = not cfg.caption_tokens_from_tower  # The N caption queries would be unused.
        if cfg.vision.pool == "shared_queries":
            pooled = AttentionalPooler(
                cfg,
                1 if late else cfg.vision.caption_queries + 1,
                width=cfg.vision.pool_width,
                heads=cfg.vision.pool_heads,
                norm_queries=True,
                name="pool",
            )(x)
            return pooled[:, 0], None if late else pooled[:, 1:]
        x = LayerNorm(cfg, name="ln_final")(x)
        contrastive = AttentionalPooler(cfg, 1, name="contrastive_pool")(x)[:, 0]
        if late:
            return contrastive, None
        caption_tokens = AttentionalPooler(cfg, cfg.vision.caption_queries, name="caption_pool")(x)
        return contrastive, caption_tokens
