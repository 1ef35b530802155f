"""Logical axis names of every parameter, the mesh shardings they resolve to, and mesh errors.

Single-device checks run in-process. The 8-device checks (data=2, fsdp=2, tensor=2) run in a
subprocess with forced host devices, because the device count is fixed when JAX starts.
"""

from pathlib import Path

import flax.linen as nn
import jax
import pytest

from mmjax.models.coca import CoCa
from mmjax.models.config import SIZES, ModelConfig
from mmjax.runtime import sharding as shd
from mmjax.training.state import dummy_batch
from tests.runs import run_with_devices

REPO = Path(__file__).resolve().parents[1]
KNOWN_NAMES = {"embed", "mlp", "heads", "kv", "vocab", "layers", "norm", "patch", "joint", None}
KNOWN_NAMES |= {"conv_in", "conv_out"}  # ResNet kernels (model.vision.encoder='resnet').
SCALARS = {"logit_scale", "logit_bias"}


def _boxed_params(scan_layers: bool):
    model = CoCa(ModelConfig.sized("tiny", {"scan_layers": scan_layers}))
    return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), *dummy_batch(model)))["params"]


def _leaves(tree):
    flat, _ = jax.tree_util.tree_flatten_with_path(
        tree, is_leaf=lambda x: isinstance(x, nn.Partitioned)
    )
    return [(tuple(k.key for k in path), leaf) for path, leaf in flat]


@pytest.mark.parametrize("scan_layers", [True, False])
def test_every_parameter_has_one_known_logical_name_per_dimension(scan_layers):
    leaves = _leaves(_boxed_params(scan_layers))
    assert len(leaves) > 50
    for path, leaf in leaves:
        where = "/".join(path)
        assert isinstance(leaf, nn.Partitioned), f"{where} has no logical partitioning"
        shape = leaf.value.shape
        assert len(leaf.names) == len(shape), f"{where}: names {leaf.names} for shape {shape}"
        assert set(leaf.names) <= KNOWN_NAMES, f"{where}: unknown names {leaf.names}"
        if not shape:
            assert path[-1] in SCALARS, f"{where} is an unexpected scalar parameter"
            assert leaf.names == ()
        # Scanned stacks carry a leading 'layers' axis; unrolled ones never do.
        in_stack = "blocks" in path
        assert (leaf.names[:1] == ("layers",)) == (scan_layers and in_stack), where
        assert list(leaf.names).count("layers") <= 1, where
    scalars = {path[-1] for path, leaf in leaves if not leaf.value.shape}
    assert scalars == SCALARS


@pytest.mark.parametrize("scan_layers", [True, False])
def test_every_matrix_is_split_by_the_default_rules(scan_layers):
    """FSDP only saves memory if no weight matrix is left whole on every device: each parameter
    with two or more non-layer dimensions maps at least one of them onto a mesh axis."""
    rule_names = {name for name, _ in shd.DEFAULT_RULES}
    assert KNOWN_NAMES - {None} <= rule_names
    for path, leaf in _leaves(_boxed_params(scan_layers)):
        names = [n for n in leaf.names if n != "layers"]
        if len(names) >= 2:
            spec = nn.logical_to_mesh_axes(tuple(leaf.names), shd.DEFAULT_RULES)
            assert any(axis is not None for axis in spec), f"{'/'.join(path)}: {spec}"


