"""The ResNet image encoder (model.vision.encoder='resnet', mmjax/models/resnet.py).

Shapes and stems are checked by tracing only (jax.eval_shape); the 8-device checks (sharded
init, sharded forward == 1-device forward) run in one subprocess with forced host devices, as
tests/test_model_sharding.py does. Small ResNets (width 4, 1 block per stage; 2 stages where a
whole CoCa is compiled) keep the compiles short; the layout is ResNet-50's. The two compiling
tests are marked slow (25-35 s of CPU each, mostly compiling the init and the step).
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax import train
from mmjax.models.coca import CoCa
from mmjax.models.config import SIZES, ModelConfig
from mmjax.models.frame_encoders import frame_encoder
from mmjax.models.resnet import ResNetEncoder, norm_groups
from mmjax.runtime import sharding as shd
from mmjax.runtime.config import ConfigError, load_config, split_config_flags
from mmjax.tools.sweep import load_sweep, parameter_count, variant_overrides
from mmjax.training.optimizer import make_optimizer
from mmjax.training.setup import Run
from mmjax.training.state import create_train_state, dummy_batch
from mmjax.training.step import bind_train_step
from mmjax.training.trainer import Trainer
from tests.runs import run_with_devices
from tests.test_model_sharding import KNOWN_NAMES

CONFIG = "configs/coca.py:size=tiny"
SMALL = {"vision.encoder": "resnet", "vision.resnet_blocks": (1, 1, 1, 1), "vision.resnet_width": 4}
SMALL_FLAGS = [
    "--config.model.vision.encoder=resnet",
    "--config.model.vision.resnet_blocks=(1, 1, 1, 1)",
    "--config.model.vision.resnet_width=4",
]
# Shorter compiles for the tests that compile a whole CoCa (compiling the init costs about a
# second per randomly initialised kernel on CPU): 2 stages, one text and one decoder layer.
SHORT = ["model.vision.resnet_blocks=(1, 1)", "model.text.layers=1", "model.decoder.layers=1"]


def _cfg(overrides=None) -> ModelConfig:
    cfg = ModelConfig.sized("tiny", {**SMALL, **(overrides or {})})
    cfg.validate()
    return cfg


def _encoder_params(cfg: ModelConfig, batch: int = 2):
    images = jnp.zeros((batch, cfg.image_size, cfg.image_size, 3), jnp.uint8)
    encoder = frame_encoder(cfg)
    assert isinstance(encoder, ResNetEncoder)
    params = jax.eval_shape(lambda: encoder.init(jax.random.PRNGKey(0), images))["params"]
    out = jax.eval_shape(lambda p: encoder.apply({"params": p}, images), params)
    return nn.unbox(params), out


def _leaves(tree):
    flat, _ = jax.tree_util.tree_flatten_with_path(
        tree, is_leaf=lambda x: isinstance(x, nn.Partitioned)
    )
    return [("/".join(k.key for k in path), leaf) for path, leaf in flat]


def _is_norm(path: str) -> bool:
    """A GroupNorm parameter (stem_norm, normN, proj_norm) of the ResNet trunk."""
    parts = path.split("/")
    return len(parts) > 1 and "norm" in parts[-2]


# --- shapes ----------------------------------------------------------------------------------


@pytest.mark.parametrize("fusion", ["cross_attention", "late"])
def test_tower_returns_pooled_vector_and_caption_tokens(fusion):
    cfg = _cfg({"decoder.fusion": fusion})
    params, (pooled, caption_tokens) = _encoder_params(cfg, batch=3)
    assert pooled.shape == (3, cfg.vision.width)
    assert pooled.dtype == jnp.float32
    if fusion == "late":
        assert caption_tokens is None
        assert "caption_pool" not in params  # Not built: nothing would read it.
    else:
        assert caption_tokens.shape == (3, cfg.vision.caption_queries, cfg.vision.width)
        assert "caption_pool" in params
    assert set(params) >= {"stem_conv", "stem_norm", "token_proj", "pos_embed"}


@pytest.mark.parametrize(
    "stem, image_size, blocks, layout, grid",
    [
        ("small", 32, (1, 1, 1, 1), "small", 4),  # 32 / 8
        ("small", 64, (1, 1, 1), "small", 16),  # 64 / 4
        ("imagenet", 128, (1, 1, 1, 1), "imagenet", 4),  # 128 / 32
        ("imagenet", 224, (3, 4, 6, 3), "imagenet", 7),  # ResNet-50: 224 / 32
        ("imagenet", 36, (1, 1), "imagenet", 5),  # ceil(36 / 8): SAME-style rounding up
        ("auto", 32, (1, 1, 1, 1), "small", 4),  # imagenet would leave 1x1
        ("auto", 128, (1, 1, 1, 1), "imagenet", 4),
        ("auto", 224, (3, 4, 6, 3), "imagenet", 7),
    ],
)
def test_feature_map_size_for_each_stem(stem, image_size, blocks, layout, grid):
    cfg = _cfg(
        {"vision.resnet_stem": stem, "image_size": image_size, "vision.resnet_blocks": blocks}
    )
    assert (cfg.resnet_stem_layout, cfg.resnet_grid) == (layout, grid)
    params, (_, caption_tokens) = _encoder_params(cfg)
    # The positions cover the real last map: grid x grid image tokens.
    assert params["pos_embed"].shape == (grid * grid, cfg.vision.width)
    stem_kernel = params["stem_conv"]["kernel"].shape
    assert stem_kernel == ((7, 7, 3, 4) if layout == "imagenet" else (3, 3, 3, 4))
    last = f"stage{len(blocks) - 1}_block{blocks[-1] - 1}"
    assert params[last]["conv3"]["kernel"].shape[-1] == 4 * 4 * 2 ** (len(blocks) - 1)
    assert params["token_proj"]["kernel"].shape == (16 * 2 ** (len(blocks) - 1), cfg.vision.width)
    assert caption_tokens.shape[1] == cfg.vision.caption_queries


def test_resnet50_layout_has_resnet50_parameter_count():
    # torchvision's ResNet-50 has 23,508,032 parameters without the classifier; GroupNorm has
    # as many affine parameters as BatchNorm. (The encoder adds the token projection, the
    # positions and the two poolers.)
    cfg = _cfg({"vision.resnet_blocks": (3, 4, 6, 3), "vision.resnet_width": 64, "image_size": 224})
    params, _ = _encoder_params(cfg)
    trunk = {k: v for k, v in params.items() if k.startswith(("stem", "stage"))}
    assert sum(math.prod(x.shape) for x in jax.tree.leaves(trunk)) == 23_508_032
    assert len([k for k in params if k.startswith("stage")]) == 16
    assert norm_groups(64) == norm_groups(2048) == 32
    assert [norm_groups(c) for c in (2, 4, 6, 16, 40)] == [1, 2, 1, 8, 4]


@pytest.mark.parametrize(
    "overrides, fragments",
    [
        (
            {"vision.resnet_stem": "imagenet"},
            ["model.vision.resnet_stem='imagenet'", "1x1", "image_size=32"],
        ),
        (dict(image_size=16), ["model.vision.resnet_stem='auto'", "2x2", "model.image_size=16"]),
        ({"vision.resnet_width": 5}, ["model.vision.resnet_width=5", "even"]),
        ({"vision.pool": "shared_queries"}, ["model.vision.pool='shared_queries'", "two_poolers"]),
    ],
)
def test_bad_resnet_layouts_raise_one_line_errors(overrides, fragments):
    with pytest.raises(ValueError) as info:
        _cfg(overrides)
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message


# --- logical axes and sharding ---------------------------------------------------------------


def test_every_parameter_has_known_logical_names_in_every_preset():
    model = CoCa(_cfg())
    boxed = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), *dummy_batch(model)))
    leaves = _leaves(boxed["params"]["image_encoder"])
    assert len(leaves) > 40
    for where, leaf in leaves:
        assert isinstance(leaf, nn.Partitioned), f"{where} has no logical partitioning"
        assert len(leaf.names) == leaf.value.ndim, f"{where}: {leaf.names}"
        assert set(leaf.names) <= KNOWN_NAMES, f"{where}: unknown names {leaf.names}"
        if where.startswith(("stem", "stage")) and where.endswith("kernel"):
            assert leaf.names[:2] == (None, None) and leaf.names[3] == "conv_out", where
            assert leaf.names[2] == (None if where.startswith("stem") else "conv_in"), where
        if _is_norm(where):
            assert leaf.names == ("norm",), where
        if leaf.value.ndim >= 2:  # FSDP: no matrix stays whole on every device.
            spec = nn.logical_to_mesh_axes(leaf.names, shd.DEFAULT_RULES)
            assert any(axis is not None for axis in spec), f"{where}: {spec}"
    # Every name the ResNet uses, the activations' act_conv included, is in every preset.
    used = {n for _, leaf in leaves for n in leaf.names} | {"act_conv"}
    for preset, rules in shd.RULE_PRESETS.items():
        assert used - {None} <= {name for name, _ in rules}, preset


_EIGHT = """
import json
import jax
import numpy as np
from mmjax.runtime import sharding as shd
from mmjax.runtime.config import load_config
from mmjax.models.coca import CoCa
from mmjax.models.config import ModelConfig
from mmjax.training.optimizer import make_optimizer
from mmjax.training.state import create_train_state

