"""Device mesh and logical-to-mesh sharding rules.

Model code names axes logically; this module is the only place that knows
the mesh axes (`data`, `fsdp`, `tensor`). The same rules serve every mesh:
an axis of size 1 simply does not split anything.

Meshes may be hybrid: `mesh.dcn_data` / `mesh.dcn_fsdp` multiply the data and
fsdp axes across granules (TPU slices, else processes) joined by the slower
data-centre network, while `mesh.{data,fsdp,tensor}` lay out the devices
inside one granule. The axis names stay the same, so rules never change.
"""

from __future__ import annotations

import ast
import collections
import contextlib
import dataclasses
import math
import operator
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
# Config keys of the DCN (across-granule) factors -> the mesh axis each multiplies.
# Tensor parallelism never crosses DCN: it communicates in every layer.
DCN_KEYS = {"dcn_data": "data", "dcn_fsdp": "fsdp"}
MESH_KEYS = MESH_AXES + tuple(DCN_KEYS)


def _rules(embed: str | None, tensor: str | None) -> tuple[tuple[str, Any], ...]:
    """One rule per logical name, in one order, so presets differ only where they mean to."""
    return (
        ("batch", ("data", "fsdp")),
        ("length", None),
        ("act_embed", None),
        ("act_heads", tensor),
        ("act_kv", None),
        ("act_mlp", tensor),
        ("act_vocab", tensor),
        ("embed", embed),
        ("heads", tensor),
        ("kv", None),
        ("mlp", tensor),
        ("vocab", tensor),
        ("joint", None),
        ("patch", None),
        ("layers", None),
        ("norm", None),
        # Convolutions (mmjax/models/resnet.py): kernels [kh, kw, conv_in, conv_out] split like
        # a Dense kernel [embed, mlp] (input channels over fsdp, output channels over tensor);
        # feature maps [batch, h, w, act_conv] keep their channels where conv_out put them.
        ("conv_in", embed),
        ("conv_out", tensor),
        ("act_conv", tensor),
    )


# Logical name -> mesh axis (or axes). The batch always goes over data+fsdp.
# data_parallel: every weight replicated (plain DDP). fsdp: each weight's `embed`
# dimension over fsdp (ZeRO-3 style). fsdp_tensor: fsdp plus Megatron tensor
# parallelism, heads/MLP/vocabulary over tensor.
RULE_PRESETS: dict[str, tuple[tuple[str, Any], ...]] = {
    "data_parallel": _rules(embed=None, tensor=None),
    "fsdp": _rules(embed="fsdp", tensor=None),
    "fsdp_tensor": _rules(embed="fsdp", tensor="tensor"),
}
DEFAULT_RULES = RULE_PRESETS["fsdp_tensor"]


class MeshError(ValueError):
    """A mesh or sharding-rules problem, explained in one line (a ConfigError upstream)."""


@dataclasses.dataclass(frozen=True)
class MeshLayout:
    """Per-axis sizes inside one granule (`ici`) and across granules (`dcn`)."""

    ici: tuple[int, ...]
    dcn: tuple[int, ...] = (1, 1, 1)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(i * d for i, d in zip(self.ici, self.dcn))

    @property
    def hybrid(self) -> bool:
        return math.prod(self.dcn) > 1


def _granule_attr(devices: Sequence[Any]) -> str:
    # TPU devices know their slice; elsewhere (GPU/CPU hosts) a process is the unit.
    first = devices[0]
    if first.platform == "tpu" and getattr(first, "slice_index", None) is not None:
        return "slice_index"
    return "process_index"


def granules(devices: Sequence[Any]) -> tuple[str, int]:
    """(kind, count) of the units DCN axes span: ('slice', n) on TPU, else ('process', n)."""
    attr = _granule_attr(devices)
    kind = "slice" if attr == "slice_index" else "process"
    return kind, len({getattr(d, attr) for d in devices})


def _kinds(kind: str) -> str:
    return "processes" if kind == "process" else f"{kind}s"


def _plural(kind: str, n: int) -> str:
    return f"{n} {kind}" if n == 1 else f"{n} {_kinds(kind)}"


