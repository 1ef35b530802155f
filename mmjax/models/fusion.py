"""The single-stream caption decoder of model.decoder.fusion='early' and 'late' (config.FUSIONS).

Instead of CoCa's cross-attention (mmjax/models/text.py), image tokens are put in front of the
unimodal text features and one self-attention stack reads the joint sequence under a prefix-LM
mask: image positions see every image position and no text, text positions see every image
position and the text causally. The two fusions differ only in what the prefix holds:

- early: the image tower's caption tokens [B, N, W] (token-level interaction in every layer);
- late: the pooled image vector (before image_proj) as one token [B, 1, W], which
  CoCa.encode_image hands over in place of caption tokens; with one prefix token the mask
  is plain causal.

Logits come from the text positions only, so the output is [B, T, vocab] as for
cross-attention and the caption loss does not change.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.models import matmul_flops
from mmjax.models.attention import AttentionMask
from mmjax.models.config import ModelConfig
from mmjax.models.layers import (
    Dense,
    EncoderBlock,
    LayerNorm,
    Stack,
    constrain,
)

Array = jax.Array


class PrefixLMDecoder(nn.Module):
    """Image prefix + text features -> one pre-LN stack of decoder.layers blocks -> LM head.

    __call__(text_features [B, T, text.width], image_tokens [B, N, W] or None) -> logits
    [B, T, vocab]. In decode mode the image tokens come on the first call only: they enter the
    self-attention KV cache together with that call's text positions (the cache is sized by
    the initialising call for N + its text length); later calls pass None and one or more
    new text positions, for which causal attention over the cache already covers the prefix.
    """

    cfg: ModelConfig
    decode: bool = False

    @staticmethod
    def forward_flops(cfg: ModelConfig, image_tokens: int, causal: float) -> float:
        """One caption: the prefix projected to text.width, one self-attention stack over
        prefix + text, the LM head over the text positions."""
        t_dec, wt = cfg.context_length - 1, cfg.text.width
        flops = matmul_flops.dense(image_tokens, cfg.vision.width, wt)
        length = image_tokens + t_dec
        # Query-key pairs: every query sees the prefix, text queries the text causally (the
        # discount halves the text-text part only, as for the causal towers).
        if causal < 1.0:
            pairs = image_tokens * image_tokens + t_dec * image_tokens + t_dec * t_dec * causal
        else:
            pairs = length * length
        keys = pairs / length
        flops += cfg.decoder.layers * matmul_flops.block(length, wt, cfg.decoder_mlp_dim, keys)
        return flops + matmul_flops.dense(t_dec, wt, cfg.vocab_size)

    @nn.compact
    def __call__(
        self, text_features: Array, image_tokens: Array | None, hidden_only: bool = False
    ) -> Array:
        """Logits of the text positions; with `hidden_only` the LM head's input instead."""
        cfg = self.cfg
        if image_tokens is None and not self.decode:
            raise ValueError(f"model.decoder.fusion={cfg.decoder.fusion!r} needs the image tokens")
        prefix = 0 if image_tokens is None else image_tokens.shape[1]
        x = text_features
        if image_tokens is not None:
            # The image towers' width (vision.width, pool_width, ...) -> the text stream's width.
            image = Dense(cfg, cfg.text.width, ("embed", "joint"), "image_to_text")(image_tokens)
            x = jnp.concatenate([image.astype(x.dtype), x], axis=1)
        x = constrain(x, ("batch", "length", "act_embed"))
        # Decode mode: the KV cache builds the same mask from `prefix` (layers.Attention).
        mask = None if self.decode else AttentionMask(causal=True, prefix=prefix)
        x = Stack(
            cfg,
            EncoderBlock,
            cfg.decoder.layers,
            dict(
                num_heads=cfg.decoder_heads,
                mlp_dim=cfg.decoder_mlp_dim,
                decode=self.decode,
                prefix=prefix,
            ),
            remat=cfg.remat_for("decoder"),
            name="blocks",
        )(x, mask)
        # Image positions predict nothing: the LM head reads the text positions only.
        x = LayerNorm(cfg, name="ln_final")(x[:, prefix:])
        if hidden_only:
            return constrain(x, ("batch", "length", "act_embed"))
        logits = Dense(cfg, cfg.vocab_size, ("embed", "vocab"), "lm_head", cfg.decoder.head_bias)(x)
        return constrain(logits, ("batch", "length", "act_vocab"))
