"""Built-in procedural clip corpus: one coloured shape that moves, grows or shrinks.

The video counterpart of `mmjax.data.shapes`: every clip is a pure function of (seed, split,
index), T frames of S x S pixels, with a caption such as 'a red circle moving left' or 'a blue
square growing'. The motions come in opposite pairs whose clips are each other's time
reversals (a linear path or growth at constant speed, per-frame noise drawn independently), so
no single frame and no unordered set of frames tells the caption: only the order does.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mmjax.data.shapes import _SIGNED_DISTANCE, COLOURS, SHAPES, ProceduralSource

# Opposite pairs: a clip played backwards is a clip of the other motion of its pair.
MOTIONS = ("moving left", "moving right", "moving up", "moving down", "growing", "shrinking")
OPPOSITE = {
    "moving left": "moving right",
    "moving right": "moving left",
    "moving up": "moving down",
    "moving down": "moving up",
    "growing": "shrinking",
    "shrinking": "growing",
}
LABELS = ("colour", "shape", "motion")  # what attributes() returns (evaluator labels)
DEFAULT_NUM_EXAMPLES = {"train": 20_000, "eval": 512}
DEFAULT_FRAMES = 4
MIN_IMAGE_SIZE = 16
MIN_FRAMES = 2
# Sets this corpus's random streams apart from the still shapes corpus's at the same seed.
_CORPUS_TAG = 2

# Geometry as fractions of the frame side. A moving shape keeps one half-extent and travels
# over a third of the frame (about 2 px a frame even at 16 px, T = 4); a growing shape ends
# at least twice as large as it starts (area: 4x).
_MOVING_HALF_EXTENT = (0.16, 0.2)
_TRAVEL = (0.35, 0.5)
_SMALL_HALF_EXTENT = (0.08, 0.11)
_LARGE_HALF_EXTENT = (0.24, 0.30)
_MARGIN = 0.03  # shapes stay this far inside the frame
_SHADE_JITTER = 15.0
_BACKGROUND_MAX = 60.0
_NOISE_AMPLITUDE = 9.0
# The longest path of the largest moving shape fits inside the margins.
assert 2 * (_MOVING_HALF_EXTENT[1] + _MARGIN) + _TRAVEL[1] <= 1


def caption_for(attributes: dict[str, str]) -> str:
    """'a red circle moving left' from {'colour', 'shape', 'motion'}."""
    return f"a {attributes['colour']} {attributes['shape']} {attributes['motion']}"


def all_captions() -> list[str]:
    """Every caption the corpus can produce."""
    return [
        caption_for({"colour": colour, "shape": shape, "motion": motion})
        for colour in COLOURS
        for shape in SHAPES
        for motion in MOTIONS
    ]


class ShapesVideoSource(ProceduralSource):
    """Random-access source of {"key", "image": uint8 [T, S, S, 3], "caption": str};
    `attributes(i)` gives the colour, shape and motion without rendering."""

    name = "shapes_video"  # the spec that builds it (see mmjax.data.sources)
    min_image_size = MIN_IMAGE_SIZE
    default_num_examples = DEFAULT_NUM_EXAMPLES
    seed_tags = (_CORPUS_TAG,)

    def __init__(
        self,
        split: str = "train",
        num_examples: int | None = None,
        seed: int = 0,
        image_size: int = 32,
        frames: int = DEFAULT_FRAMES,
    ):
        super().__init__(split, num_examples, seed, image_size)
        if frames < MIN_FRAMES:
            raise ValueError(
                f"ShapesVideoSource frames must be >= {MIN_FRAMES} (motion needs two), got {frames}"
            )
        self.frames = int(frames)
        coords = np.arange(self.image_size, dtype=np.float32) + 0.5
        self._xs = coords[None, None, :]  # broadcasts to [T, S, S]
        self._ys = coords[None, :, None]

    def _settings(self) -> dict[str, Any]:
        return dict(super()._settings(), frames=self.frames)

    def _draw(self, rng: np.random.Generator) -> dict[str, str]:
        return _draw_attributes(rng)

    def _caption(self, attributes: dict[str, str]) -> str:
        return caption_for(attributes)

    def _path(self, rng: np.random.Generator, motion: str) -> tuple[np.ndarray, ...]:
        """Per-frame centre x, centre y and half-extent, [T] each, in pixels."""
        s = self.image_size
        progress = np.linspace(0.0, 1.0, self.frames)  # constant speed: reversible
        if motion in ("growing", "shrinking"):
            small = rng.uniform(*_SMALL_HALF_EXTENT)
            large = rng.uniform(*_LARGE_HALF_EXTENT)
            lo, hi = large + _MARGIN, 1 - large - _MARGIN
            cx, cy = rng.uniform(lo, hi, size=2)
            if motion == "shrinking":
                small, large = large, small
            half = small + (large - small) * progress
            return np.full_like(half, cx * s), np.full_like(half, cy * s), half * s
        half = rng.uniform(*_MOVING_HALF_EXTENT)
        travel = rng.uniform(*_TRAVEL)
        lo, hi = half + _MARGIN, 1 - half - _MARGIN
        start = rng.uniform(lo, hi - travel)  # along the motion; the path ends inside too
        across = rng.uniform(lo, hi)
        along = start + travel * progress
        if motion in ("moving left", "moving up"):  # image y grows downward
            along = along[::-1]
        fixed = np.full_like(along, across)
        cx, cy = (along, fixed) if motion in ("moving left", "moving right") else (fixed, along)
        return cx * s, cy * s, np.full_like(along, half * s)

    def _render(self, rng: np.random.Generator, attributes: dict[str, str]) -> np.ndarray:
        cx, cy, half = (
            v.astype(np.float32)[:, None, None] for v in self._path(rng, attributes["motion"])
        )
        distance = _SIGNED_DISTANCE[attributes["shape"]](self._xs - cx, self._ys - cy, half)
        coverage = np.clip(0.5 - distance, 0.0, 1.0)[..., None]  # [T, S, S, 1], anti-aliased
        base = np.asarray(COLOURS[attributes["colour"]], np.float32)
        colour = base + rng.uniform(-_SHADE_JITTER, _SHADE_JITTER, size=3).astype(np.float32)
        background = rng.uniform(0.0, _BACKGROUND_MAX, size=3).astype(np.float32)
        shape = (self.frames, self.image_size, self.image_size, 3)
        noise = rng.random(shape, dtype=np.float32)  # independent per frame
        clip = (
            background + coverage * (colour - background) + (2 * _NOISE_AMPLITUDE) * (noise - 0.5)
        )
        return np.clip(np.rint(clip), 0, 255).astype(np.uint8)


def _draw_attributes(rng: np.random.Generator) -> dict[str, str]:
    colour, shape, motion = rng.integers(0, (len(COLOURS), len(SHAPES), len(MOTIONS)))
    return {
        "colour": tuple(COLOURS)[colour],
        "shape": SHAPES[shape],
        "motion": MOTIONS[motion],
    }
