"""orbax checkpoints of a run: `<workdir>/checkpoints/<step>/` with four items.

- `state`: the TrainState (params, optimizer state, step, RNG), each array written from its own shards;
- `data`: each host's data iterator state (one JSON file per process), so a resumed run sees the same
  batches in the same order;
- `model_config`: the model's HF config.json dict, so `restore_params` needs no training YAML;
- `run`: the run config and trainable parts, for the record.

Saves are asynchronous (training continues while the arrays are written) and atomic: on a local disk orbax
writes a temporary directory and renames it when complete; in a bucket (no renames) it writes the step in
place and marks it complete with `commit_success.txt` last. Either way a process killed mid-save leaves the
previous checkpoint as the latest one. The workdir may be a local path or a URL (`gs://bucket/run`): every
host writes its own arrays and data state there.
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any

import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
from etils import epath

from qwen2vl_jax import storage
from qwen2vl_jax.config import Qwen2VLConfig
from qwen2vl_jax.train.state import TrainState

ITEMS = ("state", "data", "model_config", "run")


class HostJsonHandler(ocp.CheckpointHandler):
    """One JSON file per process, `process_<i>-of-<n>.json`: state that differs from host to host (each reads
    its own shard of the data). orbax's JSON handler writes the primary host's value only."""

    def _file(self, directory) -> epath.Path:
        return epath.Path(directory) / f"process_{jax.process_index()}-of-{jax.process_count()}.json"

    def save(self, directory, args: "HostJsonSave"):
        self._file(directory).write_text(json.dumps(args.value))

    def restore(self, directory, args: "HostJsonRestore" = None):
        f = self._file(directory)
        return json.loads(f.read_text()) if f.exists() else None   # None: saved by another number of hosts

    def metadata(self, directory):
        return None

    def finalize(self, directory):
        pass

    def close(self):
        pass


@ocp.args.register_with_handler(HostJsonHandler, for_save=True)
@dataclasses.dataclass
class HostJsonSave(ocp.args.CheckpointArgs):
    value: Any


@ocp.args.register_with_handler(HostJsonHandler, for_restore=True)
@dataclasses.dataclass
class HostJsonRestore(ocp.args.CheckpointArgs):
    pass


class Checkpoints:
    """The checkpoints of one workdir: save every so often, keep the last `keep`, restore the latest."""

    def __init__(self, workdir: str, keep: int = 3, async_save: bool = True):
        self.directory = storage.abspath(storage.join(workdir, "checkpoints"))
        self.manager = ocp.CheckpointManager(
            self.directory, item_names=ITEMS,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                                 cleanup_tmp_directories=True))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, state: TrainState, step: int, data_state: dict | None, model_config: Qwen2VLConfig,
             run: dict) -> None:
        """Start writing step `step` (returns once the arrays are copied off the devices). `data_state`:
        this host's data iterator state (JSON-able)."""
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state.to_dict()),
            data=HostJsonSave(data_state),
            model_config=ocp.args.JsonSave(model_config.to_hf_dict()),
            run=ocp.args.JsonSave(run)), force=True)

    def restore(self, abstract: TrainState, step: int | None = None) -> tuple[TrainState, Any]:
        """(state placed as `abstract`'s shardings say, this host's data state or None) of `step` (default
        the latest)."""
        step = self.latest_step() if step is None else step
        step_path = epath.Path(self.directory) / str(step)
        meta = _state_metadata(str(step_path))
        if _old_parts(meta.get("opt_state")) is not None:
            state = restore_old_layout(str(step_path), meta, abstract)
            out = self.manager.restore(step, args=ocp.args.Composite(data=HostJsonRestore()))
            return state, out.data
        out = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract.to_dict()), data=HostJsonRestore()))
        return TrainState.from_dict(out.state), out.data

    def reached_preemption(self, step: int) -> bool:
        """True on every host once any host got a preemption notice (multi-host runs)."""
        return self.manager.reached_preemption(step)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


# -- the optimizer-state layout of checkpoints written before parameter groups ------------------------------
#
# Up to the per-group optimizer, the optimizer was optax's own chain, one AdamW per trained part:
#   optax.chain(optax.clip_by_global_norm(c), optax.multi_transform({part: adamw(schedule)}, labels))
# (no chain when clip_norm = 0), `adamw` = chain(scale_by_adam, masked(add_decayed_weights), scale_by_schedule),
# with float32 or stored-dtype moments. Its state on disk:
#   opt_state = [None (the clip's EmptyState),
#                {"inner_states": {part: {"inner_state": [{"count", "mu", "nu"}, {"inner_state": None},
#                                                         {"count"}]}}}]
# each part's mu and nu spanning the whole trainable tree with the other parts' leaves masked (None on disk).
# Every part stepped together and only on finite steps, so each part's Adam count and schedule count equal the
# one count of today's `optax.ScaleByAdamState`, and the union of the parts' moments is today's mu and nu:
# the conversion is exact and a resumed run continues bit for bit.

