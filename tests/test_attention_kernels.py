"""model.attention: every kernel computes the XLA path's attention where a loss can see it.

Splash runs here in Pallas interpret mode (the same kernel code, executed by XLA:CPU); its
TPU lowering is proven by compiling for a TPU topology (test_splash_compiles_for_a_tpu_...).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.models import attention
from mmjax.models.attention import AttentionMask, attend, choose_kernel
from mmjax.models.layers import prefix_lm_mask
from mmjax.models.text import text_attention_mask

REPO = Path(__file__).resolve().parents[1]


def _qkv(batch, queries, keys, heads=2, dim=16, seed=0, dtype=jnp.float32):
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    return (
        jax.random.normal(k1, (batch, queries, heads, dim), dtype),
        jax.random.normal(k2, (batch, keys, heads, dim), dtype),
        jax.random.normal(k3, (batch, keys, heads, dim), dtype),
    )


def test_dense_masks_are_the_models_masks():
    np.testing.assert_array_equal(
        AttentionMask(causal=True, prefix=3).dense(7, 7), prefix_lm_mask(7, 7, prefix=3)
    )
    tokens = jnp.array([[2, 9, 3, 0, 0], [2, 8, 8, 8, 3]])
    mask = text_attention_mask(tokens, with_cls=True).dense(6, 6)
    assert mask.shape == (2, 1, 6, 6)
    # Row 5 is the CLS slot: it sees the real tokens and itself, never padding.
    np.testing.assert_array_equal(mask[0, 0, 5], [1, 1, 1, 0, 0, 1])
    np.testing.assert_array_equal(mask[1, 0, 5], [1, 1, 1, 1, 1, 1])
    np.testing.assert_array_equal(mask[1, 0, 2], [1, 1, 1, 0, 0, 0])  # Causal.
    assert AttentionMask().dense(3, 4) is None


def _shape(b, t, s, d=64, dtype=jnp.float32):
    return jnp.zeros((b, t, 2, d), dtype), jnp.zeros((b, s, 2, d), dtype)


@pytest.mark.parametrize(
    "kernel, platform, shape, expected",
    [
        ("auto", "cpu", _shape(2, 256, 256), "xla"),
        ("auto", "tpu", _shape(2, 256, 196), "splash"),
        ("auto", "tpu", _shape(2, 76, 76), "xla"),  # Shorter than one splash block.
        ("auto", "gpu", _shape(2, 76, 76, dtype=jnp.bfloat16), "cudnn"),
        ("auto", "gpu", _shape(2, 76, 76), "xla"),  # cuDNN's fused attention wants 16 bits.
        ("auto", "gpu", _shape(2, 76, 76, d=160, dtype=jnp.bfloat16), "xla"),
        ("xla", "tpu", _shape(2, 256, 256), "xla"),
        ("splash", "cpu", _shape(2, 8, 8), "splash"),  # Interpret mode: for tests.
        ("cudnn", "gpu", _shape(2, 8, 8), "cudnn"),
    ],
)
def test_kernel_choice(kernel, platform, shape, expected):
    assert choose_kernel(kernel, platform, *shape) == expected


@pytest.mark.parametrize(
    "kernel, platform, message",
    [
        ("cudnn", "cpu", "model.attention='cudnn' needs a GPU; this step compiles for cpu"),
        ("splash", "gpu", "model.attention='splash' is a TPU kernel; on GPU use cudnn or auto"),
        ("flash", "cpu", "model.attention='flash' is unknown; allowed: "),
    ],
)
def test_unavailable_kernels_are_one_line(kernel, platform, message):
    with pytest.raises(ValueError, match="^" + message.replace("(", r"\(")):
        choose_kernel(kernel, platform, *_shape(1, 8, 8))


def _valid_rows(batch, queries, valid):
    return np.ones((batch, queries), bool) if valid is None else np.asarray(valid)


CASES = {
    # Text encoder: causal, right padding, a CLS slot that is never padding.
    "causal_padding": dict(queries=20, keys=20, causal=True, pad=True),
    # Early fusion: 6 image tokens seen by everyone, then causal text.
    "prefix": dict(queries=20, keys=20, causal=True, prefix=6),
    # Vision tower: bidirectional over more than one splash block.
    "full": dict(queries=130, keys=130),
    # Attentional pooler / decoder cross-attention: queries and keys of other lengths.
    "cross": dict(queries=9, keys=40),
}


@pytest.mark.parametrize("case", list(CASES))
def test_splash_equals_xla_where_a_loss_can_see(case):
    spec = CASES[case]
    batch, queries, keys = 3, spec["queries"], spec["keys"]
    q, k, v = _qkv(batch, queries, keys)
    valid = None
    if spec.get("pad"):
        lengths = np.array([20, 11, 4])
        valid = np.arange(keys)[None] < lengths[:, None]
        valid[:, -1] = True  # The CLS slot.
    mask = AttentionMask(
        key_valid=None if valid is None else jnp.asarray(valid),
        causal=spec.get("causal", False),
        prefix=spec.get("prefix", 0),
    )
    rows = jnp.asarray(_valid_rows(batch, queries, valid))[:, :, None, None]
    weights = jax.random.normal(jax.random.key(7), q.shape)

    def loss(kernel, q, k, v):  # A loss that reads valid query rows only, as the model's do.
        return jnp.sum(jnp.where(rows, attend(q, k, v, mask, kernel), 0.0) * weights)

    outs = {}
    for kernel in ("xla", "splash"):
        out = attend(q, k, v, mask, kernel)
        value, grads = jax.value_and_grad(lambda *a, kernel=kernel: loss(kernel, *a), (0, 1, 2))(
            q, k, v
        )
        outs[kernel] = (np.where(rows, out, 0.0), value, grads)
    np.testing.assert_allclose(outs["splash"][0], outs["xla"][0], atol=2e-5)
    np.testing.assert_allclose(outs["splash"][1], outs["xla"][1], rtol=1e-5)
    for got, want in zip(outs["splash"][2], outs["xla"][2]):
        np.testing.assert_allclose(got, want, atol=5e-5)


def test_splash_sees_padding_as_padding():
    """Changing what padding keys hold changes nothing a valid row gets (the kernel reads the
    mask, not a zero convention)."""
    q, k, v = _qkv(2, 8, 8)
    valid = jnp.arange(8)[None] < jnp.array([[5], [8]])
    mask = AttentionMask(key_valid=valid, causal=True)
    noisy_v = jnp.where(valid[:, :, None, None], v, 1e3)
    a = attend(q, k, v, mask, "splash")
    b = attend(q, k, noisy_v, mask, "splash")
    np.testing.assert_allclose(a[0, :5], b[0, :5], atol=1e-6)
    assert not np.allclose(
        attend(q, k, v, AttentionMask(causal=True), "splash")[0, 6],
        attend(q, k, noisy_v, AttentionMask(causal=True), "splash")[0, 6],
    )  # Without the padding mask the same values do leak in.


MODEL_EQUALITY = r"""
import json, sys
import jax, jax.numpy as jnp, numpy as np, ml_collections
from mmjax.models.coca import CoCa
from mmjax.models.config import ModelConfig
from mmjax.runtime import sharding as shd
from mmjax.training.objective import loss_and_grads

