"""Loss ablation: CoCa (contrastive + captioning) vs CLIP-only vs captioning-only vs sigmoid.

  python -m mmjax.tools.sweep --config configs/ablations/losses.py:size=tiny,steps=800 \
      --workdir runs/ablate_losses

Each variant trains in runs/ablate_losses/<variant>; runs/ablate_losses/summary.md and the
plots compare them. The base is configs/coca.py (same arguments: size, steps, batch); the
variants are its loss settings:

- coca: contrastive weight 1 + caption weight 2, softmax contrastive loss (the CoCa paper);
- clip_only: caption weight 0 (configs/clip.py; the decoder is not run);
- captioning_only: contrastive weight 0 (configs/captioning.py);
- sigmoid: the SigLIP loss with its temperature/bias initialisation (configs/siglip.py).

Measured (size=tiny, steps=800, batch 64, one process on a shared 2-CPU machine under load
average 3-6, 20.5 minutes for the sweep; every metric is in WORKDIR/summary.md;
final eval on the 512 held-out images; chance i2t_r1 0.002):

| variant | params | step s | i2t_r1 | t2i_r1 | samecap | bleu4 | exact | cider | zeroshot |
|:---|---:|---:|---:|---:|---:|---:|---:|---:|---:|
| coca | 418,242 | 0.422 | 0.538 | 0.520 | 0.799 | 0.824 | 0.643 | 7.78 | 0.998 |
| clip_only | 418,242 | 0.266 | 0.559 | 0.572 | 0.842 | 0.000 | 0.000 | 0.00 | 0.988 |
| captioning_only | 418,242 | 0.284 | 0.000 | 0.002 | 0.000 | 0.881 | 0.758 | 8.49 | 0.162 |
| sigmoid | 418,242 | 0.252 | 0.480 | 0.465 | 0.723 | 0.793 | 0.590 | 7.42 | 0.998 |

At this scale the captioning loss costs a little retrieval (coca vs clip_only) and the
contrastive loss a little captioning (coca vs captioning_only); only the contrastive loss
trains the joint space (captioning_only retrieves and zero-shot classifies at chance), and
SigLIP's sigmoid loss trails softmax. Step times are noisy on a loaded machine: coca ran
while other tests did (sigmoid has the same FLOPs, 4.9 GFLOP/step; clip_only 3.7). params
counts every weight, the decoder included where its loss weight is 0. Final losses are not
comparable across variants (different terms and weights), so they are left out here.
Columns: samecap = eval/i2t_r1_samecap, bleu4 / exact = eval/caption_bleu4 / caption_exact,
cider = eval/captioning/cider, zeroshot = eval/zeroshot/accuracy (8 colours, chance 0.125).
"""

from pathlib import Path

from mmjax.runtime.config import load_module

_CONFIGS = Path(__file__).resolve().parents[1]


def get_config(arg=None):
    return load_module(_CONFIGS / "coca.py").get_config(arg)


def get_sweep():
    # The sigmoid variant takes siglip.py's own settings, so the two cannot drift apart.
    siglip = load_module(_CONFIGS / "siglip.py").get_config()
    return {
        "coca": {
            "loss.contrastive": "softmax",
            "loss.contrastive_weight": 1.0,
            "loss.caption_weight": 2.0,
        },
        "clip_only": {"loss.caption_weight": 0.0},
        "captioning_only": {"loss.contrastive_weight": 0.0},
        "sigmoid": {
            "loss.contrastive": siglip.loss.contrastive,
            "model.init_logit_scale": siglip.model.init_logit_scale,
            "model.init_logit_bias": siglip.model.init_logit_bias,
        },
    }
