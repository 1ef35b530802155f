"""The pure train step, bound to a config and compiled ahead of time with explicit shardings.

The same `(state, batch) -> (state, metrics)` function serves training, the dry run, the
benchmarks and the sharding tests.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from mmjax.models.coca import CoCa
from mmjax.models.config import ModelConfig
from mmjax.models.video import input_shape
from mmjax.runtime import sharding as shd
from mmjax.training.objective import loss_and_grads
from mmjax.training.optimizer import learning_rate_schedule
from mmjax.training.state import HOST_MEMORY, TrainState


def train_step(
    state: TrainState,
    batch: dict[str, jax.Array],
    *,
    model: CoCa,
    tx: optax.GradientTransformation,
    loss_config: ml_collections.ConfigDict,
    schedule: optax.Schedule,
    microbatches: int = 1,
    batch_axes: tuple[str, ...] = (),
    offload: tuple[Any, Any] | None = None,
    skip_nonfinite: bool = False,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step on a global batch. Pure: no side effects, no host sync.

    `offload`: (device, host) shardings of the optimizer state when it lives in
    host memory between steps (optimizer.offload_state). `skip_nonfinite`
    (train.on_nan='skip'): a step whose loss or gradient norm is NaN/Inf keeps
    the old parameters and optimizer state (the step counter and data position
    still advance) and reports skipped_update=1.
    """
    loss, aux, grads = loss_and_grads(
        state.params,
        batch,
        model=model,
        loss_config=loss_config,
        microbatches=microbatches,
        batch_axes=batch_axes,
        rng=state.rng,
    )
    old_opt_state = state.opt_state
    if offload is not None:
        old_opt_state = jax.device_put(old_opt_state, offload[0])
    updates, opt_state = tx.update(grads, old_opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    grad_norm = optax.tree.norm(grads)
    metrics = dict(loss=loss, grad_norm=grad_norm, learning_rate=schedule(state.step), **aux)
    if skip_nonfinite:
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        params = jax.tree.map(lambda n, o: jnp.where(finite, n, o), params, state.params)
        opt_state = jax.tree.map(lambda n, o: jnp.where(finite, n, o), opt_state, old_opt_state)
        metrics["skipped_update"] = 1.0 - finite.astype(jnp.float32)
    if offload is not None:
        opt_state = jax.device_put(opt_state, offload[1])
    new_state = state.replace(
        step=state.step + 1,
        params=params,
        opt_state=opt_state,
        rng=jax.random.fold_in(state.rng, state.step),
    )
    return new_state, metrics


def batch_shardings(mesh, rules, model_cfg: ModelConfig | None = None) -> dict[str, Any]:
    """Rows over the batch axes: images [B, S, S, 3], or clips [B, T, S, S, 3] for video."""
    image_ndim = 1 + len(input_shape(model_cfg)) if model_cfg is not None else 4
    return {
        "images": shd.batch_sharding(mesh, rules, image_ndim),
        "tokens": shd.batch_sharding(mesh, rules, 2),
    }


def abstract_batch(batch_size: int, model_cfg: ModelConfig, shardings) -> dict[str, Any]:
    """The global batch as ShapeDtypeStructs: uint8 pixels and int32 token rows."""
    return {
        "images": jax.ShapeDtypeStruct(
            (batch_size, *input_shape(model_cfg)), jnp.uint8, sharding=shardings["images"]
        ),
        "tokens": jax.ShapeDtypeStruct(
            (batch_size, model_cfg.context_length), jnp.int32, sharding=shardings["tokens"]
        ),
    }


def _offload_shardings(state_shardings) -> tuple[Any, Any] | None:
    """(device, host) shardings of the optimizer state if it is kept in host memory."""
    host = state_shardings.opt_state
    if not any(s.memory_kind == HOST_MEMORY for s in jax.tree.leaves(host)):
        return None
    return jax.tree.map(lambda s: s.with_memory_kind("device"), host), host


def bind_train_step(config, model: CoCa, tx, rules, state_shardings=None):
    """`train_step` with everything the config decides bound: (state, batch) -> (state,
    metrics). `state_shardings` (optional) tell it where the optimizer state lives."""
    offload = _offload_shardings(state_shardings) if state_shardings is not None else None
    return functools.partial(
        train_step,
        model=model,
        tx=tx,
        loss_config=config.loss,
        schedule=learning_rate_schedule(config),
        microbatches=config.train.microbatches,
        batch_axes=shd.batch_mesh_axes(rules),
        offload=offload,
        skip_nonfinite=config.train.on_nan == "skip",
    )


def compile_train_step(config, model: CoCa, tx, mesh, rules, abstract_state, state_shardings):
    """Ahead-of-time compiled train step with explicit in/out shardings, donated state.

    The same signature serves training, the benchmark and sharding tests.
    """
    step = bind_train_step(config, model, tx, rules, state_shardings)
    in_batch = batch_shardings(mesh, rules, model.cfg)
    jitted = jax.jit(
        step,
        in_shardings=(state_shardings, in_batch),
        out_shardings=(state_shardings, shd.replicated(mesh)),
        donate_argnums=(0,),
    )
    batch = abstract_batch(config.batch_size, model.cfg, in_batch)
    with shd.activate(mesh, rules):
        return jitted.lower(abstract_state, batch).compile()
