"""Raw record image and caption -> model inputs: a uint8 [S, S, 3] image and clean caption text.

`load_image` decodes encoded bytes with PIL (or takes an already decoded uint8 array), applies
the EXIF orientation, converts any PIL mode to RGB (transparency composited on white), and
crops and resizes to `image_size`: a random resized crop (plus optional colour jitter) for
training, the centred square of the shorter side for evaluation. Images are never flipped.
The output stays uint8; the model normalises on the device.

Speed: the crop box is chosen from the header before any pixel is decoded, so JPEGs are decoded
at 1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling, `Image.draft`) whenever the crop still has at
least `image_size` pixels on each side, and the crop and resize are one `Image.resize(box=...)`.
EXIF orientation is applied to the small result rather than to the whole image.

Anything that makes a sample unusable raises `BadSample` (see `mmjax.data.records`). Truncated
files are detected only while `PIL.ImageFile.LOAD_TRUNCATED_IMAGES` is False (PIL's default);
this module never changes it. PIL's own decompression bomb check still applies: images over
2 * `PIL.Image.MAX_IMAGE_PIXELS` are refused as too_many_pixels whatever `max_pixels` says,
and PIL's warning for images between its two limits is silenced here (we check our own limit).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import math
import os
import struct
import threading
import warnings
from collections.abc import Iterator

import numpy as np
from PIL import Image, ImageEnhance

from mmjax.data.records import BadSample

_ORIENTATION_TAG = 0x0112
# EXIF orientation -> the transpose that displays the stored image upright (as ImageOps).
_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_DRAFT_REDUCTIONS = (8, 4, 2)  # the DCT scalings libjpeg offers, largest first
# A large downscale first shrinks by an integer factor (box filter), then resamples; with a
# gap of 3 the result is practically the same as a full bicubic resample, and much faster.
_REDUCING_GAP = 3.0
_WHITE = (255, 255, 255)
# PIL plugins are not consistent about what they raise on truncated or corrupt data.
_DECODE_ERRORS = (
    OSError,
    ValueError,
    SyntaxError,
    EOFError,
    struct.error,
    IndexError,
    KeyError,
    TypeError,
    ZeroDivisionError,
    OverflowError,
)
# File signatures of common formats (WebP is checked apart: "RIFF", size, "WEBP").
_SIGNATURES = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"II*\x00", b"MM\x00*")
# warnings.catch_warnings() swaps a process-wide filter list; serialising our own use keeps
# concurrent loader threads from restoring each other's filters. Only header parsing is held.
_OPEN_LOCK = threading.Lock()


def _new_open_lock() -> None:
    """A child forked while another thread held the lock would otherwise wait forever."""
    global _OPEN_LOCK
    _OPEN_LOCK = threading.Lock()


os.register_at_fork(after_in_child=_new_open_lock)


@dataclasses.dataclass(frozen=True)
class ImageOptions:
    """How `load_image` turns an image into a uint8 [image_size, image_size, 3] array."""

    image_size: int
    train: bool  # True: random resized crop (+ jitter); False: centre square of the shorter side
    crop_scale: tuple[float, float] = (0.9, 1.0)  # area fraction range of the random crop
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)  # width / height range of the random crop
    color_jitter: float = 0.0  # brightness, contrast, saturation factors in [1-s, 1+s]; 0: off
    max_pixels: int = 100_000_000  # width * height above this -> BadSample("too_many_pixels")
    # 0: still images (load_image); T >= 1: clips of T frames (mmjax.data.clips.load_clip),
    # every frame with the same crop and jitter.
    frames: int = 0

    def __post_init__(self) -> None:
        if not _is_int(self.image_size) or self.image_size < 1:
            raise ValueError(f"image_size={self.image_size!r} must be an integer >= 1")
        scale = _pair("crop_scale", self.crop_scale)
        if not 0 < scale[0] <= scale[1] <= 1:
            raise ValueError(f"crop_scale={scale} must satisfy 0 < lo <= hi <= 1")
        ratio = _pair("crop_ratio", self.crop_ratio)
        if not (0 < ratio[0] <= ratio[1] and math.isfinite(ratio[1])):
            raise ValueError(f"crop_ratio={ratio} must satisfy 0 < lo <= hi (finite)")
        try:
            jitter = float(self.color_jitter)
        except (TypeError, ValueError):
            raise ValueError(f"color_jitter={self.color_jitter!r} must be a number") from None
        if not 0 <= jitter < 1:
            raise ValueError(f"color_jitter={jitter} must be in [0, 1)")
        if not _is_int(self.max_pixels) or self.max_pixels < 1:
            raise ValueError(f"max_pixels={self.max_pixels!r} must be an integer >= 1")
        if not _is_int(self.frames) or self.frames < 0:
            raise ValueError(f"frames={self.frames!r} must be an integer >= 0")
        # Normalised copies: configs give lists and numpy scalars; the options must hash.
        object.__setattr__(self, "image_size", int(self.image_size))
        object.__setattr__(self, "crop_scale", scale)
        object.__setattr__(self, "crop_ratio", ratio)
        object.__setattr__(self, "color_jitter", jitter)
        object.__setattr__(self, "max_pixels", int(self.max_pixels))
        object.__setattr__(self, "frames", int(self.frames))

    @property
    def shape(self) -> tuple[int, ...]:
        """One preprocessed example: (S, S, 3), or (T, S, S, 3) for clips."""
        frame = (self.image_size, self.image_size, 3)
        return (self.frames, *frame) if self.frames else frame


def _is_int(value: object) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


def _pair(name: str, value: object) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in value)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        raise ValueError(f"{name}={value!r} must be a pair of numbers (lo, hi)") from None
    return lo, hi


def load_image(
    data: bytes | np.ndarray, options: ImageOptions, rng: np.random.Generator | None = None
) -> np.ndarray:
    """uint8 [S, S, 3] (C-contiguous, possibly read-only); raises BadSample.

    rng is required when options.train. Encoded bytes get the train or eval transform; a
    decoded array that is already S x S is returned as it is (never augmented: positions in
    the built-in corpus matter), any other array gets the eval transform.
    Same bytes and same rng state give the same output.
    """
    if options.train and rng is None:
        raise ValueError("load_image: rng is required when options.train is True")
    size = options.image_size
    if isinstance(data, np.ndarray):
        return _load_array(data, size)
    if not isinstance(data, bytes | bytearray | memoryview):
        raise TypeError(f"load_image: image must be bytes or np.ndarray, not {type(data).__name__}")
    if len(data) == 0:
        raise BadSample("empty_file")
    img = _open(data, options.max_pixels)

    # JPEG headers carry EXIF, so the crop is known before decoding and the decoder can
    # downscale. Other formats may keep EXIF after the pixels (PNG eXIf): decode first.
    is_jpeg = img.format in ("JPEG", "MPO")  # MPO: a camera JPEG with extra frames
    if not is_jpeg:
        _load(img)
    orientation = _orientation(img)
    width, height = img.size
    # The crop is chosen in displayed (upright) coordinates, then mapped to stored ones.
    shown = (height, width) if orientation >= 5 else (width, height)
    if options.train:
        box = random_resized_crop_box(rng, *shown, options.crop_scale, options.crop_ratio)
    else:
        box = _centre_square_box(*shown)
    stored_box = _stored_box(box, orientation, width, height)
    if is_jpeg:
        factor = _draft(img, stored_box, size)
        _load(img)
        stored_box = tuple(v * factor for v in stored_box)

    img = _resizable(img)
    out = img.resize(
        (size, size), Image.Resampling.BICUBIC, box=stored_box, reducing_gap=_REDUCING_GAP
    )
    if orientation in _TRANSPOSE:  # Transposing the S x S result is exact and cheap.
        out = out.transpose(_TRANSPOSE[orientation])
    out = _to_rgb(out)
    if options.train and options.color_jitter > 0:
        out = _jitter(out, rng, options.color_jitter)
    return np.asarray(out)


def random_resized_crop_box(
    rng: np.random.Generator,
    width: int,
    height: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of a random crop, as torchvision's RandomResizedCrop.

    Up to 10 tries of an area fraction uniform in `scale` and an aspect ratio (width / height)
    log-uniform in `ratio`; if none fits, the largest centred box with a ratio in range.
    """
    area = width * height
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            left = int(rng.integers(0, width - w + 1))
            top = int(rng.integers(0, height - h + 1))
            return left, top, left + w, top + h
    if width / height < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif width / height > ratio[1]:
        w, h = round(height * ratio[1]), height
    else:
        w, h = width, height
    w, h = min(max(w, 1), width), min(max(h, 1), height)
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


