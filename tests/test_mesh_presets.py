"""Hybrid (DCN x ICI) meshes, sharding-rule presets, golden parameter shardings, the dry run.

In-process tests use fake device objects (mesh_utils only reads their attributes) or no
devices at all. The 8-device checks run in one subprocess with forced host devices; the
hybrid-mesh check runs two real processes joined by jax.distributed (gloo collectives).

Golden files: `tests/golden/param_shardings_<preset>.txt` list every parameter of the `tiny`
model (scanned layers) with its shape, logical axes, PartitionSpec and per-device shard
shape on a data=2, fsdp=2, tensor=2 mesh. After an intended change to the model or the
presets, regenerate them and review the diff:

  MMJAX_REGEN_GOLDEN=1 .venv/bin/pytest tests/test_mesh_presets.py -k golden
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from jax.experimental import mesh_utils

from mmjax.runtime import sharding as shd
from mmjax.runtime.config import ConfigError, from_json_file, load_config, to_json
from mmjax.training.setup import check_devices
from tests.runs import FAST_COMPILE, run_with_devices

REPO = Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "configs" / "coca.py")
GOLDEN = REPO / "tests" / "golden"
REGEN = os.environ.get("MMJAX_REGEN_GOLDEN") == "1"


def _rule(rules, name):
    return dict(rules)[name]


# --- presets -------------------------------------------------------------------------------


def test_presets_share_logical_names_and_default_is_fsdp_tensor():
    names = [[n for n, _ in rules] for rules in shd.RULE_PRESETS.values()]
    assert all(n == names[0] for n in names)
    assert set(shd.RULE_PRESETS) == {"data_parallel", "fsdp", "fsdp_tensor"}
    assert shd.DEFAULT_RULES == shd.RULE_PRESETS["fsdp_tensor"]
    for rules in shd.RULE_PRESETS.values():
        assert _rule(rules, "batch") == ("data", "fsdp")


@pytest.mark.parametrize(
    "preset, sharded",
    [
        ("data_parallel", {"batch"}),
        ("fsdp", {"batch", "embed", "conv_in"}),
        (
            "fsdp_tensor",
            {"batch", "embed", "heads", "mlp", "vocab", "act_heads", "act_mlp", "act_vocab"}
            | {"conv_in", "conv_out", "act_conv"},
        ),
    ],
)
def test_each_preset_splits_exactly_its_names(preset, sharded):
    rules = shd.rules_from_config(preset)
    assert rules == shd.RULE_PRESETS[preset]
    assert {name for name, axes in rules if axes is not None} == sharded
    if "embed" in sharded:
        assert _rule(rules, "embed") == "fsdp"
        assert _rule(rules, "conv_in") == "fsdp"  # Conv input channels split like embed.
    for name in ("heads", "mlp", "vocab", "conv_out", "act_conv"):
        assert _rule(rules, name) == ("tensor" if preset == "fsdp_tensor" else None)


def test_rules_from_json_lists_and_literal_strings():
    as_json = json.loads(json.dumps(shd.RULE_PRESETS["fsdp"]))  # Tuples come back as lists.
    assert shd.rules_from_config(as_json) == shd.RULE_PRESETS["fsdp"]
    literal = "[('batch', ('data', 'fsdp')), ('embed', 'fsdp'), ('mlp', None)]"
    assert shd.rules_from_config(literal) == (
        ("batch", ("data", "fsdp")),
        ("embed", "fsdp"),
        ("mlp", None),
    )


@pytest.mark.parametrize(
    "rules, fragments",
    [
        ("zero3", ["sharding_rules='zero3'", "'data_parallel'", "'fsdp'", "'fsdp_tensor'"]),
        ("[('embed', 'fsdpp')]", ["'fsdpp'", "'data'", "'tensor'"]),
        ("[('embed',)]", ["('embed',)", "pair"]),
        ("[('embed', fsdp)]", ["not a valid Python literal"]),
    ],
)
def test_bad_rules_raise_one_line_errors(rules, fragments):
    with pytest.raises(shd.MeshError) as info:
        shd.rules_from_config(rules)
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message


def test_preset_override_and_config_json_round_trip(tmp_path):
    default = load_config(CONFIG + ":size=tiny")
    assert default.sharding_rules == "fsdp_tensor"
    assert dict(default.mesh) == dict(data=-1, fsdp=1, tensor=1, dcn_data=1, dcn_fsdp=1)
    config = load_config(CONFIG + ":size=tiny", ["sharding_rules=fsdp", "mesh.dcn_fsdp=1"])
    assert config.sharding_rules == "fsdp"
    (tmp_path / "config.json").write_text(to_json(config))
    restored = from_json_file(tmp_path / "config.json")
    assert restored.sharding_rules == "fsdp"
    assert shd.rules_from_config(restored.sharding_rules) == shd.RULE_PRESETS["fsdp"]
    assert dict(restored.mesh) == dict(config.mesh)


def test_unknown_preset_is_a_config_error_at_startup():
    config = load_config(CONFIG + ":size=tiny", ["sharding_rules=zero3"])
    with pytest.raises(ConfigError, match=r"sharding_rules='zero3' is unknown; allowed: \["):
        check_devices(config, 1, ("process", 1))


def test_configs_saved_before_dcn_axes_still_resolve():
    assert shd.resolve_mesh_shape({"data": -1, "fsdp": 2, "tensor": 1}, 8) == (4, 2, 1)


# --- DCN validation ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "sizes, devices, granules, fragments",
    [
        ({"dcn_data": 0}, 8, 1, ["mesh.dcn_data=0", "positive"]),
        ({"dcn_fsdp": -1}, 8, 2, ["mesh.dcn_fsdp=-1", "positive"]),
        # 8 forced devices in one process: one granule, so no DCN split is possible.
        ({"dcn_data": 2}, 8, 1, ["mesh.dcn_data=2 x mesh.dcn_fsdp=1 = 2", "there is 1 process"]),
        ({"dcn_data": 2, "dcn_fsdp": 2}, 8, 2, ["= 4", "there are 2 processes", "multiply to 2"]),
        ({"dcn_data": 2}, 16, 4, ["number of slices", "there are 4 slices", "multiply to 4"]),
        ({"dcn_tensor": 2}, 8, 2, ["mesh.dcn_tensor is unknown", "'dcn_data'", "'dcn_fsdp'"]),
        ({"dcn_data": 2, "data": 3}, 8, 2, ["mesh.fsdp=-1", "4 devices per process (8 in 2"]),
        (
            {"dcn_data": 2, "data": 3, "fsdp": 1},
            8,
            2,
            ["mesh.data=3", "multiply to 3", "there are 4 devices per process"],
        ),
        ({"dcn_data": 3, "fsdp": -1}, 8, 3, ["8 devices do not split evenly over 3 processes"]),
    ],
)
def test_bad_dcn_sizes_raise_one_line_errors(sizes, devices, granules, fragments):
    full = dict({"data": 1, "fsdp": -1, "tensor": 1}, **sizes)
    kind = "slice" if "slices" in " ".join(fragments) else "process"
    with pytest.raises(shd.MeshError) as info:
        shd.resolve_mesh(full, devices, granules, kind)
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message


def test_dcn_error_through_check_devices_names_the_keys():
    config = load_config(CONFIG + ":size=tiny", ["mesh.dcn_data=2"])
    with pytest.raises(ConfigError, match=r"mesh\.dcn_data=2 .* there is 1 process"):
        check_devices(config, 8, ("process", 1))


def test_hybrid_layout_fills_minus_one_per_granule():
    layout = shd.resolve_mesh({"data": -1, "fsdp": 2, "tensor": 2, "dcn_data": 4}, 64, 4, "slice")
    assert layout.ici == (4, 2, 2) and layout.dcn == (4, 1, 1) and layout.shape == (16, 2, 2)
    layout = shd.resolve_mesh({"data": 1, "fsdp": -1, "tensor": 1, "dcn_fsdp": 2}, 16, 2)
    assert layout.shape == (1, 16, 1) and layout.hybrid
    # All DCN factors 1: one flat mesh over the devices of every process.
    flat = shd.resolve_mesh({"data": -1, "fsdp": 2, "tensor": 1}, 16, 2)
    assert flat.shape == (8, 2, 1) and not flat.hybrid


def test_batch_split_message_names_dcn_and_ici_sizes():
    config = load_config(
        CONFIG + ":size=tiny",
        ["mesh.dcn_data=2", "mesh.data=-1", "mesh.fsdp=2", "batch_size=12"],
    )
    with pytest.raises(ConfigError) as info:
        check_devices(config, 8, ("process", 2))
    assert "data-parallel size 8 (mesh.dcn_data=2 x mesh.data=2 x mesh.fsdp=2)" in str(info.value)


# --- hybrid device order with fake devices --------------------------------------------------


@dataclasses.dataclass(frozen=True)
class FakeDevice:
    id: int
    process_index: int
    slice_index: int | None = None
    platform: str = "cpu"
    device_kind: str = "cpu"


def _fake(processes: int, per_process: int, shuffle: bool = True) -> list[FakeDevice]:
    devices = [FakeDevice(i, i // per_process) for i in range(processes * per_process)]
    if shuffle:  # Grouping must not depend on the order devices are listed in.
        random.Random(0).shuffle(devices)
    return devices


def _owner(grid) -> np.ndarray:
    return np.vectorize(lambda d: d.process_index)(grid)


def test_dcn_data_puts_each_process_in_one_block_of_the_data_axis():
    grid = shd.device_grid({"data": -1, "fsdp": 2, "tensor": 1, "dcn_data": 2}, _fake(2, 4))
    assert grid.shape == (4, 2, 1)
    assert _owner(grid)[:, :, 0].tolist() == [[0, 0], [0, 0], [1, 1], [1, 1]]


def test_dcn_data_and_fsdp_tile_four_processes():
    sizes = {"data": 2, "fsdp": -1, "tensor": 2, "dcn_data": 2, "dcn_fsdp": 2}
    grid = shd.device_grid(sizes, _fake(4, 8))
    assert grid.shape == (4, 4, 2)
    owner = _owner(grid)
    # Process index = dcn coordinate (data-major): each owns one 2x2x2 block.
    for p, (i, j) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
        block = owner[2 * i : 2 * i + 2, 2 * j : 2 * j + 2, :]
        assert (block == p).all(), owner
    assert sorted(d.id for d in grid.flat) == list(range(32))


def test_own_hybrid_layout_matches_mesh_utils():
    devices = _fake(4, 4)
    layout = shd.MeshLayout((2, 2, 1), (2, 2, 1))
    ours = shd._hybrid_grid(layout, devices, lambda d: d.process_index)
    theirs = mesh_utils.create_hybrid_device_mesh(
        layout.ici, layout.dcn, devices, process_is_granule=True
    )
    assert (ours == theirs).all()


def test_granules_are_slices_on_tpu_and_processes_elsewhere():
    tpu = [
        FakeDevice(i, process_index=i // 2, slice_index=i // 4, platform="tpu", device_kind="TPU")
        for i in range(8)
    ]
    assert shd.granules(tpu) == ("slice", 2)
    assert shd.granules(_fake(4, 2)) == ("process", 4)
    # Simulated granules (the dry run): consecutive blocks of one process's devices.
    single = _fake(1, 8, shuffle=False)
    grid = shd.device_grid(
        {"data": -1, "fsdp": 1, "tensor": 1, "dcn_data": 2}, single, lambda d: d.id // 4
    )
    assert [d.id for d in grid[:, 0, 0]] == list(range(8))


def test_uneven_granules_are_rejected():
    devices = [FakeDevice(i, 0 if i < 3 else 1) for i in range(8)]
    with pytest.raises(shd.MeshError, match="different numbers of devices"):
        shd.device_grid({"data": -1, "fsdp": 1, "tensor": 1, "dcn_data": 2}, devices)


# --- 8 forced devices: golden shardings, FSDP bytes, DCN error -----------------------------

_EIGHT_DEVICES = """
import json
import jax
import numpy as np
from mmjax.runtime import sharding as shd
from mmjax.runtime.config import load_config
from mmjax.models.coca import CoCa
from mmjax.models.config import ModelConfig
from mmjax.training.optimizer import make_optimizer
from mmjax.training.state import dummy_batch, state_shardings
import flax.linen as nn

