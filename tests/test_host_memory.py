"""The CLIs' host-memory tuning (mmjax/host_memory.py): glibc malloc tunables set by one
restart, inline CPU dispatch, and what they are for: a step that reuses its memory."""

import json
import os
import subprocess
import sys

import pytest

from mmjax.runtime import host_memory as hm

GLIBC = (2, 36)
KEEP = [hm.KEEP_FREED, hm.TRIM_THRESHOLD]


def test_tunables_wanted_only_where_they_apply():
    assert hm.missing_tunables({}, "madvise", GLIBC) == [*KEEP, hm.HUGE_PAGES]
    assert hm.missing_tunables({}, "always", GLIBC) == KEEP  # Huge pages already.
    assert hm.missing_tunables({}, "never", GLIBC) == KEEP  # The advice would be ignored.
    assert hm.missing_tunables({}, None, GLIBC) == KEEP
    assert hm.missing_tunables({}, "madvise", (2, 31)) == KEEP  # No hugetlb tunable yet.
    assert hm.missing_tunables({}, "madvise", (2, 17)) == []  # No tunables at all.
    assert hm.missing_tunables({}, "madvise", None) == []  # musl or unknown.
    assert hm.missing_tunables({hm.ENV: "0"}, "madvise", GLIBC) == []


def test_only_hosts_whose_cpu_runs_the_steps_are_tuned():
    none = lambda pattern: []
    tpu_vm = lambda pattern: ["/dev/vfio/0"] if pattern.startswith("/dev/vfio") else []
    gpu_box = lambda pattern: ["/dev/nvidia0"] if pattern.startswith("/dev/nvidia") else []
    everything = lambda name: True
    nothing = lambda name: False
    assert hm.steps_run_on_cpu({}, none, everything)  # libtpu installed, no TPU attached.
    assert not hm.steps_run_on_cpu({}, tpu_vm, lambda name: name == "libtpu")
    assert not hm.steps_run_on_cpu({}, gpu_box, lambda name: name == "jax_cuda12_plugin")
    assert hm.steps_run_on_cpu({}, gpu_box, nothing)  # A GPU JAX cannot use: CPU steps.
    assert hm.steps_run_on_cpu({}, gpu_box, lambda name: name == "libtpu")
    # JAX_PLATFORMS decides when set: its first platform is the one JAX uses.
    assert hm.steps_run_on_cpu({"JAX_PLATFORMS": "cpu"}, gpu_box, everything)
    assert not hm.steps_run_on_cpu({"JAX_PLATFORMS": "cuda,cpu"}, none, nothing)
    assert not hm.steps_run_on_cpu({"JAX_PLATFORMS": "tpu"}, none, nothing)