# C0 control characters other than whitespace (NUL first among them): scraped captions carry
# them now and then; they are turned into spaces rather than reaching the tokenizer.
_CONTROL = {c: " " for c in range(32) if chr(c) not in "\t\n\r\x0b\x0c"} | {127: " "}


def decode_caption(raw: str | bytes | None) -> str:
    """Caption text with control characters (NUL, ...) made spaces and whitespace runs
    collapsed to single spaces; raises BadSample.

    Bytes must be strict UTF-8; a str holding lone surrogates (a file read with
    errors="surrogateescape") counts as not UTF-8 too.
    """
    if raw is None:
        raise BadSample("empty_caption", "no caption")
    if isinstance(raw, bytes | bytearray | memoryview):
        try:
            text = bytes(raw).decode("utf-8")
        except UnicodeDecodeError as e:
            raise BadSample(
                "caption_not_utf8", f"byte {e.object[e.start]:#04x} at {e.start}"
            ) from None
    elif isinstance(raw, str):
        try:
            raw.encode("utf-8")
        except UnicodeEncodeError as e:
            raise BadSample("caption_not_utf8", f"lone surrogate at {e.start}") from None
        text = raw
    else:
        raise TypeError(f"decode_caption: caption must be str or bytes, not {type(raw).__name__}")
    text = " ".join(text.translate(_CONTROL).split())
    if not text:
        raise BadSample("empty_caption", "blank caption")
    return text


