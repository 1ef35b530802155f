"""Image-text retrieval: recall@1/5/10 both ways, mean and median rank, and the `samecap`
recalls that count any identical caption as a hit (see mmjax.evals.metrics.retrieval)."""

from __future__ import annotations

import numpy as np

from mmjax.data.preprocess import decode_caption
from mmjax.data.stats import DataStats
from mmjax.evals.base import NamedEvaluator
from mmjax.evals.context import limited
from mmjax.evals.metrics.retrieval import retrieval_metrics


def finite_retrieval_metrics(image_emb, text_emb, captions) -> dict[str, float]:
    """retrieval_metrics, or every metric NaN when the embeddings are not finite (a diverged
    run that train.on_nan='skip' kept going): reported, not a crash."""
    if np.all(np.isfinite(image_emb)) and np.all(np.isfinite(text_emb)):
        return retrieval_metrics(image_emb, text_emb, captions=captions)
    probe = retrieval_metrics(np.eye(2, dtype=np.float32), np.eye(2, dtype=np.float32), ["a", "b"])
    return {key: float("nan") for key in probe}


class RetrievalEval(NamedEvaluator):
    type_name = "retrieval"

    def __init__(self, name, block, ctx):
        super().__init__(name, block, ctx)
        source = ctx.source(self.settings["data"], f"evals.{name}.data")
        self.source = limited(source, self.settings["examples"])

    def evaluate(self, params, step):
        stats = DataStats([self.source.name])
        emb = self.ctx.embed_source(params, self.source, self.batch_size, texts=True, stats=stats)
        captions = [decode_caption(self.source.caption(int(i))) for i in emb["index"]]
        metrics = finite_retrieval_metrics(emb["image"], emb["text"], captions)
        metrics["num_examples"] = len(emb["index"])
        metrics["skipped"] = self.ctx.skipped(stats)
        return metrics
