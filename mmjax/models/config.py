"""The model's hyper-parameters as one frozen (hashable) dataclass.

Flax modules receive this object instead of the ml_collections ConfigDict so
that they stay hashable and the model code never sees training settings.
Named sizes live in `SIZES`; a config selects one and may override fields.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp

# What the backward pass may keep from the forward pass of each layer (jax.checkpoint):
# none = everything (no remat), minimal = matmul outputs without a batch dim (weights-like),
# dots-saveable = every matmul output, full = nothing (recompute the whole layer).
REMAT_POLICIES = ("none", "minimal", "dots-saveable", "full")
TOWERS = ("vision", "text", "decoder")
DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    # Image tower (ViT).
    image_size: int = 32
    patch_size: int = 4
    vit_width: int = 64
    vit_layers: int = 2
    vit_heads: int = 2
    vit_mlp_dim: int = 256
    caption_queries: int = 16  # N queries of the captioning attentional pooler.
    # Text towers: the unimodal encoder and the multimodal decoder share width.
    vocab_size: int = 256
    context_length: int = 16  # Tokens per caption incl. BOS and EOS.
    text_width: int = 64
    text_layers: int = 2
    text_heads: int = 2
    text_mlp_dim: int = 256
    decoder_layers: int = 1
    embed_dim: int = 64  # Joint contrastive space.
    # Numerics and memory.
    dtype: str = "float32"  # Compute dtype ('bfloat16' on accelerators).
    param_dtype: str = "float32"
    scan_layers: bool = True
    remat: str = "none"  # For every tower, unless overridden below.
    remat_vision: str = ""  # '' = model.remat
    remat_text: str = ""
    remat_decoder: str = ""
    # Contrastive head initialisation (CLIP: log(1/0.07), 0; SigLIP: log 10, -10).
    init_logit_scale: float = math.log(1 / 0.07)
    init_logit_bias: float = 0.0
    max_logit_scale: float = math.log(100.0)
    # Pixel normalisation applied on the device to uint8 images.
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)

    @property
    def compute_dtype(self):
        return jnp.dtype(self.dtype)

    @property
    def weights_dtype(self):
        return jnp.dtype(self.param_dtype)

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> ModelConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in values.items() if k in names}
        for key in ("image_mean", "image_std"):
            if key in kwargs:
                kwargs[key] = tuple(float(x) for x in kwargs[key])
        return cls(**kwargs)

    def remat_for(self, tower: str) -> str:
        """The remat policy of one tower ('vision', 'text' or 'decoder')."""
        return getattr(self, f"remat_{tower}") or self.remat

    def validate(self) -> None:
        """Raises ValueError naming the first inconsistent field."""
        if self.dtype not in DTYPES:
            raise ValueError(f"model.dtype={self.dtype!r} is unknown; allowed: {DTYPES}")
        if self.param_dtype not in DTYPES:
            raise ValueError(
                f"model.param_dtype={self.param_dtype!r} is unknown; allowed: {DTYPES}"
            )
        for key in ("remat", *(f"remat_{tower}" for tower in TOWERS)):
            value = getattr(self, key)
            if value not in REMAT_POLICIES and not (key != "remat" and value == ""):
                raise ValueError(f"model.{key}={value!r} is unknown; allowed: {REMAT_POLICIES}")
        if self.image_size % self.patch_size:
            raise ValueError(
                f"model.image_size={self.image_size} is not divisible by "
                f"model.patch_size={self.patch_size}"
            )
        for width, heads, name in (
            (self.vit_width, self.vit_heads, "vit"),
            (self.text_width, self.text_heads, "text"),
        ):
            if width % heads:
                raise ValueError(
                    f"model.{name}_width={width} is not divisible by model.{name}_heads={heads}"
                )
        if self.context_length < 3:
            raise ValueError(
                f"model.context_length={self.context_length} must be >= 3 (BOS, a token, EOS)"
            )
        for name in ("vit_layers", "text_layers", "decoder_layers", "caption_queries", "embed_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"model.{name}={getattr(self, name)} must be >= 1")


def _size(**kw) -> dict[str, Any]:
    return kw


# Named sizes. `bench` is fixed by the benchmark contract (see BUILD_NOTES.md);
# `base` follows the CoCa paper's smallest model (ViT-B/16 towers, 12+12 text
# layers split 6 unimodal + 6 multimodal in the paper's "Base"); `large` uses
# ViT-L/14 towers.
SIZES: dict[str, dict[str, Any]] = {
    "tiny": _size(
        image_size=32,
        patch_size=4,
        vit_width=64,
        vit_layers=2,
        vit_heads=2,
        vit_mlp_dim=256,
        caption_queries=16,
        vocab_size=256,
        context_length=16,
        text_width=64,
        text_layers=2,
        text_heads=2,
        text_mlp_dim=256,
        decoder_layers=2,
        embed_dim=64,
    ),
    "bench": _size(
        image_size=64,
        patch_size=8,
        vit_width=256,
        vit_layers=4,
        vit_heads=4,
        vit_mlp_dim=1024,
        caption_queries=256,
        vocab_size=4000,
        context_length=32,
        text_width=256,
        text_layers=4,
        text_heads=4,
        text_mlp_dim=1024,
        decoder_layers=2,
        embed_dim=256,
    ),
    "small": _size(
        image_size=128,
        patch_size=16,
        vit_width=384,
        vit_layers=12,
        vit_heads=6,
        vit_mlp_dim=1536,
        caption_queries=64,
        vocab_size=32000,
        context_length=64,
        text_width=384,
        text_layers=6,
        text_heads=6,
        text_mlp_dim=1536,
        decoder_layers=6,
        embed_dim=384,
    ),
    "base": _size(
        image_size=224,
        patch_size=16,
        vit_width=768,
        vit_layers=12,
        vit_heads=12,
        vit_mlp_dim=3072,
        caption_queries=256,
        vocab_size=64000,
        context_length=64,
        text_width=768,
        text_layers=6,
        text_heads=12,
        text_mlp_dim=3072,
        decoder_layers=6,
        embed_dim=768,
    ),
    "large": _size(
        image_size=224,
        patch_size=14,
        vit_width=1024,
        vit_layers=24,
        vit_heads=16,
        vit_mlp_dim=4096,
        caption_queries=256,
        vocab_size=64000,
        context_length=64,
        text_width=1024,
        text_layers=12,
        text_heads=16,
        text_mlp_dim=4096,
        decoder_layers=12,
        embed_dim=1024,
    ),
}
