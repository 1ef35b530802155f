"""The model's hyper-parameters: one frozen (hashable) dataclass, grouped per tower.

Flax modules receive this object instead of the ml_collections ConfigDict so that they stay
hashable and the model code never sees training settings. The top level holds what the
towers share (the input contract: image size, vocabulary, context length, the joint space;
numerics; the open_clip layout switches every layer reads); each tower reads its own group:
`vision` (ViT or ResNet, and its poolers), `text` (the unimodal encoder), `decoder` (the
multimodal decoder and how it meets the image: `decoder.fusion`) and `video` (the temporal
encoder over frames). As config keys: `model.vision.width`, `model.decoder.fusion`, ...

Named sizes live in `SIZES`; a config selects one and may override fields. Configs written
before the grouping used flat keys (`model.vit_width`); `LEGACY_KEYS` maps them to their new
names so that saved runs still load (`upgrade_legacy_keys`) while a flat key in a new config
fails with one line naming its new name.
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
VIT_POOLS = ("two_poolers", "shared_queries", "class_token", "map")
TEXT_POOLS = ("cls", "argmax", "last")
TEXT_MASKS = ("pad_keys", "open_clip")
DECODER_BLOCKS = ("fused", "split")
# How image and text meet (mmjax/models/registry.py DECODERS), with what the decoder reads
# about the image: cross_attention = CoCa's decoder cross-attends to the image tower's caption
# tokens; early = one prefix-LM stream over caption tokens + text; late = the decoder sees the
# pooled image embedding only, as one prefix token (the towers then build no caption pooler).
FUSIONS = {"cross_attention": "caption_tokens", "early": "caption_tokens", "late": "pooled"}
IMAGE_ENCODERS = ("vit", "resnet")  # mmjax/models/frame_encoders.py FRAME_ENCODERS
TEXT_ENCODERS = ("transformer",)  # mmjax/models/registry.py TEXT_ENCODERS
# ResNet stem (mmjax/models/resnet.py): imagenet = 7x7/2 conv + 3x3/2 max-pool (stride 4, the
# ResNet-50 stem); small = one 3x3/1 conv, no pool (stride 1, CIFAR-style, for 32-64 px);
# auto = imagenet when that leaves a final map of >= RESNET_MIN_GRID per side, else small.
RESNET_STEMS = ("auto", "imagenet", "small")
RESNET_MIN_GRID = 4  # The last feature map must keep >= 4x4 image tokens for the poolers.
INPUT_KINDS = ("image", "video")
# mmjax/models/attention.py KERNELS: auto picks per call on the compiled-for platform.
ATTENTION_KERNELS = ("auto", "xla", "cudnn", "splash")


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """The image tower (model.vision.*): one still image or video frame -> tokens."""

    encoder: str = "vit"  # vit | resnet (then patch_size/layers/mlp_dim are unused)
    patch_size: int = 4
    width: int = 64  # Token width: the ViT's stream, the poolers' output (ResNet too).
    layers: int = 2
    heads: int = 2
    mlp_dim: int = 256
    caption_queries: int = 16  # N queries of the captioning attentional pooler.
    class_token: bool = False  # A learned token before the patches; positions cover it.
    ln_pre: bool = False  # LayerNorm between the embeddings and the blocks.
    patch_bias: bool = True  # False: the patch embedding has no bias (open_clip's conv1).
    # two_poolers: 1-query and N-query poolers after a final LayerNorm (the paper);
    # shared_queries: one pooler of N+1 queries, query 0 -> contrastive (open_clip CoCa);
    # class_token: LayerNorm'd class token -> contrastive, no caption tokens (CLIP);
    # map: a final LayerNorm, then one learned probe attends to the tokens, plus a residual
    # MLP (SigLIP's multihead attention pooling head), no caption tokens.
    pool: str = "two_poolers"
    pool_width: int = 0  # shared_queries: query width (open_clip: embed_dim); 0 = width.
    pool_heads: int = 0  # 0 = heads.
    # False: the pooled vector is the image embedding, with no projection into the joint
    # space (SigLIP); embed_dim must then equal the pooled width.
    proj: bool = True
    remat: str = ""  # '' = model.remat
    # ResNet-50 style bottleneck stages: blocks per stage; stage i has resnet_width * 2**i
    # channels inside its bottlenecks and 4x that at its output. Every stage after the first
    # halves the map, so the last map (its side: ModelConfig.resnet_grid) has side
    # image_size / (stem stride * 2**(stages - 1)), rounded up, and must be >= 4.
    resnet_blocks: tuple[int, ...] = (3, 4, 6, 3)
    resnet_width: int = 64  # Even: GroupNorm groups and tensor sharding split channels.
    # auto | imagenet (7x7/2 conv + max-pool: stride 4) | small (3x3/1 conv: stride 1);
    # auto = imagenet when it keeps a >= 4x4 map (128 px and up with 4 stages), else small.
    resnet_stem: str = "auto"


@dataclasses.dataclass(frozen=True)
class TextConfig:
    """The unimodal text encoder (model.text.*); the decoder shares its width."""

    encoder: str = "transformer"
    width: int = 64
    layers: int = 2
    heads: int = 2
    mlp_dim: int = 256
    # cls: CLS appended after the tokens (CoCa); argmax: features at the highest token id,
    # i.e. EOS of CLIP's tokenizer, after a final LayerNorm (CLIP, no decoder); last: the
    # last position after a final LayerNorm, every position seeing every other, padding
    # included (SigLIP: its tokenizer pads with EOS; no decoder).
    pool: str = "cls"
    # pad_keys: padding is never a key; open_clip: key j is hidden when token j-1 is padding
    # (its CoCa's off-by-one mask, key 0 always visible).
    mask: str = "pad_keys"
    proj_bias: bool = False  # True: the projection into the joint space has a bias (SigLIP).
    remat: str = ""


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    """The multimodal caption decoder (model.decoder.*), text.width wide.

    Its blocks use text.heads heads and text.mlp_dim hidden units unless set here."""

    fusion: str = "cross_attention"  # How image and text meet: FUSIONS.
    layers: int = 1
    heads: int = 0  # 0 = text.heads
    mlp_dim: int = 0  # 0 = text.mlp_dim
    # fused: self-attn, cross-attn, MLP; split: a self-attn block and a cross-attn block
    # with one MLP each and a LayerNorm on the image tokens (open_clip's decoder).
    block: str = "fused"
    head_bias: bool = True  # False: the LM head has no bias (open_clip's text_projection).
    remat: str = ""


@dataclasses.dataclass(frozen=True)
class VideoConfig:
    """The temporal encoder over frame vectors (model.video.*; model.input_kind='video').

    It runs at the frame encoder's token width (vision.width)."""

    frames: int = 4
    layers: int = 2
    heads: int = 0  # 0 = vision.pool_heads or vision.heads when it divides the width, else 1
    mlp_dim: int = 0  # 0 = 4 x the width


