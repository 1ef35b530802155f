"""Multi-process initialisation (mmjax.runtime.distributed) and the launchers in launch/.

- What `plan()` decides from an environment: explicit / SLURM / TPU / single, and the
  one-line errors for incomplete or bad settings; SLURM host-list expansion.
- The start-up rendezvous in threads of this process: all meet, a count mismatch, a
  duplicate id, a missing peer (each side gets a one-line DistributedError, no hang).
- The real CLIs with one process of a two-process job: exit 2 within the timeout with the
  one-line message, both for process 0 and for process 1 (JAX alone would abort).
- The launchers' --dry-run output (no gcloud or srun is ever run), and multiprocess.sh
  running real processes: prefixes, the first failure's exit code, the others stopped.
- slow: two real processes (explicit and simulated-SLURM env) joined by JAX; and training
  as 2 processes x 4 devices, which must log the losses of 1 process x 8 devices and of
  1 device, write metrics only from process 0, and leave a checkpoint that restores.
"""

from __future__ import annotations

import json
import os
import shlex
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from mmjax.runtime import distributed
from mmjax.runtime.distributed import DistributedError, DistributedInfo, plan
from tests.runs import LOSS_KEYS, STEPS, train_lines

REPO = Path(__file__).resolve().parents[1]
EXPLICIT = dict(MMJAX_COORDINATOR="host0:1234", MMJAX_NUM_PROCESSES="4", MMJAX_PROCESS_ID="2")
SLURM_STEP = dict(
    SLURM_JOB_ID="777",
    SLURM_STEP_ID="0",
    SLURM_NTASKS="4",
    SLURM_PROCID="3",
    SLURM_LOCALID="1",
    SLURM_STEP_NODELIST="gpu[07-08]",
    SLURM_JOB_NODELIST="gpu[07-08],login1",
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without any multi-process or forced-device settings, plus `extra`."""
    drop = ("MMJAX_", "SLURM_", "OMPI_", "TPU_", "MEGASCALE_", "XLA_FLAGS", "JAX_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO), **extra)
    return env


# --- plan(): what the environment asks for ---------------------------------------------------


def test_single_process_by_default():
    assert plan({}) == DistributedInfo(0, 1, None, "single")
    assert plan({"HOME": "/root", "PATH": "/bin"}).source == "single"


def test_explicit_environment():
    assert plan(EXPLICIT) == DistributedInfo(2, 4, "host0:1234", "explicit")
    ipv6 = plan(dict(EXPLICIT, MMJAX_COORDINATOR="[fd00::1]:8476"))
    assert ipv6.coordinator == "[fd00::1]:8476"
    # Explicit settings win over a SLURM step around them.
    assert plan({**SLURM_STEP, **EXPLICIT}).source == "explicit"


@pytest.mark.parametrize(
    "missing", ["MMJAX_COORDINATOR", "MMJAX_NUM_PROCESSES", "MMJAX_PROCESS_ID"]
)
def test_partial_explicit_environment_names_the_missing_variable(missing):
    env = {k: v for k, v in EXPLICIT.items() if k != missing}
    with pytest.raises(DistributedError) as e:
        plan(env)
    message = str(e.value)
    assert message.startswith(f"{missing} not set but "), message
    assert "\n" not in message


@pytest.mark.parametrize(
    "name, value, expected",
    [
        ("MMJAX_COORDINATOR", "host0", "MMJAX_COORDINATOR='host0' is invalid; expected host:port"),
        ("MMJAX_COORDINATOR", "host0:99999", "MMJAX_COORDINATOR='host0:99999' is invalid"),
        ("MMJAX_COORDINATOR", ":1234", "MMJAX_COORDINATOR=':1234' is invalid"),
        ("MMJAX_NUM_PROCESSES", "two", "MMJAX_NUM_PROCESSES='two' is not an integer"),
        ("MMJAX_NUM_PROCESSES", "0", "MMJAX_NUM_PROCESSES=0 is invalid"),
        ("MMJAX_PROCESS_ID", "-1", "MMJAX_PROCESS_ID=-1 is invalid"),
        ("MMJAX_PROCESS_ID", "4", "MMJAX_PROCESS_ID=4 is out of range for MMJAX_NUM_PROCESSES=4"),
    ],
)
def test_bad_explicit_values_name_the_variable(name, value, expected):
    with pytest.raises(DistributedError, match="^" + expected.replace("[", r"\[")):
        plan(dict(EXPLICIT, **{name: value}))


def test_slurm_step_is_left_to_jax_cluster_detection():
    # JAX reads SLURM_PROCID / SLURM_NTASKS and the step's first host itself.
    assert plan(SLURM_STEP) == DistributedInfo(-1, -1, None, "slurm", None)
    with pytest.raises(DistributedError, match="^SLURM_PROCID=4 >= SLURM_NTASKS=4"):
        plan(dict(SLURM_STEP, SLURM_PROCID="4"))


def test_slurm_gpu_layout():
    # Several tasks per node (from srun or the job), or asked for: JAX's SLURM_LOCALID pin.
    assert plan(dict(SLURM_STEP, SLURM_NTASKS_PER_NODE="2")).local_device_ids is None
    assert plan(dict(SLURM_STEP, SLURM_STEP_TASKS_PER_NODE="2(x2)")).local_device_ids is None
    assert plan(dict(SLURM_STEP, MMJAX_ONE_PROCESS_PER_DEVICE="1")).local_device_ids is None
    # One task per node: every GPU of the node, not JAX's GPU SLURM_LOCALID.
    per_node = dict(SLURM_STEP, SLURM_NTASKS_PER_NODE="1", SLURM_GPUS_ON_NODE="8")
    assert plan(per_node).local_device_ids == tuple(range(8))
    visible = dict(SLURM_STEP, MMJAX_ONE_PROCESS_PER_DEVICE="0", CUDA_VISIBLE_DEVICES="4,5,6")
    assert plan(visible).local_device_ids == (0, 1, 2)
    assert plan(dict(SLURM_STEP, SLURM_NTASKS_PER_NODE="1")).local_device_ids is None  # CPUs.
    # srun bound one GPU per task: it is local device 0 whatever SLURM_LOCALID says.
    bound = dict(SLURM_STEP, MMJAX_ONE_PROCESS_PER_DEVICE="1", CUDA_VISIBLE_DEVICES="3")
    assert plan(bound).local_device_ids == (0,)
    with pytest.raises(DistributedError, match="^MMJAX_ONE_PROCESS_PER_DEVICE='yes' is invalid"):
        plan(dict(SLURM_STEP, MMJAX_ONE_PROCESS_PER_DEVICE="yes"))


def test_slurm_outside_a_step_or_single_task_is_single_process():
    # The batch script itself (no srun step): e.g. a plain evaluation after training.
    batch_script = {k: v for k, v in SLURM_STEP.items() if k != "SLURM_STEP_NODELIST"}
    assert plan(batch_script).source == "single"
    assert plan(dict(SLURM_STEP, SLURM_NTASKS="1", SLURM_PROCID="0")).source == "single"


def test_open_mpi_and_tpu_pod_detection():
    assert plan({"OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_RANK": "1"}).source == "ompi"
    assert plan({"OMPI_COMM_WORLD_SIZE": "1"}).source == "single"
    assert plan({"TPU_WORKER_HOSTNAMES": "t1,t2,t3,t4"}).source == "tpu"
    assert plan({"TPU_PROCESS_ADDRESSES": "a:1,b:1"}).source == "tpu"
    assert plan({"MEGASCALE_COORDINATOR_ADDRESS": "t1"}).source == "tpu"
    assert plan({"MMJAX_DISTRIBUTED": "tpu"}).source == "cluster"
    assert plan({"MMJAX_DISTRIBUTED": "cluster"}) == DistributedInfo(-1, -1, None, "cluster")
    assert plan({"TPU_WORKER_HOSTNAMES": "t1"}).source == "single"  # A single-host TPU VM.


def test_forced_cluster_that_jax_cannot_find_is_one_line(monkeypatch):
    """MMJAX_DISTRIBUTED=cluster on a machine that is no cluster: JAX's detection finds
    nothing, and the error says so in one line (no JAX traceback)."""
    code = (
        "from mmjax.runtime import distributed\n"
        "try:\n"
        "    distributed.initialize()\n"
        "except distributed.DistributedError as e:\n"
        "    print('ERR', e)\n"
    )
    env = clean_env(MMJAX_DISTRIBUTED="cluster", MMJAX_INIT_TIMEOUT="5")
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    line = proc.stdout.strip().splitlines()[-1]
    assert line.startswith("ERR cluster initialisation failed: JAX detected no cluster"), line


def test_mmjax_distributed_switch():
    assert plan(dict(SLURM_STEP, MMJAX_DISTRIBUTED="off")).source == "single"
    assert plan(dict(EXPLICIT, MMJAX_DISTRIBUTED="off")).source == "single"
    with pytest.raises(DistributedError, match="^MMJAX_DISTRIBUTED='mpi' is invalid"):
        plan({"MMJAX_DISTRIBUTED": "mpi"})


def test_init_timeout():
    assert distributed.init_timeout({}) == 300.0
    assert distributed.init_timeout({"MMJAX_INIT_TIMEOUT": "7.5"}) == 7.5
    for bad in ("0", "-3", "soon", "nan"):
        with pytest.raises(DistributedError, match="^MMJAX_INIT_TIMEOUT="):
            distributed.init_timeout({"MMJAX_INIT_TIMEOUT": bad})


def test_initialize_single_process_does_nothing_and_is_idempotent(monkeypatch):
    monkeypatch.setattr(distributed, "_initialized", None)
    first = distributed.initialize({})
    assert first == DistributedInfo(0, 1, None, "single")
    # A second call returns the first result without reading the environment again.
    assert distributed.initialize({"MMJAX_COORDINATOR": "broken"}) is first


def test_plan_cli_prints_the_plan(monkeypatch, capsys):
    for key in list(os.environ):
        if key.startswith(("MMJAX_", "SLURM_", "OMPI_", "TPU_", "MEGASCALE_")):
            monkeypatch.delenv(key)
    for key, value in {**SLURM_STEP, "MMJAX_INIT_TIMEOUT": "9"}.items():
        monkeypatch.setenv(key, value)
    assert distributed.main() == 0
    assert capsys.readouterr().out.strip() == (
        "process_id=-1, num_processes=-1, coordinator=None, source=slurm, "
        "local_device_ids=None, timeout_s=9"
    )
    monkeypatch.setenv("MMJAX_PROCESS_ID", "1")
    assert distributed.main() == 2
    assert capsys.readouterr().err.startswith("error: MMJAX_COORDINATOR, MMJAX_NUM_PROCESSES not")


# --- the rendezvous, in threads --------------------------------------------------------------


def rendezvous(infos: list[DistributedInfo], timeout_s: float):
    """Runs each info's side of the rendezvous in a thread; returns (exception|None, seconds)."""
    results: list = [None] * len(infos)

    def side(i, info):
        start = time.monotonic()
        try:
            if info.process_id == 0:
                distributed._rendezvous_chief(info, timeout_s)
            else:
                distributed._rendezvous_peer(info, timeout_s)
            results[i] = (None, time.monotonic() - start)
        except DistributedError as e:
            results[i] = (e, time.monotonic() - start)

    threads = [threading.Thread(target=side, args=(i, info)) for i, info in enumerate(infos)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=timeout_s + 15)
        assert not t.is_alive(), "rendezvous hung"
    return results


def job(port: int, n: int, ids) -> list[DistributedInfo]:
    return [DistributedInfo(i, n, f"localhost:{port}", "explicit") for i in ids]


def test_rendezvous_all_processes_meet():
    results = rendezvous(job(free_port(), 3, [2, 0, 1]), timeout_s=10)
    assert [error for error, _ in results] == [None, None, None]
    assert all(seconds < 5 for _, seconds in results)


def test_rendezvous_missing_peer_fails_every_side_within_the_timeout():
    port = free_port()
    results = rendezvous(job(port, 3, [0, 1]), timeout_s=2)
    (chief, chief_s), (peer, peer_s) = results
    assert str(chief) == (
        f"process 0 of 3: process 2 did not reach the coordinator localhost:{port} "
        "within 2s (MMJAX_INIT_TIMEOUT); is every process started?"
    )
    # The peer either sees the chief's verdict or times out on its own first.
    assert str(peer) in (
        f"process 1 of 3: process 2 did not reach the coordinator localhost:{port} "
        "within 2s (MMJAX_INIT_TIMEOUT); is every process started?",
        f"process 1 of 3 reached the coordinator localhost:{port} but not every process "
        "joined within 2s (MMJAX_INIT_TIMEOUT); is every process started?",
    )
    assert 1.5 < chief_s < 6 and peer_s < 6


def test_rendezvous_peer_without_coordinator():
    port = free_port()
    ((error, seconds),) = rendezvous(job(port, 2, [1]), timeout_s=1.5)
    assert str(error) == (
        f"process 1 of 2 could not reach the coordinator localhost:{port} within 1.5s "
        "(MMJAX_INIT_TIMEOUT); is every process started?"
    )
    assert 1.4 < seconds < 6


def test_rendezvous_rejects_a_process_count_mismatch():
    port = free_port()
    infos = [*job(port, 2, [0]), *job(port, 3, [1])]
    (chief, _), (peer, _) = rendezvous(infos, timeout_s=5)
    assert "process 1 expects 3 processes but process 0 expects 2" in str(chief)
    assert str(peer).startswith("process 1 of 3: process 1 expects 3 processes")


def test_rendezvous_rejects_a_duplicate_process_id():
    results = rendezvous(job(free_port(), 3, [0, 1, 1]), timeout_s=5)
    errors = [str(error) for error, _ in results]
    assert all("two processes claim process id 1" in e for e in errors), errors


def test_rendezvous_ignores_strangers_on_the_port():
    """A health check that connects first and says something else is hung up on."""
    port = free_port()
    chief_info, peer_info = job(port, 2, [0, 1])
    chief = threading.Thread(target=distributed._rendezvous_chief, args=(chief_info, 10))
    chief.start()
    deadline = time.monotonic() + 5
    while True:
        try:
            stranger = socket.create_connection(("localhost", port), timeout=5)
            break
        except OSError:
            assert time.monotonic() < deadline, "process 0 never listened"
            time.sleep(0.05)
    with stranger:
        stranger.sendall(b"GET / HTTP/1.0\r\n\r\n")
        assert stranger.recv(100) == b""  # Closed without a word.
    distributed._rendezvous_peer(peer_info, 10)  # Still welcome after the stranger.
    chief.join(timeout=15)
    assert not chief.is_alive()


# --- the CLIs with a missing peer ------------------------------------------------------------


def test_missing_peer_gives_the_timeout_error_not_a_hang(tmp_path):
    """One process of a 2-process job, for each side, through the real CLIs: exit 2 with
    one line on stderr within ~the timeout (JAX alone aborts with a C++ stack trace)."""
    port = free_port()
    procs = {}
    for pid in (0, 1):
        env = clean_env(
            MMJAX_COORDINATOR=f"localhost:{port + pid}",  # Each alone: its own port.
            MMJAX_NUM_PROCESSES="2",
            MMJAX_PROCESS_ID=str(pid),
            MMJAX_INIT_TIMEOUT="5",
        )
        argv = ["-m", "mmjax.train", "--config", "configs/coca.py:size=tiny"]
        argv += ["--workdir", str(tmp_path / f"p{pid}")]
        procs[pid] = (
            time.monotonic(),
            subprocess.Popen(
                [sys.executable, *argv], cwd=REPO, env=env, stderr=subprocess.PIPE, text=True
            ),
        )
    for pid, (start, proc) in procs.items():
        try:
            _, err = proc.communicate(timeout=60)
        finally:
            proc.kill()
        elapsed = time.monotonic() - start
        address = f"localhost:{port + pid}"
        expected = {
            0: f"error: process 0 of 2: process 1 did not reach the coordinator {address} "
            "within 5s (MMJAX_INIT_TIMEOUT); is every process started?",
            1: f"error: process 1 of 2 could not reach the coordinator {address} within 5s "
            "(MMJAX_INIT_TIMEOUT); is every process started?",
        }[pid]
        assert proc.returncode == 2, err[-3000:]
        assert err.strip().splitlines() == [expected]
        assert elapsed < 55, elapsed  # Ends by itself (no hang), even on a loaded machine.
        assert not (tmp_path / f"p{pid}").exists()  # Nothing ran.


def test_evaluate_cli_reports_bad_environment(tmp_path):
    env = clean_env(MMJAX_COORDINATOR="localhost:1", MMJAX_PROCESS_ID="0")
    proc = subprocess.run(
        [sys.executable, "-m", "mmjax.evaluate", "--workdir", str(tmp_path)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        "error: MMJAX_NUM_PROCESSES not set but MMJAX_COORDINATOR, MMJAX_PROCESS_ID are; "
        "set all of MMJAX_COORDINATOR, MMJAX_NUM_PROCESSES, MMJAX_PROCESS_ID or none"
    )


# --- launchers -------------------------------------------------------------------------------


def run_script(args, env=None, timeout=60):
    return subprocess.run(
        ["bash", *map(str, args)],
        cwd=REPO,
        env=env or clean_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture
def no_cloud_tools(tmp_path):
    """PATH with gcloud/srun/scontrol stubs that record any call (there must be none)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "calls.log"
    for tool in ("gcloud", "srun", "scontrol", "sbatch"):
        stub = bin_dir / tool
        stub.write_text(f'#!/bin/sh\necho "{tool} $*" >> {log}\nexit 97\n')
        stub.chmod(0o755)
    env = clean_env(PATH=f"{bin_dir}:{os.environ['PATH']}")
    yield env
    assert not log.exists(), log.read_text()


def test_multiprocess_dry_run(no_cloud_tools):
    cmd = [sys.executable, "-m", "mmjax.train", "--workdir", "runs/a b"]
    proc = run_script(["launch/multiprocess.sh", "--dry-run", "3", "2", "--", *cmd], no_cloud_tools)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 3
    ports = set()
    for i, line in enumerate(lines):
        words = shlex.split(line)
        env = dict(w.split("=", 1) for w in words[:5])
        assert env["MMJAX_PROCESS_ID"] == str(i)
        assert env["MMJAX_NUM_PROCESSES"] == "3"
        assert env["JAX_PLATFORMS"] == "cpu"
        assert env["XLA_FLAGS"] == "--xla_force_host_platform_device_count=2"
        host, port = env["MMJAX_COORDINATOR"].split(":")
        assert host == "localhost" and 0 < int(port) < 65536
        ports.add(port)
        assert words[5:] == cmd
    assert len(ports) == 1  # One coordinator for all.


def test_multiprocess_keeps_existing_xla_flags():
    env = clean_env(XLA_FLAGS="--xla_dump_to=/tmp/x")
    proc = run_script(["launch/multiprocess.sh", "--dry-run", "1", "--", "true"], env)
    words = shlex.split(proc.stdout)
    assert "XLA_FLAGS=--xla_dump_to=/tmp/x --xla_force_host_platform_device_count=1" in words


@pytest.mark.parametrize(
    "args", [["0", "--", "true"], ["2", "x", "--", "true"], ["2"], ["1", "2", "3", "--", "true"]]
)
def test_multiprocess_bad_arguments(args):
    proc = run_script(["launch/multiprocess.sh", *args])
    assert proc.returncode == 2
    assert "usage: bash launch/multiprocess.sh" in proc.stderr


def test_multiprocess_runs_prefixes_and_stops_the_rest_on_failure():
    # Process 1 fails first (code 5); process 0 would sleep for a minute.
    script = 'echo "out $MMJAX_PROCESS_ID of $MMJAX_NUM_PROCESSES"; echo err >&2; '
    script += '[ "$MMJAX_PROCESS_ID" = 1 ] && exit 5; sleep 60'
    start = time.monotonic()
    proc = run_script(["launch/multiprocess.sh", "2", "--", "bash", "-c", script], timeout=50)
    assert time.monotonic() - start < 20
    assert proc.returncode == 5
    assert sorted(proc.stdout.splitlines()) == ["[p0] out 0 of 2", "[p1] out 1 of 2"]
    assert "[p0] err" in proc.stderr and "[p1] err" in proc.stderr
    assert "a process exited with code 5; stopping the others" in proc.stderr

    ok = run_script(["launch/multiprocess.sh", "3", "--", "bash", "-c", "exit 0"])
    assert ok.returncode == 0, ok.stderr


def ssh_commands(stdout: str) -> list[str]:
    """The --command strings of the printed `gcloud ... ssh` lines."""
    out = []
    for line in stdout.splitlines():
        words = shlex.split(line) if line.startswith("gcloud") else []
        if words[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh"]:
            assert "--worker=all" in words, line
            out.append(words[words.index("--command") + 1])
    return out


def test_tpu_pod_dry_run(no_cloud_tools):
    train_args = [
        "--config",
        "configs/coca.py:size=base",
        "--workdir",
        "/mnt/shared/run 1",
        "--config.data.train=[('wds:/a/{0..9}.tar', 0.8)]",
    ]
    proc = run_script(
        [
            "launch/tpu_pod.sh",
            "--name",
            "pod1",
            "--zone",
            "us-east5-a",
            "--accelerator-type",
            "v5p-64",
            "--project",
            "proj",
            "--dry-run",
            "--",
            *train_args,
        ],
        no_cloud_tools,
    )
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert (
        "gcloud compute tpus tpu-vm create pod1 --zone us-east5-a --project proj "
        "--accelerator-type v5p-64 --version v2-alpha-tpuv5"
    ) in out
    assert "gcloud compute tpus tpu-vm describe pod1" in out
    assert "gcloud compute tpus tpu-vm scp /tmp/mmjax-pod1.tar.gz pod1:mmjax.tar.gz" in out
    commands = ssh_commands(out)
    assert len(commands) == 3  # unpack, install, train
    assert "pip install -q -e '.[gcs]' 'jax[tpu]'" in commands[1]
    # The remote shell gets exactly the training arguments back.
    remote = shlex.split(commands[2])
    start = remote.index("-m")
    assert remote[start - 2 : start + 2] == [
        "MMJAX_DISTRIBUTED=tpu",
        ".venv/bin/python",
        "-m",
        "mmjax.train",
    ]
    assert remote[start + 2 :] == train_args


def test_tpu_pod_dry_run_with_repo_and_errors(no_cloud_tools):
    base = ["launch/tpu_pod.sh", "--name", "p", "--zone", "z", "--accelerator-type", "v4-32"]
    proc = run_script(
        [*base, "--repo", "https://example.com/mmjax.git", "--skip-install", "--dry-run", "--"]
        + ["--config", "c"],
        no_cloud_tools,
    )
    assert proc.returncode == 0, proc.stderr
    assert "--version tpu-ubuntu2204-base" in proc.stdout
    commands = ssh_commands(proc.stdout)
    assert len(commands) == 2  # clone, train
    assert "git clone https://example.com/mmjax.git ~/mmjax" in commands[0]
    assert "scp" not in proc.stdout and "pip install" not in proc.stdout

    missing = run_script([*base[:3], "--dry-run", "--", "x"], no_cloud_tools)
    assert missing.returncode == 2 and "error: --zone is required" in missing.stderr
    no_args = run_script([*base, "--dry-run"], no_cloud_tools)
    assert no_args.returncode == 2 and "no mmjax.train arguments" in no_args.stderr


SLURM_ALLOCATION = dict(
    SLURM_JOB_ID="4242",
    SLURM_JOB_NUM_NODES="2",
    SLURM_GPUS_PER_NODE="h100:4",
    SLURM_CPUS_ON_NODE="32",
    SLURM_JOB_NODELIST="node[01-02]",
    SLURM_SUBMIT_DIR=str(REPO),
)


@pytest.mark.parametrize(
    "mode, tasks, cpus, per_device", [("node", 1, 32, "0"), ("gpu", 4, 8, "1")]
)
def test_slurm_dry_run(no_cloud_tools, mode, tasks, cpus, per_device):
    env = dict(no_cloud_tools, **SLURM_ALLOCATION, MMJAX_PROCESS_MODE=mode)
    env["MMJAX_COORDINATOR"] = "stale:1"  # Left over in the submitting shell: ignored.
    args = ["--config", "configs/coca.py:size=base", "--workdir", "/shared/run"]
    proc = run_script(["launch/slurm.sbatch", "--dry-run", *args], env)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert f"export MMJAX_ONE_PROCESS_PER_DEVICE={per_device}" in lines
    assert "export JAX_COORDINATOR_PORT=24242" in lines  # 20000 + job id mod 20000
    srun = shlex.split(lines[-1])
    assert srun[:6] == [
        "srun",
        "--nodes=2",
        f"--ntasks-per-node={tasks}",
        f"--cpus-per-task={cpus}",
        "--kill-on-bad-exit=1",
        "--label",
    ]
    assert srun[6].endswith("python") or srun[6].endswith("python3")
    assert srun[7:] == ["-m", "mmjax.train", *args]
    assert "stale" not in proc.stdout

    same = run_script(["launch/slurm.sbatch", *args], dict(env, MMJAX_DRY_RUN="1"))
    assert same.returncode == 0 and same.stdout == proc.stdout


def test_slurm_bad_mode(no_cloud_tools):
    env = dict(no_cloud_tools, **SLURM_ALLOCATION, MMJAX_PROCESS_MODE="host")
    proc = run_script(["launch/slurm.sbatch", "--dry-run", "--workdir", "x"], env)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: MMJAX_PROCESS_MODE=host is invalid; allowed: node, gpu"


# --- real multi-process runs -----------------------------------------------------------------

_JOIN = """
import json, sys
import numpy as np
from mmjax.runtime import distributed
first = distributed.initialize()
again = distributed.initialize()  # Idempotent: no second JAX initialisation.
import jax
from jax.experimental import multihost_utils
ids = multihost_utils.process_allgather(np.array([jax.process_index()]), tiled=True)
print(json.dumps(dict(source=first.source, same=again is first, pid=jax.process_index(),
                      count=jax.process_count(), devices=jax.device_count(),
                      local=jax.local_device_count(), gathered=np.asarray(ids).tolist())))
"""


@pytest.mark.slow
def test_two_processes_join_through_the_launcher():
    proc = run_script(
        ["launch/multiprocess.sh", "2", "2", "--", sys.executable, "-c", _JOIN],
        clean_env(MMJAX_INIT_TIMEOUT="60"),
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = {}
    for line in proc.stdout.splitlines():
        tag, _, rest = line.partition(" ")
        if rest.startswith("{"):
            # gloo's C++ log lines go to the same stdout unbuffered and can land right after
            # the JSON on one line: read the leading JSON object only.
            results[tag] = json.JSONDecoder().raw_decode(rest)[0]
    for pid in (0, 1):
        assert results[f"[p{pid}]"] == dict(
            source="explicit", same=True, pid=pid, count=2, devices=4, local=2, gathered=[0, 1]
        )
    logged = [line for line in proc.stdout.splitlines() if "[mmjax] distributed:" in line]
    assert len(logged) == 1, logged  # Once, from process 0.
    assert logged[0].startswith("[p0] [mmjax] distributed: 2 processes (explicit, coordinator ")
    assert logged[0].endswith("), 4 devices")


@pytest.mark.slow
def test_two_processes_join_from_a_slurm_step_environment():
    """The SLURM path for real: two processes that see only srun's variables."""
    port = str(free_port())
    procs = []
    for pid in (0, 1):
        env = clean_env(
            SLURM_JOB_ID="1",
            SLURM_STEP_ID="0",
            SLURM_NTASKS="2",
            SLURM_PROCID=str(pid),
            SLURM_LOCALID=str(pid),
            SLURM_STEP_NODELIST="localhost",
            JAX_COORDINATOR_PORT=port,
            MMJAX_INIT_TIMEOUT="60",
        )
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", _JOIN],
                cwd=REPO,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    try:
        outputs = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for pid, (p, (out, err)) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0, err[-3000:]
        result = json.loads(out.strip().splitlines()[-1])
        assert (result["source"], result["pid"], result["count"]) == ("slurm", pid, 2)
        assert result["gathered"] == [0, 1]
    assert "distributed: 2 processes (slurm, found by JAX), 2 devices" in outputs[0][0]


def restored_params(workdir: Path):
    from mmjax.runtime.config import from_json_file
    from mmjax.training.trainer import Trainer

    config = from_json_file(workdir / "config.json")
    config.mesh.data = config.mesh.fsdp = config.mesh.tensor = 1  # Onto this one device.
    trainer = Trainer(config, workdir, existing_tokenizer=True)
    try:
        assert trainer.restore() == STEPS
        return jax.device_get(trainer.state.params)
    finally:
        trainer.close()


NEEDS = {"test_two_processes_train_like_one": ("two_processes", "eight", "straight")}


@pytest.mark.slow
def test_two_processes_train_like_one(runs):
    """2 processes x 4 devices = 1 process x 8 devices = 1 device, step by step.

    The shared runs of tests/runs.py: `launch/multiprocess.sh 2 4 -- python -m
    mmjax.train ...` against the same run on 8 forced devices and on 1 device. 2x4
    and 1x8 run the same sharded program (only the collectives' transport
    differs), so their losses agree to float rounding (1e-5); the 1-device run sums
    in another order (1e-4, see test_training.py for the bound).
    """
    workdir, two = runs.get("two_processes")
    losses = {
        name: {k: [r[k] for r in train_lines(runs.get(name)[0])] for k in LOSS_KEYS}
        for name in ("two_processes", "eight", "straight")
    }
    assert len(losses["two_processes"]["loss"]) == STEPS
    for key in LOSS_KEYS:
        np.testing.assert_allclose(
            losses["two_processes"][key], losses["eight"][key], rtol=1e-5, err_msg=key
        )
        np.testing.assert_allclose(
            losses["two_processes"][key], losses["straight"][key], rtol=1e-4, err_msg=key
        )

    stdout, stderr = two.stdout, two.stderr
    assert "[p0] [mmjax] distributed: 2 processes (explicit, coordinator localhost:" in stdout
    assert "[p0] [mmjax] mesh {'data': 2, 'fsdp': 2, 'tensor': 2} on 8 cpu devices" in stdout
    # Process 1 trains and evaluates silently: no logs, bars, eval lines or summary.
    quiet = [line for line in (stdout + stderr).splitlines() if line.startswith("[p1]")]
    assert not [
        line for line in quiet if "[mmjax]" in line or f"step {STEPS}:" in line or "train:" in line
    ]
    # Files written once (process 0), and checkpoints both processes saved.
    assert json.loads((workdir / "config.json").read_text())["batch_size"] == 16
    assert (workdir / "tokenizer.model").is_file()
    assert (workdir / "checkpoints" / str(STEPS) / "commit_success.txt").is_file()
    assert {"checkpoints", "config.json", "metrics.jsonl", "tensorboard", "tokenizer.model"} <= {
        p.name for p in workdir.iterdir()
    }
    # The 2-process checkpoint restores here (one device) to the 8-device run's weights.
    a, b = restored_params(workdir), restored_params(runs.get("eight")[0])
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-5)
