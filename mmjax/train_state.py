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

from mmjax import sharding as shd
from mmjax.models.coca import CoCa


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
    cfg = model.cfg
    images = jnp.zeros((batch_size, cfg.image_size, cfg.image_size, 3), jnp.uint8)
    tokens = jnp.zeros((batch_size, cfg.context_length), jnp.int32)
    return images, tokens


def _init_boxed(model: CoCa, tx: optax.GradientTransformation, init_key, train_key) -> TrainState:
    params = model.init(init_key, *dummy_batch(model))["params"]
    return TrainState(
        step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), rng=train_key
    )


def state_shardings(model: CoCa, tx, mesh, rules) -> tuple[TrainState, TrainState]:
    """(abstract unboxed state, NamedShardings) for `model` under `mesh`/`rules`."""
    keys = split_seed(0)
    boxed = jax.eval_shape(lambda: _init_boxed(model, tx, keys["init"], keys["train"]))
    shardings = shd.logical_shardings(boxed, mesh, rules)
    abstract = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), nn.unbox(boxed), shardings
    )
    return abstract, shardings


def create_train_state(model: CoCa, tx, mesh, rules, seed: int) -> TrainState:
    keys = split_seed(seed)
    _, shardings = state_shardings(model, tx, mesh, rules)
    init = jax.jit(lambda k1, k2: nn.unbox(_init_boxed(model, tx, k1, k2)), out_shardings=shardings)
    with shd.activate(mesh, rules):
        return init(keys["init"], keys["train"])
