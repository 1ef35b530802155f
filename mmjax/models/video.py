"""Video tower: clips of T frames through the image encoder, then a temporal encoder.

Every frame goes through one frame encoder (model.image_encoder; weights shared over time),
which gives a pooled vector and caption tokens per frame. A learned time embedding marks each
frame's place in the clip; `video_layers` bidirectional pre-LN blocks mix the T frame vectors
into temporal tokens; a one-query attentional pooler over them gives the clip embedding. The
decoder reads the temporal tokens followed by every frame's caption tokens (time-embedded), so
captions can use both what happens over time and what each frame shows.

The return contract is the ImageEncoder's, (pooled [B, W], tokens [B, M, W] or None), so the
rest of CoCa (contrastive head, decoder, generation) does not know it reads clips.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.models.config import ModelConfig
from mmjax.models.frame_encoders import frame_encoder
from mmjax.models.layers import EncoderBlock, LayerNorm, Stack, constrain, partitioned
from mmjax.models.vit import AttentionalPooler

Array = jax.Array


def input_frames(cfg: ModelConfig) -> int:
    """Frames per example the model reads: model.video_frames for video, 0 for still images."""
    return cfg.video_frames if cfg.input_kind == "video" else 0


def input_shape(cfg: ModelConfig) -> tuple[int, ...]:
    """One example's pixels, without the batch: (S, S, 3), or (T, S, S, 3) for clips."""
    frame = (cfg.image_size, cfg.image_size, 3)
    return (cfg.video_frames, *frame) if cfg.input_kind == "video" else frame


def _temporal_heads(cfg: ModelConfig, width: int) -> int:
    # The frame encoder's own head count when it divides the width (it does for the ViT
    # poolers); a ResNet's width may not be a multiple of vit_heads.
    for heads in (cfg.pool_heads, cfg.vit_heads):
        if heads and width % heads == 0:
            return heads
    return 1


class VideoEncoder(nn.Module):
    """uint8 clips [B, T, H, W, 3] -> (clip vector [B, W], tokens [B, T + T*N, W] or None)."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, clips: Array) -> tuple[Array, Array | None]:
        cfg = self.cfg
        t = cfg.video_frames
        if clips.ndim != 5 or clips.shape[1] != t:
            raise ValueError(
                f"clips are {tuple(clips.shape)} but model.input_kind='video' with "
                f"model.video_frames={t} needs [batch, {t}, height, width, 3]"
            )
        b = clips.shape[0]
        # One encoder call over B*T frames: the frame encoder's weights are shared over time,
        # and b-major rows keep each device's frames on the device that holds their clips.
        frames = clips.reshape(b * t, *clips.shape[2:])
        frames = constrain(frames, ("batch", None, None, None))
        pooled, tokens = frame_encoder(cfg, name="frame_encoder")(frames)
        width = pooled.shape[-1]
        x = constrain(pooled.reshape(b, t, width), ("batch", "length", "act_embed"))
        # Without it the blocks and the pooler are permutation invariant: order would be lost.
        # std 1, not a ViT position's 1/sqrt(W): it is added to LayerNorm'd vectors (unit
        # scale per feature), and a small start hid the order for hundreds of steps (tiny,
        # 16 px frames in 8 px patches, 300 steps of 32 clips: the motion named right in 51%
        # of held-out captions with 1/sqrt(W), 99% with 1).
        time = self.param(
            "time_embed",
            partitioned(nn.initializers.normal(1.0), (None, "embed")),
            (t, width),
            cfg.weights_dtype,
        ).astype(x.dtype)
        x = x + time
        heads = _temporal_heads(cfg, width)
        if cfg.video_layers:
            # Bidirectional (no mask): a clip is seen whole, as a ViT sees its patches.
            mlp = cfg.vit_mlp_dim if width == cfg.vit_width else 4 * width
            x = Stack(
                cfg,
                EncoderBlock,
                cfg.video_layers,
                dict(num_heads=heads, mlp_dim=mlp),
                remat=cfg.remat_for("vision"),
                name="blocks",
            )(x, None)
        x = LayerNorm(cfg, name="ln_temporal")(x)  # Pre-LN blocks leave the stream unnormed.
        x = constrain(x, ("batch", "length", "act_embed"))
        clip = AttentionalPooler(cfg, 1, heads=heads, name="clip_pool")(x)[:, 0]
        clip = constrain(clip, ("batch", "act_embed"))
        if tokens is None:  # class_token pooling or fusion='late': nothing to cross-attend to.
            return clip, None
        n, token_width = tokens.shape[1:]
        if token_width != width:
            raise ValueError(
                f"the frame encoder's caption tokens are {token_width} wide but its pooled "
                f"vector is {width}: a video tower needs one width for both"
            )
        # Each frame's caption tokens carry their frame's time embedding, so the decoder knows
        # which frame a token came from; the temporal tokens come first.
        tokens = tokens.reshape(b, t, n, width) + time[None, :, None]
        tokens = tokens.reshape(b, t * n, width)
        out = jnp.concatenate([x, tokens.astype(x.dtype)], axis=1)
        return clip, constrain(out, ("batch", "length", "act_embed"))
