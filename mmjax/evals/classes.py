"""Shared by the zero-shot and linear-probe evaluators: label ids, metrics and the confusion
matrix files (JSON for tools, PNG for people) under WORKDIR/eval/NAME/."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np

import mmjax
from mmjax import storage
from mmjax.evals.metrics.classification import classification_metrics, plot_confusion_matrix
from mmjax.runtime.config import ConfigError


def resolve_file(path: str, where: str) -> Path:
    """A file named in the config: as given, else relative to the repository (for the files
    shipped under configs/)."""
    candidates = [Path(path), Path(mmjax.__file__).resolve().parents[1] / path]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise ConfigError(f"{where}: file {path!r} not found")


def label_ids(names: list, classes: list[str], by_position: bool = False) -> tuple[np.ndarray, int]:
    """Class ids of `names` (-1 where the name is not a class) and how many were unknown.
    `by_position`: the labels are already class numbers (class folders), checked in range."""
    if by_position:
        ids = np.array(names, np.int64).reshape(-1)
        ids[(ids < 0) | (ids >= len(classes))] = -1
    else:
        lookup = {name: i for i, name in enumerate(classes)}
        ids = np.array([lookup.get(name, -1) for name in names], np.int64)
    return ids, int(np.sum(ids < 0))


def scored(labels: np.ndarray, scores: np.ndarray, classes: list[str], out_dir, step: int):
    """Scalar metrics of `scores` [N, C] against `labels` [N]; writes the confusion matrix.

    Non-finite scores (diverged weights that train.on_nan='skip' kept going) give NaN
    metrics and no files: reported, not a crash."""
    if not np.all(np.isfinite(scores)):
        size = len(classes)
        probe = classification_metrics(np.arange(size), np.eye(size), num_classes=size)
        return {k: float("nan") for k in probe if k != "confusion_matrix"}
    result = classification_metrics(labels, scores, num_classes=len(classes))
    matrix = np.asarray(result.pop("confusion_matrix"))
    if out_dir is not None and jax.process_index() == 0:
        out_dir = storage.path(out_dir)
        storage.write_text(
            out_dir / f"confusion_{step}.json",
            json.dumps({"step": step, "classes": classes, "matrix": matrix.tolist()}),
        )
        plot_confusion_matrix(matrix, classes, out_dir / f"confusion_{step}.png")
    return {k: float(v) for k, v in result.items()}
