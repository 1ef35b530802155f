"""Data sources chosen by name from `config.data`."""

from __future__ import annotations

import itertools

import ml_collections

from mmjax.data.shapes import ShapesSource

SOURCES = ("shapes",)


def make_source(data: ml_collections.ConfigDict, split: str, image_size: int):
    if data.name == "shapes":
        num = data.train_examples if split == "train" else data.eval_examples
        return ShapesSource(split=split, num_examples=num, seed=data.seed, image_size=image_size)
    raise ValueError(f"data.name={data.name!r} is unknown; allowed: {list(SOURCES)}")


def caption_sample(source, limit: int = 5000):
    """Captions of the first `limit` examples, for training a tokenizer."""
    return [source[i]["caption"] for i in itertools.islice(range(len(source)), limit)]
