"""Multi-process (multi-host) initialisation, chosen from the environment.

`initialize()` is the first thing `mmjax train` and `mmjax evaluate` do. It reads the
environment (`plan`), and for a job of more than one process starts JAX's distributed
runtime. In order of precedence:

- explicit: `MMJAX_COORDINATOR=host:port`, `MMJAX_NUM_PROCESSES=N`, `MMJAX_PROCESS_ID=i`
  (all three or none), as set by `launch/multiprocess.sh` or by hand.
- a cluster JAX detects itself (`jax.distributed.initialize`'s cluster detection, which
  finds the coordinator, the process count and this process's id): an `srun` step of more
  than one task (SLURM), an Open MPI job of more than one rank, a multi-host TPU VM
  (`TPU_WORKER_HOSTNAMES` or `TPU_PROCESS_ADDRESSES` with several hosts,
  `MEGASCALE_COORDINATOR_ADDRESS`), or any environment JAX knows when `MMJAX_DISTRIBUTED=
  cluster` (`tpu` is the same switch, as `launch/tpu_pod.sh` sets it). JAX's own
  `JAX_COORDINATOR_PORT` picks the port.
- otherwise one process, and nothing is started.

What this module adds to JAX's detection:
- which environments are a multi-process job at all: a SLURM batch script outside `srun`,
  or a step of one task, stays one process (JAX would wait for peers that never start);
- SLURM's GPU layout: JAX gives each SLURM task the GPU `SLURM_LOCALID`. That is right for
  one process per GPU (several tasks per node, or `MMJAX_ONE_PROCESS_PER_DEVICE=1`); with
  one task per node the process takes every GPU of its node (`SLURM_GPUS_ON_NODE`, or the
  count in `CUDA_VISIBLE_DEVICES`);
- the explicit variables, checked first. JAX's own connect aborts the whole process (a
  C++ fatal error with a stack trace) when a peer never shows up, so on this path the
  processes first meet over a plain TCP socket on the coordinator's port: process 0
  listens until every other process has said hello, then releases them all and only then
  starts JAX's coordination service on the same port. A missing, duplicate or misconfigured
  process becomes a one-line `DistributedError` on every process within the timeout,
  naming the missing processes, instead of an abort or a hang.

`MMJAX_DISTRIBUTED=off` forces one process (e.g. an evaluation inside a SLURM step).
`MMJAX_INIT_TIMEOUT` (seconds, default 300) bounds the wait for the other processes.

`python -m mmjax.runtime.distributed` prints what this process would do (nothing is started).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import socket
import sys
import time
from collections.abc import Mapping
from typing import Literal

from mmjax.runtime import log

DEFAULT_TIMEOUT_S = 300.0
EXPLICIT_VARS = ("MMJAX_COORDINATOR", "MMJAX_NUM_PROCESSES", "MMJAX_PROCESS_ID")
_HELLO = "mmjax-hello"

Source = Literal["single", "explicit", "slurm", "ompi", "tpu", "cluster"]
# The cluster_detection_method jax.distributed.initialize is given (None: its own order).
_DETECTION = {"slurm": "slurm", "ompi": "ompi", "tpu": None, "cluster": None}


class DistributedError(RuntimeError):
    """A multi-process setup problem, explained in one line."""


@dataclasses.dataclass(frozen=True)
class DistributedInfo:
    # Both -1 for a detected cluster until JAX has initialised (it reads them itself).
    process_id: int
    num_processes: int
    coordinator: str | None  # host:port on the explicit path; None when single or JAX's.
    source: Source
    # The local accelerator ids this process uses, else None: JAX's choice.
    local_device_ids: tuple[int, ...] | None = None


_initialized: DistributedInfo | None = None


# ----------------------------------------------------------------------------- planning


def plan(env: Mapping[str, str] = os.environ) -> DistributedInfo:
    """What `initialize` would do for `env`. Pure; raises DistributedError."""
    mode = env.get("MMJAX_DISTRIBUTED", "auto").strip().lower() or "auto"
    if mode not in ("auto", "off", "cluster", "tpu"):
        raise DistributedError(
            f"MMJAX_DISTRIBUTED={env['MMJAX_DISTRIBUTED']!r} is invalid; allowed: auto, off, "
            "cluster (tpu)"
        )
    if mode == "off":
        return DistributedInfo(0, 1, None, "single")
    present = [name for name in EXPLICIT_VARS if env.get(name, "").strip()]
    if present:
        return _plan_explicit(env, present)
    if mode in ("cluster", "tpu"):
        return DistributedInfo(-1, -1, None, "tpu" if _on_tpu_pod(env) else "cluster")
    if _in_slurm_step(env) and _int(env, "SLURM_NTASKS", minimum=1) > 1:
        return _plan_slurm(env)
    if _int_or(env, "OMPI_COMM_WORLD_SIZE", 1) > 1:
        return DistributedInfo(-1, -1, None, "ompi")
    if _on_tpu_pod(env):
        return DistributedInfo(-1, -1, None, "tpu")
    return DistributedInfo(0, 1, None, "single")


def init_timeout(env: Mapping[str, str] = os.environ) -> float:
    """Seconds to wait for all processes (MMJAX_INIT_TIMEOUT, default 300)."""
    raw = env.get("MMJAX_INIT_TIMEOUT", "").strip()
    if not raw:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise DistributedError(f"MMJAX_INIT_TIMEOUT={raw!r} is invalid; allowed: seconds > 0")
    return value


def _int(env: Mapping[str, str], name: str, *, minimum: int) -> int:
    raw = env.get(name, "").strip()
    try:
        value = int(raw)
    except ValueError:
        raise DistributedError(f"{name}={raw!r} is not an integer") from None
    if value < minimum:
        raise DistributedError(f"{name}={value} is invalid; allowed: an integer >= {minimum}")
    return value


def _int_or(env: Mapping[str, str], name: str, default: int) -> int:
    return _int(env, name, minimum=0) if env.get(name, "").strip() else default


def _plan_explicit(env: Mapping[str, str], present: list[str]) -> DistributedInfo:
    missing = [name for name in EXPLICIT_VARS if name not in present]
    if missing:
        raise DistributedError(
            f"{', '.join(missing)} not set but {', '.join(present)} "
            f"{'is' if len(present) == 1 else 'are'}; set all of {', '.join(EXPLICIT_VARS)} "
            "or none"
        )
    coordinator = _check_address(env["MMJAX_COORDINATOR"].strip(), "MMJAX_COORDINATOR")
    num_processes = _int(env, "MMJAX_NUM_PROCESSES", minimum=1)
    process_id = _int(env, "MMJAX_PROCESS_ID", minimum=0)
    if process_id >= num_processes:
        raise DistributedError(
            f"MMJAX_PROCESS_ID={process_id} is out of range for "
            f"MMJAX_NUM_PROCESSES={num_processes}; allowed: 0..{num_processes - 1}"
        )
    return DistributedInfo(process_id, num_processes, coordinator, "explicit")


def _check_address(address: str, name: str) -> str:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise DistributedError(f"{name}={address!r} is invalid; expected host:port")
    return address


def _in_slurm_step(env: Mapping[str, str]) -> bool:
    # SLURM_STEP_NODELIST is set by srun, not in the batch script itself: a plain
    # `mmjax evaluate` in an sbatch script of 8 tasks stays one process. JAX's SLURM
    # detection needs the same variables.
    needed = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_PROCID", "SLURM_LOCALID")
    return all(env.get(name, "").strip() for name in needed)


def _plan_slurm(env: Mapping[str, str]) -> DistributedInfo:
    num_processes = _int(env, "SLURM_NTASKS", minimum=1)
    process_id = _int(env, "SLURM_PROCID", minimum=0)
    if process_id >= num_processes:
        raise DistributedError(f"SLURM_PROCID={process_id} >= SLURM_NTASKS={num_processes}")
    visible = env.get("CUDA_VISIBLE_DEVICES")
    per_device = _one_process_per_device(env)
    if visible is not None and len([v for v in visible.split(",") if v.strip()]) == 1:
        # srun --gpus-per-task / --gpu-bind narrowed the visible GPUs to one: that one is
        # local device 0, whatever SLURM_LOCALID says.
        local_ids: tuple[int, ...] | None = (0,)
    elif per_device:
        local_ids = None  # JAX's choice: the GPU SLURM_LOCALID.
    else:
        local_ids = tuple(range(_gpus_on_node(env))) or None
    return DistributedInfo(-1, -1, None, "slurm", local_ids)


def _one_process_per_device(env: Mapping[str, str]) -> bool:
    flag = env.get("MMJAX_ONE_PROCESS_PER_DEVICE", "").strip()
    if flag not in ("", "0", "1"):
        raise DistributedError(f"MMJAX_ONE_PROCESS_PER_DEVICE={flag!r} is invalid; allowed: 0, 1")
    if flag:
        return flag == "1"
    per_node = env.get("SLURM_NTASKS_PER_NODE") or env.get("SLURM_STEP_TASKS_PER_NODE") or ""
    # "8" or "4(x2),3": the most tasks on any node.
    counts = [int(n) for n in re.findall(r"(\d+)(?:\(x\d+\))?", per_node)]
    return max(counts, default=1) > 1


def _gpus_on_node(env: Mapping[str, str]) -> int:
    """GPUs SLURM gave this node's task (0: none, or not said)."""
    if env.get("SLURM_GPUS_ON_NODE", "").strip().isdigit():
        return int(env["SLURM_GPUS_ON_NODE"])
    visible = env.get("CUDA_VISIBLE_DEVICES", "")
    return len([v for v in visible.split(",") if v.strip()])


