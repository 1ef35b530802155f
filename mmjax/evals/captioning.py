"""Captioning: generate a caption per image, score it against the image's reference captions
with BLEU-1..4, CIDEr-D and ROUGE-L (mmjax.evals.metrics.coco_captions, pycocoevalcap's
definitions) and exact match.

A CSV often lists one image several times with different captions (COCO: five); those rows
are grouped, the image is captioned once, and all its captions are its references. The
generated captions of each evaluation are written to WORKDIR/eval/NAME/captions_<step>.jsonl.
"""

from __future__ import annotations

import json

import jax
import numpy as np

from mmjax import storage
from mmjax.data.preprocess import decode_caption
from mmjax.data.records import BadSample
from mmjax.data.stats import DataStats
from mmjax.evals.base import NamedEvaluator
from mmjax.evals.context import Subset, reference_groups
from mmjax.evals.metrics.coco_captions import caption_scores
from mmjax.inference.generate import GenerateOptions, generated_positions
from mmjax.runtime import sharding as shd
from mmjax.runtime.config import ConfigError


def _normalise(text: str) -> str:
    return " ".join(text.split()).lower()


class CaptioningEval(NamedEvaluator):
    type_name = "captioning"
    # generate: mmjax.inference.generate.GenerateOptions fields (method, beam_size, ...);
    # seed: sampling.
    defaults = {"generate": {}, "seed": 0}

    def __init__(self, name, block, ctx):
        super().__init__(name, block, ctx)
        try:
            self.options = GenerateOptions.from_mapping(dict(self.settings["generate"]))
        except ValueError as e:
            raise ConfigError(f"evals.{name}.generate: {e}") from None
        source = ctx.source(self.settings["data"], f"evals.{name}.data")
        first, self.groups = reference_groups(source)
        if self.settings["examples"]:
            first = first[: self.settings["examples"]]
            self.groups = self.groups[: self.settings["examples"]]
        self.parent = source
        self.source = Subset(source, first)

    def _references(self, i: int) -> list[str]:
        out = []
        for j in self.groups[i]:
            try:
                out.append(decode_caption(self.parent.caption(j)))
            except BadSample:  # An empty or undecodable caption is no reference.
                continue
        return out

    def evaluate(self, params, step):
        ctx = self.ctx
        caption = ctx.captioner(self.options)
        rng = jax.random.PRNGKey(self.settings["seed"])
        stats = DataStats([self.source.name])
        tokens, indices = [], []
        with shd.activate(ctx.mesh, ctx.rules):
            for batch in ctx.batches(self.source, self.batch_size, stats):
                tokens.append(np.asarray(caption(params, batch["images"], rng)))
                indices.append(batch["index"])
        index = np.concatenate(indices)
        keep = index >= 0
        span = generated_positions(self.options, ctx.model.cfg.context_length)
        predictions = ctx.tokenizer.decode_batch(np.concatenate(tokens)[keep][:, :span])
        index = index[keep]
        rows = [(int(i), p, self._references(int(i))) for i, p in zip(index, predictions)]
        rows = [row for row in rows if row[2]]  # Images without a usable reference: unscored.
        if not rows:
            raise ConfigError(f"evals.{self.name}: no image with a usable reference caption")
        index, predictions, references = (list(column) for column in zip(*rows))
        metrics = caption_scores(predictions, references)
        metrics["exact"] = float(
            np.mean(
                [
                    _normalise(p) in {_normalise(r) for r in refs}
                    for p, refs in zip(predictions, references)
                ]
            )
        )
        metrics["num_examples"] = len(predictions)
        metrics["skipped"] = ctx.skipped(stats)
        out_dir = self.output_dir()
        if out_dir is not None and jax.process_index() == 0:
            lines = [
                json.dumps({"index": i, "caption": p, "references": refs}) + "\n"
                for i, p, refs in rows
            ]
            storage.write_text(out_dir / f"captions_{step}.jsonl", "".join(lines))
        self.last_samples = list(zip(references, predictions))
        return metrics
