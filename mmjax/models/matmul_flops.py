"""Matmul FLOP terms the model's modules count themselves with (their `forward_flops`).

Convention as in MaxText/PaLM: 2*m*n*k per matmul, attention scores and values included;
`attn_keys` is the mean number of keys a query sees (halved for causal attention when the
caller discounts it). mmjax.models.flops adds the chosen modules' counts up.
"""

from __future__ import annotations


def block(tokens: int, width: int, mlp: int, attn_keys: float) -> float:
    """Self-attention block: qkv + out projections, scores + values, MLP."""
    proj = 4 * tokens * width * width
    attention = 2 * tokens * attn_keys * width
    return 2 * (proj + attention + 2 * tokens * width * mlp)


def cross(
    queries: int, keys: int, width: int, kv_width: int, shared_queries: bool = False
) -> float:
    """Cross-attention; learned (shared) queries are projected once per batch, not per example."""
    q_proj = 0 if shared_queries else queries * width * width
    proj = q_proj + queries * width * width + 2 * keys * kv_width * width
    return 2 * (proj + 2 * queries * keys * width)


def dense(tokens: int, d_in: int, d_out: int) -> float:
    return 2 * tokens * d_in * d_out
