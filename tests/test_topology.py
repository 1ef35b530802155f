"""`mmjax dryrun --topology`: the train step compiled by libtpu's XLA:TPU compiler for a TPU
topology on this CPU-only machine (the tpu extra), and what it reports: memory per chip
against the chip's HBM, collectives, kernels; out-of-HBM compiles as results; `--fit`."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from mmjax.tools import hlo_stats
from mmjax.tools.topology import HBM_GIB, compile_oom
from tests.runs import REPO

HLO = """
ENTRY %main {
  %p = bf16[4,256]{1,0} parameter(0)
  %ags = (bf16[4,256]{1,0}, bf16[16,256]{1,0}) all-gather-start(%p), dimensions={0}
  %agd = bf16[16,256]{1,0} all-gather-done(%ags)
  %ar = f32[128]{0} all-reduce(%x), to_apply=%add
  %comb = (f32[64,2]{1,0:T(8,128)}, bf16[256]{0:T(512)}, /*index=2*/f32[2]{0}) all-reduce(%a)
  %rs = f32[32]{0} reduce-scatter(%ar), dimensions={0}
  %cp = f32[8,8]{1,0} collective-permute(%y), source_target_pairs={{0,1}}
  %k = f32[8,8]{1,0} custom-call(%y), custom_call_target="tpu_custom_call", backend_config="..."
  %a = f32[8]{0} custom-call(), custom_call_target="AllocateBuffer"
}
"""


def test_collectives_count_async_pairs_once_with_their_result_bytes():
    stats = hlo_stats.collectives(HLO)
    assert stats["all-gather"] == {"count": 1, "bytes": 16 * 256 * 2}
    # A combined (tuple) all-reduce counts every array; TPU layouts hold parentheses too.
    assert stats["all-reduce"] == {"count": 2, "bytes": 128 * 4 + 64 * 2 * 4 + 256 * 2 + 2 * 4}
    assert stats["reduce-scatter"] == {"count": 1, "bytes": 32 * 4}
    assert stats["collective-permute"] == {"count": 1, "bytes": 64 * 4}
    assert stats["all-to-all"] == {"count": 0, "bytes": 0}


def test_kernels_are_the_accelerator_custom_calls():
    calls = hlo_stats.custom_calls(HLO)
    assert calls == {"AllocateBuffer": 1, "tpu_custom_call": 1}
    assert hlo_stats.kernels(calls) == {"tpu_custom_call": 1}


def test_compile_oom_reads_the_compilers_figures():
    message = (
        "RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in memory space "
        "hbm. Ran out of memory on HBM, the total memory required for HLO temporaries "
        "(64.91G) exceeds available HBM (15.75G)."
    )
    oom = compile_oom(RuntimeError(message))
    assert oom["temp_bytes"] == int(64.91 * 2**30)
    assert oom["available_bytes"] == int(15.75 * 2**30)
    used = compile_oom(RuntimeError("RESOURCE_EXHAUSTED: Used 20.5G of 15.75G hbm. Exceeded"))
    assert (used["needed_bytes"], used["available_bytes"]) == (
        int(20.5 * 2**30),
        int(15.75 * 2**30),
    )
    assert compile_oom(RuntimeError("INVALID_ARGUMENT: bad sharding")) is None


def test_every_generation_has_its_hbm():
    assert HBM_GIB["TPU v5 lite"] == 16 and HBM_GIB["TPU v5"] == 95 and HBM_GIB["TPU v4"] == 32


def _dryrun(*args, timeout=900):
    env = dict(os.environ, TPU_SKIP_MDS_QUERY="1", PYTHONPATH=str(REPO))
    env.pop("JAX_PLATFORMS", None)  # The compile is for TPU; the process itself has none.
    env.pop("XLA_FLAGS", None)
    return subprocess.run(
        [sys.executable, "-m", "mmjax", "dryrun", *args],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


# One block per tower: the compile takes ~15 s instead of ~30 s, the contract is the same.
ONE_LAYER = [f"--config.model.{t}.layers=1" for t in ("vision", "text", "decoder")]


def _needs_libtpu():
    try:
        import libtpu  # noqa: F401
    except ImportError:
        pytest.fail("the tpu extra (libtpu) is not installed: run `bash launch/local.sh test`")


def test_fit_search_takes_the_lightest_remat_then_the_largest_batch(monkeypatch):
    """The search logic against a stand-in compiler: memory = batch x a per-remat cost."""
    from mmjax.runtime.config import load_config
    from mmjax.tools import dryrun

    cost = {"none": 4.0, "minimal": 3.0, "dots-saveable": 2.0, "full": 1.0}
    compiled = []

    def fake_dry_run(config, **kwargs):
        compiled.append((config.model.remat, config.batch_size))
        need = cost[config.model.remat] * config.batch_size
        return dict(
            fits=need <= 100,
            data_parallel=4,
            compile_seconds=1.0,
            memory_per_device={"peak_estimate_bytes": int(need)},
        )

    monkeypatch.setattr(dryrun, "dry_run", fake_dry_run)
    config = load_config("configs/coca.py:size=tiny,batch=40")
    result = dryrun.fit_search(config, devices=[None] * 4, topology="v5e:2x2", hbm_gib=1.0)
    # none (160) and minimal (120) do not fit at 40; dots-saveable (80) does. Then the batch:
    # 80 (160, no), then bisection in steps of the data-parallel size: 60 (120, no), 48 (96).
    assert compiled[:3] == [("none", 40), ("minimal", 40), ("dots-saveable", 40)]
    assert (result["remat"], result["batch_size"]) == ("dots-saveable", 48)
    assert result["overrides"] == ["--config.model.remat=dots-saveable", "--config.batch_size=48"]
    assert [t["fits"] for t in result["tried"]] == [False, False, True, False, False, True, False]
    assert config.model.remat == "none" and config.batch_size == 40  # The input is untouched.
    capped = dryrun.fit_search(
        config, devices=[None] * 4, topology=None, hbm_gib=1.0, max_compiles=2
    )
    assert not capped["fits"] and len(capped["tried"]) == 2


@pytest.mark.slow
def test_tiny_compiles_for_v5e_and_fit_proposes_a_config_that_fits():
    """--fit on v5e:2x2 (4 chips of 16 GiB, judged against --hbm-gib 0.03): remat none fits at
    batch 64 (29.6 MiB), twice that does not (31.5 MiB); the proposal's own dry run is the TPU
    compiler's. (The search order itself is tested against a stand-in compiler above.)"""
    _needs_libtpu()
    proc = _dryrun(
        "--topology", "v5e:2x2", "--config", "configs/coca.py:size=tiny",
        "--config.mesh.data=2", "--config.mesh.fsdp=2", *ONE_LAYER, "--hbm-gib", "0.03",
        "--fit", "--fit-max-compiles", "2", "--json",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert [(t["remat"], t["batch_size"], t["fits"]) for t in result["tried"]] == [
        ("none", 64, True),
        ("none", 128, False),
    ]
    assert result["overrides"] == ["--config.model.remat=none", "--config.batch_size=64"]
    report = result["report"]
    assert (report["platform"], report["device_kind"], report["devices"]) == (
        "tpu",
        "TPU v5 lite",
        4,
    )
    assert report["mesh"] == {"data": 2, "fsdp": 2, "tensor": 1} and report["fits"]
    memory = report["memory_per_device"]
    assert 0 < memory["temp_bytes"] < memory["peak_estimate_bytes"] <= 0.03 * 2**30
    # FSDP gathers weights, data parallelism all-reduces gradients.
    assert report["collectives"]["all-gather"]["count"] > 0
    assert report["collectives"]["all-reduce"]["bytes"] > 0
    assert report["kernels"] == {} and report["custom_calls"]  # No Pallas kernel in the XLA path.
    assert report["flops_per_device_per_step"] == pytest.approx(report["flops_per_step"] / 4)


@pytest.mark.slow
def test_a_step_that_exceeds_the_hbm_is_a_result_with_the_compilers_figure():
    _needs_libtpu()
    proc = _dryrun(
        "--topology", "v5e:2x2", "--config", "configs/coca.py:size=tiny,batch=131072",
        "--config.mesh.data=1", "--config.mesh.fsdp=-1", "--config.sharding_rules=fsdp",
        *ONE_LAYER, "--json",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["fits"] is False and report["hbm_gib"] == 16
    assert report["compile_error"].startswith("RESOURCE_EXHAUSTED")
    assert report["memory_per_device"]["temp_bytes"] > 16 * 2**30  # The compiler's own figure.
    assert report["hbm_compiler_bytes"] < 16 * 2**30  # What it had (15.75G on a v5e).


def test_unknown_topology_and_bad_flags_are_one_line():
    _needs_libtpu()
    proc = _dryrun("--topology", "v9z:2x2", "--config", "configs/coca.py:size=tiny", timeout=300)
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: --topology v9z:2x2: libtpu refused it: "), last
    proc = _dryrun("--topology", "v5e:2x2", "--devices", "4", "--config", "configs/coca.py")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: --topology sets the devices: drop --devices / --cpu"
    )


_SLICES = """
import json
from mmjax.runtime.config import load_config
from mmjax.tools.topology import topology_devices
from mmjax.training.setup import build_run
devices = topology_devices("v5e:2x2", slices=2)
config = load_config("configs/coca.py:size=tiny", ["mesh.dcn_data=2", "mesh.data=1", "mesh.fsdp=4"])
run = build_run(config, devices=devices)
rows = [sorted({d.slice_index for d in row.flat}) for row in run.mesh.devices]
print(json.dumps(dict(n=len(devices), shape=dict(run.mesh.shape), rows=rows)))
"""


def test_slices_make_a_dcn_mesh_over_the_topologys_slices():
    """--slices 2: 8 chips in two slices; mesh.dcn_data=2 puts the slices on the data axis
    (each data row is one slice), the fsdp axis inside a slice (no compile needed)."""
    _needs_libtpu()
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run(
        [sys.executable, "-c", _SLICES], cwd=REPO, env=env, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["n"] == 8
    assert result["shape"] == {"data": 2, "fsdp": 4, "tensor": 1}
    assert result["rows"] == [[0], [1]]