_GROUPS = {
    "vision": VisionConfig,
    "text": TextConfig,
    "decoder": DecoderConfig,
    "video": VideoConfig,
}

# Flat keys of configs written before the grouping -> their grouped names.
LEGACY_KEYS = {
    "image_encoder": "vision.encoder",
    "patch_size": "vision.patch_size",
    "vit_width": "vision.width",
    "vit_layers": "vision.layers",
    "vit_heads": "vision.heads",
    "vit_mlp_dim": "vision.mlp_dim",
    "caption_queries": "vision.caption_queries",
    "vit_class_token": "vision.class_token",
    "vit_ln_pre": "vision.ln_pre",
    "vit_pool": "vision.pool",
    "pool_width": "vision.pool_width",
    "pool_heads": "vision.pool_heads",
    "remat_vision": "vision.remat",
    "resnet_blocks": "vision.resnet_blocks",
    "resnet_width": "vision.resnet_width",
    "resnet_stem": "vision.resnet_stem",
    "text_width": "text.width",
    "text_layers": "text.layers",
    "text_heads": "text.heads",
    "text_mlp_dim": "text.mlp_dim",
    "text_pool": "text.pool",
    "text_mask": "text.mask",
    "remat_text": "text.remat",
    "fusion": "decoder.fusion",
    "decoder_layers": "decoder.layers",
    "decoder_block": "decoder.block",
    "remat_decoder": "decoder.remat",
    "video_frames": "video.frames",
    "video_layers": "video.layers",
}