def _resolve_ici(shape: list[int], num_devices: int, where: str) -> tuple[int, ...]:
    """Fills a single -1 so the product equals `num_devices`; checks the rest."""
    unknown = [a for a, s in zip(MESH_AXES, shape) if s == -1]
    if len(unknown) > 1:
        raise MeshError(f"only one of mesh.{{data,fsdp,tensor}} may be -1; got -1 for {unknown}")
    for a, s in zip(MESH_AXES, shape):
        if s == 0 or s < -1:
            raise MeshError(
                f"mesh.{a}={s} is invalid; allowed: a positive size, or -1 to fill the devices"
            )
    known = math.prod(s for s in shape if s != -1)
    if unknown:
        if num_devices % known:
            raise MeshError(
                f"mesh.{unknown[0]}=-1 cannot fill {num_devices} devices{where}: the other axes "
                f"multiply to {known}, which does not divide {num_devices}"
            )
        shape[MESH_AXES.index(unknown[0])] = num_devices // known
    elif known != num_devices:
        desc = ", ".join(f"mesh.{a}={s}" for a, s in zip(MESH_AXES, shape))
        raise MeshError(
            f"{desc} multiply to {known} but there are {num_devices} devices{where}; "
            f"set one axis to -1 to fill them"
        )
    return tuple(shape)


def resolve_mesh(
    sizes: dict[str, int], num_devices: int, num_granules: int = 1, granule: str = "process"
) -> MeshLayout:
    """Checks `mesh.*` against the devices and fills -1; raises MeshError naming the key.

    With all DCN factors 1 the mesh is flat over every device (any number of
    granules). Otherwise the DCN factors must multiply to the number of
    granules, and the ICI axes (a -1 included) lay out each granule's devices.
    """
    unknown = sorted(set(sizes) - set(MESH_KEYS))
    if unknown:
        raise MeshError(f"mesh.{unknown[0]} is unknown; allowed: {list(MESH_KEYS)}")
    dcn = {k: sizes.get(k, 1) for k in DCN_KEYS}  # Absent in configs saved before DCN axes.
    for key, value in dcn.items():
        if not isinstance(value, int) or value < 1:
            raise MeshError(
                f"mesh.{key}={value} is invalid; allowed: a positive number of slices "
                f"(TPU) or processes (elsewhere), default 1"
            )
    factor = math.prod(dcn.values())
    shape = [int(sizes[a]) for a in MESH_AXES]
    if factor == 1:
        return MeshLayout(_resolve_ici(shape, num_devices, ""))
    desc = " x ".join(f"mesh.{k}={v}" for k, v in dcn.items())
    if factor != num_granules:
        raise MeshError(
            f"{desc} = {factor} must equal the number of {_kinds(granule)} the DCN axes span, "
            f"but there {'is' if num_granules == 1 else 'are'} "
            f"{_plural(granule, num_granules)}; set them to multiply to {num_granules}"
        )
    if num_devices % num_granules:
        raise MeshError(
            f"{num_devices} devices do not split evenly over {_plural(granule, num_granules)} "
            f"({desc})"
        )
    per = num_devices // num_granules
    where = f" per {granule} ({num_devices} in {_plural(granule, num_granules)})"
    ici = _resolve_ici(shape, per, where)
    return MeshLayout(ici, tuple(dcn.get(f"dcn_{a}", 1) for a in MESH_AXES))


def resolve_mesh_shape(
    sizes: dict[str, int], num_devices: int, num_granules: int = 1, granule: str = "process"
) -> tuple[int, ...]:
    """The full mesh shape (DCN x ICI per axis); see `resolve_mesh`."""
    return resolve_mesh(sizes, num_devices, num_granules, granule).shape


def _hybrid_grid(layout: MeshLayout, devices: Sequence[Any], key: Callable[[Any], int]):
    """Granules sorted by key, each reshaped to the ICI shape, tiled over the DCN shape.

    The layout `create_hybrid_device_mesh` gives, without its topology search: the
    fallback when that search fails, and what simulated granules use.
    """
    groups: dict[int, list[Any]] = {}
    for d in devices:
        groups.setdefault(key(d), []).append(d)
    blocks = [np.asarray(groups[k], dtype=object).reshape(layout.ici) for k in sorted(groups)]
    grid = np.empty(layout.shape, dtype=object)
    for index, block in zip(np.ndindex(*layout.dcn), blocks):
        grid[tuple(slice(i * n, (i + 1) * n) for i, n in zip(index, layout.ici))] = block
    return grid


