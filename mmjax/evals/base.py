"""The settings every named evaluator shares, and how its config block is read.

A named evaluator is configured as `config.evals.NAME = dict(type=..., **settings)`; its
metrics go to metrics.jsonl and eval.json as `eval/NAME/<metric>`. Unknown settings are a
ConfigError naming the key, so a typo cannot silently fall back to a default.
"""

from __future__ import annotations

import abc
import time
from collections.abc import Mapping
from typing import Any

from mmjax import storage
from mmjax.runtime.config import ConfigError

# Settings every type takes. data: a source spec ('' = data.eval); every: steps between runs
# during training (0: config.eval_every; the last step of a run always evaluates);
# batch_size: 0 = config.eval.batch_size; examples: how many examples of `data` (0: all).
COMMON = {"type": "", "data": "", "every": 0, "batch_size": 0, "examples": 0}


def settings(name: str, block: Mapping[str, Any], defaults: Mapping[str, Any], config) -> dict:
    """`block` merged over COMMON and the type's `defaults`; unknown keys are errors."""
    allowed = {**COMMON, **defaults}
    unknown = sorted(set(block) - set(allowed))
    if unknown:
        raise ConfigError(
            f"evals.{name}: unknown setting(s) {unknown}; {block['type']} takes {sorted(allowed)}"
        )
    out = {**allowed, **dict(block)}
    for key in ("every", "batch_size", "examples"):
        if not isinstance(out[key], int) or out[key] < 0:
            raise ConfigError(f"evals.{name}.{key} must be an integer >= 0, got {out[key]!r}")
    out["data"] = out["data"] or config.data.eval
    out["batch_size"] = out["batch_size"] or config.eval.batch_size
    out["every"] = out["every"] or config.eval_every
    return out


class NamedEvaluator(abc.ABC):
    """Base: `run(params, step)` -> {"eval/NAME/...": float}; subclasses define `evaluate`."""

    type_name = ""
    defaults: dict[str, Any] = {}

    def __init__(self, name: str, block: Mapping[str, Any], ctx):
        self.name, self.ctx = name, ctx
        self.settings = settings(name, block, self.defaults, ctx.config)
        self.every = self.settings["every"]
        self.batch_size = self.settings["batch_size"]

    @abc.abstractmethod
    def evaluate(self, params, step: int) -> dict[str, float]:
        """This evaluator's metrics (without the eval/NAME/ prefix)."""

    def run(self, params, step: int) -> dict[str, float]:
        start = time.perf_counter()
        metrics = self.evaluate(params, step)
        metrics["seconds"] = time.perf_counter() - start
        return {f"eval/{self.name}/{k}": float(v) for k, v in metrics.items()}

    def output_dir(self):
        """WORKDIR/eval/NAME for files (confusion matrices, captions), or None."""
        if self.ctx.workdir is None:
            return None
        path = self.ctx.workdir / "eval" / self.name
        storage.mkdir(path)
        return path
