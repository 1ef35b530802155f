"""Reproducibility and the safety of a workdir (mmjax/run_record.py).

- Determinism: the same config and seed twice give bitwise the same per-step metrics, final
  evaluation and final state.
- Workdir lock: a live holder refuses a second start (exit 2, one line naming host, pid and
  lock file), a lock from another host refuses with the advice to remove it, a dead
  holder's lock (a SIGKILLed run) is taken over with a note, and the lock goes away when
  its process exits, also after an exception; a refusal stops every process of a
  multi-process start.
- Config change on resume: refused with the differences printed one per line, unless
  allow_config_change; mesh, speed and cadence keys may change.
- Run records: runs.jsonl holds git state, versions, devices, mesh, host, command line.
- Topology change: a checkpoint of 8 devices (data=1, fsdp=4, tensor=2) restores bitwise
  onto 4 devices (data=2, fsdp=2) and onto 1 device, and training continues on 4 devices
  with the batches an uninterrupted run sees; a checkpoint of 2 processes continues in 1.
- Safe loading: nothing in mmjax unpickles or evaluates data (an AST scan).

The end-to-end parts read the shared runs of tests/runs.py and continue copies of them.
"""

from __future__ import annotations

import ast
import hashlib
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest

from mmjax.runtime import run_record
from mmjax.runtime import sharding as shd
from mmjax.runtime.config import ConfigError, load_config, to_json, validate
from mmjax.runtime.metric_writer import read_metrics
from mmjax.runtime.run_record import RunRefused, WorkdirLock
from tests.runs import LOSS_KEYS, MESH_8, REPO, STEPS, TWO_PROCESSES, env_for, train, train_lines
from tests.test_model_config import legacy_flat

# Per-step values that depend only on the computation (not on timing).
DETERMINISTIC_KEYS = LOSS_KEYS + ("grad_norm", "learning_rate", "temperature", "logit_bias")
HALF = STEPS // 2  # The checkpoint that continuations resume from.

NEEDS = {
    "test_same_config_and_seed_give_bitwise_identical_runs": ("straight", "straight_again"),
    "test_checkpoints_restore_bitwise_onto_other_meshes_and_process_counts": (
        "eight_fsdp",
        "two_processes",
    ),
    "test_mesh_change_refusals_and_continuation_on_four_devices": ("eight_fsdp", "straight"),
    "test_two_process_checkpoint_continues_in_one_process": ("two_processes", "straight"),
}


def tiny_config(*overrides: str):
    return load_config("configs/coca.py:size=tiny,batch=16,steps=8", overrides)


def one_device_mesh():
    return shd.make_mesh(dict(data=1, fsdp=1, tensor=1), jax.devices()[:1])


def sleeper() -> subprocess.Popen:
    """A live process of this host whose pid can stand for a lock holder."""
    return subprocess.Popen(["sleep", "120"])


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()  # Reaped: the pid names no process now.
    return proc.pid


def write_lock(workdir: Path, **holder) -> Path:
    path = workdir / run_record.LOCK_FILE
    path.write_text(json.dumps(holder))
    return path


# --- config check --------------------------------------------------------------------------


