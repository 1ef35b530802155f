"""Inference from a trained workdir: image and text embeddings, captions, zero-shot labels.

  from mmjax.inference.predictor import Predictor
  p = Predictor.from_workdir("runs/coca_tiny")           # latest checkpoint, parameters only
  p.caption(["a.jpg", "b.png"])                          # ['a small red circle at the top', ...]
  p.embed_images(["a.jpg"]), p.embed_texts(["a red circle"])   # float32 [N, E], unit rows
  p.classify(["a.jpg"], ["circle", "square"], templates=["a large red {} in the center"])

Works on any number of local devices: the mesh saved in config.json is used when it fits,
else the batch is split over all devices (data=-1) with the same sharding rules, so a model
trained on 8 devices runs on 1. Only the parameters are read from the checkpoint (no
optimizer state, no training data). Images are paths (decoded with the eval preprocessing:
the centre square, resized to the model's image size), PIL images or uint8 [H, W, 3] arrays.
An unreadable image raises `BadImage` naming it; `image_batches` / `embed_image_batches`
report bad images instead, for callers that skip and count them (`mmjax.tools.search index`).
A video model (model.input_kind='video') takes clips wherever images are taken: a folder of
frames, a stack file (.npy, GIF, TIFF) or a uint8 [N, H, W, 3] array each (mmjax.data.clips).

Each jitted function compiles once per batch shape: a call pads its batches to one shape
(`batch_size` rows, or a smaller power-of-two multiple of the data-parallel size when the
whole call has fewer images) and drops the padding rows. Each process uses its own
devices (`jax.local_devices()`) unless given `devices`.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import math
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from PIL import Image

from mmjax import storage
from mmjax.data.clips import load_clip, read_frame_folder
from mmjax.data.csv_source import read_file
from mmjax.data.preprocess import ImageOptions, load_image
from mmjax.data.records import BadSample
from mmjax.inference.functions import InferenceFunctions
from mmjax.inference.generate import GenerateOptions, generated_positions, unrolled
from mmjax.inference.prompts import class_embeddings
from mmjax.models.coca import CoCa
from mmjax.models.config import ModelConfig
from mmjax.models.video import input_frames
from mmjax.runtime import log, paths
from mmjax.runtime import sharding as shd
from mmjax.runtime.checkpoint import read_params
from mmjax.runtime.config import from_json_file
from mmjax.text.registry import load_tokenizer, tokenizer_path
from mmjax.text.tokenizer import TextTokenizer
from mmjax.training.state import dummy_batch

ImageInput = str | os.PathLike | np.ndarray | Image.Image
FALLBACK_MESH = dict(data=-1, fsdp=1, tensor=1)
_DECODE_THREADS = min(8, os.cpu_count() or 1)


class BadImage(ValueError):
    """An image that cannot be read or decoded; the message names it."""

    def __init__(self, name: str, reason: str):
        super().__init__(f"cannot read image {name}: {reason}")
        self.name, self.reason = name, reason


@dataclasses.dataclass
class ImageBatch:
    """Decoded images of one batch: `positions` index the caller's input sequence."""

    positions: list[int]
    images: np.ndarray  # uint8 [len(positions), S, S, 3]
    bad: list[tuple[int, BadImage]]  # (position, error) of this batch's unreadable images


def image_name(item: Any, position: int) -> str:
    """How messages name an input image: its path, or its position for in-memory images."""
    return str(item) if isinstance(item, str | os.PathLike) else f"#{position} (in memory)"


