"""What every evaluator shares: the model, the mesh, the tokenizer and the sharded eval loop.

An evaluator reads a source through `EvalContext.batches(source, batch_size)`, which pads the
last batch and drops padding and bad samples (index -1), so every example counts exactly once
on any number of devices or processes. The jitted functions are built once per context and
shared by all evaluators, so two evaluators with the same batch shapes compile once.
"""

from __future__ import annotations

import operator
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from mmjax import storage
from mmjax.data.pipeline import eval_batches, require_usable
from mmjax.data.preprocess import ImageOptions
from mmjax.data.sources import make_source
from mmjax.data.stats import DataStats
from mmjax.inference.functions import InferenceFunctions
from mmjax.inference.generate import GenerateOptions
from mmjax.models.coca import CoCa
from mmjax.models.video import input_frames
from mmjax.runtime import sharding as shd
from mmjax.runtime.config import ConfigError
from mmjax.text.tokenizer import TextTokenizer


class Subset:
    """The examples `indices` of a source, as a source (for example limits and one row per
    distinct image); `parent_index(i)` maps back."""

    def __init__(self, source, indices):
        self.source = source
        self.indices = np.asarray(indices, np.int64)
        self.name = source.name

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.source[int(self.indices[operator.index(index)])]

    def caption(self, index: int):
        return self.source.caption(int(self.indices[operator.index(index)]))

    def parent_index(self, index: int) -> int:
        return int(self.indices[index])


def limited(source, examples: int):
    """The first `examples` examples of `source` (all when 0 or more than it has)."""
    if examples and examples < len(source):
        return Subset(source, np.arange(examples))
    return source


def reference_groups(source) -> tuple[list[int], list[list[int]]]:
    """(one source index per distinct image, the indices of each image's captions).

    Sources that know their images' paths (CSV, COCO, Karpathy) group rows by path;
    elsewhere every example is its own image with one caption.
    """
    if not hasattr(source, "image_path"):
        indices = list(range(len(source)))
        return indices, [[i] for i in indices]
    groups: dict[str, list[int]] = {}
    for i in range(len(source)):
        groups.setdefault(source.image_path(i), []).append(i)
    members = list(groups.values())
    return [m[0] for m in members], members


class EvalContext:
    """Model, mesh, rules, tokenizer and the jitted eval functions, built once per run."""

    def __init__(
        self,
        config: ml_collections.ConfigDict,
        model: CoCa,
        mesh,
        rules,
        tokenizer: TextTokenizer,
        *,
        workdir: str | Path | None = None,
    ):
        self.config, self.model, self.mesh, self.rules = config, model, mesh, rules
        self.tokenizer = tokenizer
        self.workdir = storage.path(workdir) if workdir else None
        self.image_options = ImageOptions(
            image_size=model.cfg.image_size,
            train=False,
            max_pixels=config.data.max_image_pixels,
            frames=input_frames(model.cfg),
        )
        # The inference stack Predictor uses too; parameters come with the call.
        self.functions = InferenceFunctions(model, mesh, rules)
        self.image_rows = self.functions.image_rows
        self.embed_images = self.functions.embed_images
        self.embed_texts = self.functions.embed_texts
        self.logit_scale = self.functions.logit_scale

    def source(self, spec: str, where: str, *, split: str = "eval"):
        """The source a spec names; a bad spec is a ConfigError naming `where`."""
        try:
            source = make_source(
                spec,
                split=split,
                data=self.config.data,
                image_size=self.model.cfg.image_size,
                frames=input_frames(self.model.cfg),
                cache_dir=self.workdir / "data_index" if self.workdir else None,
            )
        except (ValueError, OSError) as e:
            raise ConfigError(f"{where}: {e}") from None
        require_usable(source, self.image_options, where)
        return source

    def captioner(self, options: GenerateOptions):
        """A jitted (params, images, rng) -> tokens [B, L] for these generation options."""
        return self.functions.captioner(options, self.tokenizer)

    def to_global(self, local: np.ndarray) -> jax.Array:
        sharding = shd.batch_sharding(self.mesh, self.rules, local.ndim)
        return jax.make_array_from_process_local_data(sharding, local)

    def batches(self, source, batch_size: int, stats: DataStats | None = None) -> Iterator[dict]:
        """Global batches of `source` in index order: {"images", "tokens" (device arrays),
        "index" (int64 [B] on every process; -1 for padding and bad samples)}."""
        cfg = self.config
        local = eval_batches(
            source,
            self.tokenizer,
            global_batch_size=batch_size,
            context_length=self.model.cfg.context_length,
            image_options=self.image_options,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
            workers=cfg.data.workers,
            num_threads=cfg.data.num_threads,
            prefetch=cfg.data.prefetch,
        )
        for batch in local:
            if stats is not None:
                stats.add(batch["counts"])
            index = batch["index"]
            if jax.process_count() > 1:
                index = np.asarray(multihost_utils.process_allgather(index, tiled=True))
            yield {
                "images": self.to_global(batch["images"]),
                "tokens": self.to_global(batch["tokens"]),
                "index": index,
            }

    def skipped(self, stats: DataStats) -> float:
        """Bad samples seen by all processes together (a collective)."""
        counts = stats.counts
        if jax.process_count() > 1:
            counts = np.asarray(multihost_utils.process_allgather(counts[None], tiled=True)).sum(0)
        return stats.metrics(counts)["data/skipped"]

    def embed_source(
        self, params, source, batch_size: int, *, texts: bool = False, stats=None
    ) -> dict[str, np.ndarray]:
        """{"index": [N], "image": [N, E], "text": [N, E] (with texts)} over the usable examples."""
        images, captions, indices = [], [], []
        with shd.activate(self.mesh, self.rules):
            for batch in self.batches(source, batch_size, stats):
                images.append(np.asarray(self.embed_images(params, batch["images"])))
                if texts:
                    captions.append(np.asarray(self.embed_texts(params, batch["tokens"])))
                indices.append(batch["index"])
        index = np.concatenate(indices)
        keep = index >= 0
        out = {"index": index[keep], "image": np.concatenate(images)[keep]}
        if texts:
            out["text"] = np.concatenate(captions)[keep]
        return out

    def embed_strings(self, params, texts: list[str], batch_size: int) -> np.ndarray:
        """Text embeddings [N, E] of plain strings (class prompts), padded to whole batches."""
        length = self.model.cfg.context_length
        tokens = self.tokenizer.encode_batch(texts, length)
        parallel = shd.data_parallel_size(self.mesh, self.rules)
        batch_size = -(-batch_size // parallel) * parallel  # Whole rows per device.
        out = []
        with shd.activate(self.mesh, self.rules):
            for start in range(0, len(texts), batch_size):
                chunk = tokens[start : start + batch_size]
                padded = np.zeros((batch_size, length), np.int32)
                padded[: len(chunk)] = chunk
                # Every process holds the same strings: each passes its own rows.
                rows = padded.reshape(jax.process_count(), -1, length)[jax.process_index()]
                out.append(np.asarray(self.embed_texts(params, self.to_global(rows)))[: len(chunk)])
        return np.concatenate(out)
