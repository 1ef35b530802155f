"""Writes the shapes corpus as image files: a demo of "your own data", and test fixtures.

    mmjax data corpus /tmp/corpus --num-examples 2000 --wds-shard-size 500

writes /tmp/corpus/images/train/000000.jpg ... and /tmp/corpus/train.csv
(columns filepath, caption; paths relative to the CSV), and with
--wds-shard-size also img2dataset-style tar shards of the same samples under
/tmp/corpus/wds_train/. It prints the CSV path and the shard pattern, ready
for `csv:PATH` / `wds:PATTERN` specs.

Images of different splits go to different folders, so train and eval can
share one corpus folder.
"""

from __future__ import annotations

import csv
import io
import json
import os
import tarfile
from pathlib import Path

import tqdm
from PIL import Image

from mmjax.data.csv_source import CsvSource
from mmjax.data.records import BadSample
from mmjax.data.shapes import ShapesSource

FORMATS = {"jpeg": ".jpg", "png": ".png"}


def write_image_corpus(
    out_dir: str | os.PathLike,
    *,
    num_examples: int,
    image_size: int = 64,
    split: str = "train",
    seed: int = 0,
    fmt: str = "jpeg",
    quality: int = 90,
    progress: bool = False,
) -> Path:
    """Renders `ShapesSource(split, num_examples, seed, image_size)` to files; returns the CSV.

    Image i is `out_dir/images/{split}/{i:06d}.jpg` (or .png); the CSV is
    `out_dir/{split}.csv` with columns filepath (relative), caption.
    """
    if fmt not in FORMATS:
        raise ValueError(f"image format {fmt!r} is unknown; allowed: {list(FORMATS)}")
    source = ShapesSource(split, num_examples, seed, image_size)
    out = Path(out_dir)
    folder = out / "images" / split
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in tqdm.tqdm(range(len(source)), desc=f"writing {folder}", disable=not progress):
        example = source[i]
        relative = f"images/{split}/{i:06d}{FORMATS[fmt]}"
        options = {"quality": quality} if fmt == "jpeg" else {}
        Image.fromarray(example["image"]).save(out / relative, format=fmt.upper(), **options)
        rows.append((relative, example["caption"]))
    csv_path = out / f"{split}.csv"
    temporary = csv_path.with_name(f".{csv_path.name}.tmp")
    with open(temporary, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["filepath", "caption"])
        writer.writerows(rows)
    os.replace(temporary, csv_path)  # A CSV with its final name lists only written images.
    return csv_path


def write_wds_shards(
    csv_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    shard_size: int,
    image_key: str = "filepath",
    caption_key: str = "caption",
) -> str:
    """Packs a CSV corpus into img2dataset-style tar shards; returns their brace pattern.

    Shard j is `out_dir/{j:06d}.tar`; sample i has members KEY.EXT (the image
    file's bytes and extension), KEY.txt (caption bytes; invalid UTF-8 kept)
    and KEY.json, where KEY is i as 9 digits. A row whose image cannot be read
    gets no image member, so a WebDatasetSource reports it as missing_file
    at the same position as the CSV source does.
    """
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    source = CsvSource(csv_path, image_key=image_key, caption_key=caption_key)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    num_shards = -(-len(source) // shard_size)
    for shard in range(num_shards):
        path = out / f"{shard:06d}.tar"
        temporary = path.with_name(f".{path.name}.tmp")
        with tarfile.open(temporary, "w") as tar:
            for i in range(shard * shard_size, min((shard + 1) * shard_size, len(source))):
                key = f"{i:09d}"
                caption = source.caption(i)
                members = {
                    "txt": caption.encode("utf-8", "surrogateescape"),
                    "json": json.dumps({"key": key, "caption": caption}).encode(),
                }
                try:
                    image = source[i]["image"]
                    extension = os.path.splitext(source.image_path(i))[1].lstrip(".") or "jpg"
                    members = {extension.lower(): image, **members}
                except BadSample:
                    pass
                for extension, data in members.items():
                    info = tarfile.TarInfo(f"{key}.{extension}")
                    info.size = len(data)
                    info.mtime = 0  # Same bytes on every run.
                    tar.addfile(info, io.BytesIO(data))
        os.replace(temporary, path)
    return str(out / f"{{{0:06d}..{num_shards - 1:06d}}}.tar")