def device_grid(
    sizes: dict[str, int],
    devices: Sequence[Any],
    granule_of: Callable[[Any], int] | None = None,
) -> np.ndarray:
    """The devices arranged as the (data, fsdp, tensor) mesh of config `sizes`.

    `granule_of` overrides which granule a device belongs to (the dry run uses it
    to simulate slices with one process's forced CPU devices).
    """
    devices = list(devices)
    if granule_of is None:
        attr = _granule_attr(devices)
        kind = "slice" if attr == "slice_index" else "process"
        key = operator.attrgetter(attr)
    else:
        attr, kind, key = None, "process", granule_of
    per_granule = collections.Counter(key(d) for d in devices)
    layout = resolve_mesh(sizes, len(devices), len(per_granule), kind)
    if not layout.hybrid:
        try:  # Topology-aware placement on TPU/GPU slices.
            return mesh_utils.create_device_mesh(layout.shape, devices)
        except (ValueError, NotImplementedError, AssertionError):
            return np.asarray(devices, dtype=object).reshape(layout.shape)
    if len(set(per_granule.values())) > 1:
        raise MeshError(f"{_kinds(kind)} hold different numbers of devices: {dict(per_granule)}")
    if attr is not None:
        try:  # ICI axes inside each granule, DCN axes across them.
            return mesh_utils.create_hybrid_device_mesh(
                layout.ici, layout.dcn, devices, process_is_granule=attr == "process_index"
            )
        except (ValueError, NotImplementedError, AssertionError):
            pass
    return _hybrid_grid(layout, devices, key)


def make_mesh(
    sizes: dict[str, int],
    devices: Sequence[jax.Device] | None = None,
    granule_of: Callable[[Any], int] | None = None,
) -> Mesh:
    devices = list(devices if devices is not None else jax.devices())
    return Mesh(device_grid(sizes, devices, granule_of), MESH_AXES)


def rules_from_config(rules) -> tuple[tuple[str, Any], ...]:
    """`config.sharding_rules` -> Flax's tuple form; raises MeshError naming the problem.

    Accepts a preset name (`RULE_PRESETS`), a list of (logical name, mesh axes)
    pairs (lists when read back from config.json), or such a list as a Python
    literal string (a command-line override).
    """
    if isinstance(rules, str):
        text = rules.strip()
        if text in RULE_PRESETS:
            return RULE_PRESETS[text]
        if not text.startswith(("[", "(")):
            raise MeshError(
                f"sharding_rules={rules!r} is unknown; allowed: {list(RULE_PRESETS)} "
                f"or a list of (logical name, mesh axes) pairs"
            )
        try:
            rules = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            raise MeshError(f"sharding_rules={rules!r} is not a valid Python literal") from None
    out = []
    for rule in rules:
        if not isinstance(rule, (list, tuple)) or len(rule) != 2 or not isinstance(rule[0], str):
            raise MeshError(
                f"sharding_rules entry {rule!r} is not a (logical name, mesh axes) pair"
            )
        name, axes = rule
        axes = tuple(axes) if isinstance(axes, (list, tuple)) else axes
        for axis in axes if isinstance(axes, tuple) else (axes,):
            if axis is not None and axis not in MESH_AXES:
                raise MeshError(
                    f"sharding_rules entry {(name, axes)!r} names mesh axis {axis!r}; "
                    f"allowed: {list(MESH_AXES)} or None"
                )
        out.append((name, axes))
    return tuple(out)


@contextlib.contextmanager
def activate(mesh: Mesh, rules):
    """Makes `mesh` and `rules` current so logical constraints resolve."""
    set_mesh = getattr(jax, "set_mesh", None) or getattr(jax.sharding, "use_mesh", None)
    mesh_ctx = set_mesh(mesh) if set_mesh is not None else mesh
    with mesh_ctx, nn.logical_axis_rules(rules):
        yield


def logical_shardings(abstract_tree, mesh: Mesh, rules):
    """NamedShardings for a tree of (possibly boxed) abstract values."""
    specs = nn.get_partition_spec(abstract_tree)
    return nn.logical_to_mesh_sharding(specs, mesh, rules)


def batch_sharding(mesh: Mesh, rules, ndim: int) -> NamedSharding:
    """Leading dim over the `batch` rule's axes, the rest replicated."""
    spec = nn.logical_to_mesh_axes(("batch",) + (None,) * (ndim - 1), rules)
    return NamedSharding(mesh, spec)


def batch_mesh_axes(rules) -> tuple[str, ...]:
    """The mesh axes the `batch` rule splits the batch over."""
    spec = nn.logical_to_mesh_axes(("batch",), rules)[0]
    return spec if isinstance(spec, tuple) else (spec,) if spec else ()


def data_parallel_size(mesh: Mesh | dict[str, int], rules) -> int:
    """How many ways the batch is split (a Mesh or a {axis: size} dict)."""
    sizes = mesh.shape if isinstance(mesh, Mesh) else mesh
    return math.prod(sizes[a] for a in batch_mesh_axes(rules))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def bytes_per_device(abstract_tree) -> int:
    """Bytes one device holds of a tree of sharded arrays or ShapeDtypeStructs.

    The largest shard counts (uneven splits pad up to it); replicated leaves count whole.
    """
    total = 0
    for leaf in jax.tree.leaves(abstract_tree):
        shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
        total += math.prod(shape) * np.dtype(leaf.dtype).itemsize
    return total
