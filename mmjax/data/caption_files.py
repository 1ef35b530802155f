"""The standard caption benchmarks as sources, read from the files people already have.

  coco:ROOT/annotations/captions_val2017.json    COCO captions; images in ROOT/val2017/
  karpathy:ROOT/dataset_coco.json                Karpathy's split of COCO (5k test images);
                                                 images in ROOT/<filepath>/<filename>
  karpathy:ROOT/dataset_flickr30k.json           ... of Flickr30k (1k test images); images in
                                                 ROOT/flickr30k-images/ when it exists, else ROOT/

One record per (image, caption) pair, the pairs of an image next to each other, so an image
has its five captions: the retrieval evaluator embeds each image once and counts an
image-to-text hit when any of its captions ranks in the top K (the CLIP paper's rule), and the
captioning evaluator scores a generated caption against all of them (both group the records
by `image_path`). Karpathy files hold every split: the eval split reads `test`, the train
split `train` + `restval` (the usual "train on restval too" convention). COCO's own
annotation files are one split each.
"""

from __future__ import annotations

import json
import operator
import os
from typing import Any

from mmjax import storage
from mmjax.data.csv_source import read_file

KARPATHY_SPLITS = {"eval": ("test",), "train": ("train", "restval")}


class CaptionedImages:
    """Records from parallel lists (image path, caption), in image order."""

    def __init__(self, name: str, image_paths: list[str], captions: list[str]):
        if not image_paths:
            raise ValueError(f"{name}: no captioned images")
        self.name = name
        self._paths, self._captions = image_paths, captions

    def __len__(self) -> int:
        return len(self._paths)

    def __repr__(self) -> str:
        images = len(set(self._paths))
        return f"{type(self).__name__}({self.name!r}, {images} images, {len(self)} captions)"

    def __getitem__(self, index: int) -> dict[str, Any]:
        path = self.image_path(index)
        return {"key": path, "image": read_file(path), "caption": self._captions[index]}

    def caption(self, index: int) -> str:
        return self._captions[self._check(index)]

    def image_path(self, index: int) -> str:
        return self._paths[self._check(index)]

    def _check(self, index: int) -> int:
        index = operator.index(index)
        if not 0 <= index < len(self._paths):
            raise IndexError(f"{self.name}: index {index} out of range for {len(self)} captions")
        return index


def _read_json(path, what: str) -> dict:
    try:
        data = json.loads(storage.read_bytes(storage.path(path)))
    except FileNotFoundError:
        raise ValueError(f"{path}: file not found") from None
    except ValueError as e:
        raise ValueError(f"{path}: not JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: not {what} (expected a JSON object)")
    return data


def _join(folder: str, *parts: str) -> str:
    if storage.is_remote(folder):
        return "/".join([folder.rstrip("/"), *parts])
    return os.path.join(folder, *parts)


def _folder_of(path: str) -> str:
    return str(storage.path(path).parent)


class CocoCaptionsSource(CaptionedImages):
    """COCO's `annotations/captions_<split>.json`, images in the sibling `<split>/` folder."""

    def __init__(self, path: str):
        data = _read_json(path, "a COCO captions file")
        for key in ("images", "annotations"):
            if not isinstance(data.get(key), list):
                raise ValueError(f"{path}: no {key!r} list; not a COCO captions file")
        stem = os.path.basename(str(path)).removesuffix(".json")
        if not stem.startswith("captions_"):
            raise ValueError(
                f"{path}: expected COCO's name annotations/captions_<split>.json (the images "
                "are read from ROOT/<split>/)"
            )
        images_dir = _join(_folder_of(_folder_of(path)), stem.removeprefix("captions_"))
        files = {}
        for image in data["images"]:
            try:
                files[image["id"]] = image["file_name"]
            except (KeyError, TypeError):
                raise ValueError(f"{path}: an image entry lacks 'id' or 'file_name'") from None
        by_image: dict[Any, list[str]] = {}
        for note in data["annotations"]:
            try:
                image_id, caption = note["image_id"], note["caption"]
            except (KeyError, TypeError):
                raise ValueError(f"{path}: an annotation lacks 'image_id' or 'caption'") from None
            if image_id not in files:
                raise ValueError(f"{path}: annotation for unknown image id {image_id!r}")
            by_image.setdefault(image_id, []).append(caption)
        paths, captions = [], []
        for image_id in sorted(by_image):
            for caption in by_image[image_id]:
                paths.append(_join(images_dir, files[image_id]))
                captions.append(caption)
        super().__init__(f"coco:{path}", paths, captions)


class KarpathySource(CaptionedImages):
    """Karpathy's `dataset_coco.json` / `dataset_flickr30k.json`, one split of it."""

    def __init__(self, path: str, split: str):
        if split not in KARPATHY_SPLITS:
            raise ValueError(f"karpathy: split {split!r}; allowed: {list(KARPATHY_SPLITS)}")
        data = _read_json(path, "a Karpathy split file")
        if not isinstance(data.get("images"), list):
            raise ValueError(f"{path}: no 'images' list; not a Karpathy split file")
        root = _folder_of(path)
        flickr = _join(root, "flickr30k-images")
        flat_root = flickr if not storage.is_remote(root) and os.path.isdir(flickr) else root
        wanted = KARPATHY_SPLITS[split]
        paths, captions = [], []
        for number, image in enumerate(data["images"]):
            try:
                if image["split"] not in wanted:
                    continue
                folder = _join(root, image["filepath"]) if image.get("filepath") else flat_root
                sentences = [s["raw"] for s in image["sentences"]]
                filename = image["filename"]
            except (KeyError, TypeError):
                raise ValueError(
                    f"{path}: images[{number}] lacks 'split', 'filename' or 'sentences' with "
                    "'raw' captions"
                ) from None
            for sentence in sentences:
                paths.append(_join(folder, filename))
                captions.append(sentence)
        if not paths:
            raise ValueError(f"{path}: no images in split(s) {list(wanted)}")
        super().__init__(f"karpathy:{path}", paths, captions)