assert jax.device_count() == 8

def spec_text(spec, ndim):
    entries = list(spec) + [None] * (ndim - len(spec))
    return "P(" + ", ".join(repr(e) for e in entries) + ")"

def golden(preset):
    config = load_config("configs/coca.py:size=tiny")
    model = CoCa(ModelConfig.from_mapping(config.model.to_dict()))
    mesh = shd.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    rules = shd.rules_from_config(preset)
    boxed = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), *dummy_batch(model)))
    _, shardings = state_shardings(model, make_optimizer(config), mesh, rules)
    flat_boxed = jax.tree_util.tree_flatten_with_path(
        boxed["params"], is_leaf=lambda x: isinstance(x, nn.Partitioned))[0]
    flat_shd = jax.tree_util.tree_leaves(shardings.params)
    assert len(flat_boxed) == len(flat_shd)
    rows = []
    for (path, leaf), sharding in zip(flat_boxed, flat_shd):
        shape = leaf.value.shape
        rows.append((
            "/".join(k.key for k in path),
            "[" + ",".join(map(str, shape)) + "]",
            "(" + ", ".join(str(n) for n in leaf.names) + ")",
            spec_text(sharding.spec, len(shape)),
            "[" + ",".join(map(str, sharding.shard_shape(shape))) + "]",
        ))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    head = [
        f"# Parameter shardings of configs/coca.py:size=tiny (scan_layers) under preset {preset}",
        "# on mesh data=2 fsdp=2 tensor=2. Columns: path, shape, logical axes, PartitionSpec,",
        "# per-device shard shape. Regenerate: MMJAX_REGEN_GOLDEN=1 pytest "
        "tests/test_mesh_presets.py -k golden",
    ]
    body = ["  ".join(c.ljust(w) for c, w in zip(r[:4], widths)) + "  " + r[4] for r in rows]
    return "\\n".join(head + body) + "\\n"