def _on_tpu_pod(env: Mapping[str, str]) -> bool:
    if env.get("MEGASCALE_COORDINATOR_ADDRESS", "").strip():
        return True
    hosts = env.get("TPU_PROCESS_ADDRESSES") or env.get("TPU_WORKER_HOSTNAMES") or ""
    return len([h for h in hosts.split(",") if h.strip()]) > 1


# ----------------------------------------------------------------------------- rendezvous


def _split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def _waited(timeout_s: float) -> str:
    return f"within {timeout_s:g}s (MMJAX_INIT_TIMEOUT)"


def _recv_line(conn: socket.socket, deadline: float) -> str | None:
    """One '\\n'-terminated line, or None on EOF / timeout."""
    data = b""
    while not data.endswith(b"\n") and len(data) < 4096:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return None
        conn.settimeout(remaining)
        try:
            chunk = conn.recv(4096)
        except (TimeoutError, OSError):
            return None
        if not chunk:
            return None
        data += chunk
    return data.decode("utf-8", "replace").strip()


def _listen(port: int) -> socket.socket:
    # Every interface, like JAX's own coordinator (bind address [::]:port).
    if socket.has_dualstack_ipv6():
        return socket.create_server(
            ("", port), family=socket.AF_INET6, dualstack_ipv6=True, reuse_port=False
        )
    return socket.create_server(("", port))


