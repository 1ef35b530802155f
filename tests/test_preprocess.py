"""Image decoding, cropping and caption cleaning (mmjax.data.preprocess), on tiny PIL fixtures."""

from __future__ import annotations

import io
import struct
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image, ImageOps, JpegImagePlugin, features

from mmjax.data.preprocess import (
    ImageOptions,
    decode_caption,
    load_image,
    random_resized_crop_box,
)
from mmjax.data.records import BadSample

S = 16
EVAL = ImageOptions(image_size=S, train=False)
BICUBIC = Image.Resampling.BICUBIC


def encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def smooth(width: int, height: int) -> np.ndarray:
    """A smooth colour gradient (JPEG keeps it nearly exact)."""
    y, x = np.mgrid[0:height, 0:width]
    red = 30 + 200 * x / max(width - 1, 1)
    green = 30 + 200 * y / max(height - 1, 1)
    blue = 128 + 60 * np.sin((x + y) / 8)
    return np.stack([red, green, blue], -1).round().astype(np.uint8)


def noise(width: int, height: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def halves(width: int = 40, height: int = 30) -> np.ndarray:
    """Left half red, right half blue."""
    a = np.zeros((height, width, 3), np.uint8)
    a[:, : width // 2] = (255, 0, 0)
    a[:, width // 2 :] = (0, 0, 255)
    return a


def centre_reference(img: Image.Image, size: int = S) -> np.ndarray:
    """The eval transform done the plain way: crop the centre square, then resize."""
    side = min(img.size)
    left, top = (img.width - side) // 2, (img.height - side) // 2
    crop = img.convert("RGB").crop((left, top, left + side, top + side))
    return np.asarray(crop.resize((size, size), BICUBIC))


def mad(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int32) - b.astype(np.int32)).mean())


def reason(data, options: ImageOptions = EVAL, rng=None) -> str:
    with pytest.raises(BadSample) as info:
        load_image(data, options, rng)
    return info.value.reason


# ---------------------------------------------------------------- formats and the eval transform


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_formats_decode_to_uint8_square_close_to_plain_pil(fmt):
    if fmt == "WEBP" and not features.check("webp"):
        pytest.skip("PIL built without WebP")
    data = encode(Image.fromarray(smooth(40, 30)), fmt, quality=95)
    out = load_image(data, EVAL)
    assert out.shape == (S, S, 3) and out.dtype == np.uint8 and out.flags.c_contiguous
    assert mad(out, centre_reference(Image.open(io.BytesIO(data)))) < 1.0


def test_eval_keeps_left_on_the_left_and_matches_reference():
    img = Image.fromarray(halves())
    out = load_image(encode(img, "PNG"), EVAL)
    assert (out[:, :4, 0] > 200).all() and (out[:, :4, 2] < 50).all()
    assert (out[:, -4:, 2] > 200).all() and (out[:, -4:, 0] < 50).all()
    assert mad(out, centre_reference(img)) < 1.0
    exact = Image.fromarray(noise(S, 2 * S))  # Width already S: only the centre crop is left.
    assert np.array_equal(load_image(encode(exact, "PNG"), EVAL), noise(S, 2 * S)[S // 2 : -S // 2])


# ---------------------------------------------------------------- modes (S x S inputs: no resize)


def test_grayscale_and_bilevel_give_equal_channels():
    gray = np.arange(S * S, dtype=np.uint8).reshape(S, S)
    out = load_image(encode(Image.fromarray(gray, "L"), "PNG"), EVAL)
    assert np.array_equal(out, np.repeat(gray[..., None], 3, -1))
    bits = Image.fromarray(gray > 100).convert("1")
    out = load_image(encode(bits, "PNG"), EVAL)
    assert np.array_equal(out[..., 0], np.where(gray > 100, 255, 0))
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()


def test_palette_images_use_their_colours_and_transparency():
    rgb = noise(S, S)
    pal = Image.fromarray(rgb).quantize(16)
    assert pal.mode == "P"
    out = load_image(encode(pal, "PNG"), EVAL)
    assert np.array_equal(out, np.asarray(pal.convert("RGB")))
    # 40 x 30 palette image: the resize must be bicubic on colours, not NEAREST on indices.
    big = Image.fromarray(smooth(40, 30)).quantize(64)
    assert mad(load_image(encode(big, "PNG"), EVAL), centre_reference(big)) < 1.0
    indices = np.zeros((S, S), np.uint8)
    indices[:, S // 2 :] = 1
    trans = Image.fromarray(indices, "P")
    trans.putpalette([10, 20, 30, 200, 0, 0] + [0] * 762)
    out = load_image(encode(trans, "PNG", transparency=0), EVAL)
    assert (out[:, : S // 2] == 255).all()
    assert (out[:, S // 2 :] == (200, 0, 0)).all()


def test_rgba_is_composited_on_white_by_alpha():
    rgba = np.zeros((S, S, 4), np.uint8)
    rgba[..., :3] = (10, 200, 30)
    rgba[:, :5, 3] = 0
    rgba[:, 5:10, 3] = 255
    rgba[:, 10:, 3] = 128
    out = load_image(encode(Image.fromarray(rgba, "RGBA"), "PNG"), EVAL).astype(int)
    assert (out[:, :5] == 255).all()
    assert (out[:, 5:10] == (10, 200, 30)).all()
    blend = 255 + (np.array([10, 200, 30]) - 255) * 128 / 255
    assert np.abs(out[:, 10:] - blend).max() <= 1


def test_la_is_composited_on_white():
    la = np.zeros((S, S, 2), np.uint8)
    la[..., 0] = 40
    la[:, : S // 2, 1] = 0
    la[:, S // 2 :, 1] = 255
    la[0, :, 1] = 128
    out = load_image(encode(Image.fromarray(la, "LA"), "PNG"), EVAL).astype(int)
    assert (out[1:, : S // 2] == 255).all() and (out[1:, S // 2 :] == 40).all()
    assert np.abs(out[0] - (255 + (40 - 255) * 128 / 255)).max() <= 1


def test_cmyk_jpeg_converts_to_rgb():
    cmyk = Image.new("CMYK", (S, S), (0, 255, 255, 0))  # Pure red in CMYK.
    data = encode(cmyk, "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    out = load_image(data, EVAL).astype(int)
    assert np.array_equal(out, np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))
    assert (out[..., 0] > 240).all() and (out[..., 1:] < 15).all()


def test_16bit_grayscale_png_is_scaled_to_8bit():
    values = np.array([0, 65535, 32768, 256, 255, 40000], np.uint16)
    img = Image.fromarray(np.resize(values, (S, S)))
    data = encode(img, "PNG")
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    out = load_image(data, EVAL)
    expected = np.resize(np.array([0, 255, 128, 1, 0, 156], np.uint8), (S, S))
    assert np.array_equal(out, np.repeat(expected[..., None], 3, -1))


def test_float_tiff_is_clipped():
    values = np.resize(np.array([-5.0, 0.0, 100.4, 254.6, 300.0], np.float32), (S, S))
    data = encode(Image.fromarray(values, "F"), "TIFF")
    assert Image.open(io.BytesIO(data)).mode == "F"
    expected = np.resize(np.array([0, 0, 100, 255, 255], np.uint8), (S, S))
    assert np.array_equal(load_image(data, EVAL)[..., 1], expected)


def oriented_jpeg(orientation: int, width: int = 40, height: int = 24) -> bytes:
    a = smooth(width, height)
    a[:6, :6] = (255, 0, 0)  # A marker in the stored top-left corner.
    img = Image.fromarray(a)
    exif = img.getexif()
    exif[0x0112] = orientation
    return encode(img, "JPEG", quality=95, exif=exif.tobytes())


def upright(data: bytes) -> Image.Image:
    return ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied(orientation):
    data = oriented_jpeg(orientation)
    ref = upright(data)
    assert mad(load_image(data, EVAL), centre_reference(ref)) < 1.5
    # Train: a non-square box chosen in upright coordinates must land on the same region.
    options = ImageOptions(S, train=True, crop_scale=(0.3, 0.5))
    out = load_image(data, options, np.random.default_rng(3))
    box = random_resized_crop_box(np.random.default_rng(3), *ref.size, (0.3, 0.5), (3 / 4, 4 / 3))
    assert box[2] - box[0] != box[3] - box[1]
    assert mad(out, np.asarray(ref.resize((S, S), BICUBIC, box=box))) < 1.5


def test_exif_rotation_moves_the_marker():
    out = load_image(oriented_jpeg(6, 30, 30), ImageOptions(30, train=False))
    # Orientation 6 is shown rotated 90 degrees clockwise: stored top-left -> top-right.
    assert out[2, -3, 0] > 200 and out[2, -3, 1] < 60
    assert out[2, 2, 0] < 200


# ---------------------------------------------------------------- bad samples


def png_with_size(width: int, height: int) -> bytes:
    """A valid 1x1 PNG whose IHDR claims width x height (CRC recomputed)."""
    data = bytearray(encode(Image.new("L", (1, 1)), "PNG"))
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def test_bad_files_raise_the_right_reason():
    assert reason(b"") == "empty_file"
    assert reason(b"this is a caption, not an image") == "unknown_format"
    assert reason(np.random.default_rng(0).bytes(500)) == "unknown_format"
    jpeg = encode(Image.fromarray(noise(40, 30)), "JPEG")
    assert reason(jpeg[: len(jpeg) // 2]) == "corrupt_image"
    png = encode(Image.fromarray(noise(40, 30)), "PNG")
    assert reason(png[: len(png) // 2]) == "corrupt_image"
    assert reason(png[:30]) == "corrupt_image"  # Cut inside the IHDR chunk.
    assert reason(jpeg[:3] + b"garbage") == "corrupt_image"  # A JPEG signature, then nothing.


def test_pixel_limit_is_checked_before_decoding():
    png = encode(Image.fromarray(noise(40, 30)), "PNG")
    assert reason(png, ImageOptions(S, train=False, max_pixels=1199)) == "too_many_pixels"
    assert load_image(png, ImageOptions(S, train=False, max_pixels=1200)).shape == (S, S, 3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # 1e10 pixels: over PIL's own hard limit (PIL raises DecompressionBombError).
        assert reason(png_with_size(100_000, 100_000)) == "too_many_pixels"
        # 1.2e8: between PIL's warning and error limits, over ours. Had the pixels been
        # decoded, the 1-pixel data would have been reported as corrupt_image.
        assert reason(png_with_size(12_000, 10_000)) == "too_many_pixels"
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]


def test_no_pil_bomb_warning_under_our_limit(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # PIL would warn at 40 x 30.
    png = encode(Image.fromarray(smooth(40, 30)), "PNG")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = load_image(png, EVAL)
    assert mad(out, centre_reference(Image.fromarray(smooth(40, 30)))) < 1.0


def test_array_inputs():
    square = noise(S, S)
    assert load_image(square, EVAL) is square
    train = ImageOptions(S, train=True, crop_scale=(0.1, 0.2), color_jitter=0.5)
    assert load_image(square, train, np.random.default_rng(0)) is square  # Never augmented.
    wide = smooth(40, 30)
    out = load_image(wide, train, np.random.default_rng(0))
    assert mad(out, centre_reference(Image.fromarray(wide))) < 1.0
    for bad in (square.astype(np.float32), square[..., :2], square[..., 0]):
        with pytest.raises(ValueError, match="uint8"):
            load_image(bad, EVAL)
    with pytest.raises(ValueError, match="rng"):
        load_image(square, train)


# ---------------------------------------------------------------- train crop


def test_full_square_crop_equals_eval():
    data = encode(Image.fromarray(noise(32, 32)), "PNG")
    full = ImageOptions(S, train=True, crop_scale=(1, 1), crop_ratio=(1, 1))
    out = load_image(data, full, np.random.default_rng(5))
    assert out.shape == (S, S, 3)
    assert np.array_equal(out, load_image(data, EVAL))


def test_random_crops_depend_on_the_seed_only():
    data = encode(Image.fromarray(noise(40, 30)), "PNG")
    options = ImageOptions(S, train=True, crop_scale=(0.3, 1.0))
    outs = [load_image(data, options, np.random.default_rng(seed)) for seed in range(4)]
    assert all(o.shape == (S, S, 3) for o in outs)
    assert len({o.tobytes() for o in outs}) == 4
    assert np.array_equal(outs[2], load_image(data, options, np.random.default_rng(2)))


def test_train_crop_never_flips():
    data = encode(Image.fromarray(halves()), "PNG")
    options = ImageOptions(S, train=True)
    for seed in range(10):
        out = load_image(data, options, np.random.default_rng(seed)).astype(int)
        assert (out[:, 0, 0] > out[:, 0, 2]).all() and (out[:, -1, 2] > out[:, -1, 0]).all()


def test_crop_box_statistics():
    rng = np.random.default_rng(0)
    scale, ratio = (0.25, 0.5), (3 / 4, 4 / 3)
    boxes = np.array([random_resized_crop_box(rng, 300, 200, scale, ratio) for _ in range(2000)])
    left, top, right, bottom = boxes.T
    assert (left >= 0).all() and (top >= 0).all() and (right <= 300).all() and (bottom <= 200).all()
    w, h = right - left, bottom - top
    fraction = w * h / (300 * 200)
    assert fraction.min() > 0.24 and fraction.max() < 0.51
    assert abs(fraction.mean() - 0.375) < 0.01
    aspect = w / h
    assert aspect.min() > 0.74 and aspect.max() < 1.35
    assert abs(np.log(aspect).mean()) < 0.02  # Log-uniform: symmetric around 1.
    assert left.min() <= 2 and right.max() >= 298  # Positions cover the image.
    # A panorama no sampled box fits: the largest centred box with the widest allowed ratio.
    assert random_resized_crop_box(rng, 1000, 10, (0.9, 1.0), ratio) == (493, 0, 506, 10)
    assert random_resized_crop_box(rng, 10, 1000, (0.9, 1.0), ratio) == (0, 493, 10, 506)


# ---------------------------------------------------------------- JPEG draft mode


def test_large_jpeg_is_decoded_reduced_and_matches_full_decode(monkeypatch):
    requests = []
    original = JpegImagePlugin.JpegImageFile.draft

    def spy(self, mode, size):
        requests.append((self.size, size))
        return original(self, mode, size)

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    image = Image.fromarray(smooth(512, 512))
    data = encode(image, "JPEG", quality=95)
    out = load_image(data, ImageOptions(64, train=False))
    assert requests == [((512, 512), (64, 64))]  # 512 / 8 = 64: the largest reduction.
    assert mad(out, centre_reference(Image.open(io.BytesIO(data)), 64)) < 3
    requests.clear()
    mpo = encode(image, "MPO", quality=95, save_all=True, append_images=[image])
    assert Image.open(io.BytesIO(mpo)).format == "MPO"  # Many camera JPEGs open as MPO.
    assert mad(load_image(mpo, ImageOptions(64, train=False)), out) < 1
    assert requests == [((512, 512), (64, 64))]
    # EXIF rotation with a size not divisible by 8: the box maps to the reduced pixels exactly.
    a = smooth(500, 300)
    a[:40, :40] = (255, 0, 0)
    img = Image.fromarray(a)
    exif = img.getexif()
    exif[0x0112] = 8
    data = encode(img, "JPEG", quality=95, exif=exif.tobytes())
    requests.clear()
    options = ImageOptions(32, train=True)
    out = load_image(data, options, np.random.default_rng(1))
    assert requests == [((500, 300), (62, 37))]
    ref = upright(data)
    box = random_resized_crop_box(np.random.default_rng(1), *ref.size, (0.9, 1.0), (3 / 4, 4 / 3))
    assert mad(out, np.asarray(ref.resize((32, 32), BICUBIC, box=box))) < 3
    # Small crops are decoded at full size.
    requests.clear()
    load_image(encode(Image.fromarray(smooth(40, 30)), "JPEG"), EVAL)
    assert requests == []


# ---------------------------------------------------------------- colour jitter


def test_color_jitter():
    data = encode(Image.fromarray(smooth(40, 30)), "PNG")
    plain = ImageOptions(S, train=True)
    zero = ImageOptions(S, train=True, color_jitter=0.0)
    jitter = ImageOptions(S, train=True, color_jitter=0.4)
    base = load_image(data, plain, np.random.default_rng(7))
    assert np.array_equal(load_image(data, zero, np.random.default_rng(7)), base)
    jittered = load_image(data, jitter, np.random.default_rng(7))
    assert mad(jittered, base) > 2
    assert np.array_equal(load_image(data, jitter, np.random.default_rng(7)), jittered)
    assert not np.array_equal(load_image(data, jitter, np.random.default_rng(8)), jittered)


# ---------------------------------------------------------------- captions


def test_decode_caption():
    assert decode_caption("  a  dog\n\non\tgrass \r\n") == "a dog on grass"
    assert decode_caption("caf\u00e9 \u2014 ok".encode()) == "caf\u00e9 \u2014 ok"
    assert decode_caption(b"  bytes\n") == "bytes"
    for bad in (b"\xff\xfe broken", b"caf\xe9"):
        with pytest.raises(BadSample) as info:
            decode_caption(bad)
        assert info.value.reason == "caption_not_utf8"
    with pytest.raises(BadSample) as info:
        decode_caption(b"caf\xe9 au lait".decode("utf-8", errors="surrogateescape"))
    assert info.value.reason == "caption_not_utf8"
    for empty in ("", "   \n\t", b"", b" \n", None, "\x00\x00", b"\x00 \x1b"):
        with pytest.raises(BadSample) as info:
            decode_caption(empty)
        assert info.value.reason == "empty_caption"
    # NUL and the other control characters become spaces: they never reach a tokenizer.
    assert decode_caption("a red\x00circle\x00") == "a red circle"
    assert decode_caption(b"a\x07b\x7fc\x1b[0m") == "a b c [0m"


# ---------------------------------------------------------------- options


@pytest.mark.parametrize(
    "field, value",
    [
        ("image_size", 0),
        ("image_size", 2.5),
        ("crop_scale", (0.0, 1.0)),
        ("crop_scale", (0.6, 0.5)),
        ("crop_scale", (0.5, 1.1)),
        ("crop_scale", (0.5,)),
        ("crop_scale", "ab"),
        ("crop_ratio", (0.0, 1.0)),
        ("crop_ratio", (2.0, 1.0)),
        ("crop_ratio", (1.0, float("inf"))),
        ("color_jitter", 1.0),
        ("color_jitter", -0.1),
        ("color_jitter", float("nan")),
        ("max_pixels", 0),
    ],
)
def test_options_validation(field, value):
    kwargs = {"image_size": S, "train": True, field: value}
    with pytest.raises(ValueError, match=field):
        ImageOptions(**kwargs)


def test_options_normalise_lists():
    options = ImageOptions(np.int64(S), train=True, crop_scale=[0.5, 1], crop_ratio=[1, 2])
    assert options.crop_scale == (0.5, 1.0) and options.crop_ratio == (1.0, 2.0)
    assert type(options.image_size) is int
    hash(options)