def state_bytes(size, preset, mesh):
    config = load_config(f"configs/coca.py:size={size}")
    model = CoCa(ModelConfig.from_mapping(config.model.to_dict()))
    rules = shd.rules_from_config(preset)
    abstract, _ = state_shardings(model, make_optimizer(config), mesh, rules)
    tree = (abstract.params, abstract.opt_state)
    total = sum(int(np.prod(a.shape)) * a.dtype.itemsize for a in jax.tree.leaves(tree))
    return total, shd.bytes_per_device(tree)

out = {"golden": {p: golden(p) for p in shd.RULE_PRESETS}}
fsdp8 = shd.make_mesh({"data": 1, "fsdp": 8, "tensor": 1})
out["fsdp_small"] = state_bytes("small", "fsdp", fsdp8)
out["dp_small"] = state_bytes("small", "data_parallel", fsdp8)
try:
    shd.make_mesh({"data": -1, "fsdp": 1, "tensor": 1, "dcn_data": 2})
    out["dcn_error"] = None
except shd.MeshError as e:
    out["dcn_error"] = str(e)
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def eight():
    return run_with_devices(_EIGHT_DEVICES, 8)


@pytest.mark.parametrize("preset", list(shd.RULE_PRESETS))
def test_golden_parameter_shardings(eight, preset):
    path = GOLDEN / f"param_shardings_{preset}.txt"
    text = eight["golden"][preset]
    if REGEN:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    assert path.is_file(), f"{path} missing: run with MMJAX_REGEN_GOLDEN=1"
    want = path.read_text().splitlines()
    got = text.splitlines()
    diff = [f"- {w}\n+ {g}" for w, g in zip(want, got) if w != g]
    assert len(want) == len(got) and not diff, (
        f"{path.name}: {len(diff)} lines differ (and {len(want)} vs {len(got)} lines); "
        f"first:\n" + "\n".join(diff[:5]) + "\nregenerate with MMJAX_REGEN_GOLDEN=1 if intended"
    )


