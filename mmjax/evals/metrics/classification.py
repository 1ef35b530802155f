"""Classification metrics (accuracy, top-k, macro precision / recall / F1, confusion matrix).

Conventions:
- Ties in the scores go to the lowest class index, for the predicted class (as `np.argmax`) and
  for top-k: class j ranks ahead of the label when its score is higher, or equal with j < label.
- Per-class precision is 0 for a class that is never predicted and recall is 0 for a class that
  never occurs in the labels (scikit-learn's zero_division=0); F1 is 0 where precision + recall
  is 0, and the macro F1 is the mean of the per-class F1 (not the F1 of the macro means).
- Macro averages run over the classes that occur in the labels or the predictions, which is
  scikit-learn's `precision_recall_fscore_support(average="macro", zero_division=0)` with its
  default `labels=None`. (Passing `labels=range(C)` there would also average in zeros for
  classes absent from both; a small eval set that misses some classes should not be penalised.)
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # Files only: no display needed.
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from mmjax import storage  # noqa: E402

_ANNOTATE_MAX_CLASSES = 30  # Beyond this the counts would not be readable.
_NAMED_MAX_CLASSES = 100  # Class names on the axes up to this many classes (ImageNet: none).


def classification_metrics(
    labels: np.ndarray,
    scores: np.ndarray,
    num_classes: int | None = None,
    top_k: Sequence[int] = (1, 5),
) -> dict:
    """Metrics of `labels` [N] (ints) against `scores` [N, C] or predicted classes [N].

    Returns `accuracy`, `top{k}_accuracy` for each k in `top_k` with k <= C (scores only),
    `macro_precision`, `macro_recall`, `macro_f1` (over the classes that occur as label or
    prediction), `mean_per_class_recall` (over the classes that occur as labels: balanced
    accuracy, CLIP_benchmark's figure) and `confusion_matrix` ([C, C] int64,
    rows = true class, columns = predicted class). C is `scores.shape[1]`, else `num_classes`,
    else 1 + the largest label or prediction.
    """
    labels = _class_ids("labels", labels)
    scores = np.asarray(scores)
    if scores.ndim not in (1, 2) or len(scores) != len(labels):
        raise ValueError(
            f"scores must be [N, C] scores or [N] predictions for N={len(labels)} labels, "
            f"got shape {scores.shape}"
        )
    if scores.ndim == 2:
        if scores.dtype.kind not in "iuf":
            raise ValueError(f"scores must be numbers, got dtype {scores.dtype}")
        if np.isnan(scores).any():
            raise ValueError("scores contain NaN")
        if num_classes is not None and num_classes != scores.shape[1]:
            raise ValueError(f"num_classes={num_classes} but scores have {scores.shape[1]} columns")
        num_classes = scores.shape[1]
        predictions = np.argmax(scores, axis=1)  # The first maximum: lowest index on a tie.
    else:
        predictions = _class_ids("predictions", scores)
        if num_classes is None:
            num_classes = int(max(labels.max(), predictions.max())) + 1
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    for name, ids in (("labels", labels), ("predictions", predictions)):
        if ids.max() >= num_classes:
            raise ValueError(f"{name} hold class {ids.max()} but there are {num_classes} classes")

    confusion = np.bincount(
        labels * num_classes + predictions, minlength=num_classes * num_classes
    ).reshape(num_classes, num_classes)
    metrics: dict = {"accuracy": float(np.mean(labels == predictions))}
    if scores.ndim == 2:
        label_score = scores[np.arange(len(labels)), labels][:, None]
        ahead = (scores > label_score) | (
            (scores == label_score) & (np.arange(num_classes) < labels[:, None])
        )
        rank = ahead.sum(axis=1)  # 0 for the predicted class.
        for k in top_k:
            if 1 <= k <= num_classes:
                metrics[f"top{k}_accuracy"] = float(np.mean(rank < k))

    true_positives = np.diag(confusion).astype(np.float64)
    predicted = confusion.sum(axis=0)
    actual = confusion.sum(axis=1)
    precision = np.divide(true_positives, predicted, out=np.zeros(num_classes), where=predicted > 0)
    recall = np.divide(true_positives, actual, out=np.zeros(num_classes), where=actual > 0)
    both = precision + recall
    f1 = np.divide(2 * precision * recall, both, out=np.zeros(num_classes), where=both > 0)
    present = (predicted > 0) | (actual > 0)
    metrics["macro_precision"] = float(precision[present].mean())
    metrics["macro_recall"] = float(recall[present].mean())
    metrics["macro_f1"] = float(f1[present].mean())
    metrics["mean_per_class_recall"] = float(recall[actual > 0].mean())
    metrics["confusion_matrix"] = confusion
    return metrics


def _class_ids(name: str, values) -> np.ndarray:
    ids = np.asarray(values)
    if ids.ndim != 1 or len(ids) == 0:
        raise ValueError(f"{name} must be a non-empty 1-D array, got shape {ids.shape}")
    if ids.dtype.kind not in "iu":
        raise ValueError(f"{name} must be integer class ids, got dtype {ids.dtype}")
    if ids.min() < 0:
        raise ValueError(f"{name} hold a negative class id {ids.min()}")
    return ids.astype(np.int64)


def plot_confusion_matrix(matrix: np.ndarray, class_names: Sequence[str], path: str | Path) -> Path:
    """Writes `matrix` (rows = true class) as a PNG heat map to `path`, with the counts written
    in the cells when there are at most 30 classes; returns the path."""
    matrix = np.asarray(matrix)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"confusion matrix must be square, got shape {matrix.shape}")
    num_classes = matrix.shape[0]
    if len(class_names) != num_classes:
        raise ValueError(f"{len(class_names)} class names for {num_classes} classes")
    path = storage.path(path)
    size = min(4 + 0.35 * num_classes, 40)
    fig, ax = plt.subplots(figsize=(size, size), constrained_layout=True)
    image = ax.imshow(matrix, cmap="Blues", interpolation="nearest")
    fig.colorbar(image, ax=ax, shrink=0.8)
    ticks = np.arange(num_classes)
    font = 8 if num_classes <= _ANNOTATE_MAX_CLASSES else 5
    if num_classes <= _NAMED_MAX_CLASSES:  # Beyond, names overlap: class numbers on the axes.
        ax.set_xticks(ticks, [str(n) for n in class_names], rotation=90, fontsize=font)
        ax.set_yticks(ticks, [str(n) for n in class_names], fontsize=font)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if num_classes <= _ANNOTATE_MAX_CLASSES:
        # Light text on dark cells so every count stays readable.
        threshold = matrix.max() / 2 if matrix.size else 0
        for i in range(num_classes):
            for j in range(num_classes):
                value = matrix[i, j]
                text = f"{value:g}" if matrix.dtype.kind == "f" else str(value)
                color = "white" if value > threshold else "black"
                ax.text(j, i, text, ha="center", va="center", fontsize=font, color=color)
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=100)
    plt.close(fig)
    storage.write_bytes(path, png.getvalue())
    return path