def test_config_changes_count_only_keys_that_change_training():
    old = json.loads(to_json(tiny_config()))
    new = json.loads(
        to_json(
            tiny_config(
                "total_steps=10",
                "mesh.data=2",
                "mesh.fsdp=4",
                "data.workers=2",
                "eval.batch_size=64",
                "log_every=7",
                "optimizer.learning_rate=0.5",
                "allow_config_change=True",
            )
        )
    )
    del new["keep_checkpoints"]  # Absent on one side: in config.json of an older mmjax...
    new["train"]["new_knob"] = 1  # ...or a key added since.
    changes = {c["key"]: c for c in run_record.config_changes(old, new)}
    assert sorted(k for k, c in changes.items() if not c["allowed"]) == [
        "optimizer.learning_rate",
        "total_steps",
        "train.new_knob",
    ]
    assert sorted(k for k, c in changes.items() if c["allowed"]) == [
        "allow_config_change",
        "data.workers",
        "eval.batch_size",
        "keep_checkpoints",
        "log_every",
        "mesh.data",
        "mesh.fsdp",
    ]
    assert run_record.format_change(changes["total_steps"]) == "total_steps: 8 -> 10"
    assert (
        run_record.format_change(changes["keep_checkpoints"]) == "keep_checkpoints: 3 -> (absent)"
    )
    assert run_record.format_change(changes["train.new_knob"]) == "train.new_knob: (absent) -> 1"
    assert run_record.config_changes(old, json.loads(to_json(tiny_config()))) == []
    # What may differ on resume (the policy, pinned); everything else counts.
    assert {k for k in run_record.flatten(old) if run_record.resumable(k)} == {
        "allow_config_change",
        *(f"mesh.{k}" for k in ("data", "fsdp", "tensor", "dcn_data", "dcn_fsdp")),
        "sharding_rules",
        "model.remat", "model.vision.remat", "model.text.remat", "model.decoder.remat",
        "model.attention",
        "train.microbatches",
        "loss.caption_logits", "loss.caption_chunk", "loss.sharded_softmax",
        "optimizer.offload_state",
        *(f"data.{k}" for k in ("workers", "num_threads", "prefetch")),
        *(f"eval.{k}" for k in ("batch_size", "caption_examples")),
        *("log_every", "eval_every", "checkpoint_every", "keep_checkpoints"),
        # Named evaluators (configs/coca.py): evaluation only.
        *("evals.captioning.type", "evals.captioning.generate.method"),
        *(f"evals.zeroshot.{k}" for k in ("type", "data", "label", "classes", "templates")),
    }
    for key in ("seed", "total_steps", "data.seed", "model.scan_layers", "train.on_nan"):
        assert not run_record.resumable(key), key


def test_resume_with_another_config_is_refused_with_the_differences(tmp_path, capsys):
    (tmp_path / "config.json").write_text(to_json(tiny_config()))
    changed = tiny_config("total_steps=12", "seed=3", "mesh.data=1")
    with pytest.raises(RunRefused) as refused:
        run_record.check_config(tmp_path, changed, checkpoint_step=4)
    message = str(refused.value)
    assert "\n" not in message
    assert message.startswith(f"{tmp_path} has a checkpoint (step 4) of another config: the 2 ")
    assert message.endswith("pass --config.allow_config_change=True")
    # The counted differences, one per line, and not the mesh (topology may change).
    assert capsys.readouterr().err.splitlines() == ["seed: 0 -> 3", "total_steps: 8 -> 12"]

    allowed = tiny_config("total_steps=12", "seed=3", "allow_config_change=True")
    changes = run_record.check_config(tmp_path, allowed, checkpoint_step=4)
    assert {c["key"] for c in changes} == {"allow_config_change", "seed", "total_steps"}
    # Nothing to compare without a checkpoint (a fresh run overwrites config.json).
    assert run_record.check_config(tmp_path, changed, checkpoint_step=None) == []
    (tmp_path / "config.json").write_text('{"seed": 0, "total_')  # Half written.
    with pytest.raises(RunRefused, match="config.json is unreadable"):
        run_record.check_config(tmp_path, tiny_config(), checkpoint_step=4)


def test_allow_config_change_must_be_a_bool():
    with pytest.raises(ConfigError, match="allow_config_change='maybe' is not a valid bool"):
        tiny_config("allow_config_change=maybe")
    config = tiny_config()
    with config.ignore_type():
        config.allow_config_change = "yes"
    with pytest.raises(ConfigError, match="^allow_config_change='yes' must be True or False$"):
        validate(config)


# --- the workdir lock ----------------------------------------------------------------------


