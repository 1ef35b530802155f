"""Linear-probe classification (type 'classification'): a softmax classifier fitted on the
frozen image embeddings of `train_data`, scored on `data`.

The classes are the labels seen in `train_data` (sorted); eval images with another label are
counted (`unknown_label`), not scored. The fit is full-batch Adam on the L2-normalised
embeddings with an L2 penalty, jitted, so it is deterministic and takes well under a second
for a few thousand examples.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mmjax.data.stats import DataStats
from mmjax.evals.base import NamedEvaluator
from mmjax.evals.classes import label_ids, scored
from mmjax.evals.context import limited
from mmjax.evals.labels import label_reader


def fit_linear_probe(
    features: np.ndarray, labels: np.ndarray, num_classes: int, *, steps, learning_rate, l2
):
    """(weights [D, C], bias [C]) minimising mean cross-entropy + l2/2 * |W|^2."""
    x = jnp.asarray(features, jnp.float32)
    y = jnp.asarray(labels, jnp.int32)
    params = (jnp.zeros((x.shape[1], num_classes)), jnp.zeros((num_classes,)))
    tx = optax.adam(learning_rate)

    def loss(p):
        logits = x @ p[0] + p[1]
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return ce + 0.5 * l2 * jnp.sum(p[0] ** 2)

    @jax.jit
    def fit(params):
        def step(_, carry):
            p, state = carry
            grads = jax.grad(loss)(p)
            updates, state = tx.update(grads, state, p)
            return optax.apply_updates(p, updates), state

        return jax.lax.fori_loop(0, steps, step, (params, tx.init(params)))[0]

    weights, bias = fit(params)
    return np.asarray(weights), np.asarray(bias)


class LinearProbeEval(NamedEvaluator):
    type_name = "classification"
    defaults = {
        "label": "shape",
        "train_data": "shapes",  # read from its train split
        "train_examples": 2000,  # 0: all
        "steps": 500,
        "learning_rate": 0.05,
        "l2": 1e-4,
    }

    def __init__(self, name, block, ctx):
        super().__init__(name, block, ctx)
        where = f"evals.{name}"
        s = self.settings
        train = ctx.source(s["train_data"], f"{where}.train_data", split="train")
        self.train = limited(train, s["train_examples"])
        self.train_label = label_reader(self.train, s["label"], f"{where}.label")
        self.source = limited(ctx.source(s["data"], f"{where}.data"), s["examples"])
        self.label = label_reader(self.source, s["label"], f"{where}.label")

    def evaluate(self, params, step):
        ctx, s = self.ctx, self.settings
        stats = DataStats([self.source.name])
        train = ctx.embed_source(params, self.train, self.batch_size)
        train_names = [self.train_label(int(i)) for i in train["index"]]
        classes = sorted(set(train_names))
        train_labels, _ = label_ids(train_names, classes)
        weights, bias = fit_linear_probe(
            train["image"],
            train_labels,
            len(classes),
            steps=s["steps"],
            learning_rate=s["learning_rate"],
            l2=s["l2"],
        )
        test = ctx.embed_source(params, self.source, self.batch_size, stats=stats)
        labels, unknown = label_ids([self.label(int(i)) for i in test["index"]], classes)
        known = labels >= 0
        scores = test["image"][known] @ weights + bias
        metrics = scored(labels[known], scores, classes, self.output_dir(), step)
        metrics.update(num_examples=int(known.sum()), unknown_label=unknown)
        metrics["train_examples"] = len(train_labels)
        metrics["skipped"] = ctx.skipped(stats)
        return metrics
