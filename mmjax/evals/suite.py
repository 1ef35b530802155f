"""All evaluators of a run: the default one (retrieval + greedy captioning on data.eval, keys
`eval/<metric>`, every config.eval_every steps) and the named ones of `config.evals`
(`eval/<name>/<metric>`, each at its own `every`), chosen by type:

  config.evals.NAME = dict(type='retrieval' | 'zeroshot' | 'captioning' | 'classification',
                           data=SPEC, every=STEPS, batch_size=B, examples=N, ...type settings)

See each type's module for its settings.
"""

from __future__ import annotations

import jax

from mmjax.evals.captioning import CaptioningEval
from mmjax.evals.context import EvalContext
from mmjax.evals.default import DefaultEval
from mmjax.evals.linear_probe import LinearProbeEval
from mmjax.evals.retrieval import RetrievalEval
from mmjax.evals.zeroshot import ZeroShotEval
from mmjax.runtime import log
from mmjax.runtime.config import ConfigError

TYPES = {
    cls.type_name: cls for cls in (RetrievalEval, CaptioningEval, ZeroShotEval, LinearProbeEval)
}


def named_blocks(config) -> dict[str, dict]:
    """config.evals as {name: settings dict}, with the type checked."""
    out = {}
    for name, block in (config.get("evals") or {}).items():
        block = dict(block)
        kind = block.get("type")
        if kind not in TYPES:
            raise ConfigError(f"evals.{name}.type={kind!r}; allowed: {sorted(TYPES)}")
        out[name] = block
    return out


class EvalSuite:
    def __init__(self, config, model, mesh, rules, tokenizer, *, workdir=None):
        self.context = EvalContext(config, model, mesh, rules, tokenizer, workdir=workdir)
        self.default = DefaultEval(self.context)
        blocks = named_blocks(config)
        if not model.cfg.captioning:  # A plain CLIP (e.g. converted) has nothing to caption.
            for name in [n for n, b in blocks.items() if b["type"] == "captioning"]:
                del blocks[name]
                if jax.process_index() == 0:
                    log.info(f"evals.{name}: skipped, the model has no decoder")
        self.named = {
            name: TYPES[block["type"]](name, block, self.context) for name, block in blocks.items()
        }
        self.config = config

    def due(self, step: int) -> bool:
        """Whether any evaluator runs at `step` (the last step of a run always evaluates)."""
        return step % self.config.eval_every == 0 or any(
            step % e.every == 0 for e in self.named.values()
        )

    def run(self, params, step: int, *, everything: bool = False, only=None) -> dict[str, float]:
        """Metrics of the evaluators due at `step` (all with `everything`; or those in `only`,
        where 'default' names the default evaluator)."""
        wanted = lambda name, every: (
            name in only if only is not None else everything or step % every == 0
        )
        out = {}
        if wanted("default", self.config.eval_every):
            out.update(self.default.run(params))
        for name, evaluator in self.named.items():
            if wanted(name, evaluator.every):
                out.update(evaluator.run(params, step))
        return out