def _rendezvous_chief(info: DistributedInfo, timeout_s: float) -> None:
    """Process 0: waits until every other process has said hello, then releases them."""
    start = time.monotonic()
    deadline = start + timeout_s
    _, port = _split_address(info.coordinator)
    try:
        server = _listen(port)
    except OSError as e:
        raise DistributedError(
            f"process 0 of {info.num_processes} cannot listen on port {port} of the coordinator "
            f"{info.coordinator}: {e.strerror or e}"
        ) from None
    peers: dict[int, socket.socket] = {}
    try:
        with server:
            while len(peers) < info.num_processes - 1:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                server.settimeout(remaining)
                try:
                    conn, _ = server.accept()
                except TimeoutError:
                    break
                hello = _recv_line(conn, min(deadline, time.monotonic() + 10))
                problem = _check_hello(hello, info, peers)
                if problem:
                    ours = bool(hello and hello.startswith(_HELLO))
                    for other in [conn, *peers.values()] if ours else []:
                        _send(other, f"error {problem}")
                    conn.close()
                    if not ours:
                        continue  # Not one of ours (a port scanner, a health check): ignore.
                    raise DistributedError(f"process 0 of {info.num_processes}: {problem}")
                peers[int(hello.split()[1])] = conn
        # The listener is closed: JAX's service can take the port.
        missing = sorted(set(range(1, info.num_processes)) - set(peers))
        if missing:
            for conn in peers.values():
                _send(conn, "missing " + ",".join(map(str, missing)))
            raise DistributedError(
                f"process 0 of {info.num_processes}: {_plural(missing)} did not reach the "
                f"coordinator {info.coordinator} {_waited(timeout_s)}; is every process started?"
            )
        for conn in peers.values():
            _send(conn, "go")
        # Peers hang up first, so the port's TIME_WAIT connections are on their side.
        for conn in peers.values():
            _recv_line(conn, time.monotonic() + 5)
    finally:
        for conn in peers.values():
            conn.close()