def test_lock_refuses_live_or_foreign_holders_and_takes_over_dead_ones(tmp_path):
    host = socket.gethostname()
    holder = sleeper()
    try:
        path = write_lock(tmp_path, host=host, pid=holder.pid, start_time="2026-01-01T00:00:00")
        with pytest.raises(RunRefused) as refused:
            WorkdirLock(path).acquire()
        assert str(refused.value) == (
            f"{tmp_path} is in use by a training on host {host} pid {holder.pid}, since "
            f"2026-01-01T00:00:00 (lock {path}); stop it or use another --workdir"
        )
        # The same pid but another process start time: the pid was reused, the lock is stale.
        ticks = run_record._process_start_ticks(holder.pid)
        if ticks is not None:
            write_lock(tmp_path, host=host, pid=holder.pid, process_start_ticks=ticks + 1)
            lock = WorkdirLock(path)
            assert lock.acquire().startswith(f"took over the stale lock {path}")
            lock.release()
    finally:
        holder.kill()
        holder.wait()

    write_lock(tmp_path, host="elsewhere.example", pid=os.getpid())
    with pytest.raises(
        RunRefused, match="cannot be checked from here: if that run is gone, remove"
    ):
        WorkdirLock(path).acquire()
    for text in ("", '{"host": "vm", "pid": "12"}'):  # Unreadable: refused, never guessed away.
        path.write_text(text)
        with pytest.raises(RunRefused, match="unreadable lock file"):
            WorkdirLock(path).acquire()

    gone = dead_pid()
    write_lock(tmp_path, host=host, pid=gone)
    lock = WorkdirLock(path)
    assert lock.acquire() == f"took over the stale lock {path} of host {host} pid {gone} (gone)"
    assert json.loads(path.read_text())["pid"] == os.getpid()
    # A second start from this same process (another fit()) is the same holder.
    again = WorkdirLock(path)
    assert again.acquire() is None
    lock.release()  # Not its lock any more: stays.
    assert path.exists()
    again.release()
    assert not path.exists()
    fresh = WorkdirLock(path)
    assert fresh.acquire() is None and json.loads(path.read_text())["token"] == fresh.token
    fresh.release()
    assert not path.exists()


def test_lock_released_at_exit_after_an_exception_and_left_by_sigkill(tmp_path):
    """A process that dies of an exception releases its lock; a SIGKILLed one cannot, and
    the next start on this host takes its lock over."""
    path = tmp_path / run_record.LOCK_FILE
    script = textwrap.dedent(
        f"""
        import os, signal, sys
        from mmjax.runtime.run_record import WorkdirLock
        WorkdirLock({str(path)!r}).acquire()
        print(open({str(path)!r}).read(), flush=True)
        if sys.argv[1] == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        raise RuntimeError("boom")
        """
    )
    env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
    for how in ("raise", "kill"):
        proc = subprocess.run(
            [sys.executable, "-c", script, how], capture_output=True, text=True, env=env, timeout=60
        )
        holder = json.loads(proc.stdout.splitlines()[0])
        assert holder["pid"] != os.getpid() and holder["host"] == socket.gethostname()
        if how == "raise":
            assert proc.returncode == 1 and "RuntimeError: boom" in proc.stderr
            assert not path.exists()
        else:
            assert proc.returncode == -signal.SIGKILL
            assert json.loads(path.read_text()) == holder
    lock = WorkdirLock(path)
    assert lock.acquire() == (
        f"took over the stale lock {path} of host {holder['host']} pid {holder['pid']} (gone)"
    )
    lock.release()


# --- run records ---------------------------------------------------------------------------