def upgrade_legacy_keys(values: Mapping[str, Any]) -> dict[str, Any]:
    """A model mapping with flat pre-grouping keys -> the grouped mapping.

    The video tower's MLP used to be vit_mlp_dim wide when it ran at vit_width; its default
    is now 4 x the width, so a saved video run that differed keeps its width explicitly."""
    out = {k: dict(v) if isinstance(v, Mapping) else v for k, v in values.items()}
    legacy = {k: out.pop(k) for k in list(out) if k in LEGACY_KEYS}
    for key, value in legacy.items():
        group, name = LEGACY_KEYS[key].split(".")
        current = out.setdefault(group, {}).setdefault(name, value)
        if current != value:
            raise ValueError(
                f"model.{key}={value!r} (the old name of model.{LEGACY_KEYS[key]}) disagrees "
                f"with model.{LEGACY_KEYS[key]}={current!r}"
            )
    video = out.get("video", {})
    if legacy and out.get("input_kind") == "video" and not video.get("mlp_dim"):
        vision = out.get("vision", {})
        width = vision.get("width", VisionConfig.width)
        pooled_width = (
            (vision.get("pool_width") or width)
            if vision.get("pool") == ("shared_queries")
            else width
        )
        mlp = vision.get("mlp_dim", VisionConfig.mlp_dim)
        if pooled_width == width and mlp != 4 * width:
            out.setdefault("video", {})["mlp_dim"] = mlp
    return out


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    # The input contract every tower and the data pipeline agree on.
    image_size: int = 32
    vocab_size: int = 256
    context_length: int = 16  # Tokens per caption incl. BOS and EOS.
    embed_dim: int = 64  # Joint contrastive space.
    # image: batches carry images [B, H, W, 3]; video: clips [B, video.frames, H, W, 3],
    # every frame through the image tower, then video.layers temporal blocks.
    input_kind: str = "image"
    captioning: bool = True  # False: no decoder (plain CLIP).
    # FLIP patch dropout: the fraction of its patch tokens each training image drops (a
    # random subset per image, from the step's PRNG; the class token stays). Evaluation and
    # inference see every patch. ViT image tower on still images only.
    patch_dropout: float = 0.0
    vision: VisionConfig = VisionConfig()
    text: TextConfig = TextConfig()
    decoder: DecoderConfig = DecoderConfig()
    video: VideoConfig = VideoConfig()
    # Numerics and memory.
    dtype: str = "float32"  # Compute dtype ('bfloat16' on accelerators).
    param_dtype: str = "float32"
    scan_layers: bool = True
    remat: str = "none"  # For every tower, unless its group sets its own.
    # Attention kernel (mmjax/models/attention.py): auto | xla | cudnn (GPU) | splash (TPU).
    attention: str = "auto"
    # Contrastive head initialisation (CLIP: log(1/0.07), 0; SigLIP: log 10, -10).
    init_logit_scale: float = math.log(1 / 0.07)
    init_logit_bias: float = 0.0
    max_logit_scale: float = math.log(100.0)
    # Pixel normalisation applied on the device to uint8 images.
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    # open_clip layouts every layer reads (set by mmjax.interop.open_clip).
    norm_eps: float = 1e-6  # open_clip: 1e-5 (torch's default).
    mlp_activation: str = "gelu_tanh"  # gelu = exact erf; quick_gelu = x * sigmoid(1.702 x).

    @property
    def compute_dtype(self):
        return jnp.dtype(self.dtype)

    @property
    def weights_dtype(self):
        return jnp.dtype(self.param_dtype)

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.vision.patch_size) ** 2

    @property
    def vit_positions(self) -> int:
        return self.num_patches + int(self.vision.class_token)

    @property
    def kept_patches(self) -> int:
        """Patch tokens a training image keeps under patch dropout (all of them when off)."""
        return max(1, int(self.num_patches * (1.0 - self.patch_dropout)))

    @property
    def caption_tokens_from_tower(self) -> bool:
        """Whether the image tower builds a caption pooler: the decoder reads its caption
        tokens (fusion cross_attention / early), not the pooled vector (late)."""
        return FUSIONS[self.decoder.fusion] == "caption_tokens"

    @property
    def decoder_heads(self) -> int:
        return self.decoder.heads or self.text.heads

    @property
    def decoder_mlp_dim(self) -> int:
        return self.decoder.mlp_dim or self.text.mlp_dim

    @property
    def resnet_stem_layout(self) -> str:
        """vision.resnet_stem with 'auto' resolved: 'imagenet' or 'small'."""
        if self.vision.resnet_stem != "auto":
            return self.vision.resnet_stem
        imagenet = self.replace({"vision.resnet_stem": "imagenet"})
        return "imagenet" if imagenet.resnet_grid >= RESNET_MIN_GRID else "small"

    @property
    def resnet_grid(self) -> int:
        """Side of the ResNet's last feature map (its image tokens: resnet_grid**2).

        Every stride-2 conv/pool pads (k-1)/2 on each side, so it maps n pixels to ceil(n/2).
        """
        side = self.image_size
        halvings = max(len(self.vision.resnet_blocks) - 1, 0)
        if self.resnet_stem_layout == "imagenet":
            halvings += 2  # 7x7/2 conv, 3x3/2 max-pool.
        for _ in range(halvings):
            side = -(-side // 2)
        return side

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> ModelConfig:
        """From a (nested) mapping such as config.model.to_dict(); flat legacy keys are
        upgraded, unknown keys ignored (runtime.config.validate names them)."""
        values = upgrade_legacy_keys(values)
        kwargs = {}
        for field in dataclasses.fields(cls):
            if field.name not in values:
                continue
            value = values[field.name]
            if field.name in _GROUPS:
                group = _GROUPS[field.name]
                names = {f.name for f in dataclasses.fields(group)}
                value = group(**{k: v for k, v in dict(value).items() if k in names})
            kwargs[field.name] = value
        for key in ("image_mean", "image_std"):
            if key in kwargs:
                kwargs[key] = tuple(float(x) for x in kwargs[key])
        cfg = cls(**kwargs)
        blocks = tuple(int(x) for x in cfg.vision.resnet_blocks)
        return dataclasses.replace(
            cfg, vision=dataclasses.replace(cfg.vision, resnet_blocks=blocks)
        )

    @classmethod
    def sized(cls, size: str, overrides: Mapping[str, Any] | None = None) -> ModelConfig:
        """A named size of SIZES with dotted overrides: {'vision.width': 32, 'dtype': ...}."""
        return cls.from_mapping(SIZES[size]).replace(overrides or {})

    def replace(self, overrides: Mapping[str, Any]) -> ModelConfig:
        """A copy with dotted fields replaced ({'decoder.fusion': 'late', 'remat': 'full'})."""
        top: dict[str, Any] = {}
        groups: dict[str, dict[str, Any]] = {}
        for key, value in overrides.items():
            group, _, name = key.rpartition(".")
            if group:
                if group not in _GROUPS or name not in _GROUPS[group].__dataclass_fields__:
                    raise ValueError(f"model.{key} is not a model field")
                groups.setdefault(group, {})[name] = value
            elif key in LEGACY_KEYS:
                raise ValueError(f"model.{key} was renamed model.{LEGACY_KEYS[key]}")
            else:
                top[key] = value
        for group, values in groups.items():
            top[group] = dataclasses.replace(top.get(group, getattr(self, group)), **values)
        return dataclasses.replace(self, **top)

    def remat_for(self, tower: str) -> str:
        """The remat policy of one tower ('vision', 'text' or 'decoder')."""
        return getattr(self, tower).remat or self.remat

    def validate(self) -> None:
        """Raises ValueError naming the first inconsistent field."""
        v, t, d = self.vision, self.text, self.decoder
        if self.dtype not in DTYPES:
            raise ValueError(f"model.dtype={self.dtype!r} is unknown; allowed: {DTYPES}")
        if self.param_dtype not in DTYPES:
            raise ValueError(
                f"model.param_dtype={self.param_dtype!r} is unknown; allowed: {DTYPES}"
            )
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"model.remat={self.remat!r} is unknown; allowed: {REMAT_POLICIES}")
        if not 0.0 <= self.patch_dropout < 1.0:
            raise ValueError(f"model.patch_dropout={self.patch_dropout} must be in [0, 1)")
        if self.patch_dropout and (v.encoder != "vit" or self.input_kind != "image"):
            raise ValueError(
                f"model.patch_dropout={self.patch_dropout} needs the ViT tower on still images "
                f"(model.vision.encoder='vit', model.input_kind='image'); this model has "
                f"encoder={v.encoder!r}, input_kind={self.input_kind!r}"
            )
        for tower in TOWERS:
            value = getattr(self, tower).remat
            if value not in REMAT_POLICIES and value != "":
                raise ValueError(
                    f"model.{tower}.remat={value!r} is unknown; allowed: {REMAT_POLICIES} or ''"
                )
        if v.encoder != "resnet" and self.image_size % v.patch_size:
            raise ValueError(
                f"model.image_size={self.image_size} is not divisible by "
                f"model.vision.patch_size={v.patch_size}"
            )
        for group, width, heads in (
            ("vision", v.width, v.heads),
            ("text", t.width, t.heads),
            ("decoder", t.width, self.decoder_heads),
        ):
            if width % heads:
                raise ValueError(f"model.{group}.heads={heads} does not divide its width {width}")
        if self.context_length < 3:
            raise ValueError(
                f"model.context_length={self.context_length} must be >= 3 (BOS, a token, EOS)"
            )
        for name, value, allowed in (
            ("mlp_activation", self.mlp_activation, MLP_ACTIVATIONS),
            ("attention", self.attention, ATTENTION_KERNELS),
            ("input_kind", self.input_kind, INPUT_KINDS),
            ("vision.encoder", v.encoder, IMAGE_ENCODERS),
            ("vision.pool", v.pool, VIT_POOLS),
            ("vision.resnet_stem", v.resnet_stem, RESNET_STEMS),
            ("text.encoder", t.encoder, TEXT_ENCODERS),
            ("text.pool", t.pool, TEXT_POOLS),
            ("text.mask", t.mask, TEXT_MASKS),
            ("decoder.fusion", d.fusion, tuple(FUSIONS)),
            ("decoder.block", d.block, DECODER_BLOCKS),
        ):
            if value not in allowed:
                raise ValueError(f"model.{name}={value!r} is unknown; allowed: {allowed}")
        if v.pool == "class_token" and not v.class_token:
            raise ValueError("model.vision.pool='class_token' needs model.vision.class_token=True")
        # fusion='late' captions from the pooled vector, so class_token pooling serves it too.
        no_caption_tokens = v.pool in ("class_token", "map") and self.caption_tokens_from_tower
        if self.captioning and (no_caption_tokens or t.pool != "cls"):
            raise ValueError(
                "model.captioning=True needs caption tokens and a CLS text pool: set "
                "model.vision.pool to two_poolers/shared_queries (or "
                "model.decoder.fusion='late') and model.text.pool='cls'"
            )
        pooled_width = (v.pool_width or v.width) if v.pool == "shared_queries" else v.width
        if not v.proj and self.embed_dim != pooled_width:
            raise ValueError(
                f"model.vision.proj=False makes the pooled vector the image embedding, so "
                f"model.embed_dim={self.embed_dim} must equal its width {pooled_width}"
            )
        if (v.pool_width or v.width) % (v.pool_heads or v.heads):
            raise ValueError(
                f"model.vision.pool_width={v.pool_width} is not divisible by "
                f"model.vision.pool_heads={v.pool_heads}"
            )
        for name, value in (
            ("vision.layers", v.layers),
            ("vision.caption_queries", v.caption_queries),
            ("vision.resnet_width", v.resnet_width),
            ("text.layers", t.layers),
            ("decoder.layers", d.layers),
            ("embed_dim", self.embed_dim),
            ("video.frames", self.video.frames),
        ):
            if value < 1:
                raise ValueError(f"model.{name}={value} must be >= 1")
        for name, value in (
            ("decoder.heads", d.heads),
            ("decoder.mlp_dim", d.mlp_dim),
            ("video.layers", self.video.layers),
            ("video.heads", self.video.heads),
            ("video.mlp_dim", self.video.mlp_dim),
        ):
            if value < 0:
                raise ValueError(f"model.{name}={value} must be >= 0")
        if not v.resnet_blocks or min(v.resnet_blocks) < 1:
            raise ValueError(
                f"model.vision.resnet_blocks={v.resnet_blocks} needs one or more stages of "
                ">= 1 block"
            )
        if v.encoder == "resnet":
            self._validate_resnet()
        if d.fusion != "cross_attention" and d.block != "fused":
            raise ValueError(
                f"model.decoder.block={d.block!r} is a cross-attention layout; "
                f"model.decoder.fusion={d.fusion!r} needs decoder.block='fused'"
            )

    def _validate_resnet(self) -> None:
        v = self.vision
        if v.resnet_width % 2:
            raise ValueError(
                f"model.vision.resnet_width={v.resnet_width} must be even (GroupNorm groups of "
                f">= 2 channels, channels split over the tensor axis)"
            )
        if v.pool != "two_poolers" or v.class_token:
            raise ValueError(
                f"model.vision.pool={v.pool!r} (class_token={v.class_token}) is a ViT "
                f"layout; model.vision.encoder='resnet' pools with 'two_poolers' only"
            )
        grid = self.resnet_grid
        if grid < RESNET_MIN_GRID:
            layout = self.resnet_stem_layout
            hint = (
                "use model.vision.resnet_stem='small', fewer stages or larger images"
                if layout == "imagenet"
                else "use fewer stages or larger images"
            )
            raise ValueError(
                f"model.vision.resnet_stem={v.resnet_stem!r} ({layout} stem) with "
                f"{len(v.resnet_blocks)} stages leaves a {grid}x{grid} feature map from "
                f"model.image_size={self.image_size}; it needs >= "
                f"{RESNET_MIN_GRID}x{RESNET_MIN_GRID}: {hint}"
            )


