"""A CSV or TSV file of image paths and captions, as a random-access source.

One row per sample; the header names the columns (by default `filepath` and
`caption`, as written by img2dataset-style tools and `mmjax.data.image_corpus`).
`.tsv` files are tab-separated, anything else comma-separated; both follow the
csv module's quoting rules, so files written by it (or pandas) read back as
written. Relative image paths resolve against the CSV's folder.

The file is read as UTF-8, with or without a byte-order mark (spreadsheets write one when
saving "CSV UTF-8"), with `surrogateescape`: a caption holding invalid
UTF-8 survives as a str with lone surrogates, which the caption decoder
rejects as `caption_not_utf8` (and which re-encodes to the original bytes).
Images are returned as the file's raw bytes; decoding happens later.

Clips (`frames` >= 1, model.input_kind='video'): the image column may name a folder of frames
(its image files in name order; only the frames the clip samples are read) or one file
holding a stack (.npy, GIF, TIFF, ...); see mmjax.data.clips.
"""

from __future__ import annotations

import csv
import io
import operator
import os
from typing import Any

from mmjax import storage
from mmjax.data.records import BadSample

# Errors that mean "this image file cannot be read": the sample is skipped.
UNREADABLE_FILE_ERRORS = (
    FileNotFoundError,
    PermissionError,
    IsADirectoryError,
    NotADirectoryError,
)


class CsvSource:
    """Rows of a CSV/TSV file: {"key": image path as written, "image": bytes, "caption": str}."""

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        image_key: str = "filepath",
        caption_key: str = "caption",
        frames: int = 0,
    ):
        self.path = storage.path(path)
        self.frames = int(frames)  # 0: images; T: clips of T frames (folders are read)
        self.name = f"csv:{path}"
        self.image_key = image_key
        self.caption_key = caption_key
        self._folder = str(self.path.parent)  # Image paths are relative to it (or a URL's).
        delimiter = "\t" if self.path.suffix.lower() == ".tsv" else ","
        # Raw strings (not resolved paths) keep memory to about one str per cell.
        self._filepaths: list[str] = []
        self._captions: list[str] = []
        text = storage.read_bytes(self.path).decode("utf-8-sig", errors="surrogateescape")
        with io.StringIO(text, newline="") as f:
            reader = csv.reader(f, delimiter=delimiter)
            header = next(reader, None)
            if header is None:
                raise ValueError(f"{self.path}: empty file, expected a header row")
            columns = []
            for key in (image_key, caption_key):
                if key not in header:
                    raise ValueError(f"{self.path}: no column {key!r}; columns present: {header}")
                columns.append(header.index(key))
            image_column, caption_column = columns
            needed = max(columns) + 1
            for row in reader:
                if not row:  # A blank line is no sample.
                    continue
                if len(row) < needed:
                    raise ValueError(
                        f"{self.path}:{reader.line_num}: row has {len(row)} fields, "
                        f"header has {len(header)}"
                    )
                self._filepaths.append(row[image_column])
                self._captions.append(row[caption_column])
        if not self._filepaths:
            raise ValueError(f"{self.path}: no rows after the header")

    def __len__(self) -> int:
        return len(self._filepaths)

    def __repr__(self) -> str:
        return f"CsvSource({str(self.path)!r}, {len(self)} rows)"

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = self._check(index)
        filepath = self._filepaths[index]
        path = _resolve(self._folder, filepath)
        if self.frames and not storage.is_remote(path) and os.path.isdir(path):
            from mmjax.data.clips import read_frame_folder  # Late: only clips need PIL here.

            image = read_frame_folder(path, self.frames, read_file)
        else:
            image = read_file(path)
        return {"key": filepath, "image": image, "caption": self._captions[index]}

    def caption(self, index: int) -> str:
        """The caption as read (a str; lone surrogates mark invalid UTF-8)."""
        return self._captions[self._check(index)]

    def image_path(self, index: int) -> str:
        """The image path of row `index`, resolved against the CSV's folder."""
        return _resolve(self._folder, self._filepaths[self._check(index)])

    def _check(self, index: int) -> int:
        index = operator.index(index)
        if not 0 <= index < len(self._filepaths):
            raise IndexError(f"{self.name}: index {index} out of range for {len(self)} rows")
        return index


def _resolve(folder: str, filepath: str) -> str:
    """A CSV's image path against the CSV's folder; an absolute path or a URL as it is."""
    if storage.is_remote(filepath) or os.path.isabs(filepath):
        return filepath
    if storage.is_remote(folder):
        return f"{folder.rstrip('/')}/{filepath}"
    return os.path.join(folder, filepath)


def read_file(path: str) -> bytes:
    """A whole file's bytes; an unreadable file is a `missing_file` BadSample."""
    if storage.is_remote(path):
        try:
            return storage.read_bytes(storage.path(path))
        except UNREADABLE_FILE_ERRORS as e:
            raise BadSample("missing_file", f"{path}: {e}") from None
    try:
        # A fresh handle per call: safe from any number of threads.
        with open(path, "rb") as f:
            return f.read()
    except UNREADABLE_FILE_ERRORS as e:
        raise BadSample("missing_file", f"{path}: {e.strerror or type(e).__name__}") from None