fusion = sys.argv[1]
mesh = shd.make_mesh({"data": 2, "fsdp": 1, "tensor": 2}, jax.devices())
rules = shd.rules_from_config("fsdp_tensor")
rng = np.random.default_rng(0)
results = {}
for kernel in ("xla", "splash"):
    cfg = ModelConfig.sized("tiny", {"attention": kernel, "decoder.fusion": fusion,
        "vision.layers": 1, "text.layers": 1, "decoder.layers": 1})
    model = CoCa(cfg)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (4, cfg.image_size, cfg.image_size, 3), dtype=np.uint8)
    tokens = rng.integers(4, cfg.vocab_size, (4, cfg.context_length)).astype(np.int32)
    tokens[:, 0] = 2
    for row, length in zip(tokens, (15, 9, 5, 3)):
        row[length] = 3
        row[length + 1:] = 0
    batch = {"images": jnp.asarray(images), "tokens": jnp.asarray(tokens)}
    loss_config = ml_collections.ConfigDict(
        dict(contrastive="softmax", contrastive_weight=1.0, caption_weight=2.0))
    with shd.activate(mesh, rules):
        params = jax.jit(lambda b: model.init(jax.random.key(0), b["images"], b["tokens"]))(
            batch)["params"]
        step = jax.jit(lambda p, b: loss_and_grads(
            p, b, model=model, loss_config=loss_config, batch_axes=("data",)))
        loss, aux, grads = jax.device_get(step(params, batch))
        hlo = step.lower(params, batch).as_text()
    results[kernel] = (loss, grads, "shard_map" in hlo or "sdy.manual_computation" in hlo)
