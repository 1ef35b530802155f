"""End-to-end training behaviour: overfitting, 1 vs 8 devices, exact resume,
divergence handling, evaluation output and the loss ablations.

Runs go through the real CLI (`python -m mmjax.train` / `mmjax.evaluate`) in
subprocesses. Each training run happens once per pytest run, in the background
ahead of the tests that read it (see `Runs`), and all share a persistent XLA
compilation cache, so a program compiled by one run (e.g. the eval functions,
identical in every tiny run) is not compiled again by the next. Results are
unaffected: a cached executable is the same executable.

Shared settings (BASE): batch 16, a constant learning rate (no warmup, no
decay), log every step, checkpoint every 4 steps, eval only at the last step
on 64 examples. The constant rate matters for the resume test: the schedule
is a function of total_steps, so "4 steps, then extend to 8" equals "8 steps"
only when the schedule does not change with total_steps.
"""

import fcntl
import functools
import json
import math
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import jax
import numpy as np
import pytest

from mmjax import sharding as shd
from mmjax.checkpoint import Checkpointer
from mmjax.config_loading import from_json_file, load_config
from mmjax.data.shapes import ShapesSource, all_captions
from mmjax.metric_writer import read_metrics
from mmjax.models.coca import CoCa
from mmjax.models.config import ModelConfig
from mmjax.optimizer import learning_rate_schedule, make_optimizer
from mmjax.tokenizer import train_tokenizer
from mmjax.train import Trainer, train_step
from mmjax.train_state import create_train_state

REPO = Path(__file__).resolve().parents[1]
BATCH = 16
STEPS = 8
BASE = [
    "--config.log_every=1",
    "--config.checkpoint_every=4",
    "--config.eval_every=1000",
    "--config.optimizer.warmup_steps=0",
    "--config.optimizer.end_learning_rate_factor=1.0",
    "--config.data.train_examples=256",
    "--config.data.eval_examples=64",
    "--config.eval.caption_examples=16",
    "--config.eval.batch_size=32",
]
MESH_8 = ["--config.mesh.data=2", "--config.mesh.fsdp=2", "--config.mesh.tensor=2"]
LOSS_KEYS = ("loss", "contrastive_loss", "caption_loss")
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


