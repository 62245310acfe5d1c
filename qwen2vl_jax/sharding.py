"""Meshes and logical-axis sharding rules.

Params and activations carry logical axis names; `RULES` maps them to the mesh axes (`data`, `fsdp`,
`tensor`). Changing the parallelism of a run changes the mesh shape, never the model code.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axis (or axes, or None = replicated)
RULES: tuple[tuple[str, object], ...] = (
    ("batch", ("data", "fsdp")),
    ("layers", None),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("norm", None),
    ("vit_patch", None),
    ("vit_embed", "fsdp"),
    ("vit_qkv", "tensor"),
    ("vit_heads", "tensor"),
    ("vit_mlp", "tensor"),
    ("vit_merge", "fsdp"),
    ("vit_merge_mlp", "tensor"),
    ("vit_norm", None),
    ("length", None),
    ("patches", None),
    ("act_embed", None),
    ("vit_act", None),
    ("cache_length", None),
    ("head_dim", None),
)


def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1, devices: Sequence | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh over all devices; one axis may be -1 to take what is left."""
    devices = list(jax.devices() if devices is None else devices)
    shape = [data, fsdp, tensor]
    if shape.count(-1) > 1:
        raise ValueError("at most one mesh axis may be -1")
    if -1 in shape:
        rest = int(np.prod([s for s in shape if s != -1]))
        if len(devices) % rest:
            raise ValueError(f"{len(devices)} devices cannot be split into data={data} fsdp={fsdp} tensor={tensor}")
        shape[shape.index(-1)] = len(devices) // rest
    if int(np.prod(shape)) != len(devices):
        raise ValueError(f"mesh data={shape[0]} x fsdp={shape[1]} x tensor={shape[2]} = {int(np.prod(shape))} "
                         f"devices, but {len(devices)} are available")
    try:
        from jax.experimental import mesh_utils
        arr = mesh_utils.create_device_mesh(shape, devices=devices)
    except Exception:   # CPU / unusual topologies: plain reshape
        arr = np.asarray(devices).reshape(shape)
    return Mesh(arr, MESH_AXES)


def logical_to_mesh_spec(logical: PartitionSpec | Sequence | None, rules=RULES) -> PartitionSpec:
    if logical is None:
        return PartitionSpec()
    return nn.logical_to_mesh_axes(tuple(logical), rules)


def tree_shardings(logical_specs, mesh: Mesh, rules=RULES):
    """Pytree of logical PartitionSpecs -> pytree of NamedShardings on `mesh`."""
    return jax.tree.map(lambda s: NamedSharding(mesh, logical_to_mesh_spec(s, rules)), logical_specs,
                        is_leaf=lambda x: isinstance(x, PartitionSpec) or x is None)
