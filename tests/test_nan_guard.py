"""train.on_nan: 'skip' keeps the old state for a non-finite step and counts it."""

import math

import jax
import numpy as np
import pytest

from mmjax.models.coca import CoCa
from mmjax.models.config import ModelConfig
from mmjax.runtime import sharding as shd
from mmjax.runtime.checkpoint import Checkpointer
from mmjax.runtime.config import load_config
from mmjax.training.optimizer import make_optimizer
from mmjax.training.state import create_train_state
from mmjax.training.step import bind_train_step
from tests.runs import STEPS, train_lines

NEEDS = {"test_skip_run_finishes_and_keeps_the_last_finite_weights": ("nan_skip",)}


@pytest.mark.slow
def test_skip_keeps_params_and_opt_state_on_a_nan_batch():
    config = load_config(
        "configs/coca.py:size=tiny,batch=4", ["optimizer.warmup_steps=0", "train.on_nan=skip"]
    )
    model = CoCa(ModelConfig.from_mapping(config.model.to_dict()))
    mesh = shd.make_mesh(dict(config.mesh))
    rules = shd.rules_from_config(config.sharding_rules)
    tx = make_optimizer(config)
    step = jax.jit(bind_train_step(config, model, tx, rules))
    cfg = model.cfg
    rng = np.random.default_rng(0)
    # Float images skip the uint8 scaling, so a NaN pixel reaches the loss.
    images = rng.uniform(0, 1, (4, cfg.image_size, cfg.image_size, 3)).astype(np.float32)
    tokens = rng.integers(4, cfg.vocab_size, (4, cfg.context_length)).astype(np.int32)

    def put(batch):
        return {
            k: jax.device_put(v, shd.batch_sharding(mesh, rules, v.ndim)) for k, v in batch.items()
        }

    good = put({"images": images.copy(), "tokens": tokens})
    images[1, 3, 3, 0] = np.nan
    bad = put({"images": images, "tokens": tokens})
    state = create_train_state(model, tx, mesh, rules, seed=0)
    with shd.activate(mesh, rules):
        before = jax.device_get(state)
        after_bad, metrics = step(state, bad)
        after_bad = jax.device_get(after_bad)
        assert float(metrics["skipped_update"]) == 1.0 and not math.isfinite(metrics["loss"])
        assert int(after_bad.step) == 1  # The data position moves on.
        jax.tree.map(np.testing.assert_array_equal, after_bad.params, before.params)
        jax.tree.map(np.testing.assert_array_equal, after_bad.opt_state, before.opt_state)
        after_good, metrics = step(state, good)  # From the same start (nothing donated).
        assert float(metrics["skipped_update"]) == 0.0 and math.isfinite(metrics["loss"])
    changed = jax.tree.map(
        lambda a, b: not np.array_equal(a, b), jax.device_get(after_good.params), before.params
    )
    # Every parameter moves on a good batch (but logit_bias, unused by the softmax loss).
    assert sum(jax.tree.leaves(changed)) == len(jax.tree.leaves(changed)) - 1


@pytest.mark.slow
def test_skip_run_finishes_and_keeps_the_last_finite_weights(runs):
    # Learning rate 1e30: step 1's update makes every later loss non-finite.
    workdir, proc = runs.get("nan_skip")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "update skipped (train.on_nan='skip'" in proc.stdout
    last = train_lines(workdir)[-1]
    assert last["step"] == STEPS and last["nan_skipped_steps"] == STEPS - 1
    checkpointer = Checkpointer(workdir / "checkpoints")
    try:
        assert checkpointer.all_steps()[-2:] == [4, 8]
        from mmjax.runtime.config import from_json_file
        from mmjax.training.trainer import Trainer

        trainer = Trainer(from_json_file(workdir / "config.json"), workdir, existing_tokenizer=True)
        try:
            trainer.restore(4)
            at4 = jax.device_get(trainer.state)
            trainer.restore(8)
            at8 = jax.device_get(trainer.state)
            assert trainer.nan_skipped_steps == STEPS - 1
        finally:
            trainer.close()
    finally:
        checkpointer.close()
    assert int(at8.step) == 8
    jax.tree.map(np.testing.assert_array_equal, at8.params, at4.params)
    jax.tree.map(np.testing.assert_array_equal, at8.opt_state, at4.opt_state)