def test_accelerator_hosts_keep_their_own_malloc_and_dispatch():
    code = (
        "import os, sys; from mmjax.runtime import host_memory as hm; "
        "hm.tune_host_memory(); import jax; "
        "print(os.environ.get('GLIBC_TUNABLES', ''), "
        "jax.config.values['jax_cpu_enable_async_dispatch'])"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", hm.ENV)}
    # JAX_PLATFORMS names an accelerator: tune_host_memory must neither restart nor change
    # the dispatch mode (nothing here starts JAX's backend, so no accelerator is needed).
    proc = subprocess.run(
        [sys.executable, "-c", code],
        env=dict(env, JAX_PLATFORMS="tpu"),
        capture_output=True,
        text=True,
        check=True,
    )
    assert proc.stdout.split() == ["True"], proc.stdout


def test_the_users_own_tunables_win_and_nothing_is_added_twice():
    user = {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0:glibc.malloc.mmap_max=4"}
    assert hm.missing_tunables(user, "madvise", GLIBC) == [hm.TRIM_THRESHOLD]
    env = hm.with_tunables({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2", "A": "b"}, KEEP)
    assert env == {
        "GLIBC_TUNABLES": "glibc.malloc.arena_max=2:glibc.malloc.mmap_max=0:"
        f"glibc.malloc.trim_threshold={1 << 40}",
        "A": "b",
    }
    assert hm.missing_tunables(env, "always", GLIBC) == []  # After the restart: done.
    assert hm.keeps_freed_memory(env)
    assert not hm.keeps_freed_memory(user) and not hm.keeps_freed_memory({})


@pytest.mark.parametrize(
    "text, mode",
    [("always [madvise] never\n", "madvise"), ("[always] madvise never", "always"), ("", None)],
)
def test_thp_mode_reads_the_bracketed_choice(tmp_path, text, mode):
    path = tmp_path / "enabled"
    path.write_text(text)
    assert hm.thp_mode(str(path)) == mode
    assert hm.thp_mode(str(tmp_path / "missing")) is None


def _clean_env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in (hm.ENV, "GLIBC_TUNABLES")}
    return dict(env, **extra)


def _python(code, *args, **env):
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        env=_clean_env(**env),
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout


def test_process_restarts_once_with_the_tunables_and_its_arguments():
    if not hm.missing_tunables({}, hm.thp_mode(), hm.glibc_version()):
        pytest.skip("this machine's libc has no malloc tunables")
    code = (
        "import os, sys; from mmjax.runtime import host_memory; "
        "print('start', flush=True); host_memory.tune_host_memory(); import jax; "
        "print(os.getpid(), os.environ['GLIBC_TUNABLES'], "
        "jax.config.values['jax_cpu_enable_async_dispatch'], sys.argv[1:])"
    )
    lines = _python(code, "--x", "y z").splitlines()
    assert lines[:2] == ["start", "start"], lines  # Started twice: one restart, not a loop.
    pid, tunables, async_dispatch, argv = lines[2].split(" ", 3)
    assert pid.isdigit() and "glibc.malloc.mmap_max=0" in tunables.split(":")
    assert async_dispatch == "False" and argv == "['--x', 'y z']"
    off = _python(code, **{hm.ENV: "0", "GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})
    assert off.count("start") == 1 and " glibc.malloc.arena_max=2 True " in off


def test_a_peer_child_gets_the_environment_without_what_the_restart_added():
    if not hm.missing_tunables({}, hm.thp_mode(), hm.glibc_version()):
        pytest.skip("this machine's libc has no malloc tunables")
    code = (
        "import os, json; from mmjax.runtime import host_memory; host_memory.tune_host_memory(); "
        "print(json.dumps([os.environ.get('GLIBC_TUNABLES'), "
        "host_memory.without_added_tunables(os.environ).get('GLIBC_TUNABLES')]))"
    )
    tuned, peer = json.loads(_python(code, GLIBC_TUNABLES="glibc.malloc.arena_max=2"))
    assert "glibc.malloc.mmap_max=0" in tuned.split(":") and "arena_max=2" in tuned
    assert peer == "glibc.malloc.arena_max=2"  # The user's own tunable stays.
    tuned, peer = json.loads(_python(code))
    assert "glibc.malloc.mmap_max=0" in tuned.split(":") and peer is None


# A jitted "step" with ~0.2 GB of temporaries, run after the CLI's imports and tuning; prints
# the page faults of one step in steady state.
FAULTS = """
import resource
from mmjax.runtime.host_memory import tune_host_memory
import mmjax.train  # What a CLI imports before it tunes (nothing may start JAX's backend).
tune_host_memory()
import jax, jax.numpy as jnp

@jax.jit
def step(x):
    return sum(jnp.cumsum(x * i, axis=0)[-1].sum() for i in range(1, 5))

x = jnp.ones((2500, 5000))
for _ in range(3):
    step(x).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
    step(x).block_until_ready()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 4)
"""


@pytest.mark.slow
def test_tuned_steps_reuse_their_memory_instead_of_faulting_it_in():
    if not hm.missing_tunables({}, hm.thp_mode(), hm.glibc_version()):
        pytest.skip("this machine's libc has no malloc tunables")
    untuned = float(_python(FAULTS, **{hm.ENV: "0", "XLA_FLAGS": ""}))
    tuned = float(_python(FAULTS, XLA_FLAGS=""))
    # Untuned: every step maps its temporaries afresh (~50k 4 KiB faults for 0.2 GB).
    assert untuned > 5000, untuned
    assert tuned < 100, (tuned, untuned)
