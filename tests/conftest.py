"""Session fixtures shared by the end-to-end tests: the compilation cache and the runs."""

import os

import pytest

from tests.runs import FAST_COMPILE, Runs, shared_dir

# Before any test imports jax: this process and the subprocesses that inherit its environment
# compile at -O0 (see tests/runs.py FAST_COMPILE). Set XLA_FLAGS with an optimisation level
# of your own to override it.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{FAST_COMPILE} {os.environ.get('XLA_FLAGS', '')}".strip()
# The CLIs' restart for malloc tuning (mmjax/host_memory.py) would cost every short test
# subprocess a second start-up; tests/test_host_memory.py checks it, the long runs opt back in.
os.environ.setdefault("MMJAX_MALLOC_TUNING", "0")


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    path = shared_dir(tmp_path_factory) / "jax_cache"
    path.mkdir(exist_ok=True)
    return path


@pytest.fixture(scope="session")  # Session: torn down once, not between xdist batches.
def runs(request, tmp_path_factory, cache_dir):
    """The background training runs (tests/runs.py JOBS) that the selected tests read."""
    names = set()
    for item in request.session.items:
        module = getattr(item, "module", None)
        needs = getattr(module, "NEEDS", {}) if module is not None else {}
        names.update(needs.get(item.originalname, ()))
        job_param = getattr(module, "JOB_PARAMETER", None)
        if job_param and hasattr(item, "callspec") and job_param in item.callspec.params:
            names.add(item.callspec.params[job_param])
    runs = Runs(shared_dir(tmp_path_factory), cache_dir, names)
    yield runs
    runs.close()
