"""The train state and its sharded initialisation.

Shapes come from `jax.eval_shape` of the init function, shardings from the
logical axis names through the config's rules, and the state is created by
a jit whose out_shardings are those shardings: no parameter ever exists
unsharded on one device.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax

from mmjax.models.coca import CoCa
from mmjax.models.video import input_shape
from mmjax.runtime import sharding as shd


class TrainState(flax.struct.PyTreeNode):
    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array  # Training randomness (dropout, sampling); advanced every step.


def split_seed(seed: int) -> dict[str, jax.Array]:
    """One seed -> independent keys for model init, data order and training."""
    init, data, train = jax.random.split(jax.random.PRNGKey(seed), 3)
    return dict(init=init, data=data, train=train)


def data_seed(seed: int) -> int:
    return int(jax.random.randint(split_seed(seed)["data"], (), 0, 2**31 - 1))


def dummy_batch(model: CoCa, batch_size: int = 1) -> tuple[jax.Array, jax.Array]:
    """Zero inputs for init: images [B, S, S, 3], or clips [B, T, S, S, 3] for video."""
    cfg = model.cfg
    images = jnp.zeros((batch_size, *input_shape(cfg)), jnp.uint8)
    tokens = jnp.zeros((batch_size, cfg.context_length), jnp.int32)
    return images, tokens


def _init_boxed(model: CoCa, tx: optax.GradientTransformation, init_key, train_key) -> TrainState:
    params = model.init(init_key, *dummy_batch(model))["params"]
    return TrainState(
        step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), rng=train_key
    )


HOST_MEMORY = "pinned_host"


def supports_offload(mesh) -> bool:
    """Whether the mesh's devices have a host memory space that jit can place arrays in."""
    device = mesh.devices.flat[0]
    return any(memory.kind == HOST_MEMORY for memory in device.addressable_memories())


def state_shardings(
    model: CoCa, tx, mesh, rules, *, offload_opt_state: bool = False
) -> tuple[TrainState, TrainState]:
    """(abstract unboxed state, NamedShardings) for `model` under `mesh`/`rules`.

    With `offload_opt_state` the optimizer state lives in host memory (same
    partitioning, memory kind pinned_host); the train step brings it to the
    device for the update and sends it back.
    """
    if offload_opt_state and not supports_offload(mesh):
        kinds = [m.kind for m in mesh.devices.flat[0].addressable_memories()]
        raise ValueError(
            f"optimizer.offload_state needs {HOST_MEMORY!r} memory; this backend has {kinds}"
        )
    keys = split_seed(0)
    boxed = jax.eval_shape(lambda: _init_boxed(model, tx, keys["init"], keys["train"]))
    shardings = shd.logical_shardings(boxed, mesh, rules)
    if offload_opt_state:
        shardings = shardings.replace(
            opt_state=jax.tree.map(lambda s: s.with_memory_kind(HOST_MEMORY), shardings.opt_state)
        )
    abstract = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), nn.unbox(boxed), shardings
    )
    return abstract, shardings


def create_train_state(
    model: CoCa, tx, mesh, rules, seed: int, *, offload_opt_state: bool = False
) -> TrainState:
    keys = split_seed(seed)
    _, shardings = state_shardings(model, tx, mesh, rules, offload_opt_state=offload_opt_state)
    init = jax.jit(lambda k1, k2: nn.unbox(_init_boxed(model, tx, k1, k2)), out_shardings=shardings)
    with shd.activate(mesh, rules):
        return init(keys["init"], keys["train"])
