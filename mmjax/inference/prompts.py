"""Zero-shot classification inputs: class names, prompt templates, and class embeddings.

Used by `python -m mmjax.tools.classify` and the zero-shot evaluator. A class file has one name a
line; a template file has one prompt a line with `{}` where the class name goes, e.g.

  a small red {} in the center

Blank lines and lines starting with `#` are skipped in both. The built-in shapes corpus has
`configs/zeroshot/shapes_shapes.txt` and `configs/zeroshot/shapes_shape_templates.txt`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import numpy as np

DEFAULT_TEMPLATES = ("{}",)


def _lines(path: str | os.PathLike) -> list[tuple[int, str]]:
    """(1-based line number, stripped text) of the lines that are not blank or comments."""
    with open(path, encoding="utf-8") as f:
        numbered = [(i, line.strip()) for i, line in enumerate(f, start=1)]
    return [(i, text) for i, text in numbered if text and not text.startswith("#")]


def read_classes(path: str | os.PathLike, allow_repeats: bool = False) -> list[str]:
    """Class names, one per line; a repeated name raises ValueError naming both lines, unless
    `allow_repeats` (classes read by position: ImageNet's list names two classes 'missile')."""
    names: list[str] = []
    first_line: dict[str, int] = {}
    for number, name in _lines(path):
        if name in first_line and not allow_repeats:
            raise ValueError(f"{path}:{number}: class {name!r} repeats line {first_line[name]}")
        first_line[name] = number
        names.append(name)
    if not names:
        raise ValueError(f"{path}: no class names (one per line; '#' starts a comment)")
    return names


def read_templates(path: str | os.PathLike | None) -> list[str]:
    """Prompt templates, one per line, each with exactly one `{}`; None -> ["{}"]."""
    if path is None:
        return list(DEFAULT_TEMPLATES)
    templates = []
    for number, template in _lines(path):
        count = template.count("{}")
        if count != 1:
            raise ValueError(
                f"{path}:{number}: template {template!r} has {count} '{{}}' (needs exactly one)"
            )
        # Any other brace would make str.format fail or swallow text later.
        if template.replace("{}", "").count("{") or template.replace("{}", "").count("}"):
            raise ValueError(f"{path}:{number}: template {template!r} has a stray brace")
        templates.append(template)
    if not templates:
        raise ValueError(f"{path}: no templates (one per line, each with one '{{}}')")
    return templates


def _l2_normalise(x: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(norm, 1e-12)


def class_embeddings(
    embed_texts: Callable[[list[str]], np.ndarray],
    class_names: Sequence[str],
    templates: Sequence[str] = DEFAULT_TEMPLATES,
) -> np.ndarray:
    """float32 [C, E]: each class's prompts embedded, normalised, averaged, normalised again.

    All C x T prompts go to `embed_texts` in one call (it batches them itself).
    """
    if not class_names:
        raise ValueError("class_embeddings: no class names")
    if not templates:
        raise ValueError("class_embeddings: no templates")
    prompts = [template.replace("{}", name) for name in class_names for template in templates]
    embeddings = np.asarray(embed_texts(prompts), dtype=np.float32)
    if embeddings.ndim != 2 or embeddings.shape[0] != len(prompts):
        raise ValueError(
            f"class_embeddings: embed_texts returned shape {embeddings.shape} for "
            f"{len(prompts)} prompts; expected [{len(prompts)}, E]"
        )
    per_class = _l2_normalise(embeddings).reshape(len(class_names), len(templates), -1)
    return _l2_normalise(per_class.mean(axis=1)).astype(np.float32)