def read_clip(item: ImageInput, options: ImageOptions, position: int = 0) -> np.ndarray:
    """One input clip -> uint8 [T, S, S, 3] with the eval preprocessing; raises BadImage.

    A clip is a folder of frames, a stack file (.npy, GIF, TIFF, ...; see mmjax.data.clips)
    or a uint8 [N, H, W, 3] array."""
    name = image_name(item, position)
    try:
        if isinstance(item, str | os.PathLike):
            if os.path.isdir(item):
                item = read_frame_folder(str(item), options.frames, read_file)
            else:
                try:
                    item = storage.read_bytes(storage.path(item))
                except OSError as e:
                    raise BadImage(name, e.strerror or type(e).__name__) from None
        elif not isinstance(item, np.ndarray):
            raise BadImage(
                name, f"expected a folder, a stack file or a uint8 array, got {type(item).__name__}"
            )
        return load_clip(item, options)
    except BadSample as e:
        raise BadImage(name, str(e)) from None
    except ValueError as e:
        raise BadImage(name, str(e).removeprefix("load_clip: ")) from None


def read_image(item: ImageInput, options: ImageOptions, position: int = 0) -> np.ndarray:
    """One input image -> uint8 [S, S, 3] with the eval preprocessing; raises BadImage.

    With options.frames (a video model) one input is a clip: see read_clip."""
    if options.frames:
        return read_clip(item, options, position)
    name = image_name(item, position)
    if isinstance(item, str | os.PathLike):
        try:
            data = storage.read_bytes(storage.path(item))
        except OSError as e:
            raise BadImage(name, e.strerror or type(e).__name__) from None
        try:
            return load_image(data, options)
        except BadSample as e:
            raise BadImage(name, str(e)) from None
    if isinstance(item, Image.Image):
        item = np.asarray(item.convert("RGB"))
    if not isinstance(item, np.ndarray):
        raise BadImage(
            name, f"expected a path, PIL image or uint8 array, got {type(item).__name__}"
        )
    try:
        return load_image(item, options)
    except ValueError as e:
        raise BadImage(name, str(e).removeprefix("load_image: ")) from None


def image_batches(
    images: Sequence[ImageInput], options: ImageOptions, batch_size: int
) -> Iterator[ImageBatch]:
    """Decodes `images` in batches on a thread pool, one batch ahead of the consumer."""
    starts = range(0, len(images), batch_size)
    with concurrent.futures.ThreadPoolExecutor(_DECODE_THREADS) as pool:

        def submit(start):
            return [
                (i, pool.submit(read_image, images[i], options, i))
                for i in range(start, min(start + batch_size, len(images)))
            ]

        pending = submit(starts[0]) if starts else []
        for next_start in [*starts[1:], None]:
            current = pending
            pending = submit(next_start) if next_start is not None else []
            positions, decoded, bad = [], [], []
            for i, future in current:
                try:
                    decoded.append(future.result())
                    positions.append(i)
                except BadImage as e:
                    bad.append((i, e))
            array = np.stack(decoded) if decoded else np.zeros((0, *options.shape), np.uint8)
            yield ImageBatch(positions, array, bad)


def unreadable_files(paths: Sequence[str | os.PathLike]) -> str | None:
    """One line naming every path that is not a readable file or folder, else None.

    Cheap (no decoding): CLIs call it before loading a model. A folder passes (a video
    model's clip of frames; an image model reports it when it reads it).
    """
    problems = []
    for path in paths:
        if storage.is_remote(path):
            if not storage.is_file(str(path)):
                problems.append(f"{path} (no such object)")
        elif not (os.path.isfile(path) or os.path.isdir(path)):
            problems.append(f"{path} (no such file)")
        elif not os.access(path, os.R_OK):
            problems.append(f"{path} (permission denied)")
    if not problems:
        return None
    if len(problems) == 1:
        return f"cannot read image {problems[0].replace(' (', ': ', 1)[:-1]}"
    shown = ", ".join(problems[:10]) + (
        f", and {len(problems) - 10} more" if len(problems) > 10 else ""
    )
    return f"cannot read {len(problems)} of {len(paths)} images: {shown}"


def inference_mesh(config_mesh: dict, devices: Sequence[Any] | None = None, warn=None):
    """The saved mesh if it fits the devices, else all of them on the data axis."""
    try:
        return shd.make_mesh(dict(config_mesh), devices)
    except shd.MeshError as e:
        if warn is not None:
            warn(f"saved mesh does not fit ({e}); using {FALLBACK_MESH}")
        return shd.make_mesh(FALLBACK_MESH, devices)


