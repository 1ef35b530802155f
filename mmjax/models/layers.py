"""Transformer building blocks shared by the image and text towers.

Parameters carry logical axis names only (embed, mlp, heads, kv, vocab,
layers, norm); activations are constrained with logical names (batch, length,
act_embed, act_heads, act_kv, act_mlp, act_vocab). The config's rules map
them onto mesh axes, so nothing here knows the device layout.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.models.attention import AttentionMask, attend, choose_kernel, target_platform
from mmjax.models.config import ModelConfig
from mmjax.models.matmul_flops import cross_attention_form

Array = jax.Array

constrain = nn.with_logical_constraint


def partitioned(init: Callable, names: tuple[str | None, ...]) -> Callable:
    return nn.with_logical_partitioning(init, names)


def dense_init():
    return nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")


def Dense(
    cfg: ModelConfig, features: int, axes: tuple[str, str], name: str, use_bias: bool = True
) -> nn.Dense:
    """A Dense layer whose kernel carries the logical names `axes` (in, out)."""
    return nn.Dense(
        features,
        use_bias=use_bias,
        dtype=cfg.compute_dtype,
        param_dtype=cfg.weights_dtype,
        kernel_init=partitioned(dense_init(), axes),
        bias_init=partitioned(nn.initializers.zeros, (axes[1],)),
        name=name,
    )


def LayerNorm(cfg: ModelConfig, name: str) -> nn.LayerNorm:
    # Flax computes the statistics in f32 even for bf16 inputs.
    return nn.LayerNorm(
        epsilon=cfg.norm_eps,
        dtype=cfg.compute_dtype,
        param_dtype=cfg.weights_dtype,
        scale_init=partitioned(nn.initializers.ones, ("norm",)),
        bias_init=partitioned(nn.initializers.zeros, ("norm",)),
        name=name,
    )


def activation(name: str, x: Array) -> Array:
    """A model.mlp_activation by name (see ModelConfig)."""
    if name == "gelu_tanh":
        return nn.gelu(x, approximate=True)
    if name == "gelu":
        return nn.gelu(x, approximate=False)
    if name == "quick_gelu":  # OpenAI CLIP's sigmoid approximation, kept by its checkpoints.
        return x * jax.nn.sigmoid(1.702 * x)
    raise ValueError(f"model.mlp_activation={name!r} is unknown")


class Mlp(nn.Module):
    cfg: ModelConfig
    hidden: int

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg = self.cfg
        width = x.shape[-1]
        h = Dense(cfg, self.hidden, ("embed", "mlp"), "fc1")(x)
        h = constrain(h, ("batch", "length", "act_mlp"))
        h = activation(cfg.mlp_activation, h)
        y = Dense(cfg, width, ("mlp", "embed"), "fc2")(h)
        return constrain(y, ("batch", "length", "act_embed"))


def prefix_lm_mask(
    queries: int, keys: int, *, offset: Array | int = 0, prefix: Array | int = 0
) -> Array:
    """[1, 1, queries, keys] bools: query i (absolute position offset + i) sees keys
    0..offset+i (causal) and every key below `prefix` (a bidirectional prefix).

    prefix=0 is the plain causal mask; a query inside the prefix sees the whole prefix and
    nothing after it, since every later key is also later than the query.
    """
    query_pos = offset + jnp.arange(queries)[:, None]
    key_pos = jnp.arange(keys)[None, :]
    return ((key_pos <= query_pos) | (key_pos < prefix))[None, None]


class Attention(nn.Module):
    """Multi-head attention; the kernel is model.attention's (mmjax.models.attention).

    Self-attention when `context` is None, cross-attention otherwise. In decode
    mode self-attention keeps a KV cache (keys/values of all earlier positions)
    and cross-attention stores the projected context once (on the call that
    passes `context`) and reuses it on later calls (which pass None).
    `prefix` (decode mode only; outside it the caller's mask rules): cache positions
    below it are visible to every query, so a prefix-LM's bidirectional prefix can be
    fed together with the first text token (see mmjax.models.fusion).
    """

    cfg: ModelConfig
    num_heads: int
    cross: bool = False
    decode: bool = False
    prefix: int = 0

    def _project(self, x: Array, width: int, parts: int, name: str) -> list[Array]:
        """[B, T, D] -> `parts` arrays [B, T, heads, head_dim] from one fused matmul.

        Fusing Q, K and V (or K and V) into one kernel [D, parts, heads, head_dim]
        gives one wide matmul instead of several narrow ones.
        """
        kernel, bias = self._projection_params(x.shape[-1], width, parts, name)
        dtype = self.cfg.compute_dtype
        y = jnp.einsum("btd,dphk->btphk", x.astype(dtype), kernel.astype(dtype)) + bias.astype(
            dtype
        )
        return [y[:, :, i] for i in range(parts)]

    def _projection_params(self, din: int, width: int, parts: int, name: str):
        """The fused projection's kernel [din, parts, heads, head_dim] and bias."""
        cfg = self.cfg
        shape = (din, parts, self.num_heads, width // self.num_heads)
        init = nn.initializers.variance_scaling(
            1.0, "fan_in", "truncated_normal", in_axis=0, out_axis=(2, 3), batch_axis=(1,)
        )
        kernel = self.param(
            f"{name}_kernel",
            partitioned(init, ("embed", None, "heads", "kv")),
            shape,
            cfg.weights_dtype,
        )
        bias = self.param(
            f"{name}_bias",
            partitioned(nn.initializers.zeros, (None, "heads", "kv")),
            shape[1:],
            cfg.weights_dtype,
        )
        return kernel, bias

    @nn.compact
    def __call__(
        self, x: Array, context: Array | None = None, mask: AttentionMask | None = None
    ) -> Array:
        """x: [B or 1, T, D] queries (a batch of 1 is broadcast after projection, so
        learned queries are projected once, not once per example). `mask` (outside decode
        mode): what each query sees; decode mode builds its own from the cache."""
        width = x.shape[-1]
        if self.cross:
            (q,) = self._project(x, width, 1, "query")
            if self._absorbs_keys_values(q, context):
                return self._output(self._absorbed_cross_attention(q, context, width), width)
            k, v = self._cross_keys_values(context, width)
        else:
            q, k, v = self._project(x, width, 3, "qkv")
            if self.decode:
                k, v, mask = self._update_cache(k, v)
        q = jnp.broadcast_to(q, (k.shape[0],) + q.shape[1:])
        q = constrain(q, ("batch", "length", "act_heads", "act_kv"))
        if self.decode:  # Keys/values come heads-major from the caches.
            k, v = (constrain(a, ("batch", "act_heads", "length", "act_kv")) for a in (k, v))
            out = cached_attention(q, k, v, mask)
        else:
            k, v = (constrain(a, ("batch", "length", "act_heads", "act_kv")) for a in (k, v))
            out = attend(q, k, v, mask, self.cfg.attention)
        return self._output(out, width)

    def _output(self, out: Array, width: int) -> Array:
        """[B, T, heads, head_dim] -> [B, T, width] through the output projection."""
        out = constrain(out, ("batch", "length", "act_heads", "act_kv"))
        cfg = self.cfg
        init = nn.initializers.variance_scaling(
            1.0, "fan_in", "truncated_normal", in_axis=(0, 1), out_axis=2
        )
        kernel = self.param(
            "out_kernel",
            partitioned(init, ("heads", "kv", "embed")),
            out.shape[-2:] + (width,),
            cfg.weights_dtype,
        )
        bias = self.param(
            "out_bias", partitioned(nn.initializers.zeros, ("embed",)), (width,), cfg.weights_dtype
        )
        dtype = cfg.compute_dtype
        y = jnp.einsum("bthk,hkd->btd", out, kernel.astype(dtype)) + bias.astype(dtype)
        return constrain(y, ("batch", "length", "act_embed"))

    def _absorbs_keys_values(self, q: Array, context: Array | None) -> bool:
        """Whether cross-attention runs in the absorbed form (see _absorbed_cross_attention):
        outside decode mode, with the XLA kernel, when that form needs fewer FLOPs."""
        if self.decode or context is None:
            return False
        batch, keys, din = context.shape
        heads, head_dim = q.shape[2], q.shape[3]
        k = jax.ShapeDtypeStruct((batch, keys, heads, head_dim), q.dtype)
        if choose_kernel(self.cfg.attention, target_platform(), q, k) != "xla":
            return False
        shared = q.shape[0] == 1 and batch > 1  # Learned queries: mapped once per batch.
        form = cross_attention_form(q.shape[1], keys, din, heads, head_dim, shared)
        return form == "absorbed"

    def _absorbed_cross_attention(self, q: Array, context: Array, width: int) -> Array:
        """Cross-attention without projecting the context to keys and values.

        With k_s = c_s Wk + bk and v_s = c_s Wv + bv: q.k_s = (q Wk^T).c_s + q.bk, and q.bk
        is the same for every key, so softmax drops it; sum_s p_s v_s = (sum_s p_s c_s) Wv
        + bv, since the weights sum to 1. So each head maps its queries into the context's
        space, scores them against the raw context tokens, mixes the tokens and projects
        the mix: the same attention, cheaper when the queries (times heads) are fewer than
        the context width, as for the caption decoder's few text positions over many
        image tokens, and for a pooler's single query (mmjax.models.matmul_flops.cross).
        """
        cfg = self.cfg
        dtype = cfg.compute_dtype
        kernel, bias = self._projection_params(context.shape[-1], width, 2, "kv")
        kernel, bias = kernel.astype(dtype), bias.astype(dtype)
        context = context.astype(dtype)
        _, queries, heads, head_dim = q.shape
        batch = context.shape[0]
        # Mapped before the broadcast: a batch of 1 (learned queries) is mapped once.
        mapped = jnp.einsum("bthk,dhk->bthd", q, kernel[:, 0]) / jnp.sqrt(head_dim).astype(dtype)
        mapped = jnp.broadcast_to(mapped, (batch,) + mapped.shape[1:])
        # Queries and heads as one row axis (a free reshape): plain batched matmuls, no
        # transposes of the scores or the mix.
        mapped = mapped.reshape(batch, queries * heads, -1)
        scores = jnp.einsum("bmd,bsd->bms", mapped, context)
        # Softmax in f32 at least, as jax.nn.dot_product_attention does for bf16.
        softmax_dtype = jnp.promote_types(dtype, jnp.float32)
        weights = jax.nn.softmax(scores.astype(softmax_dtype), axis=-1).astype(dtype)
        mixed = jnp.einsum("bms,bsd->bmd", weights, context).reshape(batch, queries, heads, -1)
        return jnp.einsum("bthd,dhk->bthk", mixed, kernel[:, 1]) + bias[1]

    def _cross_keys_values(self, context: Array | None, width: int) -> tuple[Array, Array]:
        if not self.decode:
            return tuple(self._project(context, width, 2, "kv"))
        if context is not None:  # First decode call: project the image tokens once.
            k, v = (heads_major(a) for a in self._project(context, width, 2, "kv"))
            self.variable("cache", "context_key", lambda: k).value = k
            self.variable("cache", "context_value", lambda: v).value = v
            return k, v
        return self.get_variable("cache", "context_key"), self.get_variable(
            "cache", "context_value"
        )

    def _update_cache(self, k: Array, v: Array) -> tuple[Array, Array, Array]:
        """Writes this call's keys/values at the cache index; returns all of them, heads-major
        [B, heads, positions, head_dim], with the mask of this call's queries.

        The cache is sized by the first (initialising) call, which passes the full
        maximum length; later calls pass one or a few new positions.
        """
        k, v = heads_major(k), heads_major(v)
        initialised = self.has_variable("cache", "cached_key")
        cached_k = self.variable("cache", "cached_key", jnp.zeros, k.shape, k.dtype)
        cached_v = self.variable("cache", "cached_value", jnp.zeros, v.shape, v.dtype)
        index = self.variable("cache", "cache_index", lambda: jnp.zeros((), jnp.int32))
        new = k.shape[2]
        max_len = cached_k.value.shape[2]
        if not initialised:  # Shape-defining call: attention within the call.
            return k, v, prefix_lm_mask(new, new, prefix=self.prefix)
        start = index.value
        cached_k.value = jax.lax.dynamic_update_slice(cached_k.value, k, (0, 0, start, 0))
        cached_v.value = jax.lax.dynamic_update_slice(cached_v.value, v, (0, 0, start, 0))
        index.value = start + new
        mask = prefix_lm_mask(new, max_len, offset=start, prefix=self.prefix)
        return cached_k.value, cached_v.value, mask


def heads_major(x: Array) -> Array:
    """[B, T, heads, head_dim] -> [B, heads, T, head_dim], the layout of the decode caches."""
    return jnp.swapaxes(x, 1, 2)


def cached_attention(q: Array, k: Array, v: Array, mask: Array | None) -> Array:
    """Attention of new positions q [B, T, heads, head_dim] over heads-major caches k, v
    [B, heads, S, head_dim] -> [B, T, heads, head_dim].

    The computation of `jax.nn.dot_product_attention`'s XLA path (scale after the dot, the
    same large negative for masked logits, softmax in f32), so decoding matches the full
    model. With the caches heads-major both dots read them in place: the [B, S, heads, dim]
    layout made XLA transpose every layer's whole cache at every generated token.
    """
    logits_dtype = jnp.promote_types(q.dtype, jnp.float32)
    logits = jnp.einsum("bthd,bhsd->bhts", q, k, preferred_element_type=logits_dtype)
    logits *= jnp.array(q.shape[-1] ** -0.5, logits_dtype)
    if mask is not None:
        large_negative = jnp.asarray(-0.7 * jnp.finfo(logits_dtype).max, logits_dtype)
        logits = jnp.where(mask, logits, large_negative)
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(k.dtype)
    return jnp.einsum("bhts,bhsd->bthd", probs, v)


class EncoderBlock(nn.Module):
    """Pre-LN block: x + attn(ln(x)), then x + mlp(ln(x)). `prefix`: see Attention."""

    cfg: ModelConfig
    num_heads: int
    mlp_dim: int
    decode: bool = False
    prefix: int = 0

    @nn.compact
    def __call__(self, x: Array, mask: AttentionMask | None) -> tuple[Array, None]:
        x = constrain(x, ("batch", "length", "act_embed"))
        h = LayerNorm(self.cfg, name="ln_attn")(x)
        attn = Attention(
            self.cfg, self.num_heads, decode=self.decode, prefix=self.prefix, name="attn"
        )
        x = x + attn(h, mask=mask)
        h = LayerNorm(self.cfg, name="ln_mlp")(x)
        x = x + Mlp(self.cfg, self.mlp_dim, name="mlp")(h)
        return x, None


class DecoderBlock(nn.Module):
    """Causal self-attention, cross-attention to image tokens, then MLP."""

    cfg: ModelConfig
    num_heads: int
    mlp_dim: int
    decode: bool = False

    @nn.compact
    def __call__(
        self, x: Array, mask: AttentionMask | None, context: Array | None
    ) -> tuple[Array, None]:
        x = constrain(x, ("batch", "length", "act_embed"))
        h = LayerNorm(self.cfg, name="ln_self")(x)
        x = x + Attention(self.cfg, self.num_heads, decode=self.decode, name="self_attn")(
            h, mask=mask
        )
        h = LayerNorm(self.cfg, name="ln_cross")(x)
        x = x + Attention(
            self.cfg, self.num_heads, cross=True, decode=self.decode, name="cross_attn"
        )(h, context=context)
        h = LayerNorm(self.cfg, name="ln_mlp")(x)
        x = x + Mlp(self.cfg, self.mlp_dim, name="mlp")(h)
        return x, None


class SplitDecoderBlock(nn.Module):
    """open_clip's decoder layer: a causal self-attention block, then a cross-attention
    block whose LayerNorm'd queries attend to LayerNorm'd image tokens; each has its MLP."""

    cfg: ModelConfig
    num_heads: int
    mlp_dim: int
    decode: bool = False

    @nn.compact
    def __call__(
        self, x: Array, mask: AttentionMask | None, context: Array | None
    ) -> tuple[Array, None]:
        cfg = self.cfg
        x = constrain(x, ("batch", "length", "act_embed"))
        h = LayerNorm(cfg, name="ln_self")(x)
        x = x + Attention(cfg, self.num_heads, decode=self.decode, name="self_attn")(h, mask=mask)
        h = LayerNorm(cfg, name="ln_self_mlp")(x)
        x = x + Mlp(cfg, self.mlp_dim, name="self_mlp")(h)
        h = LayerNorm(cfg, name="ln_cross")(x)
        # In decode mode the context comes only on the first call (then it is cached).
        context = None if context is None else LayerNorm(cfg, name="ln_context")(context)
        x = x + Attention(cfg, self.num_heads, cross=True, decode=self.decode, name="cross_attn")(
            h, context=context
        )
        h = LayerNorm(cfg, name="ln_mlp")(x)
        x = x + Mlp(cfg, self.mlp_dim, name="mlp")(h)
        return x, None


_POLICIES: dict[str, Any] = {  # Names: mmjax.models.config.REMAT_POLICIES.
    "minimal": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "dots-saveable": jax.checkpoint_policies.checkpoint_dots,
    "full": jax.checkpoint_policies.nothing_saveable,
}


class Stack(nn.Module):
    """`num_layers` copies of `block`, scanned (compile time flat in depth) or unrolled.

    Scanned parameters get a leading 'layers' axis. `broadcast_args` are passed
    unchanged to every layer (masks, the image tokens).
    """

    cfg: ModelConfig
    block: type[nn.Module]
    num_layers: int
    block_kwargs: dict = None
    remat: str = "none"  # A REMAT_POLICIES name.

    @nn.compact
    def __call__(self, x: Array, *broadcast_args) -> Array:
        block = self.block
        kwargs = dict(self.block_kwargs or {})
        if self.remat != "none":
            block = nn.remat(
                block, policy=_POLICIES[self.remat], prevent_cse=not self.cfg.scan_layers
            )
        if self.cfg.scan_layers:
            scanned = nn.scan(
                block,
                variable_axes={"params": 0, "cache": 0},
                split_rngs={"params": True},
                in_axes=(nn.broadcast,) * len(broadcast_args),
                length=self.num_layers,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )
            x, _ = scanned(self.cfg, name="layers", **kwargs)(x, *broadcast_args)
            return x
        for i in range(self.num_layers):
            x, _ = block(self.cfg, name=f"layers_{i}", **kwargs)(x, *broadcast_args)
        return x


def unstack_layers(params):
    """Parameters of scanned Stacks ('layers', a leading layer axis) in the unrolled layout
    ('layers_0', 'layers_1', ...) of the same model with model.scan_layers=False.

    For decoding: a scanned layer slices (copies) its weights out of the stack at every call,
    and a decode step, which reads every weight for a few rows, pays that copy at every token.
    Unstacked once per call (one copy), the per-token steps read the weights in place.
    """
    if not isinstance(params, Mapping):
        return params
    out = {}
    for name, child in params.items():
        if name == "layers":
            for i in range(jax.tree.leaves(child)[0].shape[0]):
                out[f"layers_{i}"] = jax.tree.map(lambda x, i=i: x[i], child)
        else:
            out[name] = unstack_layers(child)
    return out


def stack_layers(params):
    """unstack_layers in reverse: unrolled layers ('layers_0', 'layers_1', ...) stacked
    along a leading axis under 'layers', the layout of model.scan_layers=True."""
    if not isinstance(params, Mapping):
        return params
    out, unrolled = {}, {}
    for name, child in params.items():
        index = name.removeprefix("layers_")
        if name.startswith("layers_") and index.isdigit():
            unrolled[int(index)] = stack_layers(child)
        else:
            out[name] = stack_layers(child)
    if unrolled:
        layers = [unrolled[i] for i in range(len(unrolled))]
        out["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs), *layers)
    return out
