"""Clips: T frames read from a folder of images or from one file holding a stack of them.

A clip in a record (see `mmjax.data.records`) is one of
  - a list of encoded frames (a folder's image files, in name order; `frame_files`),
  - the bytes of one stack file: `.npy` (uint8 [N, H, W, 3], or [N, H, W] grey) or any
    multi-frame image PIL reads (GIF, TIFF, animated PNG/WebP),
  - a decoded uint8 array [N, H, W, 3] (the built-in corpus; used as it is when N = T and the
    frames are already S x S, as load_image does with arrays).

`load_clip` samples N >= T frames uniformly down to T (the middle frame of each of T equal
spans; N < T is a `too_few_frames` BadSample) and gives every frame the image preprocessing of
`mmjax.data.preprocess` with one crop box and one colour-jitter draw for the whole clip, so the
motion between frames survives augmentation. Only the sampled frames are decoded.
"""

from __future__ import annotations

import io
import os
import re

import numpy as np
from PIL import Image

from mmjax.data import preprocess as pp
from mmjax.data.records import BadSample

# Files of a frame folder (others, e.g. .DS_Store or a notes.txt, are ignored).
FRAME_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm")
_NPY_MAGIC = b"\x93NUMPY"


def sample_indices(count: int, frames: int) -> list[int]:
    """`frames` indices spread uniformly over `count` frames (all of them when equal)."""
    if count < frames:
        raise BadSample("too_few_frames", f"{count} frames, model.video.frames={frames}")
    return [(2 * i + 1) * count // (2 * frames) for i in range(frames)]


def _natural_key(name: str) -> list:
    # frame_2 before frame_10: runs of digits compare as numbers.
    return [
        (0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", name)
    ]


def frame_files(folder: str) -> list[str]:
    """The frame files of `folder` in order: image suffixes only, no hidden files, sorted by
    name with numbers compared as numbers (frame_2.png before frame_10.png)."""
    try:
        names = [
            entry.name
            for entry in os.scandir(folder)
            if entry.is_file()
            and not entry.name.startswith(".")
            and entry.name.lower().endswith(FRAME_SUFFIXES)
        ]
    except OSError as e:
        raise BadSample("missing_file", f"{folder}: {e.strerror or type(e).__name__}") from None
    return sorted(names, key=_natural_key)


def read_frame_folder(folder: str, frames: int, read_file) -> list[bytes]:
    """The encoded bytes of the `frames` frames `load_clip` would sample from `folder` (only
    those are read); `read_file(path) -> bytes` raises BadSample for unreadable files."""
    names = frame_files(folder)
    if len(names) < frames:
        raise BadSample(
            "too_few_frames", f"{folder}: {len(names)} frame files, model.video.frames={frames}"
        )
    return [read_file(os.path.join(folder, names[i])) for i in sample_indices(len(names), frames)]


def load_clip(
    data: bytes | list | tuple | np.ndarray,
    options: pp.ImageOptions,
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """uint8 [T, S, S, 3] (T = options.frames); raises BadSample. See the module docstring."""
    frames = options.frames
    if frames < 1:
        raise ValueError("load_clip: options.frames must be >= 1 (a clip of T frames)")
    if options.train and rng is None:
        raise ValueError("load_clip: rng is required when options.train is True")
    if isinstance(data, np.ndarray):
        return _decoded_array(data, options)
    if isinstance(data, list | tuple):
        if len(data) < frames:
            raise BadSample("too_few_frames", f"{len(data)} frames, model.video.frames={frames}")
        images = [_decode_frame(data[i], options) for i in sample_indices(len(data), frames)]
        return _preprocess(images, options, rng)
    if not isinstance(data, bytes | bytearray | memoryview):
        raise TypeError(
            f"load_clip: a clip must be bytes, a list of frame bytes or np.ndarray, "
            f"not {type(data).__name__}"
        )
    if len(data) == 0:
        raise BadSample("empty_file")
    if bytes(data[: len(_NPY_MAGIC)]) == _NPY_MAGIC:
        return _preprocess(_npy_frames(data, options), options, rng)
    return _preprocess(_stack_frames(data, options), options, rng)


def _decoded_array(array: np.ndarray, options: pp.ImageOptions) -> np.ndarray:
    if array.dtype != np.uint8 or array.ndim != 4 or array.shape[3] != 3 or 0 in array.shape:
        raise ValueError(
            f"load_clip: array clip must be uint8 [T, H, W, 3], got {array.dtype} {array.shape}"
        )
    size = options.image_size
    array = array[sample_indices(len(array), options.frames)]
    if array.shape[1:3] == (size, size):
        return np.ascontiguousarray(array)
    return np.stack([pp._load_array(frame, size) for frame in array])


def _decode_frame(data, options: pp.ImageOptions) -> tuple[Image.Image, int]:
    """One encoded frame -> (decoded PIL image, its EXIF orientation)."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise TypeError(f"load_clip: a frame must be bytes, not {type(data).__name__}")
    if len(data) == 0:
        raise BadSample("empty_file", "an empty frame file")
    img = pp._open(data, options.max_pixels)
    pp._load(img)
    return img, pp._orientation(img)


def _npy_frames(data, options: pp.ImageOptions) -> list[tuple[Image.Image, int]]:
    try:
        array = np.load(io.BytesIO(bytes(data)), allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise BadSample("corrupt_image", f".npy stack: {type(e).__name__}: {e}") from None
    if array.ndim == 3:  # Grey frames.
        array = np.repeat(array[..., None], 3, axis=-1)
    if array.dtype != np.uint8 or array.ndim != 4 or array.shape[3] != 3 or 0 in array.shape:
        raise BadSample(
            "unknown_format",
            f".npy stack must be uint8 [T, H, W, 3], got {array.dtype} {array.shape}",
        )
    height, width = array.shape[1:3]
    if height * width > options.max_pixels:
        raise BadSample("too_many_pixels", f"{width}x{height} = {width * height} > max_pixels")
    chosen = sample_indices(len(array), options.frames)
    return [(Image.fromarray(np.ascontiguousarray(array[i])), 1) for i in chosen]


def _stack_frames(data, options: pp.ImageOptions) -> list[tuple[Image.Image, int]]:
    """The sampled frames of a multi-frame image file (a single image has one frame)."""
    img = pp._open(data, options.max_pixels)
    orientation = pp._orientation(img)
    count = getattr(img, "n_frames", 1)
    out = []
    with pp._decode_errors():
        for i in sample_indices(count, options.frames):  # Ascending: GIFs decode forwards.
            img.seek(i)
            img.load()
            out.append((img.copy(), orientation))
    return out


def _preprocess(images: list[tuple[Image.Image, int]], options: pp.ImageOptions, rng) -> np.ndarray:
    """Every frame cropped by one box (chosen on the first frame, as fractions of its size)
    and resized to S x S, with one jitter draw for all; uint8 [T, S, S, 3]."""
    size = options.image_size
    upright = [
        img.transpose(pp._TRANSPOSE[orientation]) if orientation in pp._TRANSPOSE else img
        for img, orientation in images
    ]
    width, height = upright[0].size
    if options.train:
        box = pp.random_resized_crop_box(rng, width, height, options.crop_scale, options.crop_ratio)
    else:
        box = pp._centre_square_box(width, height)
    fractions = (box[0] / width, box[1] / height, box[2] / width, box[3] / height)
    jitter = None
    if options.train and options.color_jitter > 0:
        strength = options.color_jitter
        jitter = rng.uniform(1 - strength, 1 + strength, size=3)
    out = []
    for img in upright:
        w, h = img.size  # Frames of another size get the same region of their picture.
        frame_box = (fractions[0] * w, fractions[1] * h, fractions[2] * w, fractions[3] * h)
        frame = pp._resizable(img).resize(
            (size, size), Image.Resampling.BICUBIC, box=frame_box, reducing_gap=pp._REDUCING_GAP
        )
        frame = pp._to_rgb(frame)
        if jitter is not None:
            frame = pp._apply_jitter(frame, jitter)
        out.append(np.asarray(frame))
    return np.stack(out)
