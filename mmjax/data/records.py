"""What every data source yields, and how a sample is declared unusable.

A source is a random-access sequence (`len(source)`, `source[i]`) of raw
records, plus `source.caption(i)` that reads only the caption (for training a
tokenizer without decoding images). A raw record is a dict:

  {"key": str,                         # where the sample came from, for messages
   "image": bytes | np.ndarray | list[bytes],
                                       # encoded file bytes, or decoded uint8 [H, W, 3];
                                       # clips: a stack file's bytes (.npy, GIF, TIFF), the
                                       # frame files' bytes in order, or uint8 [T, H, W, 3]
   "caption": str | bytes}             # bytes are decoded (strict UTF-8) later

Decoding and checking happen in `mmjax.data.preprocess`. Anything that makes
a sample unusable raises `BadSample` with one of `REASONS`; the pipeline skips
the sample and counts it under `data/skipped_<reason>`.
"""

from __future__ import annotations

from typing import Any, Protocol

REASONS = (
    "missing_file",  # the image file (or tar member) does not exist or cannot be read
    "empty_file",  # zero bytes
    "corrupt_image",  # truncated or corrupt encoded data
    "unknown_format",  # not an image format PIL can identify
    "too_many_pixels",  # width * height over data.max_image_pixels (decompression bomb)
    "too_few_frames",  # a clip with fewer frames than model.video.frames
    "truncated_member",  # a tar member cut short: its shard ends inside it
    "empty_caption",  # missing, empty or whitespace-only caption
    "caption_not_utf8",  # caption bytes are not valid UTF-8
)


class BadSample(Exception):
    """A sample that cannot be used; `reason` is one of REASONS."""

    def __init__(self, reason: str, detail: str = ""):
        if reason not in REASONS:
            raise ValueError(f"unknown skip reason {reason!r}; allowed: {list(REASONS)}")
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class Source(Protocol):
    """The interface the pipeline reads (see the module docstring)."""

    name: str  # the spec it was built from, e.g. 'csv:/data/train.csv'

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> dict[str, Any]: ...

    def caption(self, index: int) -> str | bytes: ...
