"""Model FLOPs per train step (analytic) and the peak they are measured against.

XLA's cost analysis counts a scanned loop body once, so with scan over
layers it undercounts by the depth; we count matmuls analytically instead
(a test checks the count against the cost analysis of the unrolled model).
Convention as in MaxText/PaLM: 2*m*n*k per matmul, attention scores and
values included (halved when causal), x3 for forward + backward, no
rematerialisation.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from mmjax.models.config import ModelConfig


def _block(tokens: int, width: int, mlp: int, attn_keys: float) -> float:
    """Self-attention block: qkv + out projections, scores + values, MLP."""
    proj = 4 * tokens * width * width
    attention = 2 * tokens * attn_keys * width
    return 2 * (proj + attention + 2 * tokens * width * mlp)


def _cross(
    queries: int, keys: int, width: int, kv_width: int, shared_queries: bool = False
) -> float:
    """Cross-attention; learned (shared) queries are projected once per batch, not per example."""
    q_proj = 0 if shared_queries else queries * width * width
    proj = q_proj + queries * width * width + 2 * keys * kv_width * width
    return 2 * (proj + 2 * queries * keys * width)


def _vit_trunk(cfg: ModelConfig) -> tuple[float, int]:
    """Patch embedding + blocks -> (FLOPs, image tokens)."""
    tokens, wv = cfg.vit_positions, cfg.vit_width
    flops = 2 * cfg.num_patches * (cfg.patch_size**2 * 3) * wv
    return flops + cfg.vit_layers * _block(tokens, wv, cfg.vit_mlp_dim, tokens), tokens


def _resnet_trunk(cfg: ModelConfig) -> tuple[float, int]:
    """Convolutions of mmjax/models/resnet.py + the token projection -> (FLOPs, tokens)."""
    side = cfg.image_size
    width = cfg.resnet_width
    if cfg.resnet_stem_layout == "imagenet":
        side = -(-side // 2)
        flops = 2 * side * side * 7 * 7 * 3 * width
        side = -(-side // 2)  # Max-pool: no FLOPs counted.
    else:
        flops = 2 * side * side * 3 * 3 * 3 * width
    channels = width
    for stage, blocks in enumerate(cfg.resnet_blocks):
        inner = width * 2**stage
        for i in range(blocks):
            out_side = -(-side // 2) if stage > 0 and i == 0 else side
            flops += 2 * side * side * channels * inner  # 1x1 reduce.
            flops += 2 * out_side * out_side * 9 * inner * inner  # 3x3 (the stride).
            flops += 2 * out_side * out_side * inner * 4 * inner  # 1x1 expand.
            if channels != 4 * inner or out_side != side:  # Projection shortcut.
                flops += 2 * out_side * out_side * channels * 4 * inner
            side, channels = out_side, 4 * inner
    tokens = side * side
    return flops + 2 * tokens * channels * cfg.vit_width, tokens


def _caption_tokens(cfg: ModelConfig) -> int:
    """How many image tokens the caption decoder reads (CoCa.encode_image's second value)."""
    if cfg.fusion == "late":
        return 1
    if cfg.input_kind == "video":
        return cfg.video_frames * (1 + cfg.caption_queries)
    return cfg.caption_queries


def image_flops_per_example(cfg: ModelConfig, *, with_captioning: bool = True) -> float:
    """Forward FLOPs of the image side for one image or clip, the caption pooler included
    only when a decoder reads its tokens (unused, XLA drops it)."""
    trunk = _resnet_trunk if cfg.image_encoder == "resnet" else _vit_trunk
    flops, tokens = trunk(cfg)
    wv = cfg.vit_width
    flops += _cross(1, tokens, wv, wv, shared_queries=True)  # Contrastive pooler.
    if with_captioning and cfg.fusion != "late":
        flops += _cross(cfg.caption_queries, tokens, wv, wv, shared_queries=True)
    if cfg.input_kind != "video":
        return float(flops)
    frames = cfg.video_frames  # Every frame through the same tower, then over time.
    flops *= frames
    flops += cfg.video_layers * _block(frames, wv, cfg.vit_mlp_dim, frames)
    return float(flops + _cross(1, frames, wv, wv, shared_queries=True))


def forward_flops_per_example(
    cfg: ModelConfig, *, with_captioning: bool = True, causal_discount: bool = True
) -> float:
    """Forward matmul FLOPs for one image-caption pair."""
    wv, wt = cfg.vit_width, cfg.text_width
    half = 0.5 if causal_discount else 1.0
    flops = image_flops_per_example(cfg, with_captioning=with_captioning)
    t_enc = cfg.context_length  # L-1 tokens + CLS.
    flops += cfg.text_layers * _block(t_enc, wt, cfg.text_mlp_dim, t_enc * half)
    flops += 2 * (wv + wt) * cfg.embed_dim
    if with_captioning and cfg.fusion != "cross_attention":
        flops += _prefix_lm_decoder(cfg, half)
    elif with_captioning:
        t_dec = cfg.context_length - 1
        per_layer = _block(t_dec, wt, cfg.text_mlp_dim, t_dec * half)
        per_layer += _cross(t_dec, _caption_tokens(cfg), wt, wv)
        flops += cfg.decoder_layers * per_layer + 2 * t_dec * wt * cfg.vocab_size
    return float(flops)


def _prefix_lm_decoder(cfg: ModelConfig, half: float) -> float:
    """model.fusion early/late (mmjax/models/fusion.py): an image prefix (early: the image
    tower's caption tokens; late: the pooled vector) projected to the text width, then one
    self-attention stack over prefix + text; the LM head reads the text positions only."""
    t_dec, wv, wt = cfg.context_length - 1, cfg.vit_width, cfg.text_width
    prefix = _caption_tokens(cfg)
    flops = 2 * prefix * wv * wt
    length = prefix + t_dec
    # Query-key pairs: every query sees the prefix, text queries the text causally (the
    # discount halves the text-text part only, as for the causal towers).
    if half < 1.0:
        pairs = prefix * prefix + t_dec * prefix + t_dec * t_dec * half
    else:
        pairs = length * length
    flops += cfg.decoder_layers * _block(length, wt, cfg.text_mlp_dim, pairs / length)
    return flops + 2 * t_dec * wt * cfg.vocab_size


def train_flops_per_step(
    cfg: ModelConfig, batch_size: int, *, with_captioning: bool = True, causal_discount: bool = True
) -> float:
    per_example = forward_flops_per_example(
        cfg, with_captioning=with_captioning, causal_discount=causal_discount
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