def _old_parts(opt_meta) -> dict | None:
    """The per-part states of an opt_state in the old layout (metadata or arrays), else None."""
    candidates = opt_meta if isinstance(opt_meta, (list, tuple)) else [opt_meta]
    for c in candidates:
        if isinstance(c, dict) and isinstance(c.get("inner_states"), dict):
            return c["inner_states"]
    return None


def _drop_none(tree):
    """A nested dict without its None leaves (masked entries) and the dicts they leave empty."""
    if not isinstance(tree, dict):
        return tree
    out = {k: _drop_none(v) for k, v in tree.items() if v is not None}
    return {k: v for k, v in out.items() if not (isinstance(v, dict) and not v)}


def _old_layout_error(directory: str, why: str) -> ValueError:
    return ValueError(f"{directory}: its optimizer state has the layout of the per-part optimizer of earlier "
                      f"versions, and {why}; resume it with the parameter groups it was trained with, or start "
                      f"a new run from its params only (init_from={directory})")


def restore_old_layout(step_path: str, meta: dict, abstract: TrainState) -> TrainState:
    """The TrainState of a step written with the old per-part optimizer state, converted to today's
    `optax.ScaleByAdamState` placed as `abstract` says (exactly: see the layout above)."""
    parts_meta = _old_parts(meta["opt_state"])
    want = abstract.opt_state
    if not isinstance(want, optax.ScaleByAdamState):
        raise _old_layout_error(step_path, f"this run's optimizer state is a {type(want).__name__}")
    mu_sh = {path: leaf for path, leaf in _flat(want.mu)}

    def target_of(tree, what):
        def one(path, m):
            keys = tuple(str(getattr(k, "key", k)) for k in path)
            if keys not in mu_sh:
                raise _old_layout_error(step_path, f"it holds {what} of {'/'.join(keys)}, which this run does "
                                                   "not train")
            t = mu_sh[keys]
            return jax.ShapeDtypeStruct(tuple(m.shape), t.dtype, sharding=t.sharding)
        return jax.tree_util.tree_map_with_path(one, _drop_none(tree))

    count_t = jax.ShapeDtypeStruct((), want.count.dtype, sharding=want.count.sharding)
    parts_target = {}
    for part, st in parts_meta.items():
        try:
            adam, _, sched = st["inner_state"]
            adam = {"count": count_t, "mu": target_of(adam["mu"], "moments"), "nu": target_of(adam["nu"], "moments")}
            sched = {"count": count_t}
        except (KeyError, TypeError, ValueError) as e:
            if isinstance(e, ValueError) and "init_from=" in str(e):
                raise
            raise _old_layout_error(step_path, f"part {part!r} does not hold (adam, decay, schedule) states") from None
        parts_target[part] = {"inner_state": [adam, st["inner_state"][1], sched]}
    target = {k: v for k, v in abstract.to_dict().items() if k != "opt_state"}
    target["opt_state"] = _old_target(meta["opt_state"], parts_target)
    restore_args = jax.tree.map(lambda t: ocp.ArrayRestoreArgs(sharding=t.sharding), target)
    restored = ocp.PyTreeCheckpointer().restore(storage.join(step_path, "state"), args=ocp.args.PyTreeRestore(
        item=target, restore_args=restore_args, partial_restore=True))
    parts = _old_parts(restored["opt_state"])
    counts = {}
    mu, nu = {}, {}
    from qwen2vl_jax.train import optim
    for part, st in parts.items():
        adam, _, sched = st["inner_state"]
        counts[f"{part} adam"], counts[f"{part} schedule"] = int(adam["count"]), int(sched["count"])
        mu, nu = optim.merge(mu, adam["mu"]), optim.merge(nu, adam["nu"])
    if len(set(counts.values())) != 1:
        raise _old_layout_error(step_path, f"its step counts differ ({counts})")
    if jax.tree.structure(mu) != jax.tree.structure(want.mu):
        missing = sorted(set(mu_sh) - {p for p, _ in _flat(mu)})
        raise _old_layout_error(step_path, f"it holds no moments for {len(missing)} param(s) this run trains "
                                           f"(e.g. {'/'.join(missing[0])})")
    count = next(iter(parts.values()))["inner_state"][0]["count"]
    restored["opt_state"] = optax.ScaleByAdamState(count=count, mu=mu, nu=nu)
    return TrainState.from_dict(restored)


