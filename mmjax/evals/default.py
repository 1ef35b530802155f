"""The run's default evaluation on data.eval: retrieval both ways and greedy captions of the
first eval.caption_examples images, reported as `eval/<metric>` (the keys every run has had
since the first version: eval/i2t_r1, eval/caption_bleu4, ...)."""

from __future__ import annotations

import time

import jax
import numpy as np

from mmjax.data.preprocess import decode_caption
from mmjax.data.stats import DataStats
from mmjax.evals.metrics.retrieval import caption_metrics
from mmjax.evals.retrieval import finite_retrieval_metrics
from mmjax.inference.generate import GenerateOptions
from mmjax.runtime import sharding as shd


class DefaultEval:
    def __init__(self, ctx):
        self.ctx = ctx
        self.source = ctx.source(ctx.config.data.eval, "data.eval")
        self.last_samples: list[tuple[str, str]] = []

    def run(self, params) -> dict[str, float]:
        ctx, cfg = self.ctx, self.ctx.config
        start = time.perf_counter()
        # A plain CLIP (model.captioning=False) has no decoder: retrieval only.
        want_captions = min(cfg.eval.caption_examples, len(self.source))
        want_captions *= bool(ctx.model.cfg.captioning)
        caption = ctx.captioner(GenerateOptions())
        rng = jax.random.PRNGKey(0)  # Unused by greedy decoding.
        stats = DataStats([self.source.name])
        image_embs, text_embs, indices, predictions = [], [], [], []
        with shd.activate(ctx.mesh, ctx.rules):
            for batch in ctx.batches(self.source, cfg.eval.batch_size, stats):
                image_embs.append(np.asarray(ctx.embed_images(params, batch["images"])))
                text_embs.append(np.asarray(ctx.embed_texts(params, batch["tokens"])))
                indices.append(batch["index"])
                if sum(len(p) for p in predictions) < want_captions:
                    predictions.append(np.asarray(caption(params, batch["images"], rng)))
        index = np.concatenate(indices)
        keep = index >= 0  # Padding rows and bad samples carry index -1.
        index = index[keep]
        references = [decode_caption(self.source.caption(int(i))) for i in index]
        metrics = finite_retrieval_metrics(
            np.concatenate(image_embs)[keep], np.concatenate(text_embs)[keep], references
        )
        texts = []
        if want_captions:
            generated = np.concatenate(predictions)[keep[: sum(len(p) for p in predictions)]]
            texts = ctx.tokenizer.decode_batch(generated[:want_captions])
            metrics.update(caption_metrics(texts, references[: len(texts)]))
        out = {f"eval/{k}": float(v) for k, v in metrics.items()}
        out["eval/num_examples"] = float(len(index))
        out["eval/skipped"] = ctx.skipped(stats)
        out["eval/seconds"] = time.perf_counter() - start
        self.last_samples = list(zip(references[: len(texts)], texts))
        return out
