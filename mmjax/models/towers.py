"""Chooses the image-side tower from the model config (model.image_encoder, model.input_kind).

Every tower returns (pooled vector [B, W], caption tokens [B, N, W] or None), so the rest
of the model does not care whether it reads images or clips, through a ViT or a ResNet.
With model.fusion='late' every tower returns caption tokens None and builds no caption
pooler: the decoder reads the pooled vector only (CoCa.encode_image hands it over).
"""

from __future__ import annotations

import flax.linen as nn

from mmjax.models.config import ModelConfig


def frame_encoder(cfg: ModelConfig, name: str | None = None) -> nn.Module:
    """The encoder of one still image (or one video frame): model.image_encoder."""
    if cfg.image_encoder == "resnet":
        from mmjax.models.resnet import ResNetEncoder

        return ResNetEncoder(cfg, name=name)
    from mmjax.models.vit import ImageEncoder

    return ImageEncoder(cfg, name=name)


def image_tower(cfg: ModelConfig) -> nn.Module:
    """What CoCa.encode_image runs: the frame encoder, or the video encoder around it."""
    if cfg.input_kind == "video":
        from mmjax.models.video import VideoEncoder

        return VideoEncoder(cfg)
    return frame_encoder(cfg)
