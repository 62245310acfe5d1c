"""The train state and where each of its arrays lives on the mesh.

`TrainState` holds float32 master params (all parts, frozen ones included), the optimizer state of the
trainable parts only, the step and the RNG key. Params take their shardings from the model's logical axes;
every optimizer-state leaf that mirrors a param (Adam's mu and nu) takes that param's sharding, and the rest
(step counters) are replicated. Everything is created directly in its sharding: no host ever holds a whole
model's worth of optimizer state.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from qwen2vl_jax import api, sharding
from qwen2vl_jax.model.qwen2vl import Qwen2VLModule
from qwen2vl_jax.train import optim


@flax.struct.dataclass
class TrainState:
    step: jax.Array        # () int32: optimizer steps taken (batches consumed)
    params: dict           # float32 master weights of the whole model
    opt_state: Any         # optax state over `optim.split(params, parts)[0]`
    rng: jax.Array         # (2,) uint32 key data; step k uses fold_in(rng, k)

    def to_dict(self) -> dict:
        return {"step": self.step, "params": self.params, "opt_state": self.opt_state, "rng": self.rng}

    @classmethod
    def from_dict(cls, d: dict) -> "TrainState":
        return cls(step=d["step"], params=d["params"], opt_state=d["opt_state"], rng=d["rng"])


def param_shardings(module: Qwen2VLModule, mesh: Mesh, rules=sharding.RULES):
    """Each param's NamedSharding: its logical axes on `mesh`, a dim split only where its mesh axes divide it."""
    boxed = api.abstract_params(module)
    return sharding.tree_shardings(nn.get_partition_spec(boxed), mesh, rules, shapes=nn.meta.unbox(boxed))


def _path_keys(path) -> tuple:
    return tuple(getattr(k, "key", getattr(k, "name", getattr(k, "idx", None))) for k in path)


def opt_state_shardings(abstract_opt_state, params_shardings, params_shapes, mesh: Mesh):
    """Each optimizer-state leaf whose path ends in a param's path (and has its shape) gets that param's
    sharding; anything else (counts, empty states) is replicated."""
    by_path = {}
    for path, s in jax.tree_util.tree_flatten_with_path(params_shardings)[0]:
        by_path[_path_keys(path)] = s
    shapes = {_path_keys(p): x.shape for p, x in jax.tree_util.tree_flatten_with_path(params_shapes)[0]}
    replicated = NamedSharding(mesh, PartitionSpec())

    def pick(path, leaf):
        keys = _path_keys(path)
        for i in range(len(keys)):
            tail = keys[i:]
            if tail in by_path and shapes[tail] == leaf.shape:
                return by_path[tail]
        return replicated

    return jax.tree_util.tree_map_with_path(pick, abstract_opt_state)


def state_shardings(module: Qwen2VLModule, tx: optax.GradientTransformation, parts, mesh: Mesh,
                    rules=sharding.RULES) -> TrainState:
    """A TrainState of NamedShardings (the in/out shardings of the jitted step)."""
    p_sh = param_shardings(module, mesh, rules)
    abstract = nn.meta.unbox(api.abstract_params(module))
    trainable, _ = optim.split(abstract, parts)
    opt_abstract = jax.eval_shape(tx.init, trainable)
    replicated = NamedSharding(mesh, PartitionSpec())
    return TrainState(step=replicated, params=p_sh,
                      opt_state=opt_state_shardings(opt_abstract, p_sh, abstract, mesh), rng=replicated)


def init_state(module: Qwen2VLModule, tx: optax.GradientTransformation, parts, shardings: TrainState,
               seed: int, params=None) -> TrainState:
    """A fresh state: params from `params` (e.g. loaded from HF; placed if they are not yet) or initialised
    from `seed` directly in their shardings; optimizer state zero-initialised in its shardings. The state
    owns `params`: the first step donates their buffers."""
    key = jax.random.key(seed)
    init_key, step_key = jax.random.split(key)
    if params is None:
        dummy = api.dummy_batch(module.config)
        params = jax.jit(lambda k: nn.meta.unbox(module.init(k, dummy)["params"]),
                         out_shardings=shardings.params)(init_key)
    else:
        params = jax.device_put(params, shardings.params)
    opt_state = jax.jit(lambda p: tx.init(optim.split(p, parts)[0]), out_shardings=shardings.opt_state)(params)
    return TrainState(step=jax.device_put(jnp.zeros((), jnp.int32), shardings.step), params=params,
                      opt_state=opt_state,
                      rng=jax.device_put(jax.random.key_data(step_key), shardings.rng))


def abstract_state(module: Qwen2VLModule, tx: optax.GradientTransformation, parts,
                   shardings: TrainState) -> TrainState:
    """ShapeDtypeStructs with shardings: the restore target of a checkpoint."""
    params = nn.meta.unbox(api.abstract_params(module))
    opt = jax.eval_shape(tx.init, optim.split(params, parts)[0])
    shapes = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=params, opt_state=opt,
                        rng=jax.ShapeDtypeStruct((2,), jnp.uint32))
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings)
