"""The procedural shapes corpus: determinism, splits, captions, and what is drawn."""

import pickle

import numpy as np
import pytest

from mmjax.data.shapes import (
    COLOURS,
    POSITIONS,
    SHAPES,
    SIZES,
    ShapesSource,
    all_captions,
    caption_for,
)

NUM_CHECKED = 400


def _shape_mask(image: np.ndarray) -> np.ndarray:
    """Pixels that differ clearly from the background (the per-channel median)."""
    pixels = image.astype(np.int16)
    background = np.median(pixels.reshape(-1, 3), axis=0)
    return np.abs(pixels - background).max(axis=-1) > 60


def test_same_index_gives_identical_bytes_in_any_order_and_instance():
    forward = [ShapesSource(seed=3)[i]["image"].tobytes() for i in range(10)]
    backward = [ShapesSource(seed=3)[i]["image"].tobytes() for i in reversed(range(10))]
    assert forward == backward[::-1]
    assert len(set(forward)) == 10  # different indices, different images


def test_survives_pickling_for_worker_processes():
    source = ShapesSource(seed=1, image_size=32)
    clone = pickle.loads(pickle.dumps(source))
    assert clone[7]["caption"] == source[7]["caption"]
    np.testing.assert_array_equal(clone[7]["image"], source[7]["image"])


def test_splits_and_seeds_never_share_images():
    train = {ShapesSource("train")[i]["image"].tobytes() for i in range(200)}
    eval_ = {ShapesSource("eval")[i]["image"].tobytes() for i in range(200)}
    other_seed = {ShapesSource("train", seed=1)[i]["image"].tobytes() for i in range(200)}
    assert not train & eval_
    assert not train & other_seed


@pytest.mark.parametrize("image_size", [16, 32, 64])
def test_image_is_uint8_square_rgb(image_size):
    example = ShapesSource(image_size=image_size)[0]
    assert example["image"].dtype == np.uint8
    assert example["image"].shape == (image_size, image_size, 3)
    assert isinstance(example["caption"], str)


def test_default_lengths():
    assert len(ShapesSource()) == 20_000
    assert len(ShapesSource("eval")) == 512
    assert len(ShapesSource("eval", num_examples=7)) == 7


def test_every_attribute_value_appears():
    source = ShapesSource()
    attributes = [source.attributes(i) for i in range(NUM_CHECKED)]
    assert {a["size"] for a in attributes} == set(SIZES)
    assert {a["colour"] for a in attributes} == set(COLOURS)
    assert {a["shape"] for a in attributes} == set(SHAPES)
    assert {a["position"] for a in attributes} == set(POSITIONS)


def test_caption_template():
    assert caption_for(
        {"size": "small", "colour": "red", "shape": "circle", "position": "top left"}
    ) == ("a small red circle at the top left")
    assert caption_for(
        {"size": "large", "colour": "blue", "shape": "square", "position": "center"}
    ) == ("a large blue square in the center")
    assert caption_for(
        {"size": "small", "colour": "green", "shape": "cross", "position": "left"}
    ) == ("a small green cross on the left")
    assert caption_for(
        {"size": "large", "colour": "white", "shape": "triangle", "position": "bottom"}
    ) == ("a large white triangle at the bottom")


def test_caption_matches_attributes_and_is_a_known_caption():
    source = ShapesSource("eval")
    known = set(all_captions())
    assert len(known) == len(SIZES) * len(COLOURS) * len(SHAPES) * len(POSITIONS)
    for i in range(100):
        caption = source[i]["caption"]
        assert caption == caption_for(source.attributes(i))
        assert caption in known


