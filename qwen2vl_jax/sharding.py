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


def fit_spec(logical, shape: Sequence[int], sizes, rules=RULES) -> PartitionSpec:
    """The mesh PartitionSpec of an array of `shape` with logical axes `logical`, each dim split only where its
    mesh axes divide it (`sizes`: mesh axis -> size); a dim they do not divide stays whole. E.g. the group
    axis of 4-bit scales (input size / group rows: 56 for a 3584-wide input in groups of 64) splits over an
    8-way FSDP axis like the codes do, and stays whole at 16-way."""
    spec = tuple(logical_to_mesh_spec(logical, rules))
    out = []
    for dim, axis in zip(shape, spec + (None,) * (len(shape) - len(spec))):
        axes = () if axis is None else (axis,) if isinstance(axis, str) else tuple(axis)
        n = int(np.prod([sizes[a] for a in axes])) if axes else 1
        out.append(axis if n == 1 or dim % n == 0 else None)
    while out and out[-1] is None:
        out.pop()
    return PartitionSpec(*out)


def tree_shardings(logical_specs, mesh: Mesh, rules=RULES, shapes=None):
    """Pytree of logical PartitionSpecs -> pytree of NamedShardings on `mesh`. With `shapes` (a matching
    pytree of arrays or ShapeDtypeStructs), a dim the mesh axes do not divide stays whole (`fit_spec`)."""
    is_spec = lambda x: isinstance(x, PartitionSpec) or x is None
    if shapes is None:
        return jax.tree.map(lambda s: NamedSharding(mesh, logical_to_mesh_spec(s, rules)), logical_specs,
                            is_leaf=is_spec)
    sizes = dict(mesh.shape)
    return jax.tree.map(lambda s, x: NamedSharding(mesh, fit_spec(s or (), x.shape, sizes, rules)), logical_specs,
                        shapes, is_leaf=is_spec)


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
    # The service's own heartbeat timeout ends every process with a C++ abort; HostWatch reports earlier.
    jax.distributed.initialize(heartbeat_timeout_seconds=SERVICE_HEARTBEAT_S, **kw)
    return True


# -- hosts that reach one verdict ------------------------------------------------------------------------

AGREE_TIMEOUT_S = 3600   # a host's start-up (the check of its records) may take this long before the others give up


def agree(stage: str, error: BaseException | None, kinds: dict[str, type] | None = None) -> None:
    """Every host reports how `stage` went before any collective that follows it; if one failed, every host
    raises the same one-line error, naming the (first) failing host. One process: `error` is raised as it is.

    The reports go through the coordination service's key-value store (not a device collective), so a host
    that failed does not leave the others waiting at the first all-gather until gloo / ICI times out.
    `kinds`: exception classes by name, so that the other hosts raise the failing host's kind (its exit code)."""
    n = jax.process_count()
    if n == 1:
        if error is not None:
            raise error
        return
    from jax._src import distributed
    client = distributed.global_state.client
    me = jax.process_index()
    report = "ok" if error is None else f"{type(error).__name__}\n{error}"
    client.key_value_set(f"qwen2vl/{stage}/{me}", report)
    client.wait_at_barrier(f"qwen2vl/{stage}", AGREE_TIMEOUT_S * 1000)
    reports = [client.blocking_key_value_get(f"qwen2vl/{stage}/{i}", 60_000) for i in range(n)]
    bad = [(i, r) for i, r in enumerate(reports) if r != "ok"]
    if not bad:
        return
    host, report = bad[0]
    kind, _, text = report.partition("\n")
    more = f" (and {len(bad) - 1} more host{'s' * (len(bad) > 2)})" if len(bad) > 1 else ""
    cls = type(error) if error is not None and host == me else (kinds or {}).get(kind, RuntimeError)
    raise cls(f"host {host} of {n}{more}: {text}")


HEARTBEAT_S = 5          # how often each host says it is alive
LOST_AFTER_S = 30        # silence after which a host counts as lost (well inside the service's heartbeat timeout)
SERVICE_HEARTBEAT_S = 90   # the coordination service's own timeout, after which it aborts every process


class HostWatch:
    """A thread per host that tells the others it is alive (a counter in the coordination service's key-value
    store, every HEARTBEAT_S) and watches theirs. A host silent for LOST_AFTER_S (killed, preempted, hung), or
    an unreachable coordinator (host 0), ends this host with one line naming it, instead of a wait at the next
    collective and a C++ abort minutes later. A host that finished (`done`) is not waited for."""

    def __init__(self, describe=lambda: "", out=None):
        import sys
        import threading
        self.describe, self.out = describe, out or sys.stderr
        self.n, self.me = jax.process_count(), jax.process_index()
        self._stop = threading.Event()
        self._thread = None
        if self.n > 1:
            from jax._src import distributed
            self.client = distributed.global_state.client
            self._thread = threading.Thread(target=self._run, name="host-watch", daemon=True)
            self._thread.start()

    def _get(self, key: str) -> str | None:
        try:
            return self.client.key_value_try_get(key)
        except Exception as e:
            if "NOT_FOUND" in str(e) or "not found" in str(e).lower():
                return None
            raise

    def _lost(self, what: str) -> None:
        import os
        extra = self.describe()
        print(f"train.py: {what}; stopping host {self.me} too{'; ' + extra if extra else ''}", file=self.out,
              flush=True)
        os._exit(3)

    def _run(self) -> None:
        import time
        beat, seen = 0, {}
        while not self._stop.is_set():
            beat += 1
            now = time.monotonic()
            try:
                self.client.key_value_set(f"qwen2vl/alive/{self.me}", str(beat), allow_overwrite=True)
                for i in range(self.n):
                    if i == self.me or self._get(f"qwen2vl/done/{i}"):
                        continue
                    value = self._get(f"qwen2vl/alive/{i}")
                    if value is None or seen.get(i, (None,))[0] != value:
                        seen[i] = (value, now)
                    elif now - seen[i][1] > LOST_AFTER_S:
                        self._lost(f"host {i} of {self.n} stopped responding {LOST_AFTER_S} s ago (killed, "
                                   "preempted or hung)")
            except Exception as e:   # the coordination service runs in host 0: it went away
                if self._stop.is_set():
                    return
                self._lost(f"lost the coordinator, host 0 of {self.n} ({type(e).__name__}: "
                           f"{str(e).splitlines()[0][:200] if str(e) else 'no reply'})")
            self._stop.wait(HEARTBEAT_S)

    def done(self) -> None:
        """This host finished cleanly: the others stop watching it; stop watching them."""
        if self._thread is None:
            return
        try:
            self.client.key_value_set(f"qwen2vl/done/{self.me}", "1", allow_overwrite=True)
        except Exception:
            pass
        self._stop.set()


def mesh_from_config(mesh_cfg) -> Mesh:
    """A mesh from a config with `data`, `fsdp`, `tensor` sizes (one may be -1)."""
    return make_mesh(data=mesh_cfg.data, fsdp=mesh_cfg.fsdp, tensor=mesh_cfg.tensor)
