"""Matmul FLOP terms the model's modules count themselves with (their `forward_flops`).

Convention as in MaxText/PaLM: 2*m*n*k per matmul, attention scores and values included;
`attn_keys` is the mean number of keys a query sees (halved for causal attention when the
caller discounts it). Cross-attention counts the cheaper of its two exact forms (see
`cross`). mmjax.models.flops adds the chosen modules' counts up.
"""

from __future__ import annotations


def block(tokens: int, width: int, mlp: int, attn_keys: float) -> float:
    """Self-attention block: qkv + out projections, scores + values, MLP."""
    proj = 4 * tokens * width * width
    attention = 2 * tokens * attn_keys * width
    return 2 * (proj + attention + 2 * tokens * width * mlp)


def cross(
    queries: int,
    keys: int,
    width: int,
    kv_width: int,
    *,
    heads: int,
    shared_queries: bool = False,
) -> float:
    """Cross-attention; learned (shared) queries are projected once per batch, not per
    example. The keys/values part is counted in the cheaper of its two exact forms, the one
    mmjax.models.layers.Attention runs with the XLA kernel (`cross_attention_form`)."""
    q_proj = 0 if shared_queries else queries * width * width
    proj = 2 * (q_proj + queries * width * width)
    head_dim = width // heads
    return proj + min(
        projected_cross(queries, keys, kv_width, heads, head_dim),
        absorbed_cross(queries, keys, kv_width, heads, head_dim, shared_queries),
    )


def projected_cross(queries: int, keys: int, din: int, heads: int, head_dim: int) -> float:
    """Keys and values projected from the context, then scores and the weighted sum."""
    inner = heads * head_dim
    return 2 * (2 * keys * din * inner) + 2 * (2 * queries * keys * inner)


def absorbed_cross(
    queries: int, keys: int, din: int, heads: int, head_dim: int, shared_queries: bool = False
) -> float:
    """The absorbed form: queries mapped into the context's space (once per batch for shared
    learned queries), scores and mix over the raw context tokens, the mix projected."""
    inner = heads * head_dim
    mapped = 0 if shared_queries else 2 * queries * inner * din
    return mapped + 2 * (2 * queries * heads * din * keys) + 2 * queries * inner * din


def cross_attention_form(
    queries: int, keys: int, din: int, heads: int, head_dim: int, shared_queries: bool = False
) -> str:
    """'absorbed' where that form needs fewer FLOPs than 'projected'."""
    absorbed = absorbed_cross(queries, keys, din, heads, head_dim, shared_queries)
    return (
        "absorbed"
        if absorbed < projected_cross(queries, keys, din, heads, head_dim)
        else ("projected")
    )


def dense(tokens: int, d_in: int, d_out: int) -> float:
    return 2 * tokens * d_in * d_out
