"""An ImageNet-style tree of class folders as a labelled source (`folders:ROOT`).

  ROOT/n01440764/ILSVRC2012_val_00000293.JPEG
  ROOT/n01443537/...

Each sub-folder of ROOT is a class; classes are numbered in the sorted order of the folder
names, which for ImageNet's WordNet ids is the order of the standard class-name list
(configs/zeroshot/imagenet_classnames.txt), so zero-shot evaluation maps a folder to its
class by position (label 'index') and needs no id-to-name table; label 'folder' gives the
folder name itself. Images are the folder's files with an image extension, in name order.
The caption of an image is its folder's name.
"""

from __future__ import annotations

import operator
import os
from typing import Any

from mmjax.data.csv_source import read_file

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


class ClassFolderSource:
    """Images of class sub-folders: {"key", "image", "caption": the folder name}."""

    def __init__(self, root: str):
        self.root = str(root)
        self.name = f"folders:{root}"
        if not os.path.isdir(self.root):
            raise ValueError(f"{root}: not a folder (folders:ROOT wants ROOT/<class>/<image>)")
        self.classes = sorted(entry.name for entry in os.scandir(self.root) if entry.is_dir())
        if not self.classes:
            raise ValueError(f"{root}: no class sub-folders (folders:ROOT/<class>/<image>)")
        self._files: list[str] = []
        self._labels: list[int] = []
        for label, name in enumerate(self.classes):
            folder = os.path.join(self.root, name)
            files = sorted(f for f in os.listdir(folder) if f.lower().endswith(IMAGE_EXTENSIONS))
            self._files += [os.path.join(name, f) for f in files]
            self._labels += [label] * len(files)
        if not self._files:
            raise ValueError(f"{root}: the class folders hold no images {IMAGE_EXTENSIONS}")

    def __len__(self) -> int:
        return len(self._files)

    def __repr__(self) -> str:
        return f"ClassFolderSource({self.root!r}, {len(self.classes)} classes, {len(self)} images)"

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = self._check(index)
        return {
            "key": self._files[index],
            "image": read_file(os.path.join(self.root, self._files[index])),
            "caption": self.classes[self._labels[index]],
        }

    def caption(self, index: int) -> str:
        return self.classes[self._labels[self._check(index)]]

    def label_index(self, index: int) -> int:
        """The class number: the folder's position in sorted order."""
        return self._labels[self._check(index)]

    def _check(self, index: int) -> int:
        index = operator.index(index)
        if not 0 <= index < len(self._files):
            raise IndexError(f"{self.name}: index {index} out of range for {len(self)} images")
        return index
