"""Class labels of a labelled eval source, for zero-shot and linear-probe evaluation.

  shapes   label = one of the corpus attributes: shape | colour | size | position
  shapes_video  label = colour | shape | motion
  csv:...  label = a column of the CSV (e.g. `label`), read once
  folders:...  label = index (the class folder's position in sorted order, an int: the
           classes file is then read by position) | folder (the folder's name)
Other source kinds carry no labels: asking for them is a ConfigError.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable

from mmjax import storage
from mmjax.data.class_folders import ClassFolderSource
from mmjax.data.csv_source import CsvSource
from mmjax.data.shapes import ShapesSource
from mmjax.data.shapes_video import LABELS as VIDEO_LABELS
from mmjax.data.shapes_video import ShapesVideoSource
from mmjax.evals.context import Subset
from mmjax.runtime.config import ConfigError

SHAPES_LABELS = ("shape", "colour", "size", "position")
FOLDER_LABELS = ("index", "folder")


def _csv_column(path, key: str) -> list[str]:
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    text = storage.read_bytes(storage.path(path)).decode("utf-8-sig")
    rows = [row for row in csv.reader(io.StringIO(text, newline=""), delimiter=delimiter) if row]
    header, rows = rows[0], rows[1:]
    if key not in header:
        raise ConfigError(f"{path}: no label column {key!r}; columns present: {header}")
    column = header.index(key)
    return [row[column] if column < len(row) else "" for row in rows]


def label_reader(source, key: str, where: str) -> Callable[[int], str | int]:
    """index -> class name for `source` (a Subset maps to its parent's index); a class
    number for a class-folder source's label 'index'."""
    if isinstance(source, Subset):
        parent = label_reader(source.source, key, where)
        return lambda i: parent(source.parent_index(i))
    if isinstance(source, ShapesSource):
        if key not in SHAPES_LABELS:
            raise ConfigError(
                f"{where}: the shapes corpus has labels {list(SHAPES_LABELS)}, not {key!r}"
            )
        return lambda i: source.attributes(i)[key]
    if isinstance(source, ShapesVideoSource):
        if key not in VIDEO_LABELS:
            raise ConfigError(
                f"{where}: the shapes_video corpus has labels {list(VIDEO_LABELS)}, not {key!r}"
            )
        return lambda i: source.attributes(i)[key]
    if isinstance(source, CsvSource):
        values = _csv_column(source.path, key)
        return lambda i: values[i]
    if isinstance(source, ClassFolderSource):
        if key not in FOLDER_LABELS:
            raise ConfigError(
                f"{where}: class folders have labels {list(FOLDER_LABELS)}, not {key!r}"
            )
        if key == "index":
            return source.label_index
        return source.caption
    raise ConfigError(
        f"{where}: source {source.name} has no class labels (use the shapes corpus, a CSV "
        "with a label column or class folders)"
    )
