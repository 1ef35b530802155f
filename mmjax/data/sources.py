"""Data sources named by spec strings, and mixtures of them.

A spec is `KIND` or `KIND:PATH`:

  shapes                      the built-in procedural corpus (sized by config.data)
  shapes_video                its clip counterpart: a shape moving, growing or shrinking
  csv:/data/train.csv         a CSV/TSV of image paths and captions (mmjax.data.csv_source)
  wds:/data/{000000..000099}.tar
                              WebDataset tar shards (mmjax.data.wds_source)
  arrayrecord:/data/ar/*.array_record
                              ArrayRecord shards (mmjax.data.arrayrecord_source)
  coco:/data/coco/annotations/captions_val2017.json
                              COCO captions, five per image (mmjax.data.caption_files)
  karpathy:/data/coco/dataset_coco.json
                              a Karpathy split file, COCO or Flickr30k (the eval split
                              reads `test`; mmjax.data.caption_files)
  folders:/data/imagenet/val  class sub-folders of images, ImageNet-style
                              (mmjax.data.class_folders)

A mixture is a list of (spec, weight) pairs; a bare spec is a mixture of one.

Clips (model.input_kind='video') come from shapes_video or from a CSV whose image column
names a folder of frames or a file holding a stack of them (mmjax.data.clips).
"""

from __future__ import annotations

import ast
import math
import numbers
import os
from collections.abc import Sequence
from typing import Any

import ml_collections

from mmjax import storage
from mmjax.data.records import BadSample, Source

SOURCE_KINDS = (
    "shapes",
    "shapes_video",
    "csv",
    "wds",
    "arrayrecord",
    "coco",
    "karpathy",
    "folders",
)
_NO_PATH_KINDS = ("shapes", "shapes_video")
# Kinds whose records can be clips (model.input_kind='video').
CLIP_KINDS = ("shapes_video", "csv")


def parse_spec(spec: str) -> tuple[str, str]:
    """'csv:/a.csv' -> ('csv', '/a.csv'); 'shapes' -> ('shapes', '')."""
    if not isinstance(spec, str):
        raise ValueError(f"source spec must be a string, got {spec!r}")
    kind, colon, path = spec.strip().partition(":")
    if kind not in SOURCE_KINDS:
        raise ValueError(
            f"source spec {spec!r}: unknown kind {kind!r}; allowed kinds: {list(SOURCE_KINDS)} "
            "(specs: shapes, shapes_video, csv:PATH, wds:PATTERN, arrayrecord:GLOB, "
            "coco:CAPTIONS.json, karpathy:DATASET.json, folders:ROOT)"
        )
    if kind in _NO_PATH_KINDS:
        if colon:
            raise ValueError(f"source spec {spec!r}: {kind} takes no path; write just {kind!r}")
        return kind, ""
    if not path:
        raise ValueError(
            f"source spec {spec!r}: {kind} needs a path, e.g. {kind}:PATH; "
            f"allowed kinds: {list(SOURCE_KINDS)}"
        )
    return kind, path


def absolute_spec(spec: str) -> str:
    """The spec with its path made absolute against the working directory (braces and glob
    characters are kept as they are), so that it names the same files from anywhere."""
    kind, path = parse_spec(spec)
    if not path or storage.is_remote(path):  # A URL is absolute already.
        return f"{kind}:{path}" if path else kind
    return f"{kind}:{os.path.abspath(os.path.expanduser(path))}"


def absolute_mixture(value: Any) -> Any:
    """`value` (a spec, or a mixture in any form parse_mixture takes) with absolute paths; a
    bare spec stays a bare spec, a mixture becomes a list of (spec, weight) pairs."""
    if isinstance(value, str) and not value.strip().startswith(("[", "(")):
        return absolute_spec(value.strip())
    return repr([(absolute_spec(spec), weight) for spec, weight in parse_mixture(value)])


def parse_mixture(value: Any) -> list[tuple[str, float]]:
    """[(spec, weight), ...] from a spec, a list of pairs, or a Python literal of such a list.

    A bare spec (alone or as a list item) gets weight 1.0. Weights must be
    finite and > 0; duplicate specs are allowed (their weights add up).
    """
    if isinstance(value, str):
        text = value.strip()
        if not text.startswith(("[", "(")):
            parse_spec(text)
            return [(text, 1.0)]
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError) as e:
            raise ValueError(
                f"mixture {text!r} is not a Python literal list of (spec, weight) pairs "
                f"({type(e).__name__})"
            ) from None
    if isinstance(value, (list, tuple)) and _is_pair(value):
        value = [value]  # One (spec, weight) pair, not a list of them.
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"mixture must be a spec or a list of (spec, weight) pairs, got {value!r}")
    if not value:
        raise ValueError("mixture is empty: give at least one source spec")
    mixture = []
    for item in value:
        if isinstance(item, str):
            spec, weight = item, 1.0
        elif isinstance(item, (list, tuple)) and _is_pair(item):
            spec, weight = item
        else:
            raise ValueError(f"mixture item {item!r} is not a spec or a (spec, weight) pair")
        spec = spec.strip()
        parse_spec(spec)
        if not math.isfinite(weight) or weight <= 0:
            raise ValueError(f"mixture weight of {spec!r} is {weight}; weights must be > 0")
        mixture.append((spec, float(weight)))
    return mixture


