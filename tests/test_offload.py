"""optimizer.offload_state keeps the Adam moments in host memory and changes nothing else."""

import jax
import numpy as np
import pytest

from mmjax.models.coca import CoCa
from mmjax.models.config import ModelConfig
from mmjax.runtime import sharding as shd
from mmjax.runtime.checkpoint import Checkpointer
from mmjax.runtime.config import load_config
from mmjax.training.optimizer import make_optimizer
from mmjax.training.state import HOST_MEMORY, create_train_state, state_shardings
from mmjax.training.step import compile_train_step


def _setup(offload):
    config = load_config(
        "configs/coca.py:size=tiny,batch=8",
        [f"optimizer.offload_state={offload}", "optimizer.warmup_steps=0"],
    )
    mesh = shd.make_mesh(dict(config.mesh))
    rules = shd.rules_from_config(config.sharding_rules)
    model = CoCa(ModelConfig.from_mapping(config.model.to_dict()))
    tx = make_optimizer(config)
    abstract, shardings = state_shardings(model, tx, mesh, rules, offload_opt_state=offload)
    step = compile_train_step(config, model, tx, mesh, rules, abstract, shardings)
    state = create_train_state(model, tx, mesh, rules, config.seed, offload_opt_state=offload)
    return config, mesh, rules, abstract, step, state


def _batch(mesh, rules, cfg):
    rng = np.random.default_rng(0)
    batch = {
        "images": rng.integers(0, 256, (8, cfg.image_size, cfg.image_size, 3), dtype=np.uint8),
        "tokens": rng.integers(1, cfg.vocab_size, (8, cfg.context_length)).astype(np.int32),
    }
    return {k: jax.device_put(v, shd.batch_sharding(mesh, rules, v.ndim)) for k, v in batch.items()}


def _kinds(tree):
    return {leaf.sharding.memory_kind for leaf in jax.tree.leaves(tree)}


@pytest.mark.skipif(
    not any(m.kind == HOST_MEMORY for m in jax.devices()[0].addressable_memories()),
    reason="backend without host memory space",
)
@pytest.mark.slow
def test_offloaded_optimizer_state_trains_identically_and_checkpoints(tmp_path):
    runs = {}
    for offload in (False, True):
        config, mesh, rules, abstract, step, state = _setup(offload)
        batch = _batch(mesh, rules, ModelConfig.from_mapping(config.model.to_dict()))
        losses = []
        with shd.activate(mesh, rules):
            for _ in range(3):
                state, metrics = step(state, batch)
                losses.append(float(metrics["loss"]))
        runs[offload] = (losses, jax.device_get(state.params), state, abstract)
    assert _kinds(runs[True][2].opt_state) == {HOST_MEMORY}
    assert HOST_MEMORY not in _kinds(runs[True][2].params)
    assert HOST_MEMORY not in _kinds(runs[False][2].opt_state)
    np.testing.assert_array_equal(runs[True][0], runs[False][0])
    jax.tree.map(np.testing.assert_array_equal, runs[True][1], runs[False][1])

    # A checkpoint of the offloaded state restores into host memory again.
    state, abstract = runs[True][2], runs[True][3]
    checkpointer = Checkpointer(tmp_path / "ckpt", async_save=False)
    checkpointer.save(3, state, batch_size=8)
    restored = checkpointer.restore(3, abstract)
    checkpointer.close()
    assert _kinds(restored.opt_state) == {HOST_MEMORY}
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored), jax.device_get(state))