def abstract_params(model: CoCa, mesh, rules) -> Any:
    """ShapeDtypeStructs (with their NamedShardings) of the model's parameters."""
    boxed = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), *dummy_batch(model))["params"])
    shardings = shd.logical_shardings(boxed, mesh, rules)
    return jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), nn.unbox(boxed), shardings
    )


def padded_rows(count: int, batch_size: int, multiple: int) -> int:
    """Rows a call's batches are padded to: `batch_size` (rounded up to `multiple`) for
    calls with at least that many items, else the smallest power-of-two multiple of
    `multiple` that holds `count`; so a handful of shapes ever compile."""
    full = math.ceil(batch_size / multiple) * multiple
    if count >= full:
        return full
    blocks = 1 << max(0, math.ceil(math.log2(max(1, math.ceil(count / multiple)))))
    return min(full, blocks * multiple)


class Predictor:
    """A model, its parameters and tokenizer on a mesh, with jitted inference functions."""

    def __init__(
        self,
        model: CoCa,
        params: Any,
        tokenizer: TextTokenizer | None,
        mesh,
        rules,
        *,
        image_options: ImageOptions | None = None,
        workdir: str | os.PathLike | None = None,
        step: int | None = None,
    ):
        # Inference runs the layers unrolled: the weights are unstacked once here, not sliced
        # out of the stack at every layer call (every generated token; see `unrolled`).
        model, params = unrolled(model, params)
        self.model, self.params, self.tokenizer = model, params, tokenizer
        self.mesh, self.rules = mesh, rules
        self.workdir = storage.path(workdir) if workdir is not None else None
        self.step = step
        self.image_options = image_options or ImageOptions(
            image_size=model.cfg.image_size, train=False, frames=input_frames(model.cfg)
        )
        self.data_parallel = shd.data_parallel_size(mesh, rules)
        # The inference stack the evaluators use too, with this predictor's parameters fixed.
        self.functions = InferenceFunctions(
            model, mesh, rules, param_shardings=jax.tree.map(lambda x: x.sharding, params)
        )
        self._image_rows = self.functions.image_rows
        self._text_rows = self.functions.text_rows
        self._replicated = self.functions.replicated

    @classmethod
    def from_workdir(
        cls,
        workdir: str | os.PathLike,
        step: int | None = None,
        *,
        devices: Sequence[Any] | None = None,
        warn: Callable[[str], None] | None = log.warning,
    ) -> Predictor:
        """Loads WORKDIR/config.json, the tokenizer and checkpoint `step` (default: newest
        readable). Raises FileNotFoundError / CheckpointError / ValueError in one line."""
        workdir = paths.run_dir(workdir)  # PathError (a ValueError) in one line
        config = from_json_file(workdir / "config.json")
        model_cfg = ModelConfig.from_mapping(config.model.to_dict())
        model = CoCa(model_cfg)
        # FileNotFoundError names the path.
        tokenizer = load_tokenizer(
            tokenizer_path(config.data, workdir), config.data.get("tokenizer_type", "sentencepiece")
        )
        # This process's devices: with several processes, each one runs its own inference.
        devices = jax.local_devices() if devices is None else devices
        mesh = inference_mesh(dict(config.mesh), devices, warn)
        rules = shd.rules_from_config(config.sharding_rules)
        step, params = read_params(
            workdir / "checkpoints", abstract_params(model, mesh, rules), step, warn
        )
        options = ImageOptions(
            image_size=model_cfg.image_size,
            train=False,
            max_pixels=config.data.get("max_image_pixels", 100_000_000),
            frames=input_frames(model_cfg),
        )
        return cls(
            model,
            params,
            tokenizer,
            mesh,
            rules,
            image_options=options,
            workdir=workdir,
            step=step,
        )

    @classmethod
    def from_init(
        cls,
        model_cfg: ModelConfig,
        *,
        seed: int = 0,
        tokenizer: TextTokenizer | None = None,
        devices: Sequence[Any] | None = None,
    ) -> Predictor:
        """A randomly initialised model over all devices (benchmarks, tests)."""
        model = CoCa(model_cfg)
        devices = jax.local_devices() if devices is None else devices
        mesh = shd.make_mesh(FALLBACK_MESH, devices)
        rules = shd.DEFAULT_RULES
        shardings = jax.tree.map(lambda a: a.sharding, abstract_params(model, mesh, rules))
        init = jax.jit(
            lambda key: nn.unbox(model.init(key, *dummy_batch(model))["params"]),
            out_shardings=shardings,
        )
        with shd.activate(mesh, rules):
            params = init(jax.random.PRNGKey(seed))
        return cls(model, params, tokenizer, mesh, rules)

    @property
    def embed_dim(self) -> int:
        return self.model.cfg.embed_dim

    @property
    def logit_scale(self) -> float:
        """The learnt contrastive temperature's inverse, capped as in training."""
        with shd.activate(self.mesh, self.rules):
            return float(self.functions.logit_scale(self.params))

    # --- batching -------------------------------------------------------------------------

    def _run(self, fn, rows: int, sharding, batch: np.ndarray, *extra) -> np.ndarray:
        """fn(params, batch padded to `rows`, *extra) on the mesh, padding rows dropped."""
        count = len(batch)
        if count < rows:
            padding = np.zeros((rows - count, *batch.shape[1:]), batch.dtype)
            batch = np.concatenate([batch, padding])
        with shd.activate(self.mesh, self.rules):
            out = fn(self.params, jax.device_put(batch, sharding), *extra)
        return np.asarray(out)[:count]

    def _check_batch_size(self, batch_size: int) -> None:
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size={batch_size!r} must be an integer >= 1")

    def image_batches(
        self, images: Sequence[ImageInput], batch_size: int = 64
    ) -> Iterator[ImageBatch]:
        """Decoded batches of `images` (bad ones reported in each batch, not raised)."""
        self._check_batch_size(batch_size)
        if isinstance(images, str | os.PathLike | Image.Image) or (
            isinstance(images, np.ndarray) and images.ndim != 1 + len(self.image_options.shape)
        ):
            if self.image_options.frames:
                raise TypeError(
                    "pass a list of clips (or a uint8 [N, T, H, W, 3] array), not a single clip"
                )
            raise TypeError(
                "pass a list of images (or a uint8 [N, H, W, 3] array), not a single image"
            )
        return image_batches(images, self.image_options, batch_size)

    def embed_image_batches(
        self, images: Sequence[ImageInput], batch_size: int = 64
    ) -> Iterator[tuple[ImageBatch, np.ndarray]]:
        """(decoded batch, its embeddings float32 [len(batch.positions), E]) per batch."""
        rows = padded_rows(len(images), batch_size, self.data_parallel)
        for batch in self.image_batches(images, batch_size):
            if batch.positions:
                emb = self._run(self.functions.embed_images, rows, self._image_rows, batch.images)
            else:
                emb = np.zeros((0, self.embed_dim), np.float32)
            yield batch, emb

    # --- public API -----------------------------------------------------------------------

    def load_images(self, images: Sequence[ImageInput]) -> np.ndarray:
        """uint8 [N, S, S, 3] model inputs of `images`; raises BadImage on the first bad one."""
        out = []
        for batch in self.image_batches(images, 256):
            if batch.bad:
                raise batch.bad[0][1]
            out.append(batch.images)
        shape = self.image_options.shape
        return np.concatenate(out) if out else np.zeros((0, *shape), np.uint8)

    def embed_images(
        self, images: Sequence[ImageInput], batch_size: int = 64, progress: bool = False
    ) -> np.ndarray:
        """float32 [N, E] L2-normalised image embeddings; raises BadImage."""
        from tqdm import tqdm

        out = []
        with tqdm(total=len(images), desc="embed", unit="img", disable=not progress) as bar:
            for batch, emb in self.embed_image_batches(images, batch_size):
                if batch.bad:
                    raise batch.bad[0][1]
                out.append(emb)
                bar.update(len(batch.positions))
        return np.concatenate(out) if out else np.zeros((0, self.embed_dim), np.float32)

    def _tokenizer(self) -> TextTokenizer:
        if self.tokenizer is None:
            raise ValueError("this Predictor has no tokenizer (built without a workdir)")
        return self.tokenizer

    def embed_texts(self, texts: Sequence[str], batch_size: int = 256) -> np.ndarray:
        """float32 [N, E] L2-normalised text embeddings."""
        self._check_batch_size(batch_size)
        if isinstance(texts, str):
            raise TypeError("embed_texts takes a list of texts, got a single str")
        tokens = self._tokenizer().encode_batch(list(texts), self.model.cfg.context_length)
        rows = padded_rows(len(tokens), batch_size, self.data_parallel)
        out = [
            self._run(self.functions.embed_texts, rows, self._text_rows, tokens[i : i + batch_size])
            for i in range(0, len(tokens), batch_size)
        ]
        return np.concatenate(out) if out else np.zeros((0, self.embed_dim), np.float32)

    def _generator(self, options):
        return self.functions.captioner(options, self._tokenizer())

    def caption_batches(
        self, images: Sequence[ImageInput], options=None, seed: int = 0, batch_size: int = 64
    ) -> Iterator[tuple[ImageBatch, list[str]]]:
        """(decoded batch, captions of its good images) per batch; see `caption`."""

        options = options if options is not None else GenerateOptions()
        fn = self._generator(options)
        rows = padded_rows(len(images), batch_size, self.data_parallel)
        key = jax.random.PRNGKey(seed)
        for number, batch in enumerate(self.image_batches(images, batch_size)):
            texts: list[str] = []
            if batch.positions:
                # Each batch samples with its own key: reproducible for a given seed.
                rng = jax.device_put(jax.random.fold_in(key, number), self._replicated)
                tokens = self._run(fn, rows, self._image_rows, batch.images, rng)
                span = generated_positions(options, self.model.cfg.context_length)
                texts = self._tokenizer().decode_batch(np.asarray(tokens)[:, :span])
            yield batch, texts

    def caption(
        self,
        images: Sequence[ImageInput],
        options=None,
        seed: int = 0,
        batch_size: int = 64,
    ) -> list[str]:
        """One caption per image (`mmjax.inference.generate.GenerateOptions`, default greedy);
        `seed` fixes sampling. Raises BadImage."""
        out: list[str] = []
        for batch, texts in self.caption_batches(images, options, seed, batch_size):
            if batch.bad:
                raise batch.bad[0][1]
            out.extend(texts)
        return out

    def class_embeddings(
        self, class_names: Sequence[str], templates: Sequence[str] | None = None
    ) -> np.ndarray:
        """float32 [C, E] prompt-ensembled class embeddings (mmjax.inference.prompts)."""
        return class_embeddings(self.embed_texts, list(class_names), list(templates or ["{}"]))

    def probabilities(self, image_emb: np.ndarray, class_emb: np.ndarray) -> np.ndarray:
        """float32 [N, C]: softmax over classes of logit_scale * cosine."""
        logits = self.logit_scale * (image_emb.astype(np.float32) @ class_emb.T)
        logits -= logits.max(axis=1, keepdims=True)
        exp = np.exp(logits)
        return exp / exp.sum(axis=1, keepdims=True)

    def classify(
        self,
        images: Sequence[ImageInput],
        class_names: Sequence[str],
        templates: Sequence[str] | None = None,
        top_k: int = 5,
        batch_size: int = 64,
    ) -> list[list[tuple[str, float]]]:
        """Zero-shot: per image, the top_k (class name, probability) pairs, best first."""
        if top_k < 1:
            raise ValueError(f"top_k={top_k} must be >= 1")
        probs = self.probabilities(
            self.embed_images(images, batch_size), self.class_embeddings(class_names, templates)
        )
        k = min(top_k, len(class_names))
        order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
        return [[(class_names[c], float(row[c])) for c in best] for row, best in zip(probs, order)]
