"""Fusion ablation: how the captioning decoder reads the image (model.decoder.fusion).

  python -m mmjax.tools.sweep --config configs/ablations/fusion.py:size=tiny,steps=800 \
      --workdir runs/ablate_fusion

Each variant trains in runs/ablate_fusion/<variant>; runs/ablate_fusion/summary.md and the
plots compare them. The base is configs/coca.py (same arguments: size, steps, batch) with
its CoCa loss (contrastive + captioning); only model.decoder.fusion changes, and every variant's
decoder has model.decoder.layers blocks:

- cross_attention: CoCa's decoder, causal self-attention plus cross-attention to the image
  tower's N caption tokens in every block (the default);
- early: one stream, no cross-attention: the N caption tokens (projected to the text width)
  and the unimodal text features are concatenated and read by one self-attention stack
  under a prefix-LM mask (image positions see all image positions and no text; text sees
  the whole image and earlier text);
- late: no token-level interaction: the pooled image vector (the contrastive tower's
  output before image_proj, projected to the text width) is one prefix token before the
  text features in a causal self-attention stack; the image tower builds no caption pooler.

The contrastive side (towers, embeddings, loss) is the same in all three, so differences in
retrieval come only from what the captioning gradient does to the shared towers.
See mmjax/models/fusion.py.

Measured: see BUILD_NOTES.md 'Fusion ablation'.
"""

from pathlib import Path

from mmjax.runtime.config import load_module

_CONFIGS = Path(__file__).resolve().parents[1]


def get_config(arg=None):
    return load_module(_CONFIGS / "coca.py").get_config(arg)


def get_sweep():
    return {
        "cross_attention": {"model.decoder.fusion": "cross_attention"},
        "early": {"model.decoder.fusion": "early"},
        "late": {"model.decoder.fusion": "late"},
    }
