"""The encoders of one still image or video frame, chosen by model.vision.encoder.

Every one returns (pooled vector [B, W], caption tokens [B, N, W] or None), so the towers
above them (CoCa.encode_image, the video encoder) do not care which one reads the pixels.
"""

from __future__ import annotations

import flax.linen as nn

from mmjax.models.config import IMAGE_ENCODERS, ModelConfig
from mmjax.models.resnet import ResNetEncoder
from mmjax.models.vit import ImageEncoder

FRAME_ENCODERS: dict[str, type[nn.Module]] = {"vit": ImageEncoder, "resnet": ResNetEncoder}
assert set(FRAME_ENCODERS) == set(IMAGE_ENCODERS), "config.IMAGE_ENCODERS lists the same names"


def frame_encoder(cfg: ModelConfig, name: str | None = None) -> nn.Module:
    """The encoder model.vision.encoder names."""
    return FRAME_ENCODERS[cfg.vision.encoder](cfg, name=name)