assert jax.device_count() == 8
config = load_config("configs/coca.py:size=tiny", OVERRIDES)
model = CoCa(ModelConfig.from_mapping(config.model.to_dict()))
rules = shd.RULE_PRESETS["fsdp_tensor"]
mesh = shd.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
state = create_train_state(model, make_optimizer(config), mesh, rules, seed=0)
flat = jax.tree_util.tree_flatten_with_path(state.params["image_encoder"])[0]
out = {"specs": {}, "shards": {}}
for path, p in flat:
    key = "/".join(k.key for k in path)
    out["specs"][key] = [list(e) if isinstance(e, tuple) else e for e in p.sharding.spec]
    out["shards"][key] = [list(p.shape), list(p.addressable_shards[0].data.shape)]

rng = np.random.default_rng(0)
images = rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
tokens = rng.integers(1, config.model.vocab_size, (8, config.model.context_length), np.int32)

def forward(mesh, params):
    batch = [jax.device_put(x, shd.batch_sharding(mesh, rules, x.ndim)) for x in (images, tokens)]
    with shd.activate(mesh, rules):
        got = jax.jit(lambda p, i, t: model.apply({"params": p}, i, t))(params, *batch)
    return {k: np.asarray(v) for k, v in got.items()}

# Every block's last norm starts at scale 0 (its residual branch is off at init): perturb all
# parameters so that every conv counts in the comparison.
host = jax.tree.map(
    lambda p: p + 0.2 * rng.standard_normal(p.shape).astype(p.dtype),
    jax.device_get(state.params),
)
params_sharded = jax.tree.map(lambda h, p: jax.device_put(h, p.sharding), host, state.params)
sharded = forward(mesh, params_sharded)
one = shd.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
single = forward(one, jax.device_put(host, jax.devices()[0]))
out["max_diff"] = {k: float(np.max(np.abs(sharded[k] - single[k]))) for k in single}
out["scale"] = {k: float(np.max(np.abs(single[k]))) for k in single}
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def eight():
    overrides = [flag.removeprefix("--config.") for flag in SMALL_FLAGS] + SHORT
    return run_with_devices(_EIGHT.replace("OVERRIDES", repr(overrides)))