(lx, gx, _), (ls, gs, sharded) = results["xla"], results["splash"]
worst = max(float(np.max(np.abs(a - b)) / (np.max(np.abs(a)) + 1e-12))
            for a, b in zip(jax.tree.leaves(gx), jax.tree.leaves(gs)))
print(json.dumps(dict(xla=float(lx), splash=float(ls), worst_grad=worst, sharded=sharded)))
"""


@pytest.mark.slow
def test_model_loss_and_gradients_equal_with_splash_on_a_mesh():
    """The tiny CoCa on 4 CPU devices (data=2 x tensor=2): splash per shard (shard_map over
    batch and heads) gives the XLA path's loss and gradients. Early fusion has every mask
    kind: padded causal text, the image prefix, bidirectional patches, the poolers'
    cross-attention."""
    env = dict(
        os.environ,
        XLA_FLAGS="--xla_force_host_platform_device_count=4",
        JAX_PLATFORMS="cpu",
        PYTHONPATH=str(REPO),
    )
    proc = subprocess.run(
        [sys.executable, "-c", MODEL_EQUALITY, "early"],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["sharded"]
    assert result["splash"] == pytest.approx(result["xla"], rel=1e-5)
    assert result["worst_grad"] < 1e-4


@pytest.mark.slow
def test_splash_compiles_for_a_tpu_topology_with_the_kernel_in_the_step():
    pytest.importorskip("libtpu", reason="the tpu extra: bash launch/local.sh test installs it")
    env = dict(os.environ, TPU_SKIP_MDS_QUERY="1", PYTHONPATH=str(REPO))
    env.pop("JAX_PLATFORMS", None)
    env.pop("XLA_FLAGS", None)
    layers = [f"--config.model.{t}.layers=1" for t in ("vision", "text", "decoder")]
    proc = subprocess.run(
        [sys.executable, "-m", "mmjax", "dryrun", "--topology", "v5e:2x2",
         "--config", "configs/coca.py:size=tiny", "--config.mesh.data=2",
         "--config.mesh.fsdp=2", "--config.model.attention=splash", *layers, "--json"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["platform"] == "tpu" and report["fits"]
    # Forward and both backward kernels of the 6 attentions (3 towers' self-attention, the
    # pooler, the decoder's cross-attention...): Mosaic custom calls, one per launch.
    assert report["kernels"].get("tpu_custom_call", 0) >= 6


def test_a_kernel_the_devices_lack_is_refused_before_compiling():
    from mmjax.runtime.config import ConfigError, load_config
    from mmjax.training.setup import build_run

    config = load_config("configs/coca.py:size=tiny", ["model.attention=cudnn"])
    with pytest.raises(ConfigError, match="^model.attention='cudnn' needs a GPU; this step"):
        build_run(config)


def test_splash_block_is_the_kernels_default():
    """The padding unit is the kernel's own default block, so no partial blocks reach it."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk

    defaults = sk.BlockSizes.get_default()
    assert attention.SPLASH_BLOCK == defaults.block_q == defaults.block_kv


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("size=tiny", ("float32", "float32", "auto", "none")),
        ("size=base,accelerator=tpu", ("bfloat16", "float32", "auto", "minimal")),
        ("size=large,accelerator=gpu", ("bfloat16", "float32", "auto", "dots-saveable")),
    ],
)
def test_accelerator_presets(spec, expected):
    from mmjax.runtime.config import load_config

    model = load_config(f"configs/coca.py:{spec}").model
    assert (model.dtype, model.param_dtype, model.attention, model.remat) == expected
    overridden = load_config(f"configs/coca.py:{spec}", ["model.remat=full"]).model
    assert overridden.remat == "full"  # A preset is a default, never the last word.


def test_unknown_accelerator_is_one_line():
    from mmjax.runtime.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"^config argument accelerator='h100' is unknown; "):
        load_config("configs/video.py:accelerator=h100")
