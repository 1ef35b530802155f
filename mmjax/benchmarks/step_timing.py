"""A compiled train step on a synthetic batch, timed one step at a time (the benchmarks).

`mmjax bench`, its `--compare` variants, the side-by-side workers and the checkpoint
benchmark all build their step here, as the trainer does (`build_run`).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import jax
import numpy as np

from mmjax.models.config import ModelConfig
from mmjax.models.flops import train_flops_per_step
from mmjax.models.video import input_shape
from mmjax.training.setup import build_run
from mmjax.training.step import batch_shardings


def synthetic_batch(config, model_cfg: ModelConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """Random pixels and captions with a realistic amount of padding."""
    rng = np.random.default_rng(seed)
    b, length = config.batch_size, model_cfg.context_length
    images = rng.integers(0, 256, (b, *input_shape(model_cfg)), dtype=np.uint8)
    tokens = rng.integers(4, model_cfg.vocab_size, (b, length), dtype=np.int32)
    lengths = rng.integers(length // 2, length + 1, b)
    tokens[:, 0] = 2
    for row, n in enumerate(lengths):
        tokens[row, n - 1] = 3
        tokens[row, n:] = 0
    return {"images": images, "tokens": tokens}


@dataclasses.dataclass
class PreparedStep:
    """A compiled train step with its initial state and one device batch (benchmarks)."""

    model_cfg: ModelConfig
    mesh: Any
    abstract: Any  # abstract train state (shapes, dtypes, shardings)
    state: Any
    step: Any  # the AOT-compiled train step
    batch: dict[str, jax.Array]
    compile_seconds: float

    @property
    def parameters(self) -> int:
        return int(sum(np.prod(a.shape) for a in jax.tree.leaves(self.abstract.params)))

    @property
    def xla_flops(self) -> float:
        """FLOPs of one step by XLA's cost analysis (all devices; a scanned body once)."""
        cost = self.step.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        return float(cost.get("flops", float("nan"))) * jax.device_count()


def prepare_step(config) -> PreparedStep:
    """Mesh, state and compiled step of `config`, as the trainer builds them, on a
    synthetic batch."""
    run = build_run(config)
    state = run.create_state()
    start = time.perf_counter()
    compiled = run.compile_step()
    compile_seconds = time.perf_counter() - start
    in_shardings = batch_shardings(run.mesh, run.rules, run.model_cfg)
    batch = {
        k: jax.device_put(v, in_shardings[k])
        for k, v in synthetic_batch(config, run.model_cfg).items()
    }
    return PreparedStep(
        run.model_cfg, run.mesh, run.abstract_state, state, compiled, batch, compile_seconds
    )


def warm_up(prepared: PreparedStep, steps: int = 2):
    """(state, metrics) after `steps` untimed steps from the initial state."""
    state = prepared.state
    for _ in range(steps):
        state, metrics = prepared.step(state, prepared.batch)
    jax.block_until_ready(metrics)
    return state, metrics


def timed_step(prepared: PreparedStep, state):
    """(state, metrics, seconds) of one step, waited for."""
    start = time.perf_counter()
    state, metrics = prepared.step(state, prepared.batch)
    jax.block_until_ready(metrics)
    return state, metrics, time.perf_counter() - start


def model_flops(config, model_cfg: ModelConfig) -> float:
    return train_flops_per_step(
        model_cfg, config.batch_size, with_captioning=config.loss.caption_weight > 0
    )
