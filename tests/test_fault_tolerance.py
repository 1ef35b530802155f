"""Crash safety: preemption (SIGTERM/SIGINT), SIGKILL at any moment, damaged checkpoints.

Fast tests drive `Checkpointer` and `StopRequests` in-process on small trees.
The slow ones run the real CLI (`python -m mmjax.train`) on the tiny settings of
tests/runs.py and kill it from outside while watching its metrics file and
checkpoint directory; the final parameters are compared bit for bit with the
shared uninterrupted run "straight" (8 steps, a checkpoint every 4).
"""

import gc
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.runtime.checkpoint import COMMIT_MARKER, Checkpointer, CheckpointError, RestoreFailed
from mmjax.runtime.preemption import StopRequests
from tests.runs import MESH_8, REPO, STEPS, TWO_PROCESSES, env_for, train_args
from tests.test_training import assert_trees_equal, restore

NEEDS = {
    "test_killed_and_preempted_run_ends_with_the_uninterrupted_params": ("straight",),
    "test_truncated_latest_checkpoint_falls_back_to_the_previous_one": ("straight",),
    "test_two_processes_stop_together_on_sigterm_to_one": ("two_processes",),
}


# --- Checkpointer: damaged checkpoints, unfinished saves, retention order -------------------


def small_state(scale: float, size: int = 1000):
    return {"a": jnp.arange(size, dtype=jnp.float32) * scale, "b": {"c": jnp.ones((50, 50))}}


def abstract(state):
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state
    )


