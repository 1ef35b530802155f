"""End-to-end training behaviour: overfitting, 1 vs 8 devices, exact resume,
divergence handling, evaluation output and the loss ablations.

Runs go through the real CLI (`python -m mmjax.train` / `mmjax.evaluate`) in
subprocesses; the training runs are shared with other modules and started
ahead of the tests that read them (tests/runs.py, which also gives the shared
settings).
"""

import json
import math
import re
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest

from mmjax.data.shapes import ShapesSource, all_captions
from mmjax.models.coca import CoCa
from mmjax.models.config import ModelConfig
from mmjax.runtime import sharding as shd
from mmjax.runtime.checkpoint import Checkpointer
from mmjax.runtime.config import from_json_file, load_config
from mmjax.runtime.metric_writer import read_metrics
from mmjax.text.sentencepiece import train_tokenizer
from mmjax.training.optimizer import make_optimizer
from mmjax.training.state import create_train_state
from mmjax.training.step import bind_train_step
from mmjax.training.trainer import Trainer
from tests.runs import BATCH, JOBS, LOSS_KEYS, STEPS, run, train, train_lines

# Per-step values that depend only on the computation (not on timing).
DETERMINISTIC_KEYS = LOSS_KEYS + ("grad_norm", "learning_rate", "temperature", "logit_bias")
EVAL_KEYS = (
    "eval/i2t_r1",
    "eval/i2t_r5",
    "eval/i2t_r10",
    "eval/t2i_r1",
    "eval/t2i_r5",
    "eval/t2i_r10",
    "eval/caption_bleu4",
    "eval/caption_exact",
)

pytestmark = pytest.mark.slow

# Which shared runs (tests/runs.py JOBS) each test reads.
NEEDS = {
    "test_one_vs_eight_devices_same_losses": ("straight", "eight"),
    "test_sharded_losses_and_microbatches_match_one_device": (
        "straight",
        "eight_micro",
        "siglip",
        "siglip_eight",
    ),
    "test_resume_reproduces_uninterrupted_run_exactly": ("straight",),
    "test_nan_loss_stops_run_and_keeps_last_checkpoint": ("nan",),
    "test_evaluate_cli_and_metrics_file": ("straight",),
}
JOB_PARAMETER = "config"  # test_loss_ablation_configs_train[config] reads the job `config`.


def eval_lines(workdir):
    return [r for r in read_metrics(workdir) if any(k.startswith("eval/") for k in r)]


def restore(workdir, step=None):
    """The train state of `workdir`'s checkpoint, through the trainer's own restore path."""
    trainer = Trainer(from_json_file(Path(workdir) / "config.json"), workdir, existing_tokenizer=True)
    try:
        restored_step = trainer.restore(step)
        return restored_step, jax.device_get(trainer.state)
    finally:
        trainer.close()


def assert_trees_equal(a, b):
    leaves_a, tree_a = jax.tree.flatten(a)
    leaves_b, tree_b = jax.tree.flatten(b)
    assert tree_a == tree_b
    for x, y in zip(leaves_a, leaves_b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_overfits_one_fixed_batch(tmp_path, runs):
    """60 steps on one fixed batch of 16 shapes examples drive the loss below 10% of its start.

    (`runs` starts the CLI runs of the other tests, which then overlap with this one.)
    At learning rate 3e-3 the loss falls from ~14.6 to ~0.2 (1.5%) in 60 steps; 10% is
    reached around step 35.
    """
    steps = 60
    config = load_config(
        f"configs/coca.py:size=tiny,batch={BATCH},steps={steps}",
        [
            "optimizer.learning_rate=3e-3",
            "optimizer.warmup_steps=0",
            "optimizer.end_learning_rate_factor=1.0",
        ],
    )
    model_cfg = ModelConfig.from_mapping(config.model.to_dict())
    tokenizer = train_tokenizer(
        all_captions(), tmp_path / "tokenizer.model", config.data.tokenizer_vocab_size
    )
    source = ShapesSource("train", num_examples=BATCH, image_size=model_cfg.image_size)
    examples = [source[i] for i in range(BATCH)]
    model = CoCa(model_cfg)
    mesh = shd.make_mesh(dict(config.mesh), jax.devices()[:1])
    rules = shd.rules_from_config(config.sharding_rules)
    batch = {
        "images": np.stack([e["image"] for e in examples]),
        "tokens": tokenizer.encode_batch(
            [e["caption"] for e in examples], model_cfg.context_length
        ),
    }
    batch = {
        k: jax.device_put(v, shd.batch_sharding(mesh, rules, v.ndim)) for k, v in batch.items()
    }
    tx = make_optimizer(config)
    step_fn = jax.jit(bind_train_step(config, model, tx, rules), donate_argnums=(0,))
    state = create_train_state(model, tx, mesh, rules, config.seed)
    history = []
    with shd.activate(mesh, rules):
        for _ in range(steps):
            state, metrics = step_fn(state, batch)
            history.append(metrics)
    losses = [float(m["loss"]) for m in jax.device_get(history)]
    assert all(math.isfinite(x) for x in losses)
    assert int(state.step) == steps
    assert losses[-1] <= 0.1 * losses[0], f"loss {losses[0]:.3f} -> {losses[-1]:.3f}"


def test_one_vs_eight_devices_same_losses(runs):
    """data=2 x fsdp=2 x tensor=2 on 8 forced CPU devices reproduces the 1-device losses.

    Tolerance 1e-5 relative: both runs compute the same f32 math, but sharding
    splits the batch and weight reductions (sums over examples, the global
    gradient norm, the all-gathered contrastive logits) into partial sums that
    are added in a different order, giving differences of a few f32 ulps
    (eps = 1.2e-7; observed <= 4e-7 over 8 steps), which Adam then propagates into
    the weights. 1e-5 leaves ~25x headroom yet catches any real difference (a
    wrong shard, a dropped example or a missing all-reduce changes losses at
    1e-3 or more).
    """
    single_dir, _ = runs.get("straight")
    multi_dir, multi = runs.get("eight")
    assert "mesh {'data': 2, 'fsdp': 2, 'tensor': 2} on 8 cpu devices" in multi.stdout
    single, sharded = train_lines(single_dir), train_lines(multi_dir)
    assert [r["step"] for r in single] == [r["step"] for r in sharded] == list(range(1, STEPS + 1))
    for a, b in zip(single, sharded):
        for key in LOSS_KEYS:
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), (
                a["step"],
                key,
                a[key],
                b[key],
            )


