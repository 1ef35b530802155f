"""CLIP-only ablation: the CoCa model trained with the contrastive loss alone.

  python -m mmjax.train --config configs/clip.py:size=tiny --workdir runs/clip_tiny

The decoder is not run (caption weight 0), so steps are cheaper. Expected
(tiny, 1500 steps): retrieval close to configs/coca.py's (eval/i2t_r1_samecap
above 0.9); captions are untrained (eval/caption_exact near 0).
"""

from mmjax.config_loading import sibling


def get_config(arg=None):
    config = sibling(__file__, "coca").get_config(arg)
    config.loss.caption_weight = 0.0
    return config
