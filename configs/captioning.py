"""Captioning-only ablation (SimVLM-like): the CoCa model without the contrastive loss.

  python -m mmjax.train --config configs/captioning.py:size=tiny --workdir runs/cap_tiny

Measured (tiny, 1500 steps, 2 CPU cores): captions as good as configs/coca.py's
(eval/caption_exact 0.82, eval/caption_bleu4 0.91); retrieval at chance since the joint
space is untrained (eval/i2t_r1 0.004, chance 0.002).
"""

from mmjax.runtime.config import sibling


def get_config(arg=None):
    config = sibling(__file__, "coca").get_config(arg)
    config.loss.contrastive_weight = 0.0
    return config
