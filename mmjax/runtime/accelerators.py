"""Accelerator presets: the numerics, attention kernel and remat a family of chips wants.

A config file takes `accelerator=NAME` (`configs/coca.py:size=base,accelerator=tpu`) and
lays `model_settings(NAME, size)` over `model.*`; `--config.model.KEY=...` still overrides
any of them. On accelerators the step computes in bfloat16 while the master weights and
Adam's moments stay float32 (model.param_dtype; optax keeps its state in the parameters'
dtype), the attention kernel is the platform's fused one where the shapes suit it
(`auto`: splash on TPU, cuDNN on GPU, see mmjax/models/attention.py), and the remat policy
is the lightest one `mmjax dryrun --fit` found to fit for that size (BUILD_NOTES, "TPU
topologies"). Remat depends on the chip's HBM and the per-chip batch: run
`mmjax dryrun --topology NAME --fit` for your own topology and take its overrides.
"""

from __future__ import annotations

from typing import Any

from mmjax.runtime.config import ConfigError

# name -> model.* settings for every size.
ACCELERATORS: dict[str, dict[str, Any]] = {
    # The CPU's numerics: bf16 is no faster than f32 on the CPUs measured here.
    "cpu": dict(dtype="float32", param_dtype="float32", attention="auto"),
    "gpu": dict(dtype="bfloat16", param_dtype="float32", attention="auto"),
    "tpu": dict(dtype="bfloat16", param_dtype="float32", attention="auto"),
}

# (accelerator, size) -> model.remat. TPU: `mmjax dryrun --fit` on v5e:4x4 for base at 64-128
# images per chip (none needs 19.9 GB of 16 GiB; minimal fits at 2048 in all) and on
# v5p:4x4x4 for large (dots-saveable at 16 per chip). GPU: the v5p figures (95 GiB, close to
# an H100's 80 GB); not measured on a GPU. Sizes not named need no remat.
REMAT: dict[tuple[str, str], str] = {
    ("tpu", "base"): "minimal",
    ("tpu", "large"): "dots-saveable",
    ("gpu", "large"): "dots-saveable",
}


def model_settings(accelerator: str, size: str) -> dict[str, Any]:
    """model.* values of the preset; ConfigError in one line for an unknown name."""
    if accelerator not in ACCELERATORS:
        raise ConfigError(
            f"config argument accelerator={accelerator!r} is unknown; allowed: "
            f"{sorted(ACCELERATORS)}"
        )
    return dict(ACCELERATORS[accelerator], remat=REMAT.get((accelerator, size), "none"))
