"""Video tower: clips of T frames through the image encoder, then a temporal encoder.

Every frame goes through one frame encoder (model.vision.encoder; weights shared over time),
which gives a pooled vector and caption tokens per frame. A learned time embedding marks each
frame's place in the clip; `video.layers` bidirectional pre-LN blocks mix the T frame vectors
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

from mmjax.models import matmul_flops
from mmjax.models.config import ModelConfig
from mmjax.models.frame_encoders import FRAME_ENCODERS, frame_encoder
from mmjax.models.layers import EncoderBlock, LayerNorm, Stack, constrain, partitioned
from mmjax.models.vit import AttentionalPooler

Array = jax.Array


def input_frames(cfg: ModelConfig) -> int:
    """Frames per example the model reads: model.video.frames for video, 0 for still images."""
    return cfg.video.frames if cfg.input_kind == "video" else 0


def input_shape(cfg: ModelConfig) -> tuple[int, ...]:
    """One example's pixels, without the batch: (S, S, 3), or (T, S, S, 3) for clips."""
    frame = (cfg.image_size, cfg.image_size, 3)
    return (cfg.video.frames, *frame) if cfg.input_kind == "video" else frame


def _temporal_heads(cfg: ModelConfig, width: int) -> int:
    if cfg.video.heads:
        return cfg.video.heads
    # The frame encoder's own head count when it divides the width (it does for the ViT
    # poolers); a ResNet's width may not be a multiple of vision.heads.
    for heads in (cfg.vision.pool_heads, cfg.vision.heads):
        if heads and width % heads == 0:
            return heads
    return 1


class VideoEncoder(nn.Module):
    """uint8 clips [B, T, H, W, 3] -> (clip vector [B, W], tokens [B, T + T*N, W] or None)."""

    cfg: ModelConfig

    @staticmethod
    def forward_flops(
        cfg: ModelConfig, with_captioning: bool = True, training: bool = False
    ) -> tuple[float, int]:
        """Every frame through the frame encoder, then the temporal blocks and the clip
        pooler -> (FLOPs, caption tokens: the temporal tokens + every frame's)."""
        frame_flops, frame_tokens = FRAME_ENCODERS[cfg.vision.encoder].forward_flops(
            cfg, with_captioning, training
        )
        frames, width = cfg.video.frames, cfg.vision.width
        mlp = cfg.video.mlp_dim or 4 * width
        flops = frames * frame_flops
        flops += cfg.video.layers * matmul_flops.block(frames, width, mlp, frames)
        heads = _temporal_heads(cfg, width)
        flops += matmul_flops.cross(1, frames, width, width, heads=heads, shared_queries=True)
        return flops, frames * (1 + frame_tokens)

    @nn.compact
    def __call__(self, clips: Array) -> tuple[Array, Array | None]:
        cfg = self.cfg
        t = cfg.video.frames
        if clips.ndim != 5 or clips.shape[1] != t:
            raise ValueError(
                f"clips are {tuple(clips.shape)} but model.input_kind='video' with "
                f"model.video.frames={t} needs [batch, {t}, height, width, 3]"
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
        if cfg.video.layers:
            # Bidirectional (no mask): a clip is seen whole, as a ViT sees its patches.
            mlp = cfg.video.mlp_dim or 4 * width
            x = Stack(
                cfg,
                EncoderBlock,
                cfg.video.layers,
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
