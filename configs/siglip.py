"""CoCa with the SigLIP sigmoid contrastive loss instead of the softmax one.

  python -m mmjax.train --config configs/siglip.py:size=tiny --workdir runs/siglip_tiny

The temperature starts at log 10 and the bias at -10, as in the SigLIP paper.
Expected (tiny, 1500 steps): retrieval and captions comparable to
configs/coca.py (eval/i2t_r1_samecap above 0.9, eval/caption_exact above 0.8).
"""

import math

from mmjax.config_loading import sibling


def get_config(arg=None):
    config = sibling(__file__, "coca").get_config(arg)
    config.loss.contrastive = "sigmoid"
    config.model.init_logit_scale = math.log(10.0)
    config.model.init_logit_bias = -10.0
    return config
