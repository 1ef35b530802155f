"""mmjax.evals.metrics.classification on a hand-computed example: ties, top-k, an unpredicted class."""

import struct

import numpy as np
import pytest

from mmjax.evals.metrics.classification import classification_metrics, plot_confusion_matrix

LABELS = np.array([0, 0, 0, 1, 1, 2, 2, 3])
# Five classes; class 3 is never predicted and class 4 occurs nowhere.
SCORES = np.array(
    [
        [0.9, 0.05, 0.05, 0.0, 0.0],  # 0 -> 0
        [0.6, 0.3, 0.1, 0.0, 0.0],  # 0 -> 0
        [0.3, 0.5, 0.2, 0.0, 0.0],  # 0 -> 1, label second
        [0.1, 0.7, 0.2, 0.0, 0.0],  # 1 -> 1
        [0.2, 0.1, 0.6, 0.1, 0.0],  # 1 -> 2, label third (tied with class 3, which ranks after)
        [0.0, 0.0, 1.0, 0.0, 0.0],  # 2 -> 2
        [0.4, 0.1, 0.4, 0.05, 0.05],  # 2 -> 0 on a tie (lowest index), label second
        [0.1, 0.2, 0.3, 0.25, 0.15],  # 3 -> 2, label second
    ]
)
CONFUSION = np.array(
    [
        [2, 1, 0, 0, 0],
        [0, 1, 1, 0, 0],
        [1, 0, 1, 0, 0],
        [0, 0, 1, 0, 0],
        [0, 0, 0, 0, 0],
    ]
)
# Per class 0..3 (class 4 is in neither labels nor predictions, so not averaged):
PRECISION = [2 / 3, 1 / 2, 1 / 3, 0.0]  # Class 3 never predicted: 0.
RECALL = [2 / 3, 1 / 2, 1 / 2, 0.0]
F1 = [2 / 3, 1 / 2, 2 * (1 / 3) * (1 / 2) / (1 / 3 + 1 / 2), 0.0]


def test_hand_computed_example():
    m = classification_metrics(LABELS, SCORES, top_k=(1, 2, 5, 6))
    np.testing.assert_array_equal(m["confusion_matrix"], CONFUSION)
    assert m["accuracy"] == pytest.approx(4 / 8)
    assert m["top1_accuracy"] == pytest.approx(4 / 8)
    assert m["top2_accuracy"] == pytest.approx(7 / 8)  # Only row 4's label is third.
    assert m["top5_accuracy"] == pytest.approx(1.0)
    assert "top6_accuracy" not in m  # k > C is skipped.
    assert m["macro_precision"] == pytest.approx(np.mean(PRECISION))
    assert m["macro_recall"] == pytest.approx(np.mean(RECALL))
    assert m["macro_f1"] == pytest.approx(np.mean(F1))
    assert m["macro_f1"] != pytest.approx(
        2 * m["macro_precision"] * m["macro_recall"] / (m["macro_precision"] + m["macro_recall"])
    )


def test_predictions_instead_of_scores_give_the_same_counts():
    predictions = SCORES.argmax(axis=1)
    m = classification_metrics(LABELS, predictions, num_classes=5)
    np.testing.assert_array_equal(m["confusion_matrix"], CONFUSION)
    assert m["macro_f1"] == pytest.approx(np.mean(F1))
    assert not any(key.startswith("top") for key in m)  # No scores, no top-k.
    # Without num_classes, C is inferred from the largest id (3 here): same macro values.
    inferred = classification_metrics(LABELS, predictions)
    assert inferred["confusion_matrix"].shape == (4, 4)
    assert inferred["macro_precision"] == pytest.approx(np.mean(PRECISION))


def test_ties_go_to_the_lowest_index():
    scores = np.full((3, 4), 0.25)
    m = classification_metrics(np.array([0, 1, 3]), scores, top_k=(1, 2, 3, 4))
    np.testing.assert_array_equal(m["confusion_matrix"][:, 0], [1, 1, 0, 1])
    assert m["accuracy"] == pytest.approx(1 / 3)  # Only label 0 is "predicted".
    assert m["top2_accuracy"] == pytest.approx(2 / 3)  # Labels 0 and 1 rank first and second.
    assert m["top3_accuracy"] == pytest.approx(2 / 3)
    assert m["top4_accuracy"] == pytest.approx(1.0)
    assert "top5_accuracy" not in m


def test_perfect_predictions():
    labels = np.array([2, 0, 1, 1])
    m = classification_metrics(labels, np.eye(3)[labels])
    assert m["accuracy"] == m["macro_precision"] == m["macro_recall"] == m["macro_f1"] == 1.0
    assert "top5_accuracy" not in m and m["top1_accuracy"] == 1.0


@pytest.mark.parametrize(
    "labels, scores, kwargs, message",
    [
        ([0, 1], np.zeros((3, 2)), {}, "scores must be"),
        ([0, 2], np.zeros((2, 2)), {}, "labels hold class 2 but there are 2 classes"),
        ([0, 1], np.zeros((2, 2)), {"num_classes": 3}, "num_classes=3 but scores have 2"),
        ([0.0, 1.0], [0, 1], {}, "labels must be integer class ids"),
        ([], [], {}, "non-empty"),
        ([0, -1], [0, 1], {}, "negative class id"),
        ([0, 1], [[np.nan, 0], [0, 1]], {}, "NaN"),
        ([0, 1], [0, 4], {"num_classes": 3}, "predictions hold class 4"),
    ],
)
def test_errors(labels, scores, kwargs, message):
    with pytest.raises(ValueError, match=message):
        classification_metrics(np.asarray(labels), np.asarray(scores), **kwargs)


def _png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG file"
    return struct.unpack(">II", data[16:24])


def test_plot_confusion_matrix(tmp_path):
    out = plot_confusion_matrix(CONFUSION, ["a", "b", "c", "d", "e"], tmp_path / "cm.png")
    assert out == tmp_path / "cm.png"
    width, height = _png_size(out)
    assert width > 300 and height > 300
    big = np.arange(40 * 40).reshape(40, 40)  # Too many classes to annotate: still a plot.
    width_big, _ = _png_size(plot_confusion_matrix(big, list(range(40)), tmp_path / "big.png"))
    assert width_big > width
    with pytest.raises(ValueError, match="2 class names for 5 classes"):
        plot_confusion_matrix(CONFUSION, ["a", "b"], tmp_path / "bad.png")
