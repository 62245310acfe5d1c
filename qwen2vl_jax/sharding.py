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

from qwen2vl_jax import schema

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


# -- batches ----------------------------------------------------------------------------------------

# Logical axes of each field of the packed batch format; rows split over the "batch" rule.
BATCH_AXES: dict[str, tuple] = schema.BATCH_AXES


def batch_sharding(mesh: Mesh, key: str, stacked: bool = False, rules=RULES) -> NamedSharding:
    """Sharding of one batch field; `stacked` adds a leading (unsharded) micro-batch axis."""
    if key not in BATCH_AXES:
        raise KeyError(f"unknown batch field {key!r}; the packed format has {sorted(BATCH_AXES)}")
    axes = ((None,) if stacked else ()) + BATCH_AXES[key]
    return NamedSharding(mesh, logical_to_mesh_spec(axes, rules))


def batch_shards(mesh: Mesh, rules=RULES) -> int:
    """Number of pieces the batch rows are split into (rows per step must be a multiple of it)."""
    spec = logical_to_mesh_spec(("batch",), rules)[0]
    axes = () if spec is None else (spec,) if isinstance(spec, str) else tuple(spec)
    return int(np.prod([mesh.shape[a] for a in axes]))


# -- runs ---------------------------------------------------------------------------------------------

def initialize_distributed() -> bool:
    """`jax.distributed.initialize()` when this process is one of several: a multi-host TPU slice or SLURM
    job (detected by jax), or a hand-made cluster given by JAX_COORDINATOR_ADDRESS (host:port),
    JAX_NUM_PROCESSES and JAX_PROCESS_ID. Must run before anything touches a device. True if it did."""
    import os
    env = os.environ
    multi_host_tpu = "," in env.get("TPU_WORKER_HOSTNAMES", "")
    slurm = int(env.get("SLURM_NTASKS", "1") or 1) > 1
    if not (multi_host_tpu or slurm or env.get("JAX_COORDINATOR_ADDRESS")):
        return False
    kw = {}
    if env.get("JAX_NUM_PROCESSES"):
        kw.update(num_processes=int(env["JAX_NUM_PROCESSES"]), process_id=int(env["JAX_PROCESS_ID"]))
    jax.distributed.initialize(**kw)
    return True


def mesh_from_config(mesh_cfg) -> Mesh:
    """A mesh from a config with `data`, `fsdp`, `tensor` sizes (one may be -1)."""
    return make_mesh(data=mesh_cfg.data, fsdp=mesh_cfg.fsdp, tensor=mesh_cfg.tensor)