def largest_file(directory: Path) -> Path:
    return max((p for p in directory.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def truncate_data(step_dir: Path) -> None:
    path = largest_file(step_dir / "state")
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)


DAMAGE = {
    "truncated_array_file": (truncate_data, r"OUT_OF_RANGE|DATA_LOSS|size"),
    "missing_array_metadata": (
        lambda d: (d / "state" / "_METADATA").unlink(),
        r"state/_METADATA is missing",
    ),
    "missing_ocdbt_manifest": (
        lambda d: (d / "state" / "manifest.ocdbt").unlink(),
        r"state/manifest.ocdbt is missing",
    ),
    "garbled_ocdbt_manifest": (
        lambda d: (d / "state" / "manifest.ocdbt").write_bytes(b"garbage" * 10),
        r"DATA_LOSS",
    ),
    "array_files_overwritten": (
        lambda d: [p.write_bytes(b"x" * p.stat().st_size) for p in (d / "state").rglob("d/*")],
        r"decompress|Unknown frame|DATA_LOSS",
    ),
    "missing_meta_json": (lambda d: (d / "data" / "metadata").unlink(), r"data/metadata"),
    "missing_state_item": (lambda d: shutil.rmtree(d / "state"), r"item 'state' is missing"),
    "missing_data_item": (lambda d: shutil.rmtree(d / "data"), r"item 'data' is missing"),
    "missing_commit_marker": (lambda d: (d / COMMIT_MARKER).unlink(), COMMIT_MARKER),
    "garbled_step_metadata": (
        lambda d: (d / "_CHECKPOINT_METADATA").write_text("{"),
        r"_CHECKPOINT_METADATA",
    ),
}


@pytest.fixture
def three_checkpoints(tmp_path):
    directory = tmp_path / "ckpt"
    checkpointer = Checkpointer(directory, async_save=False)
    for step in (4, 8, 12):
        checkpointer.save(step, small_state(step), batch_size=2)
    checkpointer.close()
    return directory


@pytest.fixture
def collect_orbax_reads():
    """orbax leaves the sibling reads of a failed restore to the garbage collector, which
    reports them as unraisable exceptions in whatever test runs next: collect them here."""
    yield
    gc.collect()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.usefixtures("collect_orbax_reads")
@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_latest_checkpoint_is_reported_and_the_previous_one_used(damage, three_checkpoints):
    spoil, reason = DAMAGE[damage]
    spoil(three_checkpoints / "12")
    checkpointer = Checkpointer(three_checkpoints)
    warnings = []
    step, state, meta, skipped = checkpointer.restore_latest(
        abstract(small_state(1)), warn=warnings.append
    )
    checkpointer.close()
    assert (step, skipped, meta["step"]) == (8, [12], 8)
    np.testing.assert_array_equal(state["a"], np.arange(1000, dtype=np.float32) * 8)
    assert len(warnings) == 1
    match = re.fullmatch(r"checkpoint 12 in (.+) is unreadable \((.+)\); using 8", warnings[0])
    assert match and match[1] == str(three_checkpoints), warnings[0]
    assert re.search(reason, match[2]), match[2]


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.usefixtures("collect_orbax_reads")
def test_fallback_goes_newest_to_oldest_then_fails_in_one_line(three_checkpoints):
    truncate_data(three_checkpoints / "12")
    (three_checkpoints / "8" / COMMIT_MARKER).unlink()
    checkpointer = Checkpointer(three_checkpoints)
    warnings = []
    step, _, _, skipped = checkpointer.restore_latest(
        abstract(small_state(1)), warn=warnings.append
    )
    assert (step, skipped) == (4, [12, 8])
    assert [w.split(" is unreadable")[0] for w in warnings] == [
        f"checkpoint 12 in {three_checkpoints}",
        f"checkpoint 8 in {three_checkpoints}",
    ]
    assert all(w.endswith("; using 4") for w in warnings)

    # Set aside, the bad ones stop being steps; the run can write those steps again.
    moved = [checkpointer.set_aside(bad) for bad in skipped]
    assert [p.name for p in moved] == ["12.unreadable", "8.unreadable"]
    assert checkpointer.all_steps() == [4]
    checkpointer.save(8, small_state(80), batch_size=2)
    checkpointer.wait()
    assert checkpointer.all_steps() == [4, 8]

    shutil.rmtree(three_checkpoints / "4" / "state")
    truncate_data(three_checkpoints / "8")
    with pytest.raises(CheckpointError) as error:
        checkpointer.restore_latest(abstract(small_state(1)), warn=warnings.append)
    checkpointer.close()
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith(f"no readable checkpoint in {three_checkpoints}: 8 (")
    assert "; 4 (item 'state' is missing)" in message


# Failures that are not damage: the restore stops with the real message, nothing set aside.
NOT_DAMAGE = {
    "permission": (PermissionError(13, "Permission denied", "/x"), "PermissionError"),
    "io_error": (OSError(5, "Input/output error"), "Input/output error"),
    "memory": (MemoryError(), "MemoryError"),
    "transient_storage": (ValueError("UNAVAILABLE: connection reset by peer"), "UNAVAILABLE"),
}


@pytest.mark.parametrize("kind", sorted(NOT_DAMAGE))
def test_a_restore_error_that_is_not_damage_stops_and_sets_nothing_aside(
    kind, three_checkpoints, monkeypatch
):
    error, text = NOT_DAMAGE[kind]
    checkpointer = Checkpointer(three_checkpoints)

    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(checkpointer._manager, "restore", fail)
    warnings = []
    with pytest.raises(RestoreFailed) as raised:
        checkpointer.restore_latest(abstract(small_state(1)), warn=warnings.append)
    checkpointer.close()
    message = str(raised.value)
    assert message.startswith(f"cannot restore checkpoint 12 in {three_checkpoints}: ")
    assert text in message and "nothing was set aside" in message and "\n" not in message
    assert warnings == []  # No fallback to 8: the error was not evidence of damage.
    assert sorted(p.name for p in three_checkpoints.iterdir()) == ["12", "4", "8"]


@pytest.mark.usefixtures("collect_orbax_reads")
def test_a_tree_that_does_not_match_is_not_damage(three_checkpoints):
    checkpointer = Checkpointer(three_checkpoints)
    wrong = abstract(small_state(1, size=999))  # Another model: "a" has another shape.
    with pytest.raises(RestoreFailed, match=r"cannot restore checkpoint 12 .*shape"):
        checkpointer.restore_latest(wrong)
    checkpointer.close()
    assert (three_checkpoints / "12").is_dir()


def test_parameters_only_restore_refuses_another_model(tmp_path):
    checkpointer = Checkpointer(tmp_path / "ckpt", async_save=False)
    checkpointer.save(1, {"params": {"w": jnp.ones((4, 3))}, "opt": jnp.zeros(2)}, batch_size=1)
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    tree = lambda **shapes: {
        k: jax.ShapeDtypeStruct(v, jnp.float32, sharding=sharding) for k, v in shapes.items()
    }
    np.testing.assert_array_equal(checkpointer.restore_params(1, tree(w=(4, 3)))["w"], 1.0)
    with pytest.raises(RestoreFailed, match=r"shape: \(5, 3\) is not compatible"):
        checkpointer.restore_params(1, tree(w=(5, 3)))
    # A partial restore would hand back the missing parameter as the abstract leaf.
    with pytest.raises(RestoreFailed, match=r"no parameter \['v'\] \(1 missing\)"):
        checkpointer.restore_params(1, tree(w=(4, 3), v=(2,)))
    checkpointer.close()


def test_relative_checkpoint_directory(three_checkpoints, monkeypatch):
    monkeypatch.chdir(three_checkpoints.parent)
    checkpointer = Checkpointer(three_checkpoints.name)  # "ckpt": relative to the cwd.
    assert checkpointer.directory == three_checkpoints
    step, state, _, _ = checkpointer.restore_latest(abstract(small_state(1)))
    checkpointer.close()
    assert step == 12
    np.testing.assert_array_equal(state["a"], np.arange(1000, dtype=np.float32) * 12)
    # Parameters only, as inference and init_from read them.
    saver = Checkpointer("params_only", async_save=False)
    saver.save(0, {"params": small_state(3)}, batch_size=0)
    params = saver.restore_params(0, abstract(small_state(1)))
    saver.close()
    np.testing.assert_array_equal(params["a"], np.arange(1000, dtype=np.float32) * 3)


def test_unfinished_save_is_ignored_removed_and_its_step_saved_again(three_checkpoints):
    # What a process killed mid-save leaves: orbax's tmp directory, half written.
    leftover = three_checkpoints / "16.orbax-checkpoint-tmp"
    shutil.copytree(three_checkpoints / "12", leftover)
    (leftover / COMMIT_MARKER).unlink()
    truncate_data(leftover)
    checkpointer = Checkpointer(three_checkpoints)
    assert checkpointer.all_steps() == [4, 8, 12]
    assert checkpointer.remove_incomplete() == [leftover.name]
    assert not leftover.exists()
    assert checkpointer.remove_incomplete() == []
    checkpointer.save(16, small_state(16), batch_size=2)
    checkpointer.wait()
    step, state, _, _ = checkpointer.restore_latest(abstract(small_state(1)))
    checkpointer.close()
    assert step == 16
    np.testing.assert_array_equal(state["a"], np.arange(1000, dtype=np.float32) * 16)


def test_keep_one_deletes_the_old_checkpoint_only_after_the_new_one_commits(tmp_path):
    """Watches the directory during an async save with max_to_keep=1: at every moment one
    complete checkpoint exists, and the old one goes only once the new one is committed."""
    directory = tmp_path / "ckpt"
    checkpointer = Checkpointer(directory, max_to_keep=1)
    size = 4 << 20  # 16 MiB of float32: the save lasts long enough to be seen in flight.
    checkpointer.save(4, small_state(4, size), batch_size=2)
    checkpointer.wait()
    checkpointer.save(8, small_state(8, size), batch_size=2)
    seen_in_flight = 0
    while True:
        names = set(os.listdir(directory))
        complete = {n for n in names if n.isdigit() and checkpointer.check(int(n)) is None}
        if "8.orbax-checkpoint-tmp" in names:
            seen_in_flight += 1
            assert "4" in complete, names
        assert complete, names
        if "4" not in names:
            break
        time.sleep(0.002)
    checkpointer.wait()
    assert seen_in_flight > 0  # Otherwise this test watched nothing.
    assert checkpointer.all_steps() == [8] and sorted(os.listdir(directory)) == ["8"]
    checkpointer.close()


# --- StopRequests -------------------------------------------------------------------------


@pytest.fixture
def python_sigint():
    """Python's own SIGINT handler during the test, whatever the worker process had."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.mark.usefixtures("python_sigint")
def test_signals_stop_at_the_next_step_and_handlers_are_restored():
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    asked = []
    with StopRequests(lambda step: asked.append(step) or False, first_step=3, verbose=False) as s:
        assert not s.synced  # One process: no JAX preemption sync manager.
        assert not s.should_stop(4)
        signal.raise_signal(signal.SIGTERM)
        assert s.signal_name == "SIGTERM"
        signal.raise_signal(signal.SIGINT)  # A second signal is noted, not a KeyboardInterrupt.
        signal.raise_signal(signal.SIGTERM)
        assert s.should_stop(5) and s.stop_step == 5
    assert {sig: signal.getsignal(sig) for sig in before} == before
    with StopRequests(lambda step: False, first_step=0, verbose=False) as s:
        signal.raise_signal(signal.SIGINT)
        assert s.signal_name == "SIGINT" and s.should_stop(1)
    with pytest.raises(KeyboardInterrupt):  # Python's own handler is back.
        signal.raise_signal(signal.SIGINT)


# --- The CLI under SIGTERM / SIGKILL ------------------------------------------------------


def train_process(workdir, cache_dir, *extra, launcher=(), devices=1) -> subprocess.Popen:
    args = train_args(workdir, *extra)
    return subprocess.Popen(
        [*launcher, sys.executable, "-m", "mmjax.train", *map(str, args)],
        cwd=REPO,
        env=env_for(cache_dir, devices),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # A process group: a failed test leaves no processes behind.
    )


def stop_group(proc: subprocess.Popen) -> tuple[str, str]:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    return proc.communicate()


def readable(text: str) -> str:
    """The end of `text` without XLA's and gloo's log lines."""
    noise = re.compile(r"^(\[p\d\] )?([WI]\d{4} |\[Gloo\])")
    return "\n".join(line for line in text.splitlines() if not noise.match(line))[-4000:]


def logged_steps(workdir: Path) -> list[int]:
    try:
        lines = (workdir / "metrics.jsonl").read_text().splitlines(keepends=True)
    except FileNotFoundError:
        return []
    return [json.loads(line)["step"] for line in lines if line.endswith("\n")]


def wait_until(condition, proc: subprocess.Popen, what: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None or time.monotonic() > deadline:
            out, err = stop_group(proc)
            raise AssertionError(
                f"exit code {proc.returncode} waiting for {what}\n{readable(out)}\n{readable(err)}"
            )
        time.sleep(0.005)


def finish(proc: subprocess.Popen, timeout: float = 300) -> tuple[str, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        out, err = stop_group(proc)
    assert proc.returncode == 0, f"exit code {proc.returncode}\n{readable(out)}\n{readable(err)}"
    return out, err


def complete_steps(workdir: Path) -> list[int]:
    checkpointer = Checkpointer(workdir / "checkpoints")
    try:
        return [s for s in checkpointer.all_steps() if checkpointer.check(s) is None]
    finally:
        checkpointer.close()


@pytest.mark.slow
def test_killed_and_preempted_run_ends_with_the_uninterrupted_params(tmp_path, runs, cache_dir):
    """One run of the shared 8-step settings (keep_checkpoints=1), interrupted three ways and
    restarted each time with the same command, ends bitwise equal to "straight":

    1. SIGTERM once step 1 is logged: exit 0, a checkpoint at the step it stopped at, one
       line saying so and how to resume.
    2. SIGKILL once step k is logged (k random in 2..7 past that checkpoint, fixed seed):
       mid-step, or mid-save when k is a checkpoint step.
    3. SIGKILL while the step-8 checkpoint is being written (its tmp directory exists): the
       previous checkpoint, the only one kept, survives; the next start removes the tmp
       directory and resumes from it.
    """
    straight_dir, _ = runs.get("straight")
    workdir = tmp_path / "run"
    workdir.mkdir()
    shutil.copy(straight_dir / "tokenizer.model", workdir)  # Saves training it again.
    extra = ("--config.keep_checkpoints=1",)

    proc = train_process(workdir, cache_dir, *extra)
    wait_until(lambda: 1 in logged_steps(workdir), proc, "step 1")
    proc.send_signal(signal.SIGTERM)
    out, err = finish(proc)
    stopped = re.findall(
        r"^\[mmjax\] preempted at step (\d+), checkpoint saved in (\S+); "
        r"to resume, rerun the same command: python -m mmjax\.train ",
        out,
        re.M,
    )
    assert len(stopped) == 1, readable(out) + readable(err)
    preempted = int(stopped[0][0])
    assert stopped[0][1] == str(workdir / "checkpoints" / str(preempted))
    assert 1 <= preempted < 6, out  # Far from the end, or the rest of the test has no room.
    assert complete_steps(workdir) == [preempted]
    assert logged_steps(workdir) == list(range(1, preempted + 1))  # Flushed up to the stop.
    assert "step 8:" not in out  # No evaluation on the way out.

    kill_step = random.Random(0).randint(max(2, preempted + 1), 7)
    proc = train_process(workdir, cache_dir, *extra)
    wait_until(lambda: kill_step in logged_steps(workdir), proc, f"step {kill_step}")
    proc.kill()
    proc.communicate()
    # One checkpoint (keep 1), or two if the kill fell between a commit and the deletion.
    survivors = complete_steps(workdir)
    assert survivors and max(survivors) <= kill_step, survivors

    proc = train_process(workdir, cache_dir, *extra)
    tmp8 = workdir / "checkpoints" / "8.orbax-checkpoint-tmp"
    wait_until(tmp8.exists, proc, "the step-8 save")
    proc.kill()
    proc.communicate()
    assert tmp8.exists() and not (workdir / "checkpoints" / "8").exists()  # Killed mid-save.
    kept = complete_steps(workdir)  # keep=1 must not have deleted it for the unfinished 8.
    assert kept and max(survivors) <= max(kept) < 8, (survivors, kept)
    previous = max(kept)

    out, _ = finish(train_process(workdir, cache_dir, *extra))
    assert f"removed the unfinished save {tmp8}" in out
    assert f"resumed from {workdir / 'checkpoints'}/{previous}\n" in out
    assert sorted(os.listdir(workdir / "checkpoints")) == ["8"]
    assert logged_steps(workdir)[:STEPS] == list(range(1, STEPS + 1))
    step_a, state_a = restore(straight_dir)
    step_b, state_b = restore(workdir)
    assert step_a == step_b == STEPS
    assert_trees_equal(state_a, state_b)  # params, optimizer moments, rng, step


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.usefixtures("collect_orbax_reads")
def test_truncated_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, runs, capsys):
    straight_dir, _ = runs.get("straight")
    workdir = tmp_path / "copy"
    shutil.copytree(straight_dir, workdir)
    truncate_data(workdir / "checkpoints" / "8")
    step, state = restore(workdir)
    lines = [line for line in capsys.readouterr().out.splitlines() if "unreadable" in line]
    assert len(lines) == 1, lines
    assert re.fullmatch(
        rf"\[mmjax\] checkpoint 8 in {re.escape(str(workdir / 'checkpoints'))} is unreadable "
        r"\(.*(OUT_OF_RANGE|DATA_LOSS).*\); using 4",
        lines[0],
    ), lines[0]
    assert step == 4 and int(state.step) == 4
    assert_trees_equal(state, restore(straight_dir, 4)[1])


def process_pids(workdir: Path, process_id: int) -> list[int]:
    """The python processes of `workdir`'s multi-process run with MMJAX_PROCESS_ID=i."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if (
            b"mmjax.train" in cmdline
            and str(workdir).encode() in cmdline
            and f"MMJAX_PROCESS_ID={process_id}".encode() in environ
            and Path(cmdline[0].decode()).name.startswith("python")
        ):
            pids.append(int(entry.name))
    return pids


