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
# Layout options that reproduce open_clip (mmjax.interop.open_clip); each tuple starts with
# the default.
MLP_ACTIVATIONS = ("gelu_tanh", "gelu", "quick_gelu")
VIT_POOLS = ("two_poolers", "shared_queries", "class_token")
TEXT_POOLS = ("cls", "argmax")
TEXT_MASKS = ("pad_keys", "open_clip")
DECODER_BLOCKS = ("fused", "split")
# How image and text meet (see mmjax/models/coca.py): cross_attention = CoCa's decoder
# cross-attends to the image tokens; early = one prefix-LM stream over image + text tokens;
# late = the decoder sees the pooled image embedding only, as one prefix token.
FUSIONS = ("cross_attention", "early", "late")
IMAGE_ENCODERS = ("vit", "resnet")
# ResNet stem (mmjax/models/resnet.py): imagenet = 7x7/2 conv + 3x3/2 max-pool (stride 4, the
# ResNet-50 stem); small = one 3x3/1 conv, no pool (stride 1, CIFAR-style, for 32-64 px);
# auto = imagenet when that leaves a final map of >= RESNET_MIN_GRID per side, else small.
RESNET_STEMS = ("auto", "imagenet", "small")
RESNET_MIN_GRID = 4  # The last feature map must keep >= 4x4 image tokens for the poolers.
INPUT_KINDS = ("image", "video")


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
    # open_clip layouts (set by mmjax.interop.open_clip); the defaults are mmjax's own CoCa.
    norm_eps: float = 1e-6  # open_clip: 1e-5 (torch's default).
    mlp_activation: str = "gelu_tanh"  # gelu = exact erf; quick_gelu = x * sigmoid(1.702 x).
    vit_class_token: bool = False  # A learned token before the patches; positions cover it.
    vit_ln_pre: bool = False  # LayerNorm between the embeddings and the blocks.
    # two_poolers: 1-query and N-query poolers after a final LayerNorm (the paper);
    # shared_queries: one pooler of N+1 queries, query 0 -> contrastive (open_clip CoCa);
    # class_token: LayerNorm'd class token -> contrastive, no caption tokens (CLIP).
    vit_pool: str = "two_poolers"
    pool_width: int = 0  # shared_queries: query width (open_clip: embed_dim); 0 = vit_width.
    pool_heads: int = 0  # 0 = vit_heads.
    # cls: CLS appended after the tokens (CoCa); argmax: features at the highest token id,
    # i.e. EOS of CLIP's tokenizer, after a final LayerNorm (CLIP, no decoder).
    text_pool: str = "cls"
    # pad_keys: padding is never a key; open_clip: key j is hidden when token j-1 is padding
    # (its CoCa's off-by-one mask, key 0 always visible).
    text_mask: str = "pad_keys"
    # fused: self-attn, cross-attn, MLP; split: a self-attn block and a cross-attn block
    # with one MLP each and a LayerNorm on the image tokens (open_clip's decoder).
    decoder_block: str = "fused"
    captioning: bool = True  # False: no decoder (plain CLIP).
    # Ablation axes (issue 7). The decoder of every fusion has decoder_layers blocks.
    fusion: str = "cross_attention"
    image_encoder: str = "vit"  # vit | resnet (then patch_size/vit_layers are unused)
    # ResNet-50 style bottleneck stages: blocks per stage; stage i has resnet_width * 2**i
    # channels inside its bottlenecks and 4x that at its output. Every stage after the first
    # halves the map, so the last map (its side: the property resnet_grid) has side
    # image_size / (stem stride * 2**(stages - 1)), rounded up, and must be >= 4.
    resnet_blocks: tuple[int, ...] = (3, 4, 6, 3)
    resnet_width: int = 64  # Even: GroupNorm groups and tensor sharding split channels.
    # auto | imagenet (7x7/2 conv + max-pool: stride 4) | small (3x3/1 conv: stride 1);
    # auto = imagenet when it keeps a >= 4x4 map (128 px and up with 4 stages), else small.
    resnet_stem: str = "auto"
    # image: batches carry images [B, H, W, 3]; video: clips [B, video_frames, H, W, 3],
    # every frame through the image encoder, then video_layers temporal blocks.
    input_kind: str = "image"
    video_frames: int = 4
    video_layers: int = 2

    @property
    def compute_dtype(self):
        return jnp.dtype(self.dtype)

    @property
    def weights_dtype(self):
        return jnp.dtype(self.param_dtype)

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def vit_positions(self) -> int:
        return self.num_patches + int(self.vit_class_token)

    @property
    def resnet_stem_layout(self) -> str:
        """model.resnet_stem with 'auto' resolved: 'imagenet' or 'small'."""
        if self.resnet_stem != "auto":
            return self.resnet_stem
        imagenet = dataclasses.replace(self, resnet_stem="imagenet")
        return "imagenet" if imagenet.resnet_grid >= RESNET_MIN_GRID else "small"

    @property
    def resnet_grid(self) -> int:
        """Side of the ResNet's last feature map (its image tokens: resnet_grid**2).

        Every stride-2 conv/pool pads (k-1)/2 on each side, so it maps n pixels to ceil(n/2).
        """
        side = self.image_size
        halvings = max(len(self.resnet_blocks) - 1, 0)
        if self.resnet_stem_layout == "imagenet":
            halvings += 2  # 7x7/2 conv, 3x3/2 max-pool.
        for _ in range(halvings):
            side = -(-side // 2)
        return side

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> ModelConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in values.items() if k in names}
        for key in ("image_mean", "image_std"):
            if key in kwargs:
                kwargs[key] = tuple(float(x) for x in kwargs[key])
        if "resnet_blocks" in kwargs:
            kwargs["resnet_blocks"] = tuple(int(x) for x in kwargs["resnet_blocks"])
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
        if self.image_encoder != "resnet" and self.image_size % self.patch_size:
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
        for name, allowed in (
            ("mlp_activation", MLP_ACTIVATIONS),
            ("vit_pool", VIT_POOLS),
            ("text_pool", TEXT_POOLS),
            ("text_mask", TEXT_MASKS),
            ("decoder_block", DECODER_BLOCKS),
            ("fusion", FUSIONS),
            ("image_encoder", IMAGE_ENCODERS),
            ("resnet_stem", RESNET_STEMS),
            ("input_kind", INPUT_KINDS),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(
                    f"model.{name}={getattr(self, name)!r} is unknown; allowed: {allowed}"
                )
        if self.vit_pool == "class_token" and not self.vit_class_token:
            raise ValueError("model.vit_pool='class_token' needs model.vit_class_token=True")
        # fusion='late' captions from the pooled vector, so class_token pooling serves it too.
        no_caption_tokens = self.vit_pool == "class_token" and self.fusion != "late"
        if self.captioning and (no_caption_tokens or self.text_pool == "argmax"):
            raise ValueError(
                "model.captioning=True needs caption tokens and a CLS text pool: set "
                "model.vit_pool to two_poolers/shared_queries (or model.fusion='late') and "
                "model.text_pool='cls'"
            )
        if (self.pool_width or self.vit_width) % (self.pool_heads or self.vit_heads):
            raise ValueError(
                f"model.pool_width={self.pool_width} is not divisible by "
                f"model.pool_heads={self.pool_heads}"
            )
        for name in (
            "vit_layers",
            "text_layers",
            "decoder_layers",
            "caption_queries",
            "embed_dim",
            "resnet_width",
            "video_frames",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"model.{name}={getattr(self, name)} must be >= 1")
        if not self.resnet_blocks or min(self.resnet_blocks) < 1:
            raise ValueError(
                f"model.resnet_blocks={self.resnet_blocks} needs one or more stages of >= 1 block"
            )
        if self.image_encoder == "resnet":
            self._validate_resnet()
        if self.video_layers < 0:
            raise ValueError(f"model.video_layers={self.video_layers} must be >= 0")
        if self.fusion != "cross_attention" and self.decoder_block != "fused":
            raise ValueError(
                f"model.decoder_block={self.decoder_block!r} is a cross-attention layout; "
                f"model.fusion={self.fusion!r} needs decoder_block='fused'"
            )

    def _validate_resnet(self) -> None:
        if self.resnet_width % 2:
            raise ValueError(
                f"model.resnet_width={self.resnet_width} must be even (GroupNorm groups of >= 2 "
                f"channels, channels split over the tensor axis)"
            )
        if self.vit_pool != "two_poolers" or self.vit_class_token:
            raise ValueError(
                f"model.vit_pool={self.vit_pool!r} (vit_class_token={self.vit_class_token}) is "
                f"a ViT layout; model.image_encoder='resnet' pools with 'two_poolers' only"
            )
        grid = self.resnet_grid
        if grid < RESNET_MIN_GRID:
            layout = self.resnet_stem_layout
            hint = (
                "use model.resnet_stem='small', fewer stages or larger images"
                if layout == "imagenet"
                else "use fewer stages or larger images"
            )
            raise ValueError(
                f"model.resnet_stem={self.resnet_stem!r} ({layout} stem) with "
                f"{len(self.resnet_blocks)} stages leaves a {grid}x{grid} feature map from "
                f"model.image_size={self.image_size}; it needs >= "
                f"{RESNET_MIN_GRID}x{RESNET_MIN_GRID}: {hint}"
            )


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
        # Unrolled for the 2-core CPU benchmark: at 4 layers both layouts compile in ~10 s,
        # and XLA:CPU's layer loop costs 5-15% of the step (BUILD_NOTES "Benchmark").
        scan_layers=False,
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