def test_start_writes_a_run_record_and_holds_the_lock(tmp_path, capsys):
    config = tiny_config()
    lock = run_record.start(tmp_path, config, one_device_mesh(), checkpoint_step=None)
    try:
        assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
        # A second run of this workdir from another process is refused, with nothing recorded.
        script = (
            "import sys, jax; from mmjax.runtime import run_record, sharding as shd; "
            "from mmjax.runtime.config import load_config; "
            "c = load_config('configs/coca.py:size=tiny,batch=16,steps=8'); "
            "m = shd.make_mesh(dict(data=1, fsdp=1, tensor=1), jax.devices()[:1]); "
            f"run_record.start({str(tmp_path)!r}, c, m, checkpoint_step=None)"
        )
        proc = subprocess.run(
            [sys.executable, "-c", script],
            capture_output=True,
            text=True,
            cwd=REPO,
            env=dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu"),
            timeout=120,
        )
        assert proc.returncode == 1
        assert f"RunRefused: {tmp_path} is in use by a training on host" in proc.stderr
    finally:
        lock.release()
    assert not (tmp_path / ".lock").exists()

    (record,) = run_record.read_records(tmp_path)
    assert record["pid"] == os.getpid() and record["host"] == socket.gethostname()
    assert record["resumed_from_step"] is None and record["config_changes"] == []
    assert record["python"] == ".".join(map(str, sys.version_info[:3]))
    assert record["packages"]["jax"] == jax.__version__
    assert record["packages"]["numpy"] == np.__version__
    assert set(record["packages"]) == set(run_record.PACKAGES)
    assert record["platform"] == "cpu" and record["device_count"] == jax.device_count()
    assert record["process_count"] == 1
    assert record["cpu_async_dispatch"] is jax.config.values["jax_cpu_enable_async_dispatch"]
    assert record["mesh"] == {"data": 1, "fsdp": 1, "tensor": 1}
    assert record["command"].split()[0] == sys.orig_argv[0]
    assert record["start_time"].endswith("+00:00")
    assert record["config_sha256"] == hashlib.sha256(to_json(config).encode()).hexdigest()
    git = record["git"]
    head = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True
    )
    if head.returncode == 0:  # A git checkout (CI, development).
        assert git["commit"] == head.stdout.strip()
        status = subprocess.run(
            ["git", "-C", str(REPO), "status", "--porcelain"], capture_output=True, text=True
        )
        assert git["dirty"] == bool(status.stdout.strip())
    else:
        assert git == dict(commit=None, dirty=None, changed=None)


def test_git_state_is_null_outside_a_checkout(tmp_path):
    package = tmp_path / "site-packages" / "mmjax"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    assert run_record.git_state(package) == dict(commit=None, dirty=None, changed=None)
    # Inside some other repository that does not track the package: null too, not its commit.
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    assert run_record.git_state(package)["commit"] is None


# --- determinism and topology (shared runs) ------------------------------------------------


def restore_states(workdir: Path, step: int, meshes) -> list:
    """The state of `workdir`'s checkpoint `step` restored onto each (data, fsdp, tensor) mesh
    (the first devices), fetched to the host, through the trainer's restore path."""
    from mmjax.models.coca import CoCa
    from mmjax.models.config import ModelConfig
    from mmjax.runtime.checkpoint import Checkpointer
    from mmjax.runtime.config import from_json_file
    from mmjax.training.optimizer import make_optimizer
    from mmjax.training.state import state_shardings

    config = from_json_file(workdir / "config.json")
    model = CoCa(ModelConfig.from_mapping(config.model.to_dict()))
    tx, rules = make_optimizer(config), shd.rules_from_config(config.sharding_rules)
    checkpointer = Checkpointer(workdir / "checkpoints")
    states = []
    try:
        for sizes in meshes:
            devices = jax.devices()[: math.prod(sizes)]
            mesh = shd.make_mesh(dict(zip(shd.MESH_AXES, sizes)), devices)
            abstract, _ = state_shardings(model, tx, mesh, rules)
            state = checkpointer.restore(step, abstract)
            shapes = {tuple(x.sharding.mesh.shape.values()) for x in jax.tree.leaves(state)}
            assert shapes == {tuple(sizes)}, shapes
            states.append(jax.device_get(state))
    finally:
        checkpointer.close()
    return states


