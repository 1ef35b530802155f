"""Sharded contrastive losses equal the unsharded ones, value and gradients, on many meshes.

The multi-device checks run in one subprocess with 8 forced CPU devices (the device count is
fixed when JAX starts); it prints one JSON object of measured errors, asserted on here. Meshes
split the batch 2, 3, 4, 6, 7 and 8 ways, over one or two axes, with and without a replicated
`tensor` axis, so the ring's odd and even cases and the label offsets are all exercised.
"""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from mmjax.benchmarks.loss import main as loss_bench_main
from mmjax.training import losses, sharded_losses
from tests.runs import run_with_devices

REPO = Path(__file__).resolve().parents[1]
TOLERANCE = 1e-5  # Relative to the largest entry of the reference value / gradient.

_CHILD = """
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from mmjax.training import losses
from mmjax.runtime import sharding as shd
from mmjax.training.sharded_losses import (
    chunked_sigmoid_loss, local_softmax_loss, ring_softmax_loss, sharded_contrastive_loss,
)

assert jax.device_count() == 8
DEVICES = np.asarray(jax.devices())
out = {}


def mesh_of(data, fsdp, tensor):
    grid = DEVICES[: data * fsdp * tensor].reshape(data, fsdp, tensor)
    return Mesh(grid, ("data", "fsdp", "tensor"))


def embeddings(seed, batch, dim, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    pair = rng.normal(size=(2, batch, dim))
    pair /= np.linalg.norm(pair, axis=-1, keepdims=True)
    return jnp.asarray(pair[0], dtype), jnp.asarray(pair[1], dtype)


def rel_err(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-30))


SHARDED = {
    "sigmoid": lambda i, t, s, b, mesh, axes: chunked_sigmoid_loss(
        i, t, s, b, mesh=mesh, batch_axes=axes
    ),
    "softmax": lambda i, t, s, b, mesh, axes: ring_softmax_loss(
        i, t, s, mesh=mesh, batch_axes=axes
    ),
    "softmax_local": lambda i, t, s, b, mesh, axes: local_softmax_loss(
        i, t, s, mesh=mesh, batch_axes=axes
    ),
}
PLAIN = {
    "sigmoid": losses.sigmoid_contrastive_loss,
    "softmax": lambda i, t, s, b: losses.softmax_contrastive_loss(i, t, s),
}
PLAIN["softmax_local"] = PLAIN["softmax"]
NAMES = ("value", "image", "text", "scale", "bias")


def compare(mesh, axes, image, text, scale=10.0, bias=-5.0, names=("sigmoid", "softmax")):
    rows = NamedSharding(mesh, P(axes, None))
    image_s, text_s = jax.device_put(image, rows), jax.device_put(text, rows)
    result = {}
    for name in names:
        fn = lambda i, t, s, b: SHARDED[name](i, t, s, b, mesh, axes)
        value, grads = jax.jit(jax.value_and_grad(fn, argnums=(0, 1, 2, 3)))(
            image_s, text_s, scale, bias
        )
        ref_value, ref_grads = jax.jit(jax.value_and_grad(PLAIN[name], argnums=(0, 1, 2, 3)))(
            image, text, scale, bias
        )
        got, want = (value, *grads), (ref_value, *ref_grads)
        errors = {k: rel_err(g, w) for k, g, w in zip(NAMES, got, want)}
        if name.startswith("softmax"):
            del errors["bias"]  # The softmax loss has no bias: both gradients are zero.
        result[name] = dict(
            errors=errors,
            value=float(value),
            grad_dtypes=[str(g.dtype) for g in grads[:2]],
            # The gradient stays split like the input, not gathered.
            grad_spec=str(grads[1].sharding.spec),
        )
    return result


# (data, fsdp, tensor), batch axes: split 2, 4, 8 ways, odd 3 and 7, even 6 over two axes.
CASES = {
    "data2": ((2, 1, 1), ("data", "fsdp")),
    "data2_fsdp2_tensor2": ((2, 2, 2), ("data", "fsdp")),
    "data2_fsdp4": ((2, 4, 1), ("data", "fsdp")),
    "fsdp_major_data2_fsdp4": ((2, 4, 1), ("fsdp", "data")),
    "data8": ((8, 1, 1), ("data",)),
    "data3_tensor2": ((3, 1, 2), ("data", "fsdp")),
    "data3_fsdp2": ((3, 2, 1), ("data", "fsdp")),
    "data7": ((7, 1, 1), ("data",)),
}
out["cases"] = {}
for case, (shape, axes) in CASES.items():
    mesh = mesh_of(*shape)
    n = int(np.prod([mesh.shape[a] for a in axes]))
    image, text = embeddings(n, 4 * n, 8)  # B_local = 4.
    out["cases"][case] = dict(split=n, **compare(mesh, axes, image, text))
# The all-gather form of the softmax loss (kept for the loss benchmark), on an odd and a
# two-axis split.
for case in ("data3_fsdp2", "data2_fsdp2_tensor2"):
    shape, axes = CASES[case]
    mesh = mesh_of(*shape)
    n = int(np.prod([mesh.shape[a] for a in axes]))
    image, text = embeddings(n, 4 * n, 8)
    out["cases"][case].update(compare(mesh, axes, image, text, names=("softmax_local",)))

# bf16 embeddings (the model's mixed-precision output): same f32 maths, bf16 gradients.
image, text = embeddings(1, 16, 8, jnp.bfloat16)
out["bf16"] = compare(mesh_of(2, 2, 2), ("data", "fsdp"), image, text)

# As the train step would call it: inside jit, under set_mesh, mesh taken from the context,
# batch axes from the sharding rules, embeddings made by a model from a batch-sharded input.
mesh = shd.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
axes = shd.batch_mesh_axes(shd.DEFAULT_RULES)
rng = np.random.default_rng(7)
params = dict(
    image=jnp.asarray(rng.normal(size=(6, 8)), jnp.float32),
    text=jnp.asarray(rng.normal(size=(6, 8)), jnp.float32),
    log_scale=jnp.log(10.0),
    bias=jnp.asarray(-5.0),
)
inputs = jnp.asarray(rng.normal(size=(16, 6)), jnp.float32)
batch = jax.device_put(inputs, shd.batch_sharding(mesh, shd.DEFAULT_RULES, 2))


def model(params, x):
    norm = lambda e: e / jnp.linalg.norm(e, axis=-1, keepdims=True)
    return norm(x @ params["image"]), norm(jnp.tanh(x) @ params["text"])


def step_loss(params, x, name, sharded):
    image, text = model(params, x)
    scale, bias = jnp.exp(params["log_scale"]), params["bias"]
    if sharded:
        return sharded_contrastive_loss(name, image, text, scale, bias, batch_axes=axes)
    return losses.contrastive_loss(name, image, text, scale, bias)


out["train_step"] = {}
with jax.set_mesh(mesh):
    for name in ("sigmoid", "softmax"):
        got = jax.jit(jax.value_and_grad(lambda p, x: step_loss(p, x, name, True)))(params, batch)
        want = jax.jit(jax.value_and_grad(lambda p, x: step_loss(p, x, name, False)))(
            params, batch
        )
        flat_got, flat_want = jax.tree.leaves(got), jax.tree.leaves(want)
        out["train_step"][name] = max(rel_err(g, w) for g, w in zip(flat_got, flat_want))

# Collectives in the compiled programs (value and gradient), on the 3-axis mesh.
mesh = mesh_of(2, 2, 2)
axes = ("data", "fsdp")
rows = NamedSharding(mesh, P(axes, None))
emb = jax.ShapeDtypeStruct((64, 8), jnp.float32, sharding=rows)
num = jax.ShapeDtypeStruct((), jnp.float32, sharding=NamedSharding(mesh, P()))


def collectives(fn):
    text = jax.jit(jax.value_and_grad(fn, argnums=(0, 1, 2, 3))).lower(emb, emb, num, num)
    hlo = text.compile().as_text()
    ops = re.findall(r"= [^ ]+ (all-gather|collective-permute|all-reduce|reduce-scatter)", hlo)
    return {op: ops.count(op) for op in set(ops)}


out["hlo"] = {
    "chunked": collectives(lambda i, t, s, b: SHARDED["sigmoid"](i, t, s, b, mesh, axes)),
    "gathered": collectives(losses.sigmoid_contrastive_loss),
    "local_softmax": collectives(
        lambda i, t, s, b: SHARDED["softmax_local"](i, t, s, b, mesh, axes)
    ),
    "ring_softmax": collectives(lambda i, t, s, b: SHARDED["softmax"](i, t, s, b, mesh, axes)),
}


# Per-device temp memory at a fixed per-device batch, 4 vs 8 devices on one axis.
def temp_bytes(fn, n, local=64, dim=32):
    mesh = mesh_of(n, 1, 1)
    rows = NamedSharding(mesh, P(("data",), None))
    emb = jax.ShapeDtypeStruct((n * local, dim), jnp.float32, sharding=rows)
    num = jax.ShapeDtypeStruct((), jnp.float32, sharding=NamedSharding(mesh, P()))
    call = lambda i, t, s, b: fn(i, t, s, b, mesh)
    compiled = jax.jit(jax.value_and_grad(call, argnums=(0, 1, 2, 3))).lower(emb, emb, num, num)
    return int(compiled.compile().memory_analysis().temp_size_in_bytes)


chunked = lambda i, t, s, b, mesh: SHARDED["sigmoid"](i, t, s, b, mesh, ("data",))
gathered = lambda i, t, s, b, mesh: losses.sigmoid_contrastive_loss(i, t, s, b)
ring = lambda i, t, s, b, mesh: SHARDED["softmax"](i, t, s, b, mesh, ("data",))
local = lambda i, t, s, b, mesh: SHARDED["softmax_local"](i, t, s, b, mesh, ("data",))
out["memory"] = {
    f"{name}_{n}": temp_bytes(fn, n)
    for name, fn in (("chunked", chunked), ("gathered", gathered), ("ring", ring),
                     ("local", local))
    for n in (4, 8)
}
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def sharded():
    return run_with_devices(_CHILD)


def _assert_close(errors: dict, where: str, tolerance: float = TOLERANCE):
    bad = {k: v for k, v in errors.items() if not v <= tolerance}
    assert not bad, f"{where}: relative errors {bad}"


@pytest.mark.slow
@pytest.mark.parametrize(
    "case, split",
    [
        ("data2", 2),
        ("data2_fsdp2_tensor2", 4),
        ("data2_fsdp4", 8),
        ("fsdp_major_data2_fsdp4", 8),
        ("data8", 8),
        ("data3_tensor2", 3),
        ("data3_fsdp2", 6),
        ("data7", 7),
    ],
)
@pytest.mark.parametrize("loss", ["sigmoid", "softmax"])
def test_sharded_loss_matches_plain_loss_value_and_gradients(sharded, case, split, loss):
    result = sharded["cases"][case]
    assert result["split"] == split
    _assert_close(result[loss]["errors"], f"{loss} on {case}")
    assert result[loss]["value"] > 0.1  # Random embeddings: a real, non-trivial loss.
    assert result[loss]["grad_dtypes"] == ["float32", "float32"]


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["sigmoid", "softmax"])
def test_bf16_embeddings_get_bf16_gradients_matching_the_plain_loss(sharded, loss):
    result = sharded["bf16"][loss]
    errors = dict(result["errors"])
    # Both compute in f32 from the same bf16 inputs; only the cast-back gradients are rounded.
    _assert_close({"value": errors.pop("value")}, f"bf16 {loss}")
    _assert_close(errors, f"bf16 {loss}", tolerance=1e-2)
    assert result["grad_dtypes"] == ["bfloat16", "bfloat16"]


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["sigmoid", "softmax"])
def test_works_inside_jit_under_set_mesh_like_the_train_step(sharded, loss):
    # Parameter gradients through a model, with the mesh taken from jax.set_mesh.
    _assert_close({"params": sharded["train_step"][loss]}, f"train step {loss}")


@pytest.mark.slow
def test_chunked_sigmoid_passes_texts_around_the_ring_instead_of_gathering(sharded):
    hlo = sharded["hlo"]
    assert hlo["chunked"].get("collective-permute", 0) >= 2, hlo["chunked"]
    assert hlo["chunked"].get("all-gather", 0) == 0, hlo["chunked"]
    # The detector sees a gather where there is one, so the zero above means something.
    assert hlo["gathered"].get("all-gather", 0) >= 1, hlo["gathered"]
    assert hlo["local_softmax"].get("all-gather", 0) >= 1, hlo["local_softmax"]
    assert hlo["ring_softmax"].get("collective-permute", 0) >= 2, hlo["ring_softmax"]
    assert hlo["ring_softmax"].get("all-gather", 0) == 0, hlo["ring_softmax"]


@pytest.mark.slow
@pytest.mark.parametrize("case", ["data3_fsdp2", "data2_fsdp2_tensor2"])
def test_the_all_gather_softmax_still_matches_the_plain_loss(sharded, case):
    _assert_close(sharded["cases"][case]["softmax_local"]["errors"], f"softmax_local on {case}")


@pytest.mark.slow
def test_ring_softmax_memory_does_not_grow_with_the_ring(sharded):
    memory = sharded["memory"]
    # The all-gather form holds B_local x B_global logits: twice the devices, twice the logits.
    assert memory["local_8"] >= 1.6 * memory["local_4"], memory
    assert memory["ring_8"] <= 1.25 * memory["ring_4"], memory
    assert memory["ring_8"] < 0.5 * memory["local_8"], memory


@pytest.mark.slow
def test_chunked_sigmoid_memory_does_not_grow_with_the_ring(sharded):
    memory = sharded["memory"]
    # Fixed per-device batch: twice the devices means twice the gathered logits per device,
    # while the ring keeps the same few B_local-sized blocks (nothing saved per hop).
    assert memory["gathered_8"] >= 1.6 * memory["gathered_4"], memory
    assert memory["chunked_8"] <= 1.25 * memory["chunked_4"], memory
    assert memory["chunked_8"] < 0.5 * memory["gathered_8"], memory


def _remote_offsets(n: int) -> list[int]:
    """Ring offsets of the text shards a device scores, besides its own, per the ring plan."""
    both, extra = sharded_losses._ring_plan(n)
    offsets = [-h % n for h in range(1, both + 1)] + [h % n for h in range(1, both + 1)]
    return offsets + ([-(both + 1) % n] if extra else [])


@pytest.mark.parametrize("n", [*range(2, 20), 255, 256])
def test_ring_plan_visits_every_other_shard_exactly_once(n):
    offsets = _remote_offsets(n)
    assert sorted(offsets) == list(range(1, n)), n
    both, _ = sharded_losses._ring_plan(n)
    assert both + (n % 2 == 0) == n // 2  # ~n/2 communication rounds.


def _one_device_mesh():
    return Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1, 1), ("data", "fsdp", "tensor"))


def _pair(batch=6, dim=4):
    rng = np.random.default_rng(0)
    pair = rng.normal(size=(2, batch, dim))
    pair /= np.linalg.norm(pair, axis=-1, keepdims=True)
    return jnp.asarray(pair[0], jnp.float32), jnp.asarray(pair[1], jnp.float32)


@pytest.mark.parametrize("name", ["sigmoid", "softmax"])
def test_a_batch_split_one_way_is_the_plain_loss(name):
    image, text = _pair()
    got = sharded_losses.sharded_contrastive_loss(
        name, image, text, 10.0, -5.0, mesh=_one_device_mesh(), batch_axes=("data", "fsdp")
    )
    want = losses.contrastive_loss(name, image, text, 10.0, -5.0)
    np.testing.assert_allclose(float(got), float(want), rtol=1e-6)


@pytest.mark.parametrize(
    "name, bias",
    [("cosine", -5.0), ("sigmoid", None)],
)
def test_dispatcher_raises_the_same_errors_as_contrastive_loss(name, bias):
    image, text = _pair()
    with pytest.raises(ValueError) as plain:
        losses.contrastive_loss(name, image, text, 10.0, bias)
    with pytest.raises(ValueError) as sharded:
        sharded_losses.sharded_contrastive_loss(
            name, image, text, 10.0, bias, mesh=_one_device_mesh(), batch_axes=("data",)
        )
    assert str(sharded.value) == str(plain.value)


def test_bad_batch_axes_and_shapes_raise_one_line_errors():
    image, text = _pair()
    mesh = _one_device_mesh()
    for fn in (
        lambda **kw: sharded_losses.chunked_sigmoid_loss(image, text, 10.0, -5.0, **kw),
        lambda **kw: sharded_losses.local_softmax_loss(image, text, 10.0, **kw),
    ):
        with pytest.raises(ValueError, match=r"batch_axes \['batch'\] are not axes of the mesh"):
            fn(mesh=mesh, batch_axes=("batch",))
    with pytest.raises(ValueError, match="same shape"):
        sharded_losses.chunked_sigmoid_loss(
            image, text[:4], 10.0, -5.0, mesh=mesh, batch_axes=("data",)
        )
    with pytest.raises(ValueError, match="needs a mesh"):
        sharded_losses.local_softmax_loss(image, text, 10.0, batch_axes=("data",))


@pytest.mark.slow
def test_loss_bench_reports_chunked_below_gathered(capsys):
    args = ["--devices", "4", "--per-device-batch", "32", "--dim", "16", "--json"]
    assert loss_bench_main(args) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    by_loss = {row["loss"]: row for row in rows}
    assert set(by_loss) == {
        "sigmoid/gathered",
        "sigmoid/chunked",
        "softmax/gathered",
        "softmax/local",
        "softmax/ring",
    }
    for row in rows:
        assert row["devices"] == 4 and row["global_batch"] == 128
        assert row["temp_bytes"] > 0 and row["argument_bytes"] >= 2 * 32 * 16 * 4
    assert by_loss["sigmoid/chunked"]["temp_bytes"] < by_loss["sigmoid/gathered"]["temp_bytes"]
    assert by_loss["softmax/ring"]["temp_bytes"] < by_loss["softmax/local"]["temp_bytes"]