def _check_hello(hello: str | None, info: DistributedInfo, peers: dict) -> str | None:
    parts = (hello or "").split()
    if len(parts) != 3 or parts[0] != _HELLO or not (parts[1] + parts[2]).isdigit():
        return f"unexpected greeting {hello!r} on the coordinator port"
    pid, count = int(parts[1]), int(parts[2])
    if count != info.num_processes:
        return (
            f"process {pid} expects {count} processes but process 0 expects "
            f"{info.num_processes}; give every process the same count"
        )
    if not 0 < pid < info.num_processes:
        return f"process id {pid} is out of range 1..{info.num_processes - 1}"
    if pid in peers:
        return f"two processes claim process id {pid}; give each process its own id"
    return None


def _send(conn: socket.socket, line: str) -> None:
    try:
        conn.sendall((line + "\n").encode())
    except OSError:
        pass  # The peer is gone; it will find out on its own.


def _plural(ids: list[int]) -> str:
    return f"process{'es' if len(ids) > 1 else ''} {', '.join(map(str, ids))}"


def _rendezvous_peer(info: DistributedInfo, timeout_s: float) -> None:
    """Process i > 0: connects to process 0 (retrying until the timeout), waits for 'go'."""
    start = time.monotonic()
    deadline = start + timeout_s
    host, port = _split_address(info.coordinator)
    who = f"process {info.process_id} of {info.num_processes}"
    unreachable = (
        f"{who} could not reach the coordinator {info.coordinator} {_waited(timeout_s)}; "
        "is every process started?"
    )
    conn = None
    while conn is None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise DistributedError(unreachable)
        try:
            conn = socket.create_connection((host, port), timeout=min(remaining, 5.0))
        except OSError:  # Refused (not listening yet), unresolvable host, timeout: retry.
            time.sleep(min(0.2, max(deadline - time.monotonic(), 0)))
    with conn:
        _send(conn, f"{_HELLO} {info.process_id} {info.num_processes}")
        reply = _recv_line(conn, deadline)
        if reply == "go":
            return
        if reply and reply.startswith("missing "):
            missing = [int(i) for i in reply.split()[1].split(",")]
            raise DistributedError(
                f"{who}: {_plural(missing)} did not reach the coordinator {info.coordinator} "
                f"{_waited(timeout_s)}; is every process started?"
            )
        if reply and reply.startswith("error "):
            raise DistributedError(f"{who}: {reply[len('error ') :]}")
        if reply is None and time.monotonic() >= deadline:
            raise DistributedError(
                f"{who} reached the coordinator {info.coordinator} but not every process "
                f"joined {_waited(timeout_s)}; is every process started?"
            )
        raise DistributedError(
            f"{who}: the coordinator {info.coordinator} hung up or answered {reply!r}; "
            "is process 0 running mmjax, and is the port free of other services?"
        )