def shared_dir(tmp_path_factory) -> Path:
    """A folder shared by all xdist workers of this pytest run (or this process's temp root)."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent
    path = root / "mmjax_training_runs"
    path.mkdir(exist_ok=True)
    return path


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    path = shared_dir(tmp_path_factory) / "jax_cache"
    path.mkdir(exist_ok=True)
    return path


def run(module, args, cache_dir, *, devices=1, check=True):
    env = dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
        JAX_COMPILATION_CACHE_DIR=str(cache_dir),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
    )
    proc = subprocess.run(
        [sys.executable, "-m", module, *map(str, args)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if check:
        check_exit(proc)
    return proc


def check_exit(proc):
    assert proc.returncode == 0, (
        f"{proc.args} exited {proc.returncode}\n"
        f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    )


def train(workdir, cache_dir, *extra, config="coca", steps=STEPS, devices=1, check=True):
    args = [
        "--config",
        f"configs/{config}.py:size=tiny,batch={BATCH},steps={steps}",
        "--workdir",
        workdir,
        *BASE,
        *extra,
    ]
    return run("mmjax.train", args, cache_dir, devices=devices, check=check)


# The independent training runs, by name: train() keyword arguments.
JOBS = {
    "straight": dict(),  # 8 steps on 1 device in one go.
    "eight": dict(extra=MESH_8, devices=8),
    # Gradient accumulation and the ring sigmoid loss on the 8-device mesh.
    "eight_micro": dict(extra=[*MESH_8, "--config.train.microbatches=4"], devices=8),
    "siglip_eight": dict(config="siglip", steps=3, extra=MESH_8, devices=8),
    "half": dict(steps=STEPS // 2),  # Resumed to 8 steps by the resume test.
    "nan": dict(
        extra=["--config.optimizer.learning_rate=1e30", "--config.checkpoint_every=1"], check=False
    ),
    "clip": dict(config="clip", steps=3),
    "captioning": dict(config="captioning", steps=3),
    "siglip": dict(config="siglip", steps=3),
}
# Which runs each test reads.
NEEDS = {
    "test_one_vs_eight_devices_same_losses": ("straight", "eight"),
    "test_sharded_losses_and_microbatches_match_one_device": (
        "straight",
        "eight_micro",
        "siglip",
        "siglip_eight",
    ),
    "test_resume_reproduces_uninterrupted_run_exactly": ("straight", "half"),
    "test_nan_loss_stops_run_and_keeps_last_checkpoint": ("nan",),
    "test_evaluate_cli_and_metrics_file": ("straight",),
}


class Runs:
    """Runs each job of JOBS at most once per pytest run, ahead of the tests that read it.

    Each run mostly compiles, on about one core. Without xdist, two background
    threads run the jobs the selected tests need, two at a time; under xdist
    (`pytest -n 2`) each worker has one such thread and the workers share the
    jobs through a folder and file locks, so no job runs twice. `get(name)` waits
    for a job (running it now if nobody has started it) and returns
    (workdir, CompletedProcess).
    """

    def __init__(self, root: Path, cache_dir: Path, names):
        self._root, self._cache_dir = root, cache_dir
        self._pending = [name for name in JOBS if name in names]  # Earliest tests' runs first.
        self._stop = threading.Event()
        threads = 1 if os.environ.get("PYTEST_XDIST_WORKER") else 2
        self._threads = [
            threading.Thread(target=self._prefetch, daemon=True) for _ in range(threads)
        ]
        for thread in self._threads:
            thread.start()

    def _ensure(self, name: str, block: bool) -> bool:
        """Runs job `name` unless it has run; False if another thread or worker is on it."""
        with open(self._root / f"{name}.lock", "w") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | (0 if block else fcntl.LOCK_NB))
            except BlockingIOError:
                return False
            result = self._root / f"{name}.json"
            if not result.exists():
                kwargs = dict(JOBS[name], check=False)
                proc = train(self._root / name, self._cache_dir, *kwargs.pop("extra", ()), **kwargs)
                tmp = result.with_suffix(".tmp")
                tmp.write_text(
                    json.dumps(
                        dict(
                            args=proc.args,
                            returncode=proc.returncode,
                            stdout=proc.stdout,
                            stderr=proc.stderr,
                        )
                    )
                )
                tmp.rename(result)
            return True

    def _prefetch(self):
        while not self._stop.is_set():
            busy = [name for name in list(self._pending) if not self._ensure(name, block=False)]
            self._pending = busy
            if not busy:
                return
            self._stop.wait(0.5)  # The rest are running elsewhere; check back.

    def get(self, name: str):
        self._ensure(name, block=True)
        saved = json.loads((self._root / f"{name}.json").read_text())
        proc = subprocess.CompletedProcess(**saved)
        if JOBS[name].get("check", True):
            check_exit(proc)
        return self._root / name, proc

    def close(self):
        self._stop.set()
        for thread in self._threads:
            thread.join()  # Waits for a run in progress (their subprocesses have a timeout).


@pytest.fixture(scope="session")  # Session: torn down once, not between xdist batches.
def runs(request, tmp_path_factory, cache_dir):
    names = set()
    for item in request.session.items:
        if getattr(item, "module", None) is not sys.modules[__name__]:
            continue
        names.update(NEEDS.get(item.originalname, ()))
        if item.originalname == "test_loss_ablation_configs_train":
            names.add(item.callspec.params["config"])
    runs = Runs(shared_dir(tmp_path_factory), cache_dir, names)
    yield runs
    runs.close()


def train_lines(workdir):
    return [r for r in read_metrics(workdir) if "loss" in r]


def eval_lines(workdir):
    return [r for r in read_metrics(workdir) if any(k.startswith("eval/") for k in r)]


def restore(workdir, step=None):
    """The train state of `workdir`'s checkpoint, through the trainer's own restore path."""
    trainer = Trainer(from_json_file(Path(workdir) / "config.json"), workdir, for_eval=True)
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
    step_fn = jax.jit(
        functools.partial(
            train_step,
            model=model,
            tx=tx,
            loss_config=config.loss,
            schedule=learning_rate_schedule(config),
        ),
        donate_argnums=(0,),
    )
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


def test_resume_reproduces_uninterrupted_run_exactly(runs, cache_dir):
    """4 steps, then the same command with total_steps=8 on the same workdir: bitwise the
    same per-step metrics and final state as 8 steps in one go."""
    straight_dir, _ = runs.get("straight")
    workdir, first = runs.get("half")
    assert "resumed" not in first.stdout
    checkpointer = Checkpointer(workdir / "checkpoints")
    assert checkpointer.all_steps() == [STEPS // 2]
    checkpointer.close()
    second = train(workdir, cache_dir, steps=STEPS)
    assert f"resumed from {workdir / 'checkpoints'}/{STEPS // 2}" in second.stdout

    straight, resumed = train_lines(straight_dir), train_lines(workdir)
    assert [r["step"] for r in resumed] == list(range(1, STEPS + 1))
    for a, b in zip(straight, resumed):
        assert {k: a[k] for k in DETERMINISTIC_KEYS} == {k: b[k] for k in DETERMINISTIC_KEYS}, a[
            "step"
        ]
    # The final evaluation sees the same parameters.
    final_eval = lambda d: {k: v for k, v in eval_lines(d)[-1].items() if k != "eval/seconds"}
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
