"""Zero-shot classification: class names and prompt templates from files, one text embedding
per class (prompt ensembling, mmjax.inference.prompts), each image assigned the nearest class.

Reports top-1 / top-5 accuracy, macro precision / recall / F1, and writes the confusion
matrix. Images whose label is not among the classes are counted (`unknown_label`), not scored.
"""

from __future__ import annotations

import numpy as np

from mmjax.data.stats import DataStats
from mmjax.evals.base import NamedEvaluator
from mmjax.evals.classes import label_ids, resolve_file, scored
from mmjax.evals.context import limited
from mmjax.evals.labels import label_reader
from mmjax.inference import prompts as prompts
from mmjax.runtime.config import ConfigError


class ZeroShotEval(NamedEvaluator):
    type_name = "zeroshot"
    # label: which label of `data` is the class (see mmjax.evals.labels; 'index' for class
    # folders reads `classes` by position); classes: file with one class name per line;
    # templates: file with one prompt per line containing {} ('' = {}). ImageNet:
    # configs/zeroshot/imagenet_classnames.txt and imagenet_openai_templates.txt.
    defaults = {"label": "shape", "classes": "", "templates": ""}

    def __init__(self, name, block, ctx):
        super().__init__(name, block, ctx)
        where = f"evals.{name}"
        if not self.settings["classes"]:
            raise ConfigError(f"{where}.classes: a file of class names is required")
        self.by_position = self.settings["label"] == "index"
        try:
            self.classes = prompts.read_classes(
                resolve_file(self.settings["classes"], where), allow_repeats=self.by_position
            )
            templates = self.settings["templates"]
            self.templates = prompts.read_templates(
                resolve_file(templates, where) if templates else None
            )
        except ValueError as e:
            raise ConfigError(f"{where}: {e}") from None
        source = ctx.source(self.settings["data"], f"{where}.data")
        self.source = limited(source, self.settings["examples"])
        self.label = label_reader(self.source, self.settings["label"], f"{where}.label")
        folders = getattr(source, "classes", None)
        if self.by_position and folders is not None and len(folders) != len(self.classes):
            raise ConfigError(
                f"{where}: {source.name} has {len(folders)} class folders but "
                f"{self.settings['classes']} lists {len(self.classes)} classes; label 'index' "
                "reads the list by the folders' sorted order"
            )

    def evaluate(self, params, step):
        ctx = self.ctx
        stats = DataStats([self.source.name])
        emb = ctx.embed_source(params, self.source, self.batch_size, stats=stats)
        names = [self.label(int(i)) for i in emb["index"]]
        labels, unknown = label_ids(names, self.classes, by_position=self.by_position)
        class_emb = prompts.class_embeddings(
            lambda texts: ctx.embed_strings(params, list(texts), self.batch_size),
            self.classes,
            self.templates,
        )
        known = labels >= 0
        if not np.any(known):
            raise ConfigError(
                f"evals.{self.name}: no image has a label among the {len(self.classes)} classes"
            )
        scores = emb["image"][known] @ class_emb.T
        metrics = scored(labels[known], scores, self.classes, self.output_dir(), step)
        metrics.update(num_examples=int(known.sum()), unknown_label=unknown)
        metrics["skipped"] = ctx.skipped(stats)
        return metrics
