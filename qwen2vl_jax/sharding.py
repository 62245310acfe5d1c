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
    JAX_NUM_PROCESSES and JAX_PROCESS_ID. Must run before anything touches a device. True if this process
    is one of several (also when an earlier call initialised it)."""
    import os
    from jax._src import distributed
    if distributed.global_state.client is not None:
        return True
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
#
# The start-up of a multi-host run (config, data check, buckets, model, restore) is split by agreement points:
# every host reports how its part went through the coordination service's key-value store (not a device
# collective) before any collective that follows. A host that fails anywhere in between posts the verdict at
# once (`fail`); the others read it at their next agreement point, or, when they wait inside a collective
# already, their HostWatch thread does. The first verdict posted is the one every host reports.

AGREE_TIMEOUT_S = 3600   # a host's start-up (the check of its records) may take this long before the others give up
VERDICT = "qwen2vl/verdict"   # "host\nkind\nline" of the first failure


class HostFailed(RuntimeError):
    """An unexpected exception (not one of the project's error kinds) on one host at start-up; every host
    raises this with the same line, the failing one with its exception as the cause."""


def try_get(client, key: str) -> str | None:
    """The coordination service's value under `key`, or None while no host has set it."""
    try:
        return client.key_value_try_get(key)
    except Exception as e:
        if "NOT_FOUND" in str(e) or "not found" in str(e).lower():
            return None
        raise


class _Hosts:
    """The coordination service's client, this host's index and the number of hosts; `None` for one process."""

    def __init__(self, client, me: int, n: int):
        self.client, self.me, self.n = client, me, n
        self.seq = 0                 # agreement points passed (every host passes the same ones, in order)
        self.settled = False         # this host's main thread has taken a verdict (the watcher stays quiet)

    def get(self, key: str) -> str | None:
        return try_get(self.client, key)


_hosts: _Hosts | None = None


def hosts() -> _Hosts | None:
    global _hosts
    if jax.process_count() == 1:
        return None
    if _hosts is None:
        from jax._src import distributed
        _hosts = _Hosts(distributed.global_state.client, jax.process_index(), jax.process_count())
    return _hosts


def one_line(text) -> str:
    """A message on one line: its lines joined by "; " (by a space after a colon)."""
    out = ""
    for line in (x.strip() for x in str(text).splitlines()):
        if line:
            out += ("" if not out else " " if out.endswith(":") else "; ") + line
    return out


def _kind(error: BaseException, kinds: dict[str, type]) -> str:
    """The name of the project error kind `error` is (its class or the nearest base in `kinds`), else its
    own class name."""
    for cls in type(error).__mro__:
        if kinds.get(cls.__name__) is cls:
            return cls.__name__
    return type(error).__name__


def _describe(error: BaseException, kinds: dict[str, type]) -> tuple[str, str]:
    """(kind, one line): an unexpected exception is HostFailed, its class named in the line."""
    kind = _kind(error, kinds)
    text = one_line(error) or "(no message)"
    return (kind, text) if kind in kinds else ("HostFailed", f"{type(error).__name__}: {text}")


def _raise(h: _Hosts, verdict: str, error: BaseException | None, kinds: dict[str, type]):
    """Raise the verdict on this host: the failing host's kind (HostFailed for an unexpected one), the failing
    host's own exception as the cause on that host."""
    host, kind, line = verdict.split("\n", 2)
    h.settled = True
    _ack(h.client, h.me)
    cls = kinds.get(kind, HostFailed)
    exc = cls(line)
    exc.agreed = True
    if error is not None and int(host) == h.me:
        raise exc from error
    raise exc from None


def _post(h: _Hosts, host: int, kind: str, line: str) -> str:
    """Post a verdict unless one was posted already; the one that stands."""
    verdict = f"{host}\n{kind}\n{line}"
    try:
        h.client.key_value_set(VERDICT, verdict)
        return verdict
    except Exception as e:
        if "ALREADY_EXISTS" not in str(e) and "already exists" not in str(e).lower():
            raise
    return h.client.blocking_key_value_get(VERDICT, 60_000)


def _ack(client, me: int) -> None:
    try:
        client.key_value_set(f"qwen2vl/seen/{me}", "1", allow_overwrite=True)
    except Exception:
        pass


def _linger(client, me: int, n: int, timeout: float) -> None:
    """Host 0 runs the coordination service: before it exits on a verdict it waits (at most `timeout` s) until
    every host has read the verdict, so that none reports a lost coordinator instead."""
    import time
    if me != 0:
        return
    deadline = time.monotonic() + timeout
    waiting = set(range(1, n))
    while waiting and time.monotonic() < deadline:
        for i in list(waiting):
            try:
                if client.key_value_try_get(f"qwen2vl/seen/{i}"):
                    waiting.discard(i)
            except Exception:
                pass
        time.sleep(0.05)


def exit_on_verdict(code: int) -> None:
    """End this process after it reported an agreed verdict (multi-host): without jax's shutdown barrier,
    which would wait for hosts that are ended by their watchers instead; host 0 first lets every host read
    the verdict."""
    import os
    import sys
    sys.stdout.flush()
    sys.stderr.flush()
    if _hosts is not None:
        _linger(_hosts.client, _hosts.me, _hosts.n, 3 * HEARTBEAT_S)
    os._exit(code)


def fail(error: BaseException, kinds: dict[str, type]):
    """This host failed at start-up outside an agreement point: post the verdict (unless another host's
    stands) and raise it. One process: `error` itself. An error that is a verdict already is re-raised."""
    h = hosts()
    if h is None or getattr(error, "agreed", False):
        raise error
    kind, text = _describe(error, kinds)
    _raise(h, _post(h, h.me, kind, f"host {h.me} of {h.n}: {text}"), error, kinds)


def agree(stage: str, error: BaseException | None, kinds: dict[str, type] | None = None,
          value: str = "") -> list[str]:
    """Every host reports how `stage` went before any collective that follows it; if one failed, every host
    raises the same one-line error, naming the (first) failing host. Returns every host's `value` (a short
    string) when all went well. One process: `error` is raised as it is.

    The reports go through the coordination service's key-value store (not a device collective), so a host
    that failed does not leave the others waiting at the first all-gather until gloo / ICI times out.
    `kinds`: exception classes by name, so that the other hosts raise the failing host's kind (its exit code);
    any other exception is raised as `HostFailed` there."""
    import time
    kinds = kinds or {}
    h = hosts()
    if h is None:
        if error is not None:
            raise error
        return [value]
    if getattr(error, "agreed", False):
        raise error
    h.seq += 1
    key = f"qwen2vl/agree/{h.seq}"
    if error is None:
        mine = f"{stage}\nok\n\n{value}"
    else:
        kind, text = _describe(error, kinds)
        mine = f"{stage}\nerror\n{kind}\n{text}"
    h.client.key_value_set(f"{key}/{h.me}", mine)
    reports: list = [None] * h.n
    deadline, pause = time.monotonic() + AGREE_TIMEOUT_S, 0.02
    while True:
        for i in range(h.n):
            if reports[i] is None:
                reports[i] = h.get(f"{key}/{i}")
        if all(r is not None for r in reports):
            break
        verdict = h.get(VERDICT)   # a host failed between two agreement points
        if verdict is not None:
            _raise(h, verdict, error, kinds)
        if time.monotonic() > deadline:
            late = [i for i, r in enumerate(reports) if r is None]
            _raise(h, _post(h, late[0], "HostFailed", f"host {late[0]} of {h.n}: did not reach '{stage}' within "
                            f"{AGREE_TIMEOUT_S} s"), error, kinds)
        time.sleep(pause)
        pause = min(pause * 1.5, 0.5)
    parsed = [r.split("\n", 3) for r in reports]
    astray = [i for i, p in enumerate(parsed) if p[0] != parsed[0][0]]
    if astray:   # the hosts took different paths through the start-up
        i = astray[0]
        _raise(h, _post(h, i, "HostFailed", f"host {i} of {h.n}: reached start-up step '{parsed[i][0]}' where "
                        f"host 0 reached '{parsed[0][0]}': the hosts' configs, files or workdirs differ"),
               error, kinds)
    bad = [(i, p) for i, p in enumerate(parsed) if p[1] != "ok"]
    if bad:
        host, (_, _, kind, text) = bad[0]
        more = f" (and {len(bad) - 1} more host{'s' * (len(bad) > 2)})" if len(bad) > 1 else ""
        _raise(h, _post(h, host, kind, f"host {host} of {h.n}{more}: {text}"), error, kinds)
    return [p[3] for p in parsed]


def agree_values(stage: str, value: str, describe, kinds: dict[str, type] | None = None) -> str:
    """All hosts must hold the same `value` (a config, a checkpoint step): host 0's, once agreed. A host
    whose value differs fails every host with `describe(host, its_value, host0_value)` (a RunConfigError
    naming it)."""
    values = agree(stage, None, kinds, value)
    for i, v in enumerate(values):
        if v != values[0]:
            h = hosts()
            _raise(h, _post(h, i, "RunConfigError", f"host {i} of {len(values)}: {describe(i, v, values[0])}"),
                   None, kinds or {})
    return values[0]


HEARTBEAT_S = 5          # how often each host says it is alive
LOST_AFTER_S = 30        # silence after which a host counts as lost (well inside the service's heartbeat timeout)
SERVICE_HEARTBEAT_S = 90   # the coordination service's own timeout, after which it aborts every process


class HostWatch:
    """A thread per host that tells the others it is alive (a counter in the coordination service's key-value
    store, every HEARTBEAT_S) and watches theirs. A host silent for LOST_AFTER_S (killed, preempted, hung), or
    an unreachable coordinator (host 0), ends this host with one line naming it, instead of a wait at the next
    collective and a C++ abort minutes later. A host that finished (`done`) is not waited for.

    It also ends this host with the start-up verdict another host posted (`fail`) when this host's main thread
    has not taken it within a heartbeat: it waits inside a collective that the failed host never joins.
    `code(kind)`: the exit code for a verdict of that error kind."""

    def __init__(self, describe=lambda: "", out=None, code=lambda kind: 1):
        import sys
        import threading
        self.describe, self.out, self.code = describe, out or sys.stderr, code
        self.n, self.me = jax.process_count(), jax.process_index()
        self._stop = threading.Event()
        self._thread = None
        if self.n > 1:
            from jax._src import distributed
            self.client = distributed.global_state.client
            self._thread = threading.Thread(target=self._run, name="host-watch", daemon=True)
            self._thread.start()

    def _get(self, key: str) -> str | None:
        return try_get(self.client, key)

    def _lost(self, what: str) -> None:
        import os
        extra = self.describe()
        print(f"train.py: {what}; stopping host {self.me} too{'; ' + extra if extra else ''}", file=self.out,
              flush=True)
        os._exit(3)

    def _verdict(self, verdict: str) -> None:
        import os
        _, kind, line = verdict.split("\n", 2)
        print(f"train.py: {line}", file=self.out, flush=True)
        _ack(self.client, self.me)
        _linger(self.client, self.me, self.n, 2 * HEARTBEAT_S)
        os._exit(self.code(kind))

    def _run(self) -> None:
        import time
        beat, seen, verdict_seen = 0, {}, None
        while not self._stop.is_set():
            if _hosts is not None and _hosts.settled:   # the main thread reports the verdict and exits
                return
            beat += 1
            now = time.monotonic()
            try:
                self.client.key_value_set(f"qwen2vl/alive/{self.me}", str(beat), allow_overwrite=True)
                verdict = self._get(VERDICT)
                if verdict is not None:
                    if verdict_seen is not None and now - verdict_seen >= HEARTBEAT_S - 0.5:
                        self._verdict(verdict)
                    verdict_seen = verdict_seen or now
                for i in range(self.n):
                    if i == self.me or self._get(f"qwen2vl/done/{i}"):
                        continue
                    value = self._get(f"qwen2vl/alive/{i}")
                    if value is None or seen.get(i, (None,))[0] != value:
                        seen[i] = (value, now)
                    elif now - seen[i][1] > LOST_AFTER_S and verdict is None:
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


_watch: HostWatch | None = None


def watch(describe=None, code=None) -> HostWatch:
    """This process's HostWatch (started on the first call, after `initialize_distributed`); later calls
    update what its lines add (`describe`) and the exit code of a verdict (`code`)."""
    global _watch
    if _watch is None:
        _watch = HostWatch()
    if describe is not None:
        _watch.describe = describe
    if code is not None:
        _watch.code = code
    return _watch


def mesh_from_config(mesh_cfg) -> Mesh:
    """A mesh from a config with `data`, `fsdp`, `tensor` sizes (one may be -1)."""
    return make_mesh(data=mesh_cfg.data, fsdp=mesh_cfg.fsdp, tensor=mesh_cfg.tensor)
