"""The jitted, sharded inference functions of one model on one mesh.

Both inference front ends use them: `Predictor` (parameters it holds, inputs from files or
arrays) and the evaluators' `EvalContext` (the training run's parameters, inputs from eval
sources). Inputs are rows over the mesh's batch axes; outputs are replicated, so every
process ends up with the whole result. Captioners are built once per set of generation
options.
"""

from __future__ import annotations

from typing import Any

import jax

from mmjax.inference.generate import GenerateOptions, make_generate_fn
from mmjax.models.coca import CoCa
from mmjax.models.video import input_shape
from mmjax.runtime import sharding as shd
from mmjax.text.tokenizer import TextTokenizer


class InferenceFunctions:
    """embed_images(params, images), embed_texts(params, tokens), logit_scale(params) and
    captioner(options, tokenizer)(params, images, rng), jitted for `mesh` and `rules`.

    `param_shardings`: the parameters' shardings when they are fixed (a Predictor's);
    None takes them from the arguments (a training state's parameters).
    """

    def __init__(self, model: CoCa, mesh, rules, *, param_shardings: Any = None):
        self.model, self.mesh, self.rules = model, mesh, rules
        rows = lambda ndim: shd.batch_sharding(mesh, rules, ndim)
        # Images [B, S, S, 3] or clips [B, T, S, S, 3]: rows over the batch axes either way.
        self.image_rows = rows(1 + len(input_shape(model.cfg)))
        self.text_rows = rows(2)
        self.replicated = shd.replicated(mesh)
        self.param_shardings = param_shardings

        def embed_images(params, images):
            return model.apply({"params": params}, images, method=CoCa.encode_image)[0]

        def embed_texts(params, tokens):
            return model.apply({"params": params}, tokens, method=CoCa.encode_text)[0]

        def logit_scale(params):
            return model.apply({"params": params}, method=CoCa.contrastive_scale_and_bias)[0]

        out = self.replicated
        self.embed_images = jax.jit(
            embed_images, in_shardings=(param_shardings, self.image_rows), out_shardings=out
        )
        self.embed_texts = jax.jit(
            embed_texts, in_shardings=(param_shardings, self.text_rows), out_shardings=out
        )
        self.logit_scale = jax.jit(logit_scale, in_shardings=(param_shardings,), out_shardings=out)
        self._captioners: dict[tuple[GenerateOptions, int, int, int], Any] = {}

    def captioner(self, options: GenerateOptions, tokenizer: TextTokenizer):
        """A jitted (params, images, rng) -> tokens [B, L] for these generation options."""
        key = (options, tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id)
        if key not in self._captioners:
            self._captioners[key] = make_generate_fn(
                self.model,
                bos_id=tokenizer.bos_id,
                eos_id=tokenizer.eos_id,
                pad_id=tokenizer.pad_id,
                options=options,
                in_shardings=(self.param_shardings, self.image_rows, self.replicated),
                out_shardings=self.replicated,
            )
        return self._captioners[key]
