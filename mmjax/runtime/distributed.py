"""Multi-process (multi-host) initialisation, chosen from the environment.

`initialize()` is the first thing `mmjax.train` and `mmjax.evaluate` do. It reads the
environment (`plan`), and for a job of more than one process starts JAX's distributed
runtime. In order of precedence:

- explicit: `MMJAX_COORDINATOR=host:port`, `MMJAX_NUM_PROCESSES=N`, `MMJAX_PROCESS_ID=i`
  (all three or none), as set by `launch/multiprocess.sh` or by hand.
- SLURM: inside an `srun` step of more than one task. Process id `SLURM_PROCID`, count
  `SLURM_NTASKS`, coordinator the first host of the step's node list, port
  `MMJAX_COORDINATOR_PORT` (default 12355). With one process per GPU
  (`MMJAX_ONE_PROCESS_PER_DEVICE=1`, or more than one task per node) each process takes
  the GPU `SLURM_LOCALID`; otherwise a process uses all GPUs of its node.
- TPU pod: a multi-host TPU VM (`TPU_WORKER_HOSTNAMES` or `TPU_PROCESS_ADDRESSES` with
  more than one host, `MEGASCALE_COORDINATOR_ADDRESS`, or `MMJAX_DISTRIBUTED=tpu`, which
  `launch/tpu_pod.sh` sets); JAX detects the rest from the TPU metadata.
- otherwise one process, and nothing is started.

`MMJAX_DISTRIBUTED=off` forces one process (e.g. an evaluation inside a SLURM step).
`MMJAX_INIT_TIMEOUT` (seconds, default 300) bounds the wait for the other processes.

JAX's own connect aborts the whole process (a C++ fatal error with a stack trace) when a
peer never shows up. So for the explicit and SLURM paths the processes first meet over a
plain TCP socket on the coordinator's port: process 0 listens until every other process
has said hello, then releases them all and only then starts JAX's coordination service
on the same port. A missing, duplicate or misconfigured process becomes a one-line
`DistributedError` on every process within the timeout instead of an abort or a hang.

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

DEFAULT_SLURM_PORT = 12355
DEFAULT_TIMEOUT_S = 300.0
EXPLICIT_VARS = ("MMJAX_COORDINATOR", "MMJAX_NUM_PROCESSES", "MMJAX_PROCESS_ID")
_HELLO = "mmjax-hello"

Source = Literal["single", "explicit", "slurm", "tpu"]


class DistributedError(RuntimeError):
    """A multi-process setup problem, explained in one line."""


@dataclasses.dataclass(frozen=True)
class DistributedInfo:
    # Both -1 in a TPU plan: JAX reads them from the TPU runtime when it initialises.
    process_id: int
    num_processes: int
    coordinator: str | None  # host:port; None when single or left to JAX (TPU).
    source: Source
    # The local accelerator ids this process uses (one process per GPU), else None: all.
    local_device_ids: tuple[int, ...] | None = None


_initialized: DistributedInfo | None = None


# ----------------------------------------------------------------------------- planning


def plan(env: Mapping[str, str] = os.environ) -> DistributedInfo:
    """What `initialize` would do for `env`. Pure; raises DistributedError."""
    mode = env.get("MMJAX_DISTRIBUTED", "auto").strip().lower() or "auto"
    if mode not in ("auto", "off", "tpu"):
        raise DistributedError(
            f"MMJAX_DISTRIBUTED={env['MMJAX_DISTRIBUTED']!r} is invalid; allowed: auto, off, tpu"
        )
    if mode == "off":
        return DistributedInfo(0, 1, None, "single")
    present = [name for name in EXPLICIT_VARS if env.get(name, "").strip()]
    if present:
        return _plan_explicit(env, present)
    if mode != "tpu" and _in_slurm_step(env) and _int(env, "SLURM_NTASKS", minimum=1) > 1:
        return _plan_slurm(env)
    if mode == "tpu" or _on_tpu_pod(env):
        # Process id and count come from the TPU runtime once JAX is initialised.
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
    # SLURM_STEP_ID is set by srun, not in the batch script itself: a plain
    # `python -m mmjax.evaluate` in an sbatch script of 8 tasks stays one process.
    return bool(env.get("SLURM_JOB_ID")) and bool(env.get("SLURM_STEP_ID", env.get("SLURM_STEPID")))


def _plan_slurm(env: Mapping[str, str]) -> DistributedInfo:
    num_processes = _int(env, "SLURM_NTASKS", minimum=1)
    process_id = _int(env, "SLURM_PROCID", minimum=0)
    if process_id >= num_processes:
        raise DistributedError(f"SLURM_PROCID={process_id} >= SLURM_NTASKS={num_processes}")
    for name in ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST"):
        if env.get(name, "").strip():
            hosts = expand_nodelist(env[name].strip(), name)
            break
    else:
        raise DistributedError("SLURM_JOB_NODELIST is not set inside a SLURM job step")
    port = env.get("MMJAX_COORDINATOR_PORT", "").strip() or str(DEFAULT_SLURM_PORT)
    coordinator = _check_address(f"{hosts[0]}:{port}", "MMJAX_COORDINATOR_PORT")
    local_ids = None
    if _one_process_per_device(env):
        local_ids = (_int(env, "SLURM_LOCALID", minimum=0),)
    return DistributedInfo(process_id, num_processes, coordinator, "slurm", local_ids)


def _one_process_per_device(env: Mapping[str, str]) -> bool:
    flag = env.get("MMJAX_ONE_PROCESS_PER_DEVICE", "").strip()
    if flag not in ("", "0", "1"):
        raise DistributedError(f"MMJAX_ONE_PROCESS_PER_DEVICE={flag!r} is invalid; allowed: 0, 1")
    if flag:
        wanted = flag == "1"
    else:
        per_node = env.get("SLURM_NTASKS_PER_NODE") or env.get("SLURM_STEP_TASKS_PER_NODE") or ""
        # "8" or "4(x2),3": the most tasks on any node.
        counts = [int(n) for n in re.findall(r"(\d+)(?:\(x\d+\))?", per_node)]
        wanted = max(counts, default=1) > 1
    # srun --gpus-per-task / --gpu-bind already narrowed the visible GPUs to one:
    # that one is local device 0, so there is nothing to choose.
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and len([v for v in visible.split(",") if v.strip()]) == 1:
        return False
    return wanted


def expand_nodelist(nodelist: str, name: str = "SLURM_JOB_NODELIST") -> list[str]:
    """SLURM's compact host list -> host names: 'node[001-003,007],gpu12' ->
    ['node001', 'node002', 'node003', 'node007', 'gpu12']. Bracket groups may appear
    anywhere in a name and more than once ('r[1-2]n[01-02]'); zero padding is kept."""
    hosts: list[str] = []
    for item in _split_top_level(nodelist, name):
        names = [""]
        for match in re.finditer(r"([^\[\]]*)(?:\[([^\[\]]*)\])?", item):
            literal, group = match[1], match[2]
            choices = [""] if group is None else _expand_range_group(group, nodelist, name)
            names = [prefix + literal + choice for prefix in names for choice in choices]
        hosts.extend(names)
    if not hosts or any(not h for h in hosts):
        raise DistributedError(f"{name}={nodelist!r} is not a valid SLURM host list")
    return hosts


def _split_top_level(nodelist: str, name: str) -> list[str]:
    items, depth, start = [], 0, 0
    for i, ch in enumerate(nodelist):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        if depth not in (0, 1):
            raise DistributedError(f"{name}={nodelist!r} has unbalanced brackets")
        if ch == "," and depth == 0:
            items.append(nodelist[start:i])
            start = i + 1
    if depth:
        raise DistributedError(f"{name}={nodelist!r} has unbalanced brackets")
    items.append(nodelist[start:])
    return [item.strip() for item in items if item.strip()]


def _expand_range_group(group: str, nodelist: str, name: str) -> list[str]:
    out = []
    for part in group.split(","):
        match = re.fullmatch(r"\s*(\d+)(?:-(\d+))?\s*", part)
        if not match:
            raise DistributedError(f"{name}={nodelist!r}: bad range {part!r} in [{group}]")
        lo, hi = match[1], match[2] or match[1]
        if int(hi) < int(lo):
            raise DistributedError(f"{name}={nodelist!r}: empty range {part!r} in [{group}]")
        out.extend(str(n).zfill(len(lo)) for n in range(int(lo), int(hi) + 1))
    return out


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
    enter together. Every process must make the same sequence of calls.
    """
    import jax

    if jax.process_count() == 1:
        return
    from jax._src import distributed as jax_distributed

    global _barriers
    _barriers += 1
    client = jax_distributed.global_state.client
    client.wait_at_barrier(f"mmjax_{_barriers}_{what}", int(timeout_s * 1000))


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
    if info.source == "tpu":
        try:
            jax.distributed.initialize(initialization_timeout=math.ceil(timeout_s))
        except (RuntimeError, ValueError) as e:
            message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise DistributedError(f"TPU pod initialisation failed: {message}") from None
        from jax._src import distributed as jax_distributed  # The address JAX chose.

        info = dataclasses.replace(
            info,
            process_id=jax.process_index(),
            num_processes=jax.process_count(),
            coordinator=getattr(jax_distributed.global_state, "coordinator_address", None),
        )
    else:
        if info.process_id == 0:
            _rendezvous_chief(info, timeout_s)
        else:
            _rendezvous_peer(info, timeout_s)
        jax.distributed.initialize(
            coordinator_address=info.coordinator,
            num_processes=info.num_processes,
            process_id=info.process_id,
            local_device_ids=list(info.local_device_ids) if info.local_device_ids else None,
            # Everything is given: keep JAX from second-guessing it (its SLURM detection
            # would otherwise pin each process to one GPU).
            cluster_detection_method="deactivate",
            initialization_timeout=math.ceil(timeout_s),
        )
    _initialized = info
    log.set_process(info.process_id)
    if info.process_id == 0:
        where = f"coordinator {info.coordinator}" if info.coordinator else "coordinator auto"
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