def differing_leaves(a, b) -> list[str]:
    flat_a, tree_a = jax.tree_util.tree_flatten_with_path(a)
    flat_b, tree_b = jax.tree_util.tree_flatten_with_path(b)
    assert tree_a == tree_b
    return [
        jax.tree_util.keystr(path)
        for (path, x), (_, y) in zip(flat_a, flat_b)
        if not np.array_equal(np.asarray(x), np.asarray(y))
    ]


def _restore_report(spec_json: str) -> None:
    """Run in a subprocess with 8 CPU devices: for each (workdir, step, meshes), the leaves
    whose restore onto meshes[i] differs from the restore onto meshes[0], as JSON."""
    report = []
    for workdir, step, meshes in json.loads(spec_json):
        states = restore_states(Path(workdir), step, meshes)
        leaves = len(jax.tree.leaves(states[0]))
        report.append(
            dict(
                workdir=workdir,
                leaves=leaves,
                step=int(states[0].step),
                differing=[differing_leaves(states[0], s) for s in states[1:]],
            )
        )
    print(json.dumps(report))


@pytest.mark.slow
def test_same_config_and_seed_give_bitwise_identical_runs(runs):
    """Two runs of one command: every per-step value, the final evaluation and the final state
    (params, Adam moments, rng) are bitwise equal. (The second run may take its compiled
    programs from the shared compilation cache: the same executables, so this checks that
    data order, initialisation and PRNG use are pure functions of config and seed.)"""
    (dir_a, _), (dir_b, _) = runs.get("straight"), runs.get("straight_again")
    lines_a, lines_b = train_lines(dir_a), train_lines(dir_b)
    assert [r["step"] for r in lines_a] == [r["step"] for r in lines_b] == list(range(1, STEPS + 1))
    for a, b in zip(lines_a, lines_b):
        for key in DETERMINISTIC_KEYS:
            assert a[key] == b[key], (a["step"], key, a[key], b[key])
    evals = [
        {k: v for k, v in r.items() if k.startswith("eval/") and not k.endswith("seconds")}
        for d in (dir_a, dir_b)
        for r in read_metrics(d)
        if "eval/i2t_r1" in r
    ]
    assert len(evals) == 2 and evals[0] == evals[1]
    state_a, state_b = (restore_states(d, STEPS, [(1, 1, 1)])[0] for d in (dir_a, dir_b))
    assert differing_leaves(state_a, state_b) == []
    # The records say the two runs are the same run: code, versions, config.
    (rec_a,), (rec_b,) = run_record.read_records(dir_a), run_record.read_records(dir_b)
    for key in ("packages", "python", "config_sha256", "mesh", "device_count", "seed"):
        assert rec_a[key] == rec_b[key], key
    assert rec_a["git"]["commit"] == rec_b["git"]["commit"]
    assert rec_a["pid"] != rec_b["pid"]


@pytest.mark.slow
def test_checkpoints_restore_bitwise_onto_other_meshes_and_process_counts(runs, cache_dir):
    """The step-4 checkpoint of the 8-device run (data=1, fsdp=4, tensor=2) restores onto
    data=2 x fsdp=2 (4 devices) and onto 1 device; the 2-process checkpoint (2 x 4 devices)
    restores in one process onto its own mesh and onto 1 device: bitwise the same state."""
    spec = [
        (str(runs.get("eight_fsdp")[0]), HALF, [(1, 4, 2), (2, 2, 1), (1, 1, 1)]),
        (str(runs.get("two_processes")[0]), HALF, [(2, 2, 2), (1, 1, 1)]),
    ]
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from tests.test_reproducibility import _restore_report; "
            "_restore_report(sys.argv[1])",
            json.dumps(spec),
        ],
        cwd=REPO,
        env=env_for(cache_dir, devices=8, PYTHONPATH=str(REPO)),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.splitlines()[-1])
    for entry, (_, _, meshes) in zip(report, spec):
        assert entry["step"] == HALF and entry["leaves"] > 50
        assert entry["differing"] == [[]] * (len(meshes) - 1), entry