def _size(*, vision, text, decoder, **top) -> dict[str, Any]:
    return dict(top, vision=vision, text=text, decoder=decoder)


# Named sizes (nested mappings, as config.model holds them). `bench` is fixed by the
# benchmark contract (see BUILD_NOTES.md); `base` follows the CoCa paper's smallest model
# (ViT-B/16 towers, 12+12 text layers split 6 unimodal + 6 multimodal in the paper's
# "Base"); `large` uses ViT-L/14 towers.
SIZES: dict[str, dict[str, Any]] = {
    "tiny": _size(
        image_size=32,
        vocab_size=256,
        context_length=16,
        embed_dim=64,
        vision=dict(patch_size=4, width=64, layers=2, heads=2, mlp_dim=256, caption_queries=16),
        text=dict(width=64, layers=2, heads=2, mlp_dim=256),
        decoder=dict(layers=2),
    ),
    "bench": _size(
        image_size=64,
        vocab_size=4000,
        context_length=32,
        embed_dim=256,
        vision=dict(patch_size=8, width=256, layers=4, heads=4, mlp_dim=1024, caption_queries=256),
        text=dict(width=256, layers=4, heads=4, mlp_dim=1024),
        decoder=dict(layers=2),
        # Unrolled for the 2-core CPU benchmark: at 4 layers both layouts compile in ~10 s,
        # and XLA:CPU's layer loop costs 5-15% of the step (BUILD_NOTES "Benchmark").
        scan_layers=False,
    ),
    "small": _size(
        image_size=128,
        vocab_size=32000,
        context_length=64,
        embed_dim=384,
        vision=dict(patch_size=16, width=384, layers=12, heads=6, mlp_dim=1536, caption_queries=64),
        text=dict(width=384, layers=6, heads=6, mlp_dim=1536),
        decoder=dict(layers=6),
    ),
    "base": _size(
        image_size=224,
        vocab_size=64000,
        context_length=64,
        embed_dim=768,
        vision=dict(
            patch_size=16, width=768, layers=12, heads=12, mlp_dim=3072, caption_queries=256
        ),
        text=dict(width=768, layers=6, heads=12, mlp_dim=3072),
        decoder=dict(layers=6),
    ),
    "large": _size(
        image_size=224,
        vocab_size=64000,
        context_length=64,
        embed_dim=1024,
        vision=dict(
            patch_size=14, width=1024, layers=24, heads=16, mlp_dim=4096, caption_queries=256
        ),
        text=dict(width=1024, layers=12, heads=16, mlp_dim=4096),
        decoder=dict(layers=12),
    ),
}
