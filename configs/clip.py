"""CLIP-only ablation: the CoCa model trained with the contrastive loss alone.

  python -m mmjax.train --config configs/clip.py:size=tiny --workdir runs/clip_tiny

The decoder is not run (caption weight 0), so steps are cheaper. Measured (tiny,
1500 steps, 2 CPU cores): final loss 0.15; eval/i2t_r1 0.57, eval/i2t_r1_samecap 0.85,
eval/i2t_r5 0.99, eval/t2i_r1 0.58, i.e. retrieval close to configs/coca.py's (0.59 /
0.88); captions are untrained (eval/caption_exact and eval/caption_bleu4 0).
"""

from mmjax.runtime.config import sibling


def get_config(arg=None):
    config = sibling(__file__, "coca").get_config(arg)
    config.loss.caption_weight = 0.0
    return config