def _golden_row(text: str, path: str) -> list[str]:
    for line in text.splitlines():
        if line.split("  ")[0] == path:
            return [c.strip() for c in line.split("  ") if c.strip()]
    raise AssertionError(f"{path} not in golden text")


def test_golden_content_spot_checks(eight):
    g = eight["golden"]
    qkv = "image_encoder/blocks/layers/attn/qkv_kernel"
    assert _golden_row(g["fsdp_tensor"], qkv)[3:] == [
        "P(None, 'fsdp', None, 'tensor', None)",
        "[2,32,3,1,32]",
    ]
    assert _golden_row(g["fsdp"], qkv)[3] == "P(None, 'fsdp', None, None, None)"
    assert _golden_row(g["data_parallel"], qkv)[3:] == [
        "P(None, None, None, None, None)",
        "[2,64,3,2,32]",
    ]
    emb = _golden_row(g["fsdp_tensor"], "text_encoder/token_embed/embedding")
    assert emb[2:] == ["(vocab, embed)", "P('tensor', 'fsdp')", "[128,32]"]
    # data_parallel: every parameter whole on every device.
    for line in g["data_parallel"].splitlines():
        if not line.startswith("#"):
            assert "'" not in line.split("  P(")[1], line


def test_fsdp_over_8_devices_splits_the_state_8_ways(eight):
    total, per_device = eight["fsdp_small"]
    assert per_device <= total / 8 * 1.05, (per_device, total / 8)
    dp_total, dp_per_device = eight["dp_small"]
    assert dp_total == total and dp_per_device == total  # Replicated: the bound really bites.


