"""Evaluation results in CLIP_benchmark's JSON schema, so numbers compare with theirs.

One record per zero-shot or retrieval evaluation, as CLIP_benchmark writes one file per
(dataset, model, task): `{"dataset", "model", "pretrained", "task", "metrics", "language"}`,
with the metrics under CLIP_benchmark's names:

  zeroshot_classification  acc1, acc5, mean_per_class_recall (balanced accuracy)
  zeroshot_retrieval       image_retrieval_recall@K (a text finds its image in the top K:
                           mmjax's t2i_rK), text_retrieval_recall@K (an image finds its text:
                           i2t_rK), K = 1, 5, 10

Other evaluators (captioning, linear probe) have no CLIP_benchmark task and are left out.
"""

from __future__ import annotations

from typing import Any

RECALL_KS = (1, 5, 10)


def _zeroshot(metrics: dict[str, Any], prefix: str) -> dict[str, float]:
    names = {
        "acc1": "accuracy",
        "acc5": "top5_accuracy",
        "mean_per_class_recall": "mean_per_class_recall",
    }
    return {
        ours: metrics[prefix + theirs]
        for ours, theirs in names.items()
        if prefix + theirs in metrics
    }


def _retrieval(metrics: dict[str, Any], prefix: str) -> dict[str, float]:
    out = {}
    for k in RECALL_KS:
        if f"{prefix}t2i_r{k}" in metrics:
            out[f"image_retrieval_recall@{k}"] = metrics[f"{prefix}t2i_r{k}"]
            out[f"text_retrieval_recall@{k}"] = metrics[f"{prefix}i2t_r{k}"]
    return out


def records(
    metrics: dict[str, Any], evaluators: dict[str, tuple[str, str]], model: str, pretrained: str
) -> dict[str, dict[str, Any]]:
    """evaluator name -> CLIP_benchmark record, from a run's `eval/...` metrics.

    `evaluators`: name -> (type, data spec); the name 'default' is the default evaluation
    (retrieval on data.eval, keys eval/...), the others have keys eval/NAME/...
    """
    out = {}
    for name, (kind, data) in evaluators.items():
        prefix = "eval/" if name == "default" else f"eval/{name}/"
        if kind == "zeroshot":
            task, values = "zeroshot_classification", _zeroshot(metrics, prefix)
        elif kind in ("retrieval", "default"):
            task, values = "zeroshot_retrieval", _retrieval(metrics, prefix)
        else:
            continue
        if values:
            out[name] = {
                "dataset": data,
                "model": model,
                "pretrained": pretrained,
                "task": task,
                "metrics": values,
                "language": "en",
            }
    return out
