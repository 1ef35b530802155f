"""Image-encoder ablation: CoCa with its ViT image tower vs a ResNet of the same size.

  python -m mmjax.tools.sweep --config configs/ablations/encoders.py:size=tiny,steps=800 \
      --workdir runs/ablate_encoders

Each variant trains in runs/ablate_encoders/<variant>; runs/ablate_encoders/summary.md and
the plots compare them. The base is configs/coca.py (same arguments: size, steps, batch);
only model.vision.encoder and the ResNet's shape change, the text towers, poolers
(1 contrastive + caption_queries caption queries), losses and optimizer are shared:

- vit: the tiny ViT (32 px, 4 px patches: 64 tokens, 2 layers of width 64);
- resnet: the ResNet-50 layout (bottleneck stages of 3, 4, 6 and 3 blocks, GroupNorm +
  weight-standardised convolutions) at 1/16 of its width (resnet_width 4: 4-32 inner
  channels, 16-128 out), with the small stem (one 3x3/1 conv, no pool) so that 32 px
  images leave a 4x4 map: 16 image tokens, projected to width 64 for the same poolers.

The ResNet settings are sized for size=tiny: at other sizes set model.vision.resnet_width (64 is
ResNet-50) and model.vision.resnet_stem='auto' on the command line.

Measured at size=tiny (batch 64, one process, f32, jit of mmjax.train.train_step; on a shared
2-CPU machine under load average 5-6, so the times are rough; not yet trained for 800 steps,
so there are no eval figures here: the sweep's summary.md has them):

| variant | params | image tower | image fwd MFLOP/img | first step s | step s |
|:---|---:|---:|---:|---:|---:|
| vit | 418,242 | 142,208 | 10.9 | 40 | 0.43 |
| resnet | 415,206 | 139,172 | 14.8 | 71 | 0.66 |

Parameters match within 1% (params counts the whole CoCa; image tower = the encoder with its
poolers) and forward FLOPs within 40% (XLA's cost analysis of the image tower on one image;
mmjax.models.flops, and so the logged GFLOP/step and MFU, count a ViT tower). The first step is
mostly compilation (16 bottlenecks, each weight standardisation and GroupNorm adds ops); a
CPU runs the narrow convolutions and GroupNorm over 32x32 maps less efficiently than the
ViT's matmuls, so the ResNet's step is ~1.5x slower there.
"""

from pathlib import Path

from mmjax.runtime.config import load_module

_CONFIGS = Path(__file__).resolve().parents[1]


def get_config(arg=None):
    return load_module(_CONFIGS / "coca.py").get_config(arg)


def get_sweep():
    return {
        "vit": {"model.vision.encoder": "vit"},
        "resnet": {
            "model.vision.encoder": "resnet",
            "model.vision.resnet_blocks": (3, 4, 6, 3),
            "model.vision.resnet_width": 4,
            "model.vision.resnet_stem": "small",
        },
    }