def _is_pair(item: Any) -> bool:
    return (
        len(item) == 2
        and isinstance(item[0], str)
        and isinstance(item[1], numbers.Real)
        and not isinstance(item[1], bool)
    )


def make_source(
    spec: str,
    *,
    split: str,
    data: ml_collections.ConfigDict,
    image_size: int,
    frames: int | None = 0,
    cache_dir: str | os.PathLike | None = None,
) -> Source:
    """The source a spec names. `data` is config.data; `cache_dir` holds wds indexes
    when the shards' folder is not writable.

    `frames`: what the model reads, 0 still images, T >= 1 clips of T frames (a kind that
    cannot hold what the model reads is a ValueError); None when only captions are read.
    """
    kind, path = parse_spec(spec)
    if frames and kind not in CLIP_KINDS:
        raise ValueError(
            f"source spec {spec!r}: {kind} holds still images, but model.input_kind='video' "
            f"reads clips of {frames} frames; clip sources: {list(CLIP_KINDS)}"
        )
    if frames == 0 and kind == "shapes_video":
        raise ValueError(
            f"source spec {spec!r} holds clips; set model.input_kind='video' to read them"
        )
    # Late imports: each kind pulls in only what it needs.
    if kind in ("shapes", "shapes_video"):  # The generated corpora.
        generated = dict(
            split=split,
            num_examples=data.train_examples if split == "train" else data.eval_examples,
            seed=data.seed,
            image_size=image_size,
        )
        if kind == "shapes":
            from mmjax.data.shapes import ShapesSource

            return ShapesSource(**generated)
        from mmjax.data.shapes_video import DEFAULT_FRAMES, ShapesVideoSource

        # frames None: captions only, any count will do.
        return ShapesVideoSource(**generated, frames=frames or DEFAULT_FRAMES)
    if kind == "csv":
        from mmjax.data.csv_source import CsvSource

        return CsvSource(
            path,
            image_key=data.get("image_key", "filepath"),
            caption_key=data.get("caption_key", "caption"),
            frames=frames or 0,
        )
    if kind == "coco":
        from mmjax.data.caption_files import CocoCaptionsSource

        return CocoCaptionsSource(path)
    if kind == "karpathy":
        from mmjax.data.caption_files import KarpathySource

        return KarpathySource(path, "train" if split == "train" else "eval")
    if kind == "folders":
        from mmjax.data.class_folders import ClassFolderSource

        return ClassFolderSource(path)
    if kind == "wds":
        from mmjax.data.wds_source import WebDatasetSource

        return WebDatasetSource(path, cache_dir=cache_dir)
    from mmjax.data.arrayrecord_source import ArrayRecordSource

    return ArrayRecordSource(path)


def caption_sample(source: Source, limit: int = 5000, *, progress: bool = False) -> list[str]:
    """Up to `limit` captions spread evenly over `source`, for training a tokenizer.

    Reads captions only (no images) and normalises them as the pipeline does
    (`preprocess.decode_caption`); captions the pipeline would skip (unreadable,
    missing, not UTF-8, blank) are skipped here too.
    """
    from tqdm import tqdm

    from mmjax.data.preprocess import decode_caption  # Late: only training needs PIL.

    size = len(source)
    count = min(size, limit)
    captions = []
    for i in tqdm(range(count), desc=f"captions of {source.name}", disable=not progress):
        # Evenly spaced, distinct indices: a source sorted by topic is sampled throughout.
        try:
            captions.append(decode_caption(source.caption(i * size // count)))
        except BadSample:
            continue
    return captions


def read_captions(sources: Sequence[Source], limit: int, *, progress: bool = False) -> list[str]:
    """Up to `limit` usable captions spread evenly over `sources` and within each source."""
    if limit < 1:
        raise ValueError(f"caption limit must be >= 1, got {limit}")
    per_source = max(1, limit // max(len(sources), 1))
    return [c for source in sources for c in caption_sample(source, per_source, progress=progress)]