def test_dcn_on_eight_devices_of_one_process_is_an_error(eight):
    message = eight["dcn_error"]
    assert message and "mesh.dcn_data=2" in message and "there is 1 process" in message


# --- two real processes: dcn_data=2 over gloo ----------------------------------------------

_WORKER = """
import json, sys
import jax
import jax.numpy as jnp
import numpy as np

jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.config.update("jax_num_cpu_devices", 4)
pid, port = int(sys.argv[1]), sys.argv[2]
jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=pid)
from mmjax.runtime import sharding as shd

mesh = shd.make_mesh({"data": -1, "fsdp": 2, "tensor": 1, "dcn_data": 2, "dcn_fsdp": 1})
sharding = shd.batch_sharding(mesh, shd.DEFAULT_RULES, 2)
# Each process feeds its own rows: they must land on its own devices, and a global
# reduction must see both processes' rows.
local = np.full((4, 3), pid + 1, np.float32)
rows = jax.make_array_from_process_local_data(sharding, local)
total = float(jax.jit(jnp.sum, out_shardings=shd.replicated(mesh))(rows))
try:
    shd.make_mesh({"data": -1, "fsdp": 1, "tensor": 1, "dcn_data": 4})
    error = None
except shd.MeshError as e:
    error = str(e)
print(json.dumps({
    "granules": list(shd.granules(jax.devices())),
    "mesh": dict(mesh.shape),
    "owner": [[d.process_index for d in row] for row in mesh.devices[:, :, 0]],
    "rows": sorted({s.index[0].start for s in rows.addressable_shards}),
    "total": total,
    "error": error,
}))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_dcn_data_gives_each_process_half_the_data_axis(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(textwrap.dedent(_WORKER))
    port = str(_free_port())
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO), XLA_FLAGS=FAST_COMPILE)
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(i), port],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    results = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=120)
            assert p.returncode == 0, err[-3000:]
            results.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for pid, r in enumerate(results):
        assert r["granules"] == ["process", 2]
        assert r["mesh"] == {"data": 4, "fsdp": 2, "tensor": 1}
        assert r["owner"] == [[0, 0], [0, 0], [1, 1], [1, 1]]
        assert r["rows"] == ([0, 1, 2, 3] if pid == 0 else [4, 5, 6, 7])
        assert r["total"] == 4 * 3 * 1 + 4 * 3 * 2
        assert "mesh.dcn_data=4" in r["error"] and "there are 2 processes" in r["error"]


# --- the dry run CLI ------------------------------------------------------------------------


@pytest.mark.slow
def test_dryrun_cli_on_8_simulated_devices(tmp_path):
    """The real `python -m mmjax.tools.dryrun`, DCN simulated: 2 slices x (fsdp=2, tensor=2)."""
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS",)}
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=FAST_COMPILE)
    argv = [
        "--config",
        CONFIG + ":size=tiny",
        "--devices",
        "8",
        "--json",
        "--hbm-gib",
        "0.5",
        "--config.mesh.data=-1",
        "--config.mesh.fsdp=2",
        "--config.mesh.tensor=2",
        "--config.mesh.dcn_data=2",
    ]
    proc = subprocess.run(
        [sys.executable, "-m", "mmjax.tools.dryrun", *argv],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1
    r = json.loads(lines[0])
    assert r["devices"] == 8 and r["simulated"] and r["platform"] == "cpu"
    assert r["mesh"] == {"data": 2, "fsdp": 2, "tensor": 2}
    assert r["mesh_dcn"] == {"dcn_data": 2, "dcn_fsdp": 1}
    assert r["sharding_rules"] == "fsdp_tensor" and r["data_parallel"] == 4
    assert r["params"] > 300_000
    assert r["param_bytes"] == 4 * r["params"]  # float32
    assert r["opt_state_bytes"] > 2 * r["param_bytes"]  # Adam mu + nu (+ counts).
    # Each weight is split 4 ways at most (fsdp x tensor); the data axis replicates.
    assert r["param_bytes"] / 4 <= r["param_bytes_per_device"] < r["param_bytes"] / 2
    memory = r["memory_per_device"]
    for key in ("argument_bytes", "output_bytes", "alias_bytes", "temp_bytes"):
        assert memory[key] >= 0
    assert memory["argument_bytes"] >= r["param_bytes_per_device"] + r["opt_state_bytes_per_device"]
    assert memory["alias_bytes"] > 0  # The donated state is reused for the new state.
    assert r["flops_per_step"] > 0 and r["compile_seconds"] > 0
    assert r["fits"] is True and 0 < r["hbm_fraction"] < 1
    top = r["largest_tensors"]
    assert len(top) == 10
    sizes = [t["bytes_per_device"] for t in top]
    assert sizes == sorted(sizes, reverse=True)
    assert {"name", "shape", "spec", "bytes", "bytes_per_device"} <= set(top[0])


def test_dryrun_rejects_a_device_count_it_cannot_provide(capsys):
    """Once this process's backend is up, the dry run would re-run itself; a re-run child that
    still cannot get the count stops with one error line instead of looping."""
    import jax

    from mmjax.tools import dryrun

    jax.devices()  # The backend is up: the count can no longer change in this process.
    os.environ[dryrun._REEXEC_ENV] = "1"
    try:
        code = dryrun.main(["--config", CONFIG + ":size=tiny", "--devices", "3"])
    finally:
        del os.environ[dryrun._REEXEC_ENV]
    err = capsys.readouterr().err
    assert code == 2 and err.strip() == "error: --devices=3: could not force the CPU device count"


def test_dryrun_text_report_names_every_figure():
    from mmjax.tools.dryrun import format_report

    mib = 2**20
    report = {
        "platform": "cpu",
        "simulated": True,
        "devices": 8,
        "mesh": {"data": 1, "fsdp": 8, "tensor": 1},
        "mesh_dcn": {"dcn_data": 1, "dcn_fsdp": 1},
        "sharding_rules": "fsdp",
        "batch_size": 64,
        "data_parallel": 8,
        "params": 2_000_000,
        "dtype": "bfloat16",
        "param_dtype": "float32",
        "remat": "none",
        "scan_layers": True,
        "param_bytes": 8 * mib,
        "opt_state_bytes": 16 * mib,
        "param_bytes_per_device": mib,
        "opt_state_bytes_per_device": 2 * mib,
        "state_vs_ideal": 1.0,
        "memory_per_device": {
            "argument_bytes": 3 * mib,
            "output_bytes": 3 * mib,
            "alias_bytes": 3 * mib,
            "temp_bytes": 40 * 2**30,
            "generated_code_bytes": 0,
            "peak_estimate_bytes": 40 * 2**30 + 3 * mib,
        },
        "flops_per_step": 2.5e12,
        "flops_per_device_per_step": 2.5e12 / 8,
        "compile_seconds": 12.0,
        "hbm_gib": 16.0,
        "fits": False,
        "hbm_fraction": 2.5,
        "largest_tensors": [
            {
                "name": "params/decoder/lm_head/kernel",
                "shape": [768, 64000],
                "dtype": "float32",
                "spec": "P('fsdp', None)",
                "bytes": 8 * mib,
                "bytes_per_device": mib,
            }
        ],
    }
    text = format_report(report)
    for fragment in (
        "8 simulated cpu",
        "data=1 fsdp=8 tensor=1 (DCN: none); rules fsdp",
        "params 1.00 MiB + optimizer 2.00 MiB = 3.00 MiB (1.000x the ideal total/8 = 3.00 MiB)",
        "temp 40.00 GiB",
        "aliased with donated arguments 3.00 MiB",
        "2.50 TFLOP/step",
        "312.50 GFLOP per device",
        "fits in 16 GiB HBM? NO (250% of it)",
        "params/decoder/lm_head/kernel  float32[768x64000]  P('fsdp', None)",
    ):
        assert fragment in text, f"{fragment!r} not in:\n{text}"