_SHARDED_STATE = """
import json
import jax
from mmjax.runtime import sharding as shd
from mmjax.runtime.config import load_config
from mmjax.models.coca import CoCa
from mmjax.models.config import ModelConfig
from mmjax.training.optimizer import make_optimizer
from mmjax.training.state import create_train_state, state_shardings

def spec(s):
    return [list(e) if isinstance(e, tuple) else e for e in s.spec]

def by_path(tree):
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {jax.tree_util.keystr(p): v for p, v in flat}

assert jax.device_count() == 8
config = load_config("configs/coca.py:size=tiny")
tx = make_optimizer(config)
mesh = shd.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
rules = shd.DEFAULT_RULES
out = {"mesh": dict(mesh.shape)}
for scan in (True, False):
    config.model.scan_layers = scan
    model = CoCa(ModelConfig.from_mapping(config.model.to_dict()))
    _, shardings = state_shardings(model, tx, mesh, rules)
    out["scan" if scan else "unrolled"] = {k: spec(v) for k, v in by_path(shardings.params).items()}

config.model.scan_layers = True
model = CoCa(ModelConfig.from_mapping(config.model.to_dict()))
state = create_train_state(model, tx, mesh, rules, seed=0)
params = by_path(state.params)
fc1 = params["['image_encoder']['blocks']['layers']['mlp']['fc1']['kernel']"]
out["fc1_shape"] = list(fc1.shape)
out["fc1_spec"] = spec(fc1.sharding)
out["fc1_shard_shapes"] = sorted({tuple(s.data.shape) for s in fc1.addressable_shards})
out["fc1_num_shards"] = len(fc1.addressable_shards)
out["fc1_distinct_blocks"] = len({str(s.index) for s in fc1.addressable_shards})

# Adam's moments mirror the parameters leaf by leaf, sharding included.
adam = state.opt_state[1][0]
mismatched = []
for name in ("mu", "nu"):
    moments = by_path(getattr(adam, name))
    assert moments.keys() == params.keys()
    for k, p in params.items():
        if moments[k].sharding != p.sharding:
            mismatched.append(f"{name}{k}")
out["moment_mismatches"] = mismatched
mu_fc1 = by_path(adam.mu)["['image_encoder']['blocks']['layers']['mlp']['fc1']['kernel']"]
out["mu_fc1_spec"] = spec(mu_fc1.sharding)
out["mu_fc1_shard_shapes"] = sorted({tuple(s.data.shape) for s in mu_fc1.addressable_shards})
out["step_spec"] = spec(state.step.sharding)
out["logit_scale_spec"] = spec(params["['logit_scale']"].sharding)
out["batch_images"] = spec(shd.batch_sharding(mesh, rules, 4))
out["batch_tokens"] = spec(shd.batch_sharding(mesh, rules, 2))
out["data_parallel"] = shd.data_parallel_size(mesh, rules)
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def sharded():
    return run_with_devices(_SHARDED_STATE)


def _key(*parts):
    return "".join(f"['{p}']" for p in parts)


def test_parameter_shardings_on_a_3d_mesh(sharded):
    assert sharded["mesh"] == {"data": 2, "fsdp": 2, "tensor": 2}
    scan, unrolled = sharded["scan"], sharded["unrolled"]
    vit = ("image_encoder", "blocks", "layers")
    expected_scan = {
        # Fused [embed, q/k/v, heads, head_dim] kernel: heads over tensor, embed over fsdp.
        _key(*vit, "attn", "qkv_kernel"): [None, "fsdp", None, "tensor", None],
        _key(*vit, "attn", "qkv_bias"): [None, None, "tensor", None],
        _key(*vit, "attn", "out_kernel"): [None, "tensor", None, "fsdp"],
        _key(*vit, "mlp", "fc1", "kernel"): [None, "fsdp", "tensor"],
        _key(*vit, "mlp", "fc2", "kernel"): [None, "tensor", "fsdp"],
        _key(*vit, "ln_attn", "scale"): [None, None],
        _key("decoder", "blocks", "layers", "cross_attn", "kv_kernel"): [
            None,
            "fsdp",
            None,
            "tensor",
            None,
        ],
        _key("decoder", "blocks", "layers", "cross_attn", "query_kernel"): [
            None,
            "fsdp",
            None,
            "tensor",
            None,
        ],
        _key("text_encoder", "token_embed", "embedding"): ["tensor", "fsdp"],
        _key("decoder", "lm_head", "kernel"): ["fsdp", "tensor"],
        _key("decoder", "lm_head", "bias"): ["tensor"],
        _key("decoder", "ln_final", "scale"): [None],
        _key("image_encoder", "patch_embed", "kernel"): [None, "fsdp"],
        _key("image_encoder", "pos_embed"): [None, "fsdp"],
        _key("image_proj", "kernel"): ["fsdp", None],
        _key("logit_scale"): [],
        _key("logit_bias"): [],
    }
    for key, spec in expected_scan.items():
        # PartitionSpec drops trailing Nones; compare padded to the expected rank.
        got = scan[key] + [None] * (len(spec) - len(scan[key]))
        assert got == spec, f"{key}: {scan[key]}"
    expected_unrolled = {
        _key("image_encoder", "blocks", "layers_0", "attn", "qkv_kernel"): [
            "fsdp",
            None,
            "tensor",
            None,
        ],
        _key("image_encoder", "blocks", "layers_1", "mlp", "fc1", "kernel"): ["fsdp", "tensor"],
        _key("text_encoder", "blocks", "layers_0", "mlp", "fc2", "kernel"): ["tensor", "fsdp"],
    }
    for key, spec in expected_unrolled.items():
        got = unrolled[key] + [None] * (len(spec) - len(unrolled[key]))
        assert got == spec, f"{key}: {unrolled[key]}"
    # LayerNorm parameters are replicated everywhere.
    for tree in (scan, unrolled):
        norms = {k: v for k, v in tree.items() if "['ln_" in k}
        assert norms and all(all(e is None for e in v) for v in norms.values()), norms


def test_created_state_is_sharded_including_optimizer_state(sharded):
    # fc1 kernel [layers=2, embed=64, mlp=256] over (None, fsdp=2, tensor=2).
    assert sharded["fc1_shape"] == [2, 64, 256]
    assert sharded["fc1_spec"] == [None, "fsdp", "tensor"]
    assert sharded["fc1_shard_shapes"] == [[2, 32, 128]]
    assert sharded["fc1_num_shards"] == 8
    assert sharded["fc1_distinct_blocks"] == 4  # Replicated over the data axis only.
    assert sharded["moment_mismatches"] == []
    assert sharded["mu_fc1_spec"] == [None, "fsdp", "tensor"]
    assert sharded["mu_fc1_shard_shapes"] == [[2, 32, 128]]
    assert sharded["step_spec"] == []
    assert sharded["logit_scale_spec"] == []


def test_batch_sharding_splits_the_batch_over_data_and_fsdp(sharded):
    assert sharded["batch_images"] == [["data", "fsdp"], None, None, None]
    assert sharded["batch_tokens"] == [["data", "fsdp"], None]
    assert sharded["data_parallel"] == 4


def test_resolve_mesh_shape_fills_one_minus_one():
    assert shd.resolve_mesh_shape({"data": -1, "fsdp": 2, "tensor": 1}, 8) == (4, 2, 1)
    assert shd.resolve_mesh_shape({"data": 2, "fsdp": 2, "tensor": 2}, 8) == (2, 2, 2)
    assert shd.resolve_mesh_shape({"data": 1, "fsdp": -1, "tensor": 1}, 1) == (1, 1, 1)
    mesh = shd.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
    assert dict(mesh.shape) == {"data": jax.device_count(), "fsdp": 1, "tensor": 1}


@pytest.mark.parametrize(
    "sizes, devices, names",
    [
        (
            {"data": 3, "fsdp": 1, "tensor": 1},
            8,
            ["mesh.data=3", "mesh.fsdp=1", "mesh.tensor=1", "8"],
        ),
        ({"data": 2, "fsdp": 2, "tensor": 4}, 8, ["mesh.data=2", "mesh.tensor=4", "16"]),
        ({"data": -1, "fsdp": -1, "tensor": 1}, 8, ["mesh.", "data", "fsdp"]),
        ({"data": 2, "fsdp": 0, "tensor": 1}, 8, ["mesh.fsdp=0"]),
        ({"data": -1, "fsdp": 3, "tensor": 1}, 8, ["mesh.data=-1", "3", "8"]),
        ({"data": 1, "fsdp": 1, "tensor": -2}, 8, ["mesh.tensor=-2"]),
    ],
)
def test_bad_mesh_shapes_raise_mesh_error_naming_the_keys(sizes, devices, names):
    with pytest.raises(shd.MeshError) as info:
        shd.resolve_mesh_shape(sizes, devices)
    message = str(info.value)
    for name in names:
        assert name in message, message
