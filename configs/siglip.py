"""CoCa with the SigLIP sigmoid contrastive loss instead of the softmax one.

  python -m mmjax.train --config configs/siglip.py:size=tiny --workdir runs/siglip_tiny

The temperature starts at log 10 and the bias at -10, as in the SigLIP paper.
Measured (tiny, 1500 steps, 2 CPU cores): slightly behind configs/coca.py at this
scale: eval/i2t_r1 0.55 (samecap 0.83), eval/t2i_r1 0.55, eval/caption_bleu4 0.85,
eval/caption_exact 0.70 (coca: 0.59 / 0.88 / 0.59 / 0.91 / 0.82).
"""

import math

from mmjax.runtime.config import sibling


def get_config(arg=None):
    config = sibling(__file__, "coca").get_config(arg)
    config.loss.contrastive = "sigmoid"
    config.model.init_logit_scale = math.log(10.0)
    config.model.init_logit_bias = -10.0
    return config