def test_shape_lies_in_the_named_grid_cell():
    source = ShapesSource(image_size=32)
    cell = 32 / 3
    for i in range(NUM_CHECKED):
        mask = _shape_mask(source[i]["image"])
        rows, cols = np.nonzero(mask)
        assert rows.size > 0, f"example {i}: nothing drawn"
        row, col = divmod(POSITIONS.index(source.attributes(i)["position"]), 3)
        # The centroid is in the cell, and so is every shape pixel.
        assert (int(rows.mean() // cell), int(cols.mean() // cell)) == (row, col), f"example {i}"
        assert rows.min() >= int(row * cell) and rows.max() < np.ceil((row + 1) * cell), (
            f"example {i}"
        )
        assert cols.min() >= int(col * cell) and cols.max() < np.ceil((col + 1) * cell), (
            f"example {i}"
        )


def test_large_shapes_cover_more_pixels_than_small_ones():
    source = ShapesSource(image_size=32)
    areas = {(size, shape): [] for size in SIZES for shape in SHAPES}
    for i in range(NUM_CHECKED):
        attributes = source.attributes(i)
        areas[attributes["size"], attributes["shape"]].append(_shape_mask(source[i]["image"]).sum())
    for shape in SHAPES:
        assert min(areas["large", shape]) > max(areas["small", shape]), shape


def test_drawn_colour_is_the_named_one():
    source = ShapesSource(image_size=32)
    names = list(COLOURS)
    palette = np.array([COLOURS[name] for name in names], np.float32)
    for i in range(NUM_CHECKED):
        image = source[i]["image"]
        # Fully covered pixels only: the eroded mask drops anti-aliased edges.
        mask = _shape_mask(image)
        core = (
            mask[1:-1, 1:-1] & mask[:-2, 1:-1] & mask[2:, 1:-1] & mask[1:-1, :-2] & mask[1:-1, 2:]
        )
        if not core.any():
            continue
        mean_colour = image[1:-1, 1:-1][core].astype(np.float32).mean(axis=0)
        nearest = names[np.abs(palette - mean_colour).sum(axis=1).argmin()]
        assert nearest == source.attributes(i)["colour"], f"example {i}"


def _half_covered_mask(image: np.ndarray) -> np.ndarray:
    """Pixels at least half covered by the shape (anti-aliased edges vary)."""
    pixels = image.astype(np.int16)
    background = np.median(pixels.reshape(-1, 3), axis=0)
    contrast = np.abs(pixels - background).max(axis=-1)
    return contrast > 0.5 * contrast.max()


def _classify_shape(mask: np.ndarray) -> str:
    rows, cols = np.nonzero(mask)
    box = mask[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
    fill = box.mean()
    if fill > 0.9:
        return "square"
    if fill > 0.68:
        return "circle"
    # Near the top a triangle is much narrower than near its base; a cross
    # is equally narrow at both ends. (The very edge rows are anti-aliasing.)
    widths = box.sum(axis=1)
    if widths[int(0.15 * len(widths))] < 0.5 * widths[int(0.85 * len(widths))]:
        return "triangle"
    return "cross"


def test_shapes_are_recognisable():
    source = ShapesSource(image_size=96)
    for i in range(150):
        shape = _classify_shape(_half_covered_mask(source[i]["image"]))
        assert shape == source.attributes(i)["shape"], f"example {i}: {source[i]['caption']}"


def test_large_shapes_are_recognisable_at_32_px():
    # Only a handful of pixels wide, so a crude classifier slips now and then.
    source = ShapesSource(image_size=32)
    large = [i for i in range(NUM_CHECKED) if source.attributes(i)["size"] == "large"]
    correct = [
        _classify_shape(_half_covered_mask(source[i]["image"])) == source.attributes(i)["shape"]
        for i in large
    ]
    assert np.mean(correct) > 0.9


def test_bad_arguments_are_rejected_with_the_culprit_named():
    with pytest.raises(ValueError, match="split"):
        ShapesSource("test")
    with pytest.raises(ValueError, match="image_size"):
        ShapesSource(image_size=8)
    with pytest.raises(ValueError, match="num_examples"):
        ShapesSource(num_examples=0)
    source = ShapesSource("eval", num_examples=5)
    with pytest.raises(IndexError, match="index 5"):
        source[5]
    with pytest.raises(IndexError, match="index -1"):
        source[-1]
    with pytest.raises(IndexError, match="index 9"):
        source.attributes(9)
    with pytest.raises(TypeError, match="index"):
        source[1.5]


def test_numpy_integer_index_is_accepted():
    source = ShapesSource("eval")
    assert source[np.int64(3)]["caption"] == source[3]["caption"]
