"""Text side of CoCa: a unimodal causal encoder and the multimodal decoder."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.models import matmul_flops
from mmjax.models.attention import AttentionMask
from mmjax.models.config import ModelConfig
from mmjax.models.layers import (
    DecoderBlock,
    Dense,
    EncoderBlock,
    LayerNorm,
    SplitDecoderBlock,
    Stack,
    constrain,
    partitioned,
)
from mmjax.text.tokenizer import PAD_ID

Array = jax.Array


def text_attention_mask(
    tokens: Array, with_cls: bool, convention: str = "pad_keys"
) -> AttentionMask:
    """Causal mask that also hides padding keys (T, or T+1 positions with the CLS slot).

    The CLS slot appended at the end attends to every real token and itself;
    padding never acts as a key, so changing it cannot change any output.
    convention='open_clip' reproduces open_clip's CoCa instead: key 0 is always
    visible and key j is hidden when token j-1 is padding (its checkpoints learnt that).
    """
    valid = tokens != PAD_ID
    if convention == "open_clip":
        valid = jnp.concatenate([jnp.ones_like(valid[:, :1]), valid], axis=1)
        if not with_cls:
            valid = valid[:, :-1]
    elif with_cls:
        valid = jnp.concatenate([valid, jnp.ones_like(valid[:, :1])], axis=1)
    return AttentionMask(key_valid=valid, causal=True)


class TextEncoder(nn.Module):
    """Causal transformer over the tokens plus a learnable CLS appended at the end.

    Returns (cls_features [B, W] after LayerNorm, token_features [B, T, W]).
    In decode mode no CLS is appended and positions come from a cache counter.
    With model.text.pool='argmax' (CLIP) no CLS is appended either: every position
    is LayerNorm'd and the pooled vector is the one at the highest token id (EOS).
    With model.text.pool='last' (SigLIP) attention is bidirectional and unmasked (the
    tokenizer pads with EOS, which the model reads) and the pooled vector is the last
    position's, after a final LayerNorm.
    """

    cfg: ModelConfig
    decode: bool = False

    @staticmethod
    def forward_flops(cfg: ModelConfig, causal: float) -> float:
        """One caption: context_length positions (L-1 tokens + CLS); `causal` scales the keys
        a query sees (0.5 counts the causal half, 1.0 the full square)."""
        t, t_enc = cfg.text, cfg.context_length
        if t.pool == "last":  # Bidirectional: every query sees every key.
            causal = 1.0
        return t.layers * matmul_flops.block(t_enc, t.width, t.mlp_dim, t_enc * causal)

    @nn.compact
    def __call__(self, tokens: Array) -> tuple[Array | None, Array]:
        cfg = self.cfg
        width = cfg.text.width
        embed = nn.Embed(
            cfg.vocab_size,
            width,
            dtype=cfg.compute_dtype,
            param_dtype=cfg.weights_dtype,
            embedding_init=partitioned(nn.initializers.normal(0.02), ("vocab", "embed")),
            name="token_embed",
        )
        pos = self.param(
            "pos_embed",
            partitioned(nn.initializers.normal(0.01), (None, "embed")),
            (cfg.context_length, width),
            cfg.weights_dtype,
        ).astype(cfg.compute_dtype)
        x = embed(tokens)
        t = tokens.shape[1]
        if self.decode:
            start = self.variable("cache", "position", lambda: jnp.zeros((), jnp.int32))
            x = x + jax.lax.dynamic_slice_in_dim(pos, start.value, t)[None]
            if self.is_initializing():
                start.value = jnp.zeros((), jnp.int32)
            else:
                start.value = start.value + t
            mask = None  # The attention KV cache builds its own causal mask.
        elif cfg.text.pool == "argmax":
            x = x + pos[:t][None]
            mask = AttentionMask(causal=True)
        elif cfg.text.pool == "last":
            x = x + pos[:t][None]
            mask = None
        else:
            cls = self.param(
                "cls",
                partitioned(nn.initializers.normal(0.02), ("embed",)),
                (width,),
                cfg.weights_dtype,
            )
            x = jnp.concatenate(
                [x, jnp.broadcast_to(cls.astype(x.dtype), (x.shape[0], 1, width))], 1
            )
            x = x + pos[: t + 1][None]
            mask = text_attention_mask(tokens, with_cls=True, convention=cfg.text.mask)
        x = constrain(x, ("batch", "length", "act_embed"))
        x = Stack(
            cfg,
            EncoderBlock,
            cfg.text.layers,
            dict(num_heads=cfg.text.heads, mlp_dim=cfg.text.mlp_dim, decode=self.decode),
            remat=cfg.remat_for("text"),
            name="blocks",
        )(x, mask)
        if self.decode:
            return None, x
        if cfg.text.pool == "argmax":
            x = LayerNorm(cfg, name="ln_final")(x)
            eos = jnp.argmax(tokens, axis=1)
            return jnp.take_along_axis(x, eos[:, None, None], axis=1)[:, 0], x
        if cfg.text.pool == "last":
            x = LayerNorm(cfg, name="ln_final")(x)
            return x[:, -1], x
        cls_features = LayerNorm(cfg, name="ln_cls")(x[:, -1])
        return cls_features, x[:, :-1]


class MultimodalDecoder(nn.Module):
    """Causal self-attention + cross-attention to the image tokens, then the LM head."""

    cfg: ModelConfig
    decode: bool = False

    @staticmethod
    def forward_flops(cfg: ModelConfig, image_tokens: int, causal: float) -> float:
        """One caption's decoder: causal self-attention, cross-attention to `image_tokens`
        tokens of vision.width, MLP, and the LM head."""
        t_dec, wt = cfg.context_length - 1, cfg.text.width
        per_layer = matmul_flops.block(t_dec, wt, cfg.decoder_mlp_dim, t_dec * causal)
        per_layer += matmul_flops.cross(
            t_dec, image_tokens, wt, cfg.vision.width, heads=cfg.decoder_heads
        )
        return cfg.decoder.layers * per_layer + matmul_flops.dense(t_dec, wt, cfg.vocab_size)

    @nn.compact
    def __call__(
        self, text_features: Array, image_tokens: Array | None, hidden_only: bool = False
    ) -> Array:
        """Logits [B, T, V]; with `hidden_only` the LM head's input [B, T, W] instead (the
        chunked caption loss applies the head itself: mmjax.training.losses)."""
        cfg = self.cfg
        if self.decode:
            mask = None
        else:  # Right padding: causal masking alone keeps pads out of real positions.
            mask = AttentionMask(causal=True)
        x = Stack(
            cfg,
            SplitDecoderBlock if cfg.decoder.block == "split" else DecoderBlock,
            cfg.decoder.layers,
            dict(num_heads=cfg.decoder_heads, mlp_dim=cfg.decoder_mlp_dim, decode=self.decode),
            remat=cfg.remat_for("decoder"),
            name="blocks",
        )(text_features, mask, image_tokens)
        x = LayerNorm(cfg, name="ln_final")(x)
        if hidden_only:
            return constrain(x, ("batch", "length", "act_embed"))
        logits = Dense(cfg, cfg.vocab_size, ("embed", "vocab"), "lm_head", cfg.decoder.head_bias)(x)
        return constrain(logits, ("batch", "length", "act_vocab"))
