"""Built-in procedural image-caption corpus: one coloured shape per image.

Every example is a pure function of (seed, split, index), so the corpus needs
no files, reads identically in any order or process, and the train and eval
splits never share an image. Attributes (size, colour, shape, position) fully
determine the caption; rendering jitter (placement, scale, shade, background,
noise) makes every image distinct.
"""

from __future__ import annotations

import operator
from typing import Any

import numpy as np

SIZES = ("small", "large")
# Chosen so that every colour has a channel >= 200 (contrast with the dark
# background) and any two differ by >= 95 in some channel, which the +-15
# shade jitter below cannot bridge.
COLOURS = {
    "red": (220, 30, 30),
    "green": (40, 200, 60),
    "blue": (50, 90, 240),
    "yellow": (240, 230, 40),
    "purple": (160, 60, 210),
    "orange": (255, 125, 20),
    "white": (240, 240, 240),
    "cyan": (50, 220, 230),
}
SHAPES = ("circle", "square", "triangle", "cross")
# Row-major over the 3x3 grid: POSITIONS[3 * row + col].
POSITIONS = (
    "top left", "top", "top right",
    "left", "center", "right",
    "bottom left", "bottom", "bottom right",
)  # fmt: skip

SPLIT_IDS = {"train": 0, "eval": 1}
DEFAULT_NUM_EXAMPLES = {"train": 20_000, "eval": 512}
MIN_IMAGE_SIZE = 16

# Half-extent of a shape as a fraction of its grid cell. The classes are
# disjoint with a wide gap (areas differ by >= 2.3x for the same shape).
_HALF_EXTENT_RANGE = {"small": (0.20, 0.25), "large": (0.38, 0.46)}
# Shapes stay this far (in cells) inside their cell: a caption's position is
# never contradicted by the drawing; at most a faint anti-aliased fringe
# crosses the cell border.
_CELL_MARGIN = 0.02
_SHADE_JITTER = 15.0  # per channel, in uint8 units
_BACKGROUND_MAX = 60.0  # background channels are uniform in [0, this)
# Per-pixel, per-channel noise, uniform in +-this (std ~5) in uint8 units;
# uniform rather than Gaussian because it draws 4x faster.
_NOISE_AMPLITUDE = 9.0


def caption_for(attributes: dict[str, str]) -> str:
    """The caption for a set of attributes, e.g. 'a small red circle at the top'."""
    return (
        f"a {attributes['size']} {attributes['colour']} {attributes['shape']} "
        f"{_position_phrase(attributes['position'])}"
    )


def all_captions() -> list[str]:
    """Every caption the corpus can produce (one per attribute combination)."""
    return [
        caption_for({"size": size, "colour": colour, "shape": shape, "position": position})
        for size in SIZES
        for colour in COLOURS
        for shape in SHAPES
        for position in POSITIONS
    ]


def _position_phrase(position: str) -> str:
    # English picks the preposition by position: "in the center", "on the
    # left", but "at the top left".
    if position == "center":
        return "in the center"
    if position in ("left", "right"):
        return f"on the {position}"
    return f"at the {position}"


class ProceduralSource:
    """What the built-in corpora share: examples that are pure functions of (seed, split,
    index), grain's RandomAccessDataSource protocol (__len__, __getitem__) and
    `mmjax.data.records.Source` (name, caption).

    A corpus sets `name`, `min_image_size`, `default_num_examples` and `seed_tags` (its random
    streams apart from other corpora's at the same seed) and implements `_draw(rng)` ->
    attributes, `_caption(attributes)` and `_render(rng, attributes)`.
    """

    name: str
    min_image_size: int
    default_num_examples: dict[str, int]
    seed_tags: tuple[int, ...] = ()

    def __init__(self, split: str, num_examples: int | None, seed: int, image_size: int):
        kind = type(self).__name__
        if split not in SPLIT_IDS:
            raise ValueError(f"{kind} split must be one of {sorted(SPLIT_IDS)}, got {split!r}")
        if num_examples is None:
            num_examples = self.default_num_examples[split]
        if num_examples < 1:
            raise ValueError(f"{kind} num_examples must be >= 1, got {num_examples}")
        if image_size < self.min_image_size:
            raise ValueError(
                f"{kind} image_size must be >= {self.min_image_size}, got {image_size}"
            )
        if seed < 0:
            raise ValueError(f"{kind} seed must be >= 0, got {seed}")
        self.split = split
        self.num_examples = int(num_examples)
        self.seed = int(seed)
        self.image_size = int(image_size)

    def _settings(self) -> dict[str, Any]:
        return dict(
            split=self.split,
            num_examples=self.num_examples,
            seed=self.seed,
            image_size=self.image_size,
        )

    def __len__(self) -> int:
        return self.num_examples

    def __repr__(self) -> str:
        settings = ", ".join(f"{k}={v!r}" for k, v in self._settings().items())
        return f"{type(self).__name__}({settings})"

    def __getitem__(self, index: int) -> dict[str, Any]:
        rng = self._rng(index)
        attributes = self._draw(rng)
        return {
            "key": f"{self.name}/{self.split}/{index}",
            "image": self._render(rng, attributes),
            "caption": self._caption(attributes),
        }

    def caption(self, index: int) -> str:
        """The caption of example `index`, without rendering it."""
        return self._caption(self.attributes(index))

    def attributes(self, index: int) -> dict[str, str]:
        """The attributes of example `index` (no rendering)."""
        return self._draw(self._rng(index))

    def _rng(self, index: int) -> np.random.Generator:
        kind = type(self).__name__
        try:
            index = operator.index(index)
        except TypeError:
            raise TypeError(
                f"{kind} index must be an integer, got {type(index).__name__}"
            ) from None
        if not 0 <= index < self.num_examples:
            raise IndexError(
                f"{kind} index {index} out of range for the {self.split!r} split "
                f"of {self.num_examples} examples"
            )
        return np.random.default_rng(
            np.random.SeedSequence([self.seed, *self.seed_tags, SPLIT_IDS[self.split], index])
        )


