"""Model FLOPs per train step (analytic) and the peak they are measured against.

XLA's cost analysis counts a scanned loop body once, so with scan over layers it
undercounts by the depth; the chosen modules count their matmuls analytically instead
(`forward_flops`, with the terms of mmjax.models.matmul_flops; a test checks the sum against
the cost analysis of the unrolled model). Convention as in MaxText/PaLM: 2*m*n*k per matmul,
attention scores and values included (halved when causal), x3 for forward + backward, no
rematerialisation.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from mmjax.models import registry
from mmjax.models.config import ModelConfig


def image_flops_per_example(
    cfg: ModelConfig, *, with_captioning: bool = True, training: bool = False
) -> float:
    """Forward FLOPs of the image side for one image or clip, the caption pooler included
    only when a decoder reads its tokens (unused, XLA drops it); in `training`, on the
    tokens patch dropout keeps."""
    flops, _ = registry.image_tower_class(cfg).forward_flops(cfg, with_captioning, training)
    return float(flops)


def _caption_tokens(cfg: ModelConfig) -> int:
    """How many image tokens the caption decoder reads (CoCa.encode_image's second value)."""
    if not cfg.caption_tokens_from_tower:
        return 1  # The pooled vector.
    return registry.image_tower_class(cfg).forward_flops(cfg)[1]


def forward_flops_per_example(
    cfg: ModelConfig,
    *,
    with_captioning: bool = True,
    causal_discount: bool = True,
    training: bool = False,
) -> float:
    """Forward matmul FLOPs for one image-caption pair: the chosen towers' own counts plus
    the two projections into the joint space (`training`: under patch dropout)."""
    causal = 0.5 if causal_discount else 1.0
    flops = image_flops_per_example(cfg, with_captioning=with_captioning, training=training)
    flops += registry.TEXT_ENCODER_CLASSES[cfg.text.encoder].forward_flops(cfg, causal)
    flops += 2 * (cfg.vision.width * int(cfg.vision.proj) + cfg.text.width) * cfg.embed_dim
    if with_captioning:
        decoder = registry.DECODERS[cfg.decoder.fusion]
        flops += decoder.forward_flops(cfg, _caption_tokens(cfg), causal)
    return float(flops)


def train_flops_per_step(
    cfg: ModelConfig, batch_size: int, *, with_captioning: bool = True, causal_discount: bool = True
) -> float:
    per_example = forward_flops_per_example(
        cfg, with_captioning=with_captioning, causal_discount=causal_discount, training=True
    )
    contrastive_logits = 2 * batch_size * cfg.embed_dim  # Per example: one row of B x B.
    return 3.0 * batch_size * (per_example + contrastive_logits)


# Dense bf16 peaks per chip from vendor data sheets (FLOP/s).
_KNOWN_PEAKS = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
    "H100": 989e12,
    "H200": 989e12,
    "A100": 312e12,
    "L4": 121e12,
    "A10": 125e12,
}


def _cache_file() -> Path:
    root = Path(os.environ.get("MMJAX_CACHE", Path.home() / ".cache" / "mmjax"))
    return root / "peak_flops.json"


def measure_matmul_flops(
    dtype=jnp.float32, n: int = 2048, repeats: int = 5, device: jax.Device | None = None
) -> float:
    """Best-of-`repeats` rate of an n x n x n matmul on one device, after a warm-up call.

    Best, not median: a single call right after other work reads low (cold threads and
    caches), so only the warm rate is a peak.
    """
    device = device or jax.devices()[0]
    a = jax.device_put(jnp.ones((n, n), dtype), device)
    b = jax.device_put(jnp.ones((n, n), dtype), device)
    matmul = jax.jit(lambda x, y: x @ y)
    matmul(a, b).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a, b).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def peak_flops(dtype: str = "float32", *, fresh: bool = False) -> tuple[float, str]:
    """(peak FLOP/s of the whole job's devices, where the number came from).

    Accelerators with a known data-sheet peak use it (bf16 dense; f32 runs are
    then judged against bf16, as MFU usually is). Anything else, notably the
    CPU, is measured once by a matmul and cached (`fresh` re-measures: the
    benchmark compares against a peak taken in the same run). On the CPU all
    forced host devices share the same cores, so the machine's rate is the peak.
    """
    devices = jax.devices()
    kind = devices[0].device_kind
    for name, value in _KNOWN_PEAKS.items():
        if name.lower() in kind.lower():
            return value * len(devices), f"data sheet ({kind})"
    key = f"{jax.default_backend()}|{kind}|{dtype}|{os.cpu_count()}"
    cache = _cache_file()
    try:
        table = json.loads(cache.read_text())
    except (OSError, ValueError):
        table = {}
    if fresh or key not in table:
        table[key] = measure_matmul_flops(jnp.dtype(dtype))
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            cache.write_text(json.dumps(table, indent=1))
        except OSError:
            pass  # A read-only home only costs a re-measurement next time.
    rate = table[key]
    scale = 1 if jax.default_backend() == "cpu" else len(devices)
    return rate * scale, f"measured {dtype} matmul ({kind})"
