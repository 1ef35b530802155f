"""The model's parts chosen by name: image towers, text encoders, fusion decoders.

- Image side (model.input_kind, model.vision.encoder): every tower returns (pooled vector
  [B, W], caption tokens [B, N, W] or None), so the rest of the model does not care whether
  it reads images or clips, through a ViT or a ResNet. When the decoder reads the pooled
  vector (model.decoder.fusion='late') the towers return caption tokens None and build no
  caption pooler; CoCa.encode_image hands the pooled vector over instead.
- Text side (model.text.encoder): (pooled [B, W], token features [B, T, W]).
- Decoder (model.decoder.fusion): (text features, image tokens) -> caption logits.

Every module also counts its own forward FLOPs (`forward_flops`), which mmjax.models.flops
adds up for the chosen parts.
"""

from __future__ import annotations

import flax.linen as nn

from mmjax.models.config import FUSIONS, TEXT_ENCODERS, ModelConfig
from mmjax.models.frame_encoders import FRAME_ENCODERS, frame_encoder
from mmjax.models.fusion import PrefixLMDecoder
from mmjax.models.text import MultimodalDecoder, TextEncoder
from mmjax.models.video import VideoEncoder

TEXT_ENCODER_CLASSES: dict[str, type[nn.Module]] = {"transformer": TextEncoder}
DECODERS: dict[str, type[nn.Module]] = {
    "cross_attention": MultimodalDecoder,
    "early": PrefixLMDecoder,
    "late": PrefixLMDecoder,
}
assert set(TEXT_ENCODER_CLASSES) == set(TEXT_ENCODERS), "config.TEXT_ENCODERS: same names"
assert set(DECODERS) == set(FUSIONS), "config.FUSIONS lists the same names"


def image_tower_class(cfg: ModelConfig) -> type[nn.Module]:
    return VideoEncoder if cfg.input_kind == "video" else FRAME_ENCODERS[cfg.vision.encoder]


def image_tower(cfg: ModelConfig) -> nn.Module:
    """What CoCa.encode_image runs: the frame encoder, or the video encoder around it."""
    if cfg.input_kind == "video":
        return VideoEncoder(cfg)
    return frame_encoder(cfg)


def text_encoder(cfg: ModelConfig, *, decode: bool = False) -> nn.Module:
    return TEXT_ENCODER_CLASSES[cfg.text.encoder](cfg, decode=decode)


def decoder(cfg: ModelConfig, *, decode: bool = False) -> nn.Module:
    return DECODERS[cfg.decoder.fusion](cfg, decode=decode)