def test_sharded_losses_and_microbatches_match_one_device(runs):
    """On 8 devices the contrastive loss runs sharded (local softmax; the sigmoid as a ring
    of ppermutes) and, with train.microbatches=4, the gradient is accumulated over 4 slices
    that each see the whole batch's negatives: the losses still follow the 1-device run.
    Accumulation adds the gradient in another order, so the tolerance is 1e-4 (a slice
    that lost its negatives, or a caption loss averaged per slice, moves them by >1e-2)."""
    pairs = (("straight", "eight_micro"), ("siglip", "siglip_eight"))
    for single_name, sharded_name in pairs:
        single_dir, _ = runs.get(single_name)
        sharded_dir, _ = runs.get(sharded_name)
        single, sharded = train_lines(single_dir), train_lines(sharded_dir)
        assert [r["step"] for r in single] == [r["step"] for r in sharded]
        for a, b in zip(single, sharded):
            for key in LOSS_KEYS:
                assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), (
                    sharded_name,
                    a["step"],
                    key,
                    a[key],
                    b[key],
                )


def test_resume_reproduces_uninterrupted_run_exactly(runs, cache_dir, tmp_path):
    """A run of 4 steps (the straight run as it was at its step-4 checkpoint, with
    total_steps=4), then the same command with total_steps=8 on the same workdir: bitwise the
    same per-step metrics and final state as 8 steps in one go."""
    straight_dir, _ = runs.get("straight")
    workdir = tmp_path / "run"
    shutil.copytree(straight_dir, workdir)
    shutil.rmtree(workdir / "checkpoints" / str(STEPS))
    saved = json.loads((workdir / "config.json").read_text())
    (workdir / "config.json").write_text(json.dumps(dict(saved, total_steps=STEPS // 2)))
    checkpointer = Checkpointer(workdir / "checkpoints")
    assert checkpointer.all_steps() == [STEPS // 2]
    checkpointer.close()
    # Extending total_steps is a config change (it re-stretches the schedule; constant here).
    second = train(workdir, cache_dir, "--config.allow_config_change=True", steps=STEPS)
    assert f"resumed from {workdir / 'checkpoints'}/{STEPS // 2}" in second.stdout
    assert f"(allow_config_change): total_steps: {STEPS // 2} -> {STEPS}" in second.stdout

    straight, resumed = train_lines(straight_dir), train_lines(workdir)
    assert [r["step"] for r in resumed] == list(range(1, STEPS + 1))
    for a, b in zip(straight, resumed):
        assert {k: a[k] for k in DETERMINISTIC_KEYS} == {k: b[k] for k in DETERMINISTIC_KEYS}, a[
            "step"
        ]
    # The final evaluation sees the same parameters.
    final_eval = lambda d: {k: v for k, v in eval_lines(d)[-1].items() if not k.endswith("seconds")}
    assert final_eval(straight_dir) == final_eval(workdir)

    step_a, state_a = restore(straight_dir)
    step_b, state_b = restore(workdir)
    assert step_a == step_b == STEPS
    assert int(state_a.step) == int(state_b.step) == STEPS
    assert_trees_equal(state_a, state_b)  # params, optimizer moments, rng


def test_nan_loss_stops_run_and_keeps_last_checkpoint(runs):
    """A diverging run exits non-zero naming the step; the checkpoint before it restores."""
    workdir, proc = runs.get("nan")  # Learning rate 1e30, a checkpoint every step.
    assert proc.returncode not in (0, None), proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    match = re.match(
        r"error: step (\d+): non-finite .*loss=(nan|inf|-inf)\b.*"
        r"Last good checkpoint: step (\d+) in ",
        errors[0],
    )
    assert match, errors[0]
    bad_step, good_step = int(match[1]), int(match[3])
    # With a checkpoint every step, the last good one is the step before the NaN. (Here
    # step 1 runs on the initial weights and its 1e30-sized update breaks step 2.)
    assert bad_step >= 2 and good_step == bad_step - 1, errors[0]

    checkpointer = Checkpointer(workdir / "checkpoints")
    assert checkpointer.latest_step() == good_step
    kept = checkpointer.all_steps()
    checkpointer.close()
    assert kept == list(range(max(1, good_step - 2), good_step + 1))  # keep_checkpoints=3
    # Nothing half-written for the NaN step either.
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == sorted(map(str, kept))
    logged = train_lines(workdir)
    assert [r["step"] for r in logged] == list(range(1, bad_step))  # Nothing for the NaN step.
    assert all(math.isfinite(logged[-1][k]) for k in LOSS_KEYS)

    step, state = restore(workdir)
    assert step == good_step and int(state.step) == good_step
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state.params))


def test_evaluate_cli_and_metrics_file(runs, cache_dir):
    workdir, _ = runs.get("straight")
    proc = run("mmjax.evaluate", ["--workdir", workdir], cache_dir)
    assert f"wrote {workdir / 'eval.json'}" in proc.stdout
    result = json.loads((workdir / "eval.json").read_text())
    assert result["step"] == STEPS
    for key in EVAL_KEYS:
        assert 0.0 <= result[key] <= 1.0, (key, result[key])
    assert result["eval/num_examples"] == 64

    records = read_metrics(workdir)
    train_recs, eval_recs = train_lines(workdir), eval_lines(workdir)
    assert len(train_recs) + len(eval_recs) == len(records)
    assert [r["step"] for r in train_recs] == list(range(1, STEPS + 1))
    for record in train_recs:
        for key in LOSS_KEYS + ("examples_per_sec", "mfu"):
            assert math.isfinite(record[key]), (record["step"], key)
        assert record["examples_per_sec"] > 0 and record["mfu"] > 0
        assert record["loss"] == pytest.approx(
            record["contrastive_loss"] + 2 * record["caption_loss"], rel=1e-5
        )
    assert [r["step"] for r in eval_recs] == [STEPS]
    for key in EVAL_KEYS:
        assert 0.0 <= eval_recs[0][key] <= 1.0
        # Restoring the final checkpoint and evaluating it reproduces the in-training eval.
        assert result[key] == pytest.approx(eval_recs[0][key], abs=1e-6), key


@pytest.mark.parametrize("config", ["clip", "captioning", "siglip"])
def test_loss_ablation_configs_train(config, runs):
    workdir, _ = runs.get(config)
    steps = JOBS[config]["steps"]
    records = train_lines(workdir)
    assert [r["step"] for r in records] == list(range(1, steps + 1))
    for r in records:
        assert all(math.isfinite(r[k]) for k in LOSS_KEYS + ("grad_norm",)), r
        assert r["contrastive_loss"] > 0  # Reported even when it is not trained.
        if config == "clip":
            assert r["caption_loss"] == 0.0
            assert r["loss"] == pytest.approx(r["contrastive_loss"], rel=1e-6)
        elif config == "captioning":
            assert r["caption_loss"] > 0
            assert r["loss"] == pytest.approx(2 * r["caption_loss"], rel=1e-6)
        else:
            assert r["caption_loss"] > 0
            assert r["loss"] == pytest.approx(
                r["contrastive_loss"] + 2 * r["caption_loss"], rel=1e-5
            )
    if config == "siglip":  # SigLIP init: temperature 1/10, bias -10.
        assert records[0]["temperature"] == pytest.approx(0.1, rel=1e-6)
        assert records[0]["logit_bias"] == pytest.approx(-10.0, rel=1e-6)
    assert eval_lines(workdir), "no final evaluation"