# ----------------------------------------------------------------------------- initialize


_barriers = 0


def align_processes(what: str, timeout_s: float = 1800.0) -> None:
    """Waits until every process gets here (no-op with one process).

    Uses the coordination service, not a device collective. Call it before the first
    collective of a phase: gloo gives a new group of processes a fixed 30 s to set up its
    connections, which a process still compiling on a loaded host can miss; aligned, they
    enter together. Every process must make the same sequence of calls. JAX exposes the
    service's barrier only on its internal client, so without it this falls back to a
    device-collective sync.
    """
    import jax

    if jax.process_count() == 1:
        return
    global _barriers
    _barriers += 1
    name = f"mmjax_{_barriers}_{what}"
    try:
        from jax._src import distributed as jax_distributed

        client = jax_distributed.global_state.client
    except (ImportError, AttributeError):
        client = None
    if client is None:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
        return
    client.wait_at_barrier(name, int(timeout_s * 1000))


def initialize(
    env: Mapping[str, str] = os.environ, *, timeout_s: float | None = None
) -> DistributedInfo:
    """Starts JAX's distributed runtime when `env` describes a multi-process job.

    Call before any other JAX call that touches devices. A second call returns the
    first call's result. Raises DistributedError (one line).
    """
    global _initialized
    if _initialized is not None:
        return _initialized
    info = plan(env)
    timeout_s = init_timeout(env) if timeout_s is None else float(timeout_s)
    if info.source == "single" or info.num_processes == 1:
        _initialized = info
        return info

    import jax

    # CPU processes exchange collectives over gloo (harmless for accelerators).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    local_ids = list(info.local_device_ids) if info.local_device_ids else None
    if info.source == "explicit":
        if info.process_id == 0:
            _rendezvous_chief(info, timeout_s)
        else:
            _rendezvous_peer(info, timeout_s)
        jax.distributed.initialize(
            coordinator_address=info.coordinator,
            num_processes=info.num_processes,
            process_id=info.process_id,
            # Everything is given: keep JAX from second-guessing it (its SLURM detection
            # would otherwise pin each process to one GPU).
            cluster_detection_method="deactivate",
            initialization_timeout=math.ceil(timeout_s),
        )
    else:
        try:
            jax.distributed.initialize(
                local_device_ids=local_ids,
                cluster_detection_method=_DETECTION[info.source],
                initialization_timeout=math.ceil(timeout_s),
            )
        except (RuntimeError, ValueError) as e:
            message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            if "coordinator_address" in message:
                message = "JAX detected no cluster environment it knows (SLURM, Open MPI, TPU...)"
            raise DistributedError(f"{info.source} initialisation failed: {message}") from None
        info = dataclasses.replace(
            info, process_id=jax.process_index(), num_processes=jax.process_count()
        )
    _initialized = info
    log.set_process(info.process_id)
    if info.process_id == 0:
        where = f"coordinator {info.coordinator}" if info.coordinator else "found by JAX"
        log.info(
            f"distributed: {info.num_processes} processes ({info.source}, {where}), "
            f"{jax.device_count()} devices"
        )
    return info


def main(argv: list[str] | None = None) -> int:
    """Prints the plan of this process (takes no arguments)."""
    if argv:
        print(f"error: mmjax distributed takes no arguments, got {argv[0]!r}", file=sys.stderr)
        return 2
    try:
        info, timeout_s = plan(), init_timeout()
    except DistributedError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    fields = ", ".join(f"{k}={v}" for k, v in dataclasses.asdict(info).items())
    print(f"{fields}, timeout_s={timeout_s:g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