class ShapesSource(ProceduralSource):
    """Random-access source of {"key": str, "image": uint8 [S, S, 3], "caption": str};
    `attributes(i)` gives the size, colour, shape and position."""

    name = "shapes"  # the spec that builds it (see mmjax.data.sources)
    min_image_size = MIN_IMAGE_SIZE
    default_num_examples = DEFAULT_NUM_EXAMPLES

    def __init__(
        self,
        split: str = "train",
        num_examples: int | None = None,
        seed: int = 0,
        image_size: int = 32,
    ):
        super().__init__(split, num_examples, seed, image_size)
        # Pixel-centre coordinates, shaped to broadcast to [S, S].
        coords = np.arange(self.image_size, dtype=np.float32) + 0.5
        self._xs = coords[None, :]
        self._ys = coords[:, None]

    def _draw(self, rng: np.random.Generator) -> dict[str, str]:
        return _draw_attributes(rng)

    def _caption(self, attributes: dict[str, str]) -> str:
        return caption_for(attributes)

    def _render(self, rng: np.random.Generator, attributes: dict[str, str]) -> np.ndarray:
        cell = self.image_size / 3
        half_extent = rng.uniform(*_HALF_EXTENT_RANGE[attributes["size"]])
        # Jitter the centre as far as the cell allows for this half-extent.
        max_offset = 0.5 - _CELL_MARGIN - half_extent
        offset_x, offset_y = rng.uniform(-max_offset, max_offset, size=2)
        row, col = divmod(POSITIONS.index(attributes["position"]), 3)
        centre_x = (col + 0.5 + offset_x) * cell
        centre_y = (row + 0.5 + offset_y) * cell

        signed_distance = _SIGNED_DISTANCE[attributes["shape"]](
            self._xs - np.float32(centre_x), self._ys - np.float32(centre_y), half_extent * cell
        )
        # A box filter one pixel wide: partial coverage at the edge anti-aliases
        # small shapes so they keep their outline at 32 px.
        coverage = np.clip(0.5 - signed_distance, 0.0, 1.0)[..., None]

        base_colour = np.asarray(COLOURS[attributes["colour"]], np.float32)
        colour = base_colour + rng.uniform(-_SHADE_JITTER, _SHADE_JITTER, size=3).astype(np.float32)
        background = rng.uniform(0.0, _BACKGROUND_MAX, size=3).astype(np.float32)
        noise = rng.random((self.image_size, self.image_size, 3), dtype=np.float32)

        image = (
            background + coverage * (colour - background) + (2 * _NOISE_AMPLITUDE) * (noise - 0.5)
        )
        return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def _draw_attributes(rng: np.random.Generator) -> dict[str, str]:
    # Drawn first from the example's generator, so attributes() needs no rendering.
    size, colour, shape, position = rng.integers(
        0, (len(SIZES), len(COLOURS), len(SHAPES), len(POSITIONS))
    )
    return {
        "size": SIZES[size],
        "colour": tuple(COLOURS)[colour],
        "shape": SHAPES[shape],
        "position": POSITIONS[position],
    }


# Signed distances in pixels (negative inside) from offsets dx [1, S] and
# dy [S, 1] to the shape's centre; h is the half-extent. Each shape spans at
# most [-h, h] on both axes.


def _circle(dx: np.ndarray, dy: np.ndarray, h: float) -> np.ndarray:
    return np.hypot(dx, dy) - h


def _square(dx: np.ndarray, dy: np.ndarray, h: float) -> np.ndarray:
    # Slightly smaller than the circle's bounding box so both have similar area.
    return np.maximum(np.abs(dx), np.abs(dy)) - 0.8 * h


def _triangle(dx: np.ndarray, dy: np.ndarray, h: float) -> np.ndarray:
    # Upward-pointing: apex (0, -h), base from (-h, 0.75h) to (h, 0.75h).
    # Inside = under both slanted edges and above the base (y grows downward).
    slope = 1.75
    slanted = (slope * np.abs(dx) - dy - h) / np.hypot(slope, 1.0)
    return np.maximum(slanted, dy - 0.75 * h)


def _cross(dx: np.ndarray, dy: np.ndarray, h: float) -> np.ndarray:
    # A plus sign: the union (min) of a horizontal and a vertical bar.
    arm = 0.3 * h
    horizontal = np.maximum(np.abs(dx) - h, np.abs(dy) - arm)
    vertical = np.maximum(np.abs(dx) - arm, np.abs(dy) - h)
    return np.minimum(horizontal, vertical)


_SIGNED_DISTANCE = {"circle": _circle, "square": _square, "triangle": _triangle, "cross": _cross}
