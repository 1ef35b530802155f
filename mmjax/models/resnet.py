"""ResNet image encoder (model.vision.encoder='resnet') followed by CoCa's attentional poolers.

A bottleneck ResNet in the ResNet-50 layout (v1.5: the stride sits in the 3x3 conv):

- stem (model.vision.resnet_stem, see mmjax.models.config.RESNET_STEMS): 'imagenet' = 7x7/2 conv +
  3x3/2 max-pool, 'small' = one 3x3/1 conv (no pool) for 32-64 px images, 'auto' picks;
- len(model.vision.resnet_blocks) stages of bottlenecks (1x1 reduce, 3x3, 1x1 expand to 4x), stage i
  with resnet_width * 2**i inner channels; every stage after the first starts with a stride-2
  block; a block whose shape changes has a projection shortcut (1x1 conv + norm);
- the last feature map [B, h, w, C] is flattened to h*w image tokens, projected to vision.width,
  given learned positions and pooled exactly like the ViT's two_poolers: 1 contrastive query and
  vision.caption_queries caption queries (mmjax.models.vit.AttentionalPooler). With
  model.decoder.fusion='late' the caption pooler is not built and the caption tokens are None.

Normalisation: GroupNorm after every convolution, whose kernels are weight-standardised (BiT,
Kolesnikov et al. 2020; big_vision's ResNets). BatchNorm would need mutable batch statistics
in the train state and a cross-device mean in the step; mmjax's train_step is a pure function
of (params, batch) and its state holds parameters only, and eval would then depend on running
averages. GroupNorm normalises each example on its own (no state, identical in train and eval,
independent of how the batch is sharded); weight standardisation recovers most of BatchNorm's
optimisation benefit in the BiT recipe. The last norm of every residual branch starts at scale
0, so each block starts as the identity (Goyal et al. 2017).

Every parameter carries logical names: conv kernels (None, None, 'conv_in', 'conv_out'), the
3-channel stem kernel (None, None, None, 'conv_out'), norms 'norm'; feature maps are
constrained to ('batch', None, None, 'act_conv'). mmjax.runtime.sharding maps these for
every preset.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.models import matmul_flops
from mmjax.models.config import ModelConfig
from mmjax.models.layers import Dense, constrain, partitioned
from mmjax.models.vit import AttentionalPooler, normalise_pixels, pooler_flops

Array = jax.Array

FEATURE_MAP = ("batch", None, None, "act_conv")
GROUPS = 32  # GroupNorm groups (BiT), fewer for narrow layers; see norm_groups.
WS_EPS = 1e-5  # Weight standardisation.
GN_EPS = 1e-5


def norm_groups(channels: int) -> int:
    """32 groups as BiT, but never fewer than 2 channels per group: gcd(32, channels / 2).

    Any ResNet-50 width (multiples of 64 channels) gets 32; narrow test/tiny models still get
    a real group statistic instead of per-channel (instance) normalisation.
    """
    return math.gcd(GROUPS, channels // 2) if channels >= 2 else 1


def standardise(kernel: Array) -> Array:
    """Weight standardisation: each output filter to zero mean, unit variance over its fan-in."""
    w = kernel.astype(jnp.float32)
    mean = jnp.mean(w, axis=(0, 1, 2), keepdims=True)
    var = jnp.var(w, axis=(0, 1, 2), keepdims=True)
    return (w - mean) * jax.lax.rsqrt(var + WS_EPS)


def conv_init() -> nn.initializers.Initializer:
    """He initialisation of a kernel [kh, kw, in, out], drawn as the matrix [kh*kw*in, out]
    (the same fan-in, so the same distribution): XLA:CPU compiles a random draw of a 4-D
    shape with small leading dims several times slower (~1 s per 3x3 kernel)."""
    matrix = nn.initializers.variance_scaling(2.0, "fan_in", "truncated_normal")

    def init(key, shape, dtype=jnp.float32):
        return matrix(key, (math.prod(shape[:-1]), shape[-1]), dtype).reshape(shape)

    return init


class StdConv(nn.Module):
    """A bias-free, weight-standardised convolution, NHWC, symmetric (k-1)/2 padding.

    Stride s maps n pixels to ceil(n / s) (ModelConfig.resnet_grid relies on it).
    """

    cfg: ModelConfig
    features: int
    kernel_size: int
    strides: int = 1
    in_axis: str | None = "conv_in"  # None for the RGB stem (3 channels do not split).

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg = self.cfg
        k = self.kernel_size
        # The standardisation makes the initial scale irrelevant to the output.
        kernel = self.param(
            "kernel",
            partitioned(conv_init(), (None, None, self.in_axis, "conv_out")),
            (k, k, x.shape[-1], self.features),
            cfg.weights_dtype,
        )
        x = x.astype(cfg.compute_dtype)
        w = standardise(kernel).astype(cfg.compute_dtype)
        if k == 1:  # A strided 1x1 conv is a subsampled matmul (much faster on CPU).
            s = self.strides
            y = jnp.einsum("bhwc,cd->bhwd", x[:, ::s, ::s], w[0, 0])
        else:
            pad = (k - 1) // 2
            y = jax.lax.conv_general_dilated(
                x,
                w,
                window_strides=(self.strides, self.strides),
                padding=((pad, pad), (pad, pad)),
                dimension_numbers=("NHWC", "HWIO", "NHWC"),
            )
        return constrain(y, FEATURE_MAP)


def GroupNorm(cfg: ModelConfig, channels: int, name: str, zero_scale: bool = False):
    # Flax reduces in f32 even for bf16 inputs (force_float32_reductions).
    return nn.GroupNorm(
        num_groups=norm_groups(channels),
        epsilon=GN_EPS,
        dtype=cfg.compute_dtype,
        param_dtype=cfg.weights_dtype,
        scale_init=partitioned(
            nn.initializers.zeros if zero_scale else nn.initializers.ones, ("norm",)
        ),
        bias_init=partitioned(nn.initializers.zeros, ("norm",)),
        name=name,
    )


class Bottleneck(nn.Module):
    """relu(norm(1x1 expand(relu(norm(3x3/s(relu(norm(1x1 reduce(x)))))))) + shortcut(x))."""

    cfg: ModelConfig
    width: int  # Inner channels; the block outputs 4 * width.
    strides: int = 1

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg = self.cfg
        out = 4 * self.width
        shortcut = x
        if x.shape[-1] != out or self.strides != 1:
            shortcut = StdConv(cfg, out, 1, self.strides, name="proj")(x)
            shortcut = GroupNorm(cfg, out, "proj_norm")(shortcut)
        y = StdConv(cfg, self.width, 1, name="conv1")(x)
        y = nn.relu(GroupNorm(cfg, self.width, "norm1")(y))
        y = StdConv(cfg, self.width, 3, self.strides, name="conv2")(y)
        y = nn.relu(GroupNorm(cfg, self.width, "norm2")(y))
        y = StdConv(cfg, out, 1, name="conv3")(y)
        y = GroupNorm(cfg, out, "norm3", zero_scale=True)(y)
        return constrain(nn.relu(y + shortcut), FEATURE_MAP)


class ResNetEncoder(nn.Module):
    """Stem, bottleneck stages, then the ViT's two attentional poolers over the last map.

    Returns the contrastive vector [B, vision.width] and the caption tokens
    [B, caption_queries, vision.width], or None with model.decoder.fusion='late'.
    """

    cfg: ModelConfig

    @staticmethod
    def forward_flops(
        cfg: ModelConfig, with_captioning: bool = True, training: bool = False
    ) -> tuple[float, int]:
        """Forward FLOPs for one image (convolutions, token projection, poolers; max-pool and
        norms not counted) -> (FLOPs, caption tokens). The same in training (no patch
        dropout for a ResNet)."""
        side, width = cfg.image_size, cfg.vision.resnet_width
        if cfg.resnet_stem_layout == "imagenet":
            side = -(-side // 2)
            flops = 2 * side * side * 7 * 7 * 3 * width
            side = -(-side // 2)  # Max-pool.
        else:
            flops = 2 * side * side * 3 * 3 * 3 * width
        channels = width
        for stage, blocks in enumerate(cfg.vision.resnet_blocks):
            inner = width * 2**stage
            for i in range(blocks):
                out_side = -(-side // 2) if stage > 0 and i == 0 else side
                flops += 2 * side * side * channels * inner  # 1x1 reduce.
                flops += 2 * out_side * out_side * 9 * inner * inner  # 3x3 (the stride).
                flops += 2 * out_side * out_side * inner * 4 * inner  # 1x1 expand.
                if channels != 4 * inner or out_side != side:  # Projection shortcut.
                    flops += 2 * out_side * out_side * channels * 4 * inner
                side, channels = out_side, 4 * inner
        tokens = side * side
        flops += matmul_flops.dense(tokens, channels, cfg.vision.width)
        return flops + pooler_flops(cfg, tokens, with_captioning), cfg.vision.caption_queries

    @nn.compact
    def __call__(self, images: Array) -> tuple[Array, Array | None]:
        cfg = self.cfg
        x = normalise_pixels(images, cfg)
        b, h, w, _ = x.shape
        if (h, w) != (cfg.image_size, cfg.image_size):
            raise ValueError(f"images are {h}x{w} but model.image_size={cfg.image_size}")
        x = constrain(x, ("batch", None, None, None))
        width = cfg.vision.resnet_width
        if cfg.resnet_stem_layout == "imagenet":
            x = StdConv(cfg, width, 7, 2, in_axis=None, name="stem_conv")(x)
        else:
            x = StdConv(cfg, width, 3, 1, in_axis=None, name="stem_conv")(x)
        x = nn.relu(GroupNorm(cfg, width, "stem_norm")(x))
        if cfg.resnet_stem_layout == "imagenet":
            x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        x = constrain(x, FEATURE_MAP)

        # Any remat policy recomputes whole blocks: the dot-based policies (minimal,
        # dots-saveable) would save nothing of a conv block anyway, so all act as 'full'.
        block = Bottleneck if cfg.remat_for("vision") == "none" else nn.remat(Bottleneck)
        for stage, num_blocks in enumerate(cfg.vision.resnet_blocks):
            for i in range(num_blocks):
                strides = 2 if stage > 0 and i == 0 else 1
                x = block(cfg, width * 2**stage, strides, name=f"stage{stage}_block{i}")(x)

        b, gh, gw, c = x.shape
        # Row-parallel like an MLP's fc2: the channels arrive split over conv_out's axis.
        x = Dense(cfg, cfg.vision.width, ("conv_out", "embed"), "token_proj")(
            x.reshape(b, gh * gw, c)
        )
        pos = self.param(
            "pos_embed",
            partitioned(nn.initializers.normal(cfg.vision.width**-0.5), (None, "embed")),
            (gh * gw, cfg.vision.width),
            cfg.weights_dtype,
        )
        x = constrain(x + pos.astype(x.dtype), ("batch", "length", "act_embed"))
        contrastive = AttentionalPooler(cfg, 1, name="contrastive_pool")(x)[:, 0]
        if not cfg.caption_tokens_from_tower:  # The decoder sees the pooled embedding only.
            return contrastive, None
        caption_tokens = AttentionalPooler(cfg, cfg.vision.caption_queries, name="caption_pool")(x)
        return contrastive, caption_tokens
