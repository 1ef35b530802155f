"""Captioning-only ablation (SimVLM-like): the CoCa model without the contrastive loss.

  python -m mmjax.train --config configs/captioning.py:size=tiny --workdir runs/cap_tiny

Expected (tiny, 1500 steps): captions about as good as configs/coca.py's
(eval/caption_exact above 0.8); retrieval near chance since the joint space
is untrained (eval/i2t_r1 near 0.002).
"""

from mmjax.config_loading import sibling


def get_config(arg=None):
    config = sibling(__file__, "coca").get_config(arg)
    config.loss.contrastive_weight = 0.0
    return config
