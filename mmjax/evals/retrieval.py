"""Image-text retrieval: recall@1/5/10 both ways, mean and median rank.

A source whose images each have one caption is scored pair by pair, with the `samecap`
recalls that count any identical caption as a hit (see mmjax.evals.metrics.retrieval). A
source that lists an image with several captions (COCO, Flickr30k, a CSV repeating image
paths) is scored by the CLIP paper's rule: each image is embedded once, an image finds any of
its captions, a caption finds its image (`grouped_retrieval_metrics`); `examples` then counts
images, and `num_captions` is reported beside `num_examples`.
"""

from __future__ import annotations

import numpy as np

from mmjax.data.preprocess import decode_caption
from mmjax.data.records import BadSample
from mmjax.data.stats import DataStats
from mmjax.evals.base import NamedEvaluator
from mmjax.evals.context import Subset, limited, reference_groups
from mmjax.evals.metrics.retrieval import grouped_retrieval_metrics, retrieval_metrics


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
        first, groups = reference_groups(source)
        self.groups = None
        if len(first) < len(source):  # Several captions per image.
            limit = self.settings["examples"] or len(first)
            self.parent, self.groups = source, groups[:limit]
            self.source = Subset(source, first[:limit])
        else:
            self.source = limited(source, self.settings["examples"])

    def evaluate(self, params, step):
        stats = DataStats([self.source.name])
        if self.groups is not None:
            return self._grouped(params, stats)
        emb = self.ctx.embed_source(params, self.source, self.batch_size, texts=True, stats=stats)
        captions = [decode_caption(self.source.caption(int(i))) for i in emb["index"]]
        metrics = finite_retrieval_metrics(emb["image"], emb["text"], captions)
        metrics["num_examples"] = len(emb["index"])
        metrics["skipped"] = self.ctx.skipped(stats)
        return metrics

    def _grouped(self, params, stats: DataStats) -> dict[str, float]:
        emb = self.ctx.embed_source(params, self.source, self.batch_size, stats=stats)
        captions, owner = [], []
        for row, i in enumerate(emb["index"]):  # Usable images only; their readable captions.
            for j in self.groups[int(i)]:
                try:
                    captions.append(decode_caption(self.parent.caption(j)))
                except BadSample:
                    continue
                owner.append(row)
        text = self.ctx.embed_strings(params, captions, self.batch_size)
        images = emb["image"]
        keep = np.isin(np.arange(len(images)), owner)  # An image whose captions all failed.
        remap = np.cumsum(keep) - 1
        if np.all(np.isfinite(images)) and np.all(np.isfinite(text)):
            metrics = grouped_retrieval_metrics(images[keep], text, remap[np.asarray(owner)])
        else:
            probe = grouped_retrieval_metrics(np.eye(2), np.eye(2), np.arange(2))
            metrics = {key: float("nan") for key in probe}
        metrics["num_examples"] = int(keep.sum())
        metrics["num_captions"] = len(captions)
        metrics["skipped"] = self.ctx.skipped(stats)
        return metrics
