"""Attention kernels chosen by config (`model.attention`): what a query sees, and who computes it.

The model says what each attention may see as an `AttentionMask` (causal or not, a
bidirectional prefix, which keys are padding), never as a layout-specific array, so each
kernel can take the mask in its own form:

- `xla`: `jax.nn.dot_product_attention`'s XLA path over the dense boolean mask; runs
  everywhere and is the reference the others are tested against.
- `cudnn`: the same function's cuDNN fused kernel (GPU, fp16/bf16); a plain causal mask is
  passed as `is_causal` so cuDNN skips the masked half, anything else as the dense mask.
- `splash`: Pallas splash attention (TPU): the mask as block-sparse structure (causal, prefix
  or full), padding as segment ids, sequences padded up to whole blocks; under a mesh it runs
  per shard inside `shard_map` (batch and heads split as the logical rules say). Off a TPU it
  runs in Pallas interpret mode, which is how the tests check its numerics on CPU.
- `auto`: per call, on the platform the step is compiled for (the mesh's, so a TPU topology
  dry run on a CPU host picks TPU kernels): splash on TPU when both lengths fill a block,
  cuDNN on GPU for fp16/bf16 and head sizes it supports, XLA otherwise.

A padded query row (a key-padding position) is computed differently by the kernels: XLA lets
it see the valid keys, splash only other padding. No valid position, and so no loss, sees a
padded row's output (right padding, causal masks), so the kernels agree where it matters.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks
from jax.sharding import PartitionSpec as P

from mmjax.models.config import ATTENTION_KERNELS

Array = jax.Array

SPLASH_BLOCK = 128  # Splash's default q/kv block: sequences are padded to a multiple of it.
CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)


@struct.dataclass
class AttentionMask:
    """Which keys each query sees: every key, or (causal) keys up to its own position, plus
    (prefix) every key below `prefix`; `key_valid` [B, S] hides padding keys."""

    key_valid: Array | None = None
    causal: bool = struct.field(pytree_node=False, default=False)
    prefix: int = struct.field(pytree_node=False, default=0)

    def dense(self, queries: int, keys: int) -> Array | None:
        """[B or 1, 1, queries, keys] bools (None: every key is visible)."""
        allowed = None
        if self.causal:
            q_pos = jnp.arange(queries)[:, None]
            k_pos = jnp.arange(keys)[None, :]
            allowed = ((k_pos <= q_pos) | (k_pos < self.prefix))[None, None]
        if self.key_valid is not None:
            valid = self.key_valid[:, None, None, :]
            allowed = valid if allowed is None else allowed & valid
        return allowed


def target_platform() -> str:
    """The platform the computation being traced is compiled for: the current mesh's (a TPU
    topology when a dry run compiles for one), else the default backend."""
    mesh = jax.sharding.get_abstract_mesh()
    device = None if mesh.empty else getattr(mesh, "abstract_device", None)
    platform = getattr(device, "platform", None)
    return platform or jax.default_backend()


def check_available(kernel: str, platform: str) -> None:
    """ValueError in one line when config value `kernel` cannot run on `platform`."""
    if kernel not in ATTENTION_KERNELS:
        raise ValueError(f"model.attention={kernel!r} is unknown; allowed: {ATTENTION_KERNELS}")
    if kernel == "cudnn" and platform != "gpu":
        raise ValueError(f"model.attention='cudnn' needs a GPU; this step compiles for {platform}")
    if kernel == "splash" and platform == "gpu":
        raise ValueError("model.attention='splash' is a TPU kernel; on GPU use cudnn or auto")


def choose_kernel(kernel: str, platform: str, q: Array, k: Array) -> str:
    """The kernel that computes q [B, T, H, D] x k [B, S, H, D] for config value `kernel`."""
    check_available(kernel, platform)
    if kernel != "auto":
        return kernel
    head_dim = q.shape[-1]
    if platform == "tpu" and min(q.shape[1], k.shape[1]) >= SPLASH_BLOCK:
        return "splash"
    if platform == "gpu" and q.dtype in CUDNN_DTYPES and head_dim % 8 == 0 and head_dim <= 128:
        return "cudnn"
    return "xla"


def attend(q: Array, k: Array, v: Array, mask: AttentionMask | None, kernel: str) -> Array:
    """Softmax(q k^T / sqrt(D)) v over q [B, T, H, D], k/v [B, S, H, D] -> [B, T, H, D]."""
    mask = mask or AttentionMask()
    platform = target_platform()
    chosen = choose_kernel(kernel, platform, q, k)
    if chosen == "splash":
        return splash_attention(q, k, v, mask, interpret=platform != "tpu")
    dense = mask.dense(q.shape[1], k.shape[1])
    if chosen == "cudnn":
        plain_causal = mask.causal and not mask.prefix and mask.key_valid is None
        return jax.nn.dot_product_attention(
            q,
            k,
            v,
            mask=None if plain_causal else dense,
            is_causal=plain_causal,
            implementation="cudnn",
        )
    return jax.nn.dot_product_attention(q, k, v, mask=dense)


def _round_up(n: int, block: int) -> int:
    return -(-n // block) * block


def _splash_mask(mask: AttentionMask, queries: int, keys: int) -> masks.Mask:
    """The static (block-sparse) part of the mask at the padded lengths."""
    shape = (queries, keys)
    if not mask.causal:
        return masks.FullMask(shape)
    if not mask.prefix:
        return masks.CausalMask(shape)
    q_pos = np.arange(queries)[:, None]
    k_pos = np.arange(keys)[None, :]
    return masks.NumpyMask((k_pos <= q_pos) | (k_pos < mask.prefix))


def splash_attention(
    q: Array, k: Array, v: Array, mask: AttentionMask, *, interpret: bool = False
) -> Array:
    """Splash attention over [B, T, H, D] arrays, sharded as the logical rules shard them."""
    batch, queries, _, head_dim = q.shape
    keys = k.shape[1]
    t_pad, s_pad = _round_up(queries, SPLASH_BLOCK), _round_up(keys, SPLASH_BLOCK)
    # Segment ids: 1 = a key every valid query may see; 0 = key padding and the filler up to
    # whole blocks, seen only by padded/filler queries (so no row is empty).
    kv_valid = jnp.ones((batch, keys), bool) if mask.key_valid is None else mask.key_valid
    kv_valid = jnp.broadcast_to(kv_valid, (batch, keys))
    kv_seg = jnp.pad(kv_valid.astype(jnp.int32), ((0, 0), (0, s_pad - keys)))
    if keys == queries:
        q_seg = jnp.pad(kv_valid.astype(jnp.int32), ((0, 0), (0, t_pad - queries)))
    else:  # Cross-attention: every real query is valid.
        q_seg = jnp.pad(jnp.ones((batch, queries), jnp.int32), ((0, 0), (0, t_pad - queries)))

    def heads_major(x: Array, length: int) -> Array:
        x = jnp.pad(x, ((0, 0), (0, length - x.shape[1]), (0, 0), (0, 0)))
        return jnp.swapaxes(x, 1, 2)  # [B, H, L, D]

    def per_shard(q, k, v, q_seg, kv_seg):
        # One kernel per call: its mask is per head, and a shard holds q.shape[2] heads.
        kernel = splash.make_splash_mha(
            masks.MultiHeadMask([_splash_mask(mask, t_pad, s_pad)] * q.shape[2]),
            head_shards=1,
            q_seq_shards=1,
            interpret=interpret,
        )
        scaled = heads_major(q * jnp.asarray(head_dim**-0.5, q.dtype), t_pad)
        out = jax.vmap(kernel)(
            scaled,
            heads_major(k, s_pad),
            heads_major(v, s_pad),
            segment_ids=splash.SegmentIds(q=q_seg, kv=kv_seg),
        )
        return jnp.swapaxes(out, 1, 2)[:, :queries]

    if jax.sharding.get_abstract_mesh().empty:
        return per_shard(q, k, v, q_seg, kv_seg)
    qkv_spec = nn.logical_to_mesh_axes(("batch", "length", "act_heads", "act_kv"))
    qkv_spec = P(qkv_spec[0], None, qkv_spec[2], None)  # Whole sequences on each shard.
    seg_spec = P(qkv_spec[0], None)
    sharded = jax.shard_map(
        per_shard,
        in_specs=(qkv_spec, qkv_spec, qkv_spec, seg_spec, seg_spec),
        out_specs=qkv_spec,
        check_vma=False,
    )
    return sharded(q, k, v, q_seg, kv_seg)
