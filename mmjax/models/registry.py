"""Chooses the image-side tower from the model config (model.input_kind, model.image_encoder).

Every tower returns (pooled vector [B, W], caption tokens [B, N, W] or None), so the rest
of the model does not care whether it reads images or clips, through a ViT or a ResNet.
With model.fusion='late' every tower returns caption tokens None and builds no caption
pooler: the decoder reads the pooled vector only (CoCa.encode_image hands it over).
"""

from __future__ import annotations

import flax.linen as nn

from mmjax.models.config import ModelConfig
from mmjax.models.frame_encoders import frame_encoder
from mmjax.models.video import VideoEncoder


def image_tower(cfg: ModelConfig) -> nn.Module:
    """What CoCa.encode_image runs: the frame encoder, or the video encoder around it."""
    if cfg.input_kind == "video":
        return VideoEncoder(cfg)
    return frame_encoder(cfg)
