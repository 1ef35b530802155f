"""Importing torch and open_clip (the `openclip` extra), with one-line errors when absent.

PyPI's torchvision wheel is a CUDA build; beside the CPU torch the extra pins, its import
fails while registering fake kernels for two operators whose schemas it expects torch to
define ('operator torchvision::nms does not exist'). open_clip imports torchvision only for
its transforms, never these operators, so their schemas are declared here and the import
retried.
"""

from __future__ import annotations

import sys
from types import ModuleType

_REGISTRATIONS: list = []  # Keeps the torchvision library definitions alive.


class MissingExtra(ImportError):
    """An optional dependency is absent; the message names the extra that installs it."""


def import_torch() -> ModuleType:
    try:
        import torch
    except ImportError as e:
        raise MissingExtra(
            f"torch is not installed ({e}); install the openclip extra: "
            "pip install -e '.[openclip]'"
        ) from None
    return torch


def import_open_clip() -> tuple[ModuleType, ModuleType]:
    """(torch, open_clip)."""
    torch = import_torch()
    try:
        import torchvision  # noqa: F401
    except RuntimeError as e:
        if "torchvision::nms does not exist" not in str(e):
            raise
        sys.modules.pop("torchvision", None)
        lib = torch.library.Library("torchvision", "DEF")
        for op in ("nms", "qnms"):
            lib.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        _REGISTRATIONS.append(lib)
    except ImportError:
        pass  # open_clip reports what it lacks itself, below.
    try:
        import open_clip
    except ImportError as e:
        raise MissingExtra(
            f"open_clip cannot be imported ({e}); install the openclip extra: "
            "pip install -e '.[openclip]' open_clip_torch torchvision"
        ) from None
    return torch, open_clip