def _load_array(array: np.ndarray, size: int) -> np.ndarray:
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3 or 0 in array.shape:
        raise ValueError(
            f"load_image: array image must be uint8 [H, W, 3], got {array.dtype} {array.shape}"
        )
    height, width = array.shape[:2]
    if (height, width) == (size, size):
        return array
    img = Image.fromarray(np.ascontiguousarray(array))
    box = _centre_square_box(width, height)
    out = img.resize((size, size), Image.Resampling.BICUBIC, box=box, reducing_gap=_REDUCING_GAP)
    return np.asarray(out)


@contextlib.contextmanager
def _decode_errors() -> Iterator[None]:
    """Turns what PIL raises on bad data into BadSample."""
    try:
        yield
    except Image.DecompressionBombError as e:
        raise BadSample("too_many_pixels", str(e)) from None
    except _DECODE_ERRORS as e:
        raise BadSample("corrupt_image", f"{type(e).__name__}: {e}") from None


def _open(data: bytes | bytearray | memoryview, max_pixels: int) -> Image.Image:
    """Parses the header only, and checks the pixel count before anything is decoded."""
    try:
        with _OPEN_LOCK, warnings.catch_warnings():
            # PIL warns above its own limit (~89M pixels); ours is max_pixels, checked below.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except Image.UnidentifiedImageError:  # An OSError, so before the corrupt-data errors.
        head = bytes(data[:12])
        # A known signature with a header PIL cannot parse is a broken file (often truncated).
        known = head.startswith(_SIGNATURES) or (head[:4] == b"RIFF" and head[8:] == b"WEBP")
        reason = "corrupt_image" if known else "unknown_format"
        raise BadSample(reason, f"{len(data)} bytes starting {head[:8]!r}") from None
    except Image.DecompressionBombError as e:
        raise BadSample("too_many_pixels", str(e)) from None
    except _DECODE_ERRORS as e:  # A known format with a broken header.
        raise BadSample("corrupt_image", f"{type(e).__name__}: {e}") from None
    width, height = img.size
    if width * height > max_pixels:
        raise BadSample(
            "too_many_pixels", f"{width}x{height} = {width * height} > max_pixels={max_pixels}"
        )
    return img


def _load(img: Image.Image) -> None:
    with _decode_errors():
        img.load()


def _orientation(img: Image.Image) -> int:
    """EXIF orientation 1..8 (1: upright)."""
    try:
        value = img.getexif().get(_ORIENTATION_TAG, 1)
    except Exception:  # A broken EXIF block should not cost an otherwise decodable image.
        return 1
    return value if _is_int(value) and value in _TRANSPOSE else 1