def continue_copy(source: Path, workdir: Path, step: int) -> None:
    """`source` as it was at checkpoint `step`: later checkpoints left out."""
    shutil.copytree(source, workdir)
    for path in (workdir / "checkpoints").iterdir():
        if path.name.isdigit() and int(path.name) > step:
            shutil.rmtree(path)


def assert_continues(continued: Path, references: dict[str, Path], rtol: float) -> None:
    """Steps HALF+1..STEPS of `continued` match each reference run's (other meshes: rtol)."""
    lines = train_lines(continued)
    assert [r["step"] for r in lines] == list(range(1, STEPS + 1))
    for name, reference in references.items():
        expected = train_lines(reference)
        for a, b in zip(expected[HALF:], lines[HALF:]):
            for key in LOSS_KEYS + ("grad_norm",):
                assert b[key] == pytest.approx(a[key], rel=rtol, abs=1e-6), (
                    name,
                    a["step"],
                    key,
                    a[key],
                    b[key],
                )


@pytest.mark.slow
def test_mesh_change_refusals_and_continuation_on_four_devices(runs, cache_dir, tmp_path):
    """A copy of the 8-device run (data=1, fsdp=4, tensor=2) at its step-4 checkpoint:

    1. a start while another process holds the workdir's lock is refused (exit 2, one line);
    2. with the holder dead (stale lock) and total_steps changed, the lock is taken over and
       the config change refused, the difference printed; the lock is gone afterwards;
    3. the same command on 4 devices (data=2, fsdp=2, tensor=1) resumes (the mesh may change)
       and logs for steps 5-8 the losses of the uninterrupted 1-device and 8-device runs.
       Tolerance 1e-4: other meshes sum in other orders (see test_training.py).
    """
    source, _ = runs.get("eight_fsdp")
    workdir = tmp_path / "run"
    continue_copy(source, workdir, HALF)
    mesh_4 = ["--config.mesh.data=2", "--config.mesh.fsdp=2", "--config.mesh.tensor=1"]
    host = socket.gethostname()

    holder = sleeper()
    try:
        lock = write_lock(workdir, host=host, pid=holder.pid, start_time="then")
        busy = train(workdir, cache_dir, *mesh_4, devices=4, check=False)
    finally:
        holder.kill()
        holder.wait()
    assert busy.returncode == 2, busy.stderr[-3000:]
    assert busy.stderr.strip().splitlines()[-1] == (
        f"error: {workdir} is in use by a training on host {host} pid {holder.pid}, since then "
        f"(lock {lock}); stop it or use another --workdir"
    )

    changed = train(workdir, cache_dir, *mesh_4, devices=4, steps=STEPS + 2, check=False)
    assert changed.returncode == 2, changed.stderr[-3000:]
    assert (
        f"took over the stale lock {lock} of host {host} pid {holder.pid} (gone)" in changed.stdout
    )
    errors = changed.stderr.strip().splitlines()[-2:]
    assert errors[0] == f"total_steps: {STEPS} -> {STEPS + 2}"
    assert errors[1].startswith(f"error: {workdir} has a checkpoint (step {HALF}) of another ")
    assert not lock.exists()  # Released by the refused run.

    resumed = train(workdir, cache_dir, *mesh_4, devices=4)
    assert f"resumed from {workdir / 'checkpoints'}/{HALF}" in resumed.stdout
    assert "mesh {'data': 2, 'fsdp': 2, 'tensor': 1} on 4 cpu devices" in resumed.stdout
    assert (
        "config differs from config.json (may change on resume): mesh.data: 1 -> 2; "
        "mesh.fsdp: 4 -> 2; mesh.tensor: 2 -> 1"
    ) in resumed.stdout
    assert not lock.exists()
    assert_continues(workdir, {"straight": runs.get("straight")[0], "eight_fsdp": source}, 1e-4)
    first, second = run_record.read_records(workdir)  # The refused starts left no record.
    assert first["mesh"] == {"data": 1, "fsdp": 4, "tensor": 2} and first["device_count"] == 8
    assert second["mesh"] == {"data": 2, "fsdp": 2, "tensor": 1} and second["device_count"] == 4
    assert second["resumed_from_step"] == HALF
    assert {c["key"] for c in second["config_changes"]} == {"mesh.data", "mesh.fsdp", "mesh.tensor"}


