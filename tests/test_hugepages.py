"""The CLIs' restart with glibc's huge-page malloc tunable (mmjax/hugepages.py)."""

import os
import subprocess
import sys

import pytest

from mmjax import hugepages

GLIBC = (2, 36)


def test_restart_only_where_it_helps():
    assert hugepages.restart_wanted({}, "madvise", GLIBC)
    assert not hugepages.restart_wanted({}, "always", GLIBC)  # Huge pages already.
    assert not hugepages.restart_wanted({}, "never", GLIBC)  # The advice is ignored.
    assert not hugepages.restart_wanted({}, None, GLIBC)
    assert not hugepages.restart_wanted({}, "madvise", (2, 31))  # No such tunable yet.
    assert not hugepages.restart_wanted({}, "madvise", None)  # musl or unknown.
    assert not hugepages.restart_wanted({hugepages.ENV: "0"}, "madvise", GLIBC)
    # Already set, by us (no second restart) or by the user (theirs wins).
    assert not hugepages.restart_wanted(
        {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, "madvise", GLIBC
    )


def test_tunable_is_added_to_the_users_own():
    env = hugepages.with_tunable({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2", "A": "b"})
    assert env == {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1", "A": "b"}
    assert hugepages.with_tunable({})["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1"


@pytest.mark.parametrize(
    "text, mode",
    [("always [madvise] never\n", "madvise"), ("[always] madvise never", "always"), ("", None)],
)
def test_thp_mode_reads_the_bracketed_choice(tmp_path, text, mode):
    path = tmp_path / "enabled"
    path.write_text(text)
    assert hugepages.thp_mode(str(path)) == mode
    assert hugepages.thp_mode(str(tmp_path / "missing")) is None


def test_process_restarts_once_with_the_tunable_and_its_arguments():
    if not hugepages.restart_wanted({}, hugepages.thp_mode(), hugepages.glibc_version()):
        pytest.skip("this machine's kernel or libc gains nothing from the tunable")
    code = (
        "import os, sys; from mmjax import hugepages; "
        "print('start', flush=True); hugepages.restart_with_huge_pages(); "
        "print(os.getpid(), os.environ['GLIBC_TUNABLES'], sys.argv[1:])"
    )
    env = {k: v for k, v in os.environ.items() if k not in (hugepages.ENV, "GLIBC_TUNABLES")}
    proc = subprocess.run(
        [sys.executable, "-c", code, "--x", "y z"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    lines = proc.stdout.splitlines()
    assert lines[:2] == ["start", "start"], lines  # Started twice: one restart, not a loop.
    pid, tunable, argv = lines[2].split(" ", 2)
    assert pid.isdigit() and tunable == "glibc.malloc.hugetlb=1"
    assert argv == "['--x', 'y z']"
    off = subprocess.run(
        [sys.executable, "-c", code],
        env=dict(env, **{hugepages.ENV: "0", "GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert off.stdout.splitlines()[0] == "start" and "arena_max=2 " in off.stdout
    assert off.stdout.count("start") == 1
