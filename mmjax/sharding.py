"""Device mesh and logical-to-mesh sharding rules.

Model code names axes logically; this module is the only place that knows
the mesh axes (`data`, `fsdp`, `tensor`). The same rules serve every mesh:
an axis of size 1 simply does not split anything.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# Logical name -> mesh axis (or axes). Activations first, then parameters.
# FSDP shards each weight's `embed` dimension; tensor parallelism splits
# heads, MLP and vocabulary (Megatron layout); the batch goes over data+fsdp.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv", None),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv", None),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("joint", None),
    ("patch", None),
    ("layers", None),
    ("norm", None),
)


class MeshError(ValueError):
    pass


def resolve_mesh_shape(sizes: dict[str, int], num_devices: int) -> tuple[int, ...]:
    """Fills a single -1 so the product equals `num_devices`; checks the rest."""
    shape = [int(sizes[a]) for a in MESH_AXES]
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
                f"mesh.{unknown[0]}=-1 cannot fill {num_devices} devices: the other axes "
                f"multiply to {known}, which does not divide {num_devices}"
            )
        shape[MESH_AXES.index(unknown[0])] = num_devices // known
    elif known != num_devices:
        desc = ", ".join(f"mesh.{a}={s}" for a, s in zip(MESH_AXES, shape))
        raise MeshError(
            f"{desc} multiply to {known} but there are {num_devices} devices; "
            f"set one axis to -1 to fill them"
        )
    return tuple(shape)


def make_mesh(sizes: dict[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    devices = list(devices if devices is not None else jax.devices())
    shape = resolve_mesh_shape(sizes, len(devices))
    try:  # Topology-aware placement on TPU/GPU slices.
        grid = mesh_utils.create_device_mesh(shape, devices)
    except (ValueError, NotImplementedError, AssertionError):
        grid = np.asarray(devices).reshape(shape)
    return Mesh(grid, MESH_AXES)


def rules_from_config(rules) -> tuple[tuple[str, Any], ...]:
    """Normalises rules read back from JSON (lists) into Flax's tuple form."""
    out = []
    for name, axes in rules:
        if isinstance(axes, (list, tuple)):
            axes = tuple(axes)
        out.append((str(name), axes))
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