@pytest.mark.slow
def test_two_processes_stop_together_on_sigterm_to_one(tmp_path, runs, cache_dir):
    """SIGTERM to process 1 only: JAX's preemption sync manager makes both processes stop
    after the same step, save it together and exit 0."""
    source, _ = runs.get("two_processes")
    workdir = tmp_path / "two"
    shutil.copytree(source, workdir, ignore=shutil.ignore_patterns("8", ".lock"))
    metrics = workdir / "metrics.jsonl"
    kept = [line for line in metrics.read_text().splitlines(True) if json.loads(line)["step"] <= 4]
    metrics.write_text("".join(kept))
    events = set((workdir / "tensorboard").iterdir())
    proc = train_process(workdir, cache_dir, *MESH_8, launcher=TWO_PROCESSES, devices=None)
    # A new TensorBoard file: the run has restored and is about to train (its first step,
    # which sets up the collectives, takes seconds). Later, with steps of a fraction of a
    # second, the processes could reach step 8 before they have agreed on a stop.
    wait_until(lambda: set((workdir / "tensorboard").iterdir()) - events, proc, "the loop")
    pids = process_pids(workdir, 1)
    if len(pids) != 1:
        out, err = stop_group(proc)
        raise AssertionError(f"process 1 is not one process: {pids}\n{readable(err)}")
    os.kill(pids[0], signal.SIGTERM)
    out, err = finish(proc)
    stopped = re.findall(r"^\[p0\] \[mmjax\] preempted at step (\d+), checkpoint saved", out, re.M)
    assert len(stopped) == 1, readable(out) + readable(err)
    preempted = int(stopped[0])
    assert 4 < preempted < STEPS
    assert not re.search(r"^\[p1\] \[mmjax\] preempted", out, re.M)  # Process 0 speaks.
    assert complete_steps(workdir) == [4, preempted]
    assert logged_steps(workdir)[-1] == preempted