def _centre_square_box(width: int, height: int) -> tuple[int, int, int, int]:
    """Resize the shorter side to S then centre crop == resize the central square."""
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return left, top, left + side, top + side


def _stored_box(
    box: tuple[float, ...], orientation: int, width: int, height: int
) -> tuple[float, ...]:
    """A box in displayed coordinates -> the same region in the stored width x height image."""
    left, top, right, bottom = box
    if orientation == 2:
        return width - right, top, width - left, bottom
    if orientation == 3:
        return width - right, height - bottom, width - left, height - top
    if orientation == 4:
        return left, height - bottom, right, height - top
    if orientation == 5:
        return top, left, bottom, right
    if orientation == 6:
        return top, height - right, bottom, height - left
    if orientation == 7:
        return width - bottom, height - right, width - top, height - left
    if orientation == 8:
        return width - bottom, left, width - top, right
    return box


def _draft(img: Image.Image, box: tuple[float, ...], size: int) -> float:
    """Asks the JPEG decoder for the largest reduction that keeps the crop >= size pixels.

    Returns the factor from stored to decoded coordinates (1 / reduction).
    """
    crop = min(box[2] - box[0], box[3] - box[1])
    reduction = next((r for r in _DRAFT_REDUCTIONS if crop / r >= size), 1)
    if reduction == 1:
        return 1.0
    width, height = img.size
    # PIL picks the largest scaling with decoded size >= the request: exactly `reduction`.
    with _decode_errors():
        result = img.draft("RGB", (max(1, width // reduction), max(1, height // reduction)))
    if result is None:  # Not applied (e.g. already configured); use what the size says.
        return img.size[0] / width
    # Decoded pixel i covers stored [i * r, (i + 1) * r); img.size is rounded up, so the
    # exact factor comes from draft's box, not from the new size.
    return result[1][2] / width


def _resizable(img: Image.Image) -> Image.Image:
    """Any decoded mode -> "L", "RGB" or "RGBA" (which resize filters correctly)."""
    mode = img.mode
    if mode in ("RGB", "L"):
        return img.convert("RGBA") if "transparency" in img.info else img
    if mode == "RGBA":
        return img
    if mode == "P":  # Resizing "P" would silently use NEAREST.
        return img.convert("RGBA" if "transparency" in img.info else "RGB")
    if mode in ("LA", "PA", "RGBa"):
        return img.convert("RGBA")
    if mode == "La":
        return img.convert("LA").convert("RGBA")
    if mode == "1":
        return img.convert("L")
    if mode == "I" or mode.startswith("I;16"):
        # 16-bit samples (PNG "I;16", or "I" holding 0..65535): keep the high byte.
        values = np.clip(np.asarray(img, dtype=np.int64), 0, 65535) >> 8
        return Image.fromarray(values.astype(np.uint8))
    if mode == "F":
        values = np.clip(np.nan_to_num(np.asarray(img, dtype=np.float32)), 0, 255)
        return Image.fromarray(np.rint(values).astype(np.uint8))
    try:  # CMYK, YCbCr, LAB, HSV, RGBX, ...
        return img.convert("RGB")
    except ValueError:
        raise BadSample("corrupt_image", f"cannot convert PIL mode {mode} to RGB") from None


def _to_rgb(img: Image.Image) -> Image.Image:
    """The resized "L", "RGB" or "RGBA" image -> "RGB"; transparency is composited on white."""
    if img.mode == "RGB":
        return img
    if img.mode == "L":
        return img.convert("RGB")
    background = Image.new("RGB", img.size, _WHITE)
    background.paste(img, mask=img.getchannel("A"))
    return background


def _jitter(img: Image.Image, rng: np.random.Generator, strength: float) -> Image.Image:
    """Brightness, contrast, then saturation, each by a factor uniform in [1-s, 1+s]."""
    return _apply_jitter(img, rng.uniform(1 - strength, 1 + strength, size=3))


def _apply_jitter(img: Image.Image, factors) -> Image.Image:
    """Brightness, contrast, then saturation by the given factors (all frames of a clip share
    one draw)."""
    brightness, contrast, saturation = factors
    img = ImageEnhance.Brightness(img).enhance(float(brightness))
    img = ImageEnhance.Contrast(img).enhance(float(contrast))
    return ImageEnhance.Color(img).enhance(float(saturation))