def _flat(tree):
    return [(tuple(str(getattr(k, "key", k)) for k in p), x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _old_target(opt_meta, parts_target: dict):
    """The restore target of an old-layout opt_state: its structure as saved, the parts' arrays only (the
    clip's and the weight decay's empty states hold nothing)."""
    if isinstance(opt_meta, (list, tuple)):
        return [_old_target(m, parts_target) if isinstance(m, dict) and "inner_states" in m else m
                for m in opt_meta]
    return {"inner_states": parts_target}


# -- reading a checkpoint without its run config ---------------------------------------------------------

def step_dir(path: str) -> str:
    """The checkpoint step directory for `path`: a workdir (its latest checkpoint), a `checkpoints` dir, or
    a step dir itself. Local path or URL."""
    path = storage.abspath(path).rstrip("/")
    if storage.isdir(storage.join(path, "state")) and storage.isdir(storage.join(path, "model_config")):
        return path
    for root in (storage.join(path, "checkpoints"), path):
        names = storage.listdir(root) if storage.isdir(root) else []
        steps = [int(d) for d in names if re.fullmatch(r"\d+", d) and _complete(storage.join(root, d))]
        if steps:
            return storage.join(root, str(max(steps)))
    raise FileNotFoundError(f"{path}: no orbax checkpoint here; give a training workdir, its checkpoints/ "
                            "directory or one step directory (checkpoints/<step>)")


def _complete(step: str) -> bool:
    # In a bucket a step is written in place, so a killed save leaves a step without its commit marker.
    return storage.isdir(storage.join(step, "state")) and (
        not storage.is_url(step) or storage.exists(storage.join(step, "commit_success.txt")))


def read_model_config(path: str) -> Qwen2VLConfig:
    d = step_dir(path)
    handler = ocp.JsonCheckpointHandler()
    try:
        hf_dict = handler.restore(epath.Path(d) / "model_config")
    except FileNotFoundError:
        raise FileNotFoundError(f"{d}: the checkpoint has no model_config item; it was not written by "
                                "qwen2vl_jax.train") from None
    return Qwen2VLConfig.from_hf_dict(hf_dict, source=storage.join(d, "model_config"))


def restore_params(path: str, shardings=None) -> tuple[Qwen2VLConfig, dict]:
    """(model config, params) of a training checkpoint, without its optimizer state.

    `path`: a workdir (latest checkpoint), its `checkpoints/` dir, or a step dir. `shardings`: optional
    pytree of jax Shardings matching the params (default: all on the first local device).
    """
    d = step_dir(path)
    config = read_model_config(d)
    checkpointer = ocp.PyTreeCheckpointer()
    params_meta = _params_metadata(d)
    if shardings is None:
        device = jax.local_devices()[0]
        shardings = jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(device), params_meta)
    target = jax.tree.map(lambda m, s: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=s),
                          params_meta, shardings)
    restored = checkpointer.restore(storage.join(d, "state"), args=ocp.args.PyTreeRestore(
        item={"params": target},
        restore_args={"params": jax.tree.map(lambda t: ocp.ArrayRestoreArgs(sharding=t.sharding), target)},
        partial_restore=True))
    return config, restored["params"]


def _state_metadata(d: str) -> dict:
    """The metadata tree of step dir `d`'s train state. The handler's metadata, not the checkpointer's: that
    one also looks for step metadata inside the item directory, where the manager never writes it, and logs
    a warning on every restore."""
    meta = ocp.PyTreeCheckpointHandler().metadata(epath.Path(d) / "state")
    return meta if isinstance(meta, dict) else meta.tree


def _params_metadata(d: str):
    return _state_metadata(d)["params"]


def param_shapes(path: str) -> dict:
    """ShapeDtypeStructs of the params a training checkpoint holds (all of them, or a LoRA run's adapters),
    read from its metadata: nothing is loaded."""
    return jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype), _params_metadata(step_dir(path)))


# -- export -------------------------------------------------------------------------------------------------

class _Gathered:
    """A param that becomes a whole host array only when the HF writer reads it, one tensor at a time;
    on multi-host runs every process takes part in the gather."""

    def __init__(self, x: jax.Array, dtype):
        self.x, self.dtype = x, dtype

    def __array__(self, dtype=None, copy=None):
        if self.x.is_fully_addressable:
            a = np.asarray(jax.device_get(self.x))
        else:
            from jax.experimental import multihost_utils
            a = np.asarray(multihost_utils.process_allgather(self.x, tiled=True))
        return a.astype(dtype or self.dtype)


def export_hf(params: dict, config: Qwen2VLConfig, path: str, dtype: str = "float32", processor=None,
              generation=None) -> None:
    """A complete HF checkpoint of `params` (`hf.save_processing` + `hf.save_params`), to a local directory or
    a URL: loads in transformers and `load_pretrained`."""
    import ml_dtypes

    from qwen2vl_jax import hf
    np_dtype = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.dtype(dtype)
    lazy = jax.tree.map(lambda x: _Gathered(x, np_dtype), params)
    if jax.process_index() == 0:
        hf.save_processing(config, path, processor, generation)   # checks the processor before the weights
        hf.save_params(lazy, config, path)
    else:   # every process takes part in every gather (they are collective); only process 0 writes
        for _ in hf.hf_tensors(lazy, config):
            pass
