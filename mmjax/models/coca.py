"""CoCa: image encoder, unimodal text encoder, multimodal decoder, contrastive head."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.models import registry
from mmjax.models.config import ModelConfig
from mmjax.models.layers import Dense, partitioned

Array = jax.Array


def l2_normalise(x: Array) -> Array:
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + 1e-12)


class CoCa(nn.Module):
    """The whole model. `tokens` are full captions [B, L]: BOS ... EOS PAD...

    The text towers read tokens[:, :-1] (so the CLS slot makes L positions) and
    the decoder predicts tokens[:, 1:] (teacher forcing). model.decoder.fusion picks the
    decoder: cross-attention to the caption tokens (MultimodalDecoder), or a
    prefix-LM stack over [image prefix; text] (fusion.PrefixLMDecoder: the caption
    tokens for 'early', the pooled image vector for 'late').
    """

    cfg: ModelConfig
    decode: bool = False

    def setup(self):
        cfg = self.cfg
        self.image_encoder = registry.image_tower(cfg)
        self.text_encoder = registry.text_encoder(cfg, decode=self.decode)
        if cfg.captioning:  # Plain CLIP has no decoder.
            self.decoder = registry.decoder(cfg, decode=self.decode)
        if cfg.vision.proj:  # Else the pooled vector is the embedding (SigLIP).
            self.image_proj = Dense(cfg, cfg.embed_dim, ("embed", "joint"), "image_proj", False)
        self.text_proj = Dense(
            cfg, cfg.embed_dim, ("embed", "joint"), "text_proj", cfg.text.proj_bias
        )
        self.logit_scale = self.param(
            "logit_scale",
            partitioned(nn.initializers.constant(cfg.init_logit_scale), ()),
            (),
            jnp.float32,
        )
        self.logit_bias = self.param(
            "logit_bias",
            partitioned(nn.initializers.constant(cfg.init_logit_bias), ()),
            (),
            jnp.float32,
        )

    def encode_image(
        self, images: Array, patch_keep: Array | None = None
    ) -> tuple[Array, Array | None]:
        """-> (L2-normalised embedding [B, E] in f32, caption tokens [B, N, W] or None).

        The second value is what the decoder reads about the image; with model.decoder.fusion='late'
        that is the pooled vector before image_proj, as one token [B, 1, W] (the towers then
        build no caption pooler)."""
        if patch_keep is None:
            pooled, caption_tokens = self.image_encoder(images)
        else:  # Training under patch dropout (the ViT tower; ModelConfig.validate).
            pooled, caption_tokens = self.image_encoder(images, patch_keep)
        if self.cfg.captioning and not self.cfg.caption_tokens_from_tower:
            caption_tokens = pooled[:, None]
        embedding = self.image_proj(pooled) if self.cfg.vision.proj else pooled
        return l2_normalise(embedding), caption_tokens

    def encode_text(self, tokens: Array) -> tuple[Array, Array]:
        """-> (L2-normalised embedding [B, E] in f32, token features [B, L-1, W]).

        With text.pool 'argmax' (CLIP) or 'last' (SigLIP) the encoder reads all L tokens
        (no CLS slot)."""
        if self.cfg.text.pool in ("argmax", "last"):
            cls, features = self.text_encoder(tokens)
        else:
            cls, features = self.text_encoder(tokens[:, :-1])
        return l2_normalise(self.text_proj(cls)), features

    def contrastive_scale_and_bias(self) -> tuple[Array, Array]:
        # Clipping the log-scale (CLIP caps at 100) also stops its gradient above the cap.
        scale = jnp.exp(jnp.minimum(self.logit_scale, self.cfg.max_logit_scale))
        return scale, self.logit_bias

    def __call__(
        self,
        images: Array,
        tokens: Array,
        with_captioning: bool = True,
        caption_hidden: bool = False,
        patch_keep: Array | None = None,
    ) -> dict[str, Array]:
        """Embeddings, contrastive scale and bias, and the caption `logits`; with
        `caption_hidden` the LM head's input as `caption_hidden` instead of the logits (the
        chunked caption loss applies params['decoder']['lm_head'] itself). `patch_keep`:
        the patch tokens each image keeps in training (mmjax.models.patch_dropout)."""
        image_emb, caption_tokens = self.encode_image(images, patch_keep)
        text_emb, features = self.encode_text(tokens)
        scale, bias = self.contrastive_scale_and_bias()
        out = dict(image_emb=image_emb, text_emb=text_emb, scale=scale, bias=bias)
        if with_captioning and self.cfg.captioning:
            if caption_hidden:
                out["caption_hidden"] = self.decoder(features, caption_tokens, hidden_only=True)
            else:
                out["logits"] = self.decoder(features, caption_tokens)
        return out

    def decode_step(self, tokens: Array, caption_tokens: Array | None) -> Array:
        """Decode mode: logits for the new positions of `tokens` [B, t].

        Pass the image's caption tokens (encode_image's second value) on the first call,
        None afterwards: cross-attention projects their keys/values once and caches them;
        the prefix-LM decoders (fusion 'early'/'late') feed them into the self-attention
        cache ahead of the first text positions, so passing them again would repeat them.
        """
        if not self.cfg.captioning:
            raise ValueError("this model has no decoder (model.captioning=False)")
        _, features = self.text_encoder(tokens)
        return self.decoder(features, caption_tokens)