@pytest.mark.slow
def test_two_process_checkpoint_continues_in_one_process(runs, cache_dir, tmp_path):
    """The 2-process run (2 x 4 devices) at its step-4 checkpoint: a 2-process start refused by
    process 0 (workdir locked) stops both processes; continued by one process on one device,
    steps 5-8 log the losses of the 2-process run itself and of the 1-device run (the data
    position is the step; each process only read its rows of the global batch). Its
    config.json is first rewritten with the flat model keys of runs saved before the per-tower
    grouping: such a run still resumes."""
    source, _ = runs.get("two_processes")
    workdir = tmp_path / "run"
    continue_copy(source, workdir, HALF)
    # Both processes of a 2-process start stop when process 0 finds the workdir locked.
    holder = sleeper()
    try:
        lock = write_lock(workdir, host=socket.gethostname(), pid=holder.pid)
        busy = train(workdir, cache_dir, *MESH_8, launcher=TWO_PROCESSES, devices=None, check=False)
    finally:
        holder.kill()
        holder.wait()
    assert busy.returncode == 2, busy.stdout[-3000:]
    output = busy.stdout + busy.stderr
    assert f"[p0] error: {workdir} is in use by a training on host " in output
    assert f"[p1] error: process 0 refused to start in {workdir} (see its error)" in output
    lock.unlink()

    # As if written before the per-tower model grouping (flat model.vit_width, ...): the
    # run resumes as the same config, and config.json is rewritten grouped.
    saved = json.loads((workdir / "config.json").read_text())
    saved["model"] = legacy_flat(saved["model"])
    (workdir / "config.json").write_text(json.dumps(saved))
    mesh_1 = ["--config.mesh.data=1", "--config.mesh.fsdp=1", "--config.mesh.tensor=1"]
    resumed = train(workdir, cache_dir, *mesh_1)
    assert "vision" in json.loads((workdir / "config.json").read_text())["model"]
    assert f"resumed from {workdir / 'checkpoints'}/{HALF}" in resumed.stdout
    assert "mesh {'data': 1, 'fsdp': 1, 'tensor': 1} on 1 cpu devices" in resumed.stdout
    assert_continues(workdir, {"two_processes": source, "straight": runs.get("straight")[0]}, 1e-4)
    first, second = run_record.read_records(workdir)
    assert (first["process_count"], first["device_count"]) == (2, 8)
    assert (second["process_count"], second["device_count"]) == (1, 1)


# --- safe loading --------------------------------------------------------------------------

# Modules whose loaders run code from the data they read.
UNSAFE_MODULES = {
    "pickle",
    "_pickle",
    "cPickle",
    "dill",
    "cloudpickle",
    "shelve",
    "marshal",
    "jsonpickle",
    "joblib",
}
UNSAFE_CALLS = {  # (object name, attribute): why
    ("yaml", "load"): "yaml.load (use yaml.safe_load)",
    ("yaml", "unsafe_load"): "yaml.unsafe_load",
    ("yaml", "full_load"): "yaml.full_load",
    ("yaml", "load_all"): "yaml.load_all",
    ("torch", "load"): "torch.load (pickle)",
    ("pd", "read_pickle"): "pandas.read_pickle",
    ("pandas", "read_pickle"): "pandas.read_pickle",
}
UNSAFE_BUILTINS = {"eval", "exec", "compile", "__import__"}
# Where running code is the point: the config file the user passes (--config FILE.py).
ALLOWED = {
    ("mmjax/runtime/config.py", "exec_module"),
    # The open_clip converter reads the user's torch state dict with weights_only=True:
    # torch's restricted unpickler (tensors and containers only), as issue 8 specifies.
    ("mmjax/interop/open_clip.py", "torch.load (pickle)"),
}