@pytest.mark.slow
def test_initialises_sharded_and_conv_kernels_split(eight):
    specs, shards = eight["specs"], eight["shards"]
    conv = {k: v for k, v in specs.items() if k.startswith(("stem", "stage"))}
    conv = {k: v for k, v in conv.items() if k.endswith("kernel")}
    assert len(conv) == 1 + 2 * 3 + 2  # stem, 3 convs per block, 2 projection shortcuts
    for key, spec in conv.items():
        spec = spec + [None] * (4 - len(spec))
        want = [None, None, None if key.startswith("stem") else "fsdp", "tensor"]
        assert spec == want, f"{key}: {spec}"
        shape, shard = shards[key]
        assert shard[3] * 2 == shape[3], key  # Output channels really split in two.
    # The projection to the token width is row-parallel, like an MLP's fc2.
    assert specs["token_proj/kernel"] == ["tensor", "fsdp"]
    assert shards["token_proj/kernel"] == [[32, 64], [16, 32]]
    norms = [v for k, v in specs.items() if _is_norm(k)]
    assert norms and all(all(e is None for e in v) for v in norms)


@pytest.mark.slow
def test_sharded_forward_equals_one_device(eight):
    assert set(eight["max_diff"]) >= {"image_emb", "text_emb", "logits"}
    for key, diff in eight["max_diff"].items():
        assert diff <= 1e-5 * max(1.0, eight["scale"][key]), (key, diff, eight["scale"][key])


# --- training and the config loader ----------------------------------------------------------


@pytest.mark.slow  # ~35 s of CPU: compiling the init and the train step of a whole CoCa.
def test_train_steps_on_a_fixed_batch_reduce_the_loss():
    """6 steps of mmjax.training.step.train_step on one batch of 8 (a 2-stage ResNet and 1-layer text
    towers keep the compile short): the loss falls from ~15 to ~8."""
    steps, batch_size = 6, 8
    _, overrides = split_config_flags(SMALL_FLAGS)
    config = load_config(
        f"{CONFIG},batch={batch_size},steps={steps}",
        overrides
        + [
            *SHORT,
            "optimizer.learning_rate=3e-3",
            "optimizer.warmup_steps=0",
            "optimizer.end_learning_rate_factor=1.0",
        ],
    )
    cfg = ModelConfig.from_mapping(config.model.to_dict())
    model = CoCa(cfg)
    mesh = shd.make_mesh(dict(config.mesh), jax.devices()[:1])
    rules = shd.rules_from_config(config.sharding_rules)
    rng = np.random.default_rng(0)
    batch = {
        "images": rng.integers(0, 256, (batch_size, 32, 32, 3), dtype=np.uint8),
        "tokens": rng.integers(1, cfg.vocab_size, (batch_size, cfg.context_length), np.int32),
    }
    tx = make_optimizer(config)
    step_fn = jax.jit(bind_train_step(config, model, tx, rules), donate_argnums=(0,))
    state = create_train_state(model, tx, mesh, rules, config.seed)
    losses = []
    with shd.activate(mesh, rules):
        for _ in range(steps):
            state, metrics = step_fn(state, batch)
            losses.append(float(metrics["loss"]))
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < 0.8 * losses[0], losses


def test_config_loader_accepts_resnet():
    _, overrides = split_config_flags(["--config.model.vision.encoder=resnet"])
    config = load_config(CONFIG, overrides)
    cfg = ModelConfig.from_mapping(config.model.to_dict())
    assert cfg.vision.encoder == "resnet"
    # Default ResNet-50 stages at 32 px: 'auto' picks the small stem, a 4x4 last map.
    assert (cfg.vision.resnet_blocks, cfg.resnet_stem_layout, cfg.resnet_grid) == (
        (3, 4, 6, 3),
        "small",
        4,
    )


def test_invalid_image_encoder_is_a_one_line_cli_error(capsys, tmp_path, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("a config error must be reported before any state or compilation")

    monkeypatch.setattr(Trainer, "compile_step", forbidden)
    monkeypatch.setattr(Run, "create_state", forbidden)
    monkeypatch.setattr(Run, "compile_step", forbidden)
    workdir = tmp_path / "run"
    argv = ["--config", CONFIG, "--workdir", str(workdir), "--config.model.vision.encoder=cnn"]
    assert train.main(argv) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1, errors
    assert "model.vision.encoder='cnn'" in errors[0] and "'resnet'" in errors[0], errors[0]
    assert not (workdir / "checkpoints").exists()
    with pytest.raises(ConfigError, match=r"model\.vision.resnet_stem='imagenet' .* 1x1"):
        load_config(CONFIG, ["model.vision.encoder=resnet", "model.vision.resnet_stem=imagenet"])


def test_encoder_ablation_variants_are_valid_and_comparable():
    spec = "configs/ablations/encoders.py:size=tiny,steps=800"
    sweep = load_sweep(spec)
    assert list(sweep) == ["vit", "resnet"]
    counts = {}
    for name, deltas in sweep.items():
        config = load_config(spec, variant_overrides(deltas))
        assert config.model.vision.encoder == name
        counts[name] = parameter_count(config)
    assert abs(counts["resnet"] / counts["vit"] - 1) < 0.05, counts