def unsafe_loads(source: str, filename: str) -> list[str]:
    """Places in Python source that could run code hidden in data: 'file:line: what'."""
    found = []

    def flag(node, what):
        if (filename, what) not in ALLOWED:
            found.append(f"{filename}:{node.lineno}: {what}")

    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Import | ast.ImportFrom):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]
            for name in names:
                if name and name.split(".")[0] in UNSAFE_MODULES:
                    flag(node, f"import {name}")
        elif isinstance(node, ast.Call):
            func = node.func
            if isinstance(func, ast.Name) and func.id in UNSAFE_BUILTINS:
                flag(node, f"{func.id}()")
            if isinstance(func, ast.Attribute):
                owner = func.value.id if isinstance(func.value, ast.Name) else None
                if (owner, func.attr) in UNSAFE_CALLS:
                    flag(node, UNSAFE_CALLS[owner, func.attr])
                if func.attr == "exec_module":
                    flag(node, "exec_module")
            for keyword in node.keywords:
                if keyword.arg == "allow_pickle" and not (
                    isinstance(keyword.value, ast.Constant) and keyword.value.value is False
                ):
                    flag(node, "allow_pickle")
    return found


def test_nothing_in_mmjax_unpickles_or_evaluates_data():
    """Policy (BUILD_NOTES.md, "Safe loading"): checkpoints are orbax (tensorstore + JSON),
    tokenizers sentencepiece protobufs, configs JSON or the Python file the user passed,
    data records raw bytes decoded by PIL; nothing is unpickled or eval'ed. ast.literal_eval
    (command-line overrides, mixture specs) is allowed."""
    files = sorted(REPO.glob("mmjax/**/*.py")) + sorted(REPO.glob("configs/*.py"))
    assert len(files) > 30
    found = []
    for path in files:
        found += unsafe_loads(path.read_text(), str(path.relative_to(REPO)))
    assert found == [], "\n".join(found)


def test_the_safe_loading_scan_catches_each_unsafe_form():
    snippets = {
        "import pickle": "import pickle",
        "from cloudpickle import loads": "import cloudpickle",
        "import dill as d": "import dill",
        "x = np.load(path, allow_pickle=True)": "allow_pickle",
        "x = np.load(path, allow_pickle=flag)": "allow_pickle",
        "cfg = yaml.load(text)": "yaml.load (use yaml.safe_load)",
        "state = torch.load(f)": "torch.load (pickle)",
        "df = pd.read_pickle(p)": "pandas.read_pickle",
        "value = eval(text)": "eval()",
        "exec(code)": "exec()",
        "spec.loader.exec_module(m)": "exec_module",
    }
    for code, what in snippets.items():
        assert unsafe_loads(code, "mmjax/x.py") == [f"mmjax/x.py:1: {what}"], code
    safe = (
        "import ast, json, yaml\n"
        "v = ast.literal_eval(text)\n"
        "c = yaml.safe_load(text)\n"
        "a = np.load(path)\n"
        "b = np.load(path, allow_pickle=False)\n"
        "j = json.loads(text)\n"
        "out = jitted.lower(x).compile()\n"
    )
    assert unsafe_loads(safe, "mmjax/x.py") == []
    assert unsafe_loads("spec.loader.exec_module(m)", "mmjax/runtime/config.py") == []
