"""The jitted train step: gradients of the assistant-token loss over k micro-batches, clip, AdamW, guard.

A step takes a stacked batch, every field (k, B, ...) for k micro-batches (positions (k, 3, B, L)). The loss
is sum(CE over target tokens) / (target tokens of all k micro-batches), so accumulating k micro-batches
gives the gradient of one batch k times the size, and a row full of short examples weighs what its tokens
weigh. Only the trainable parts are differentiated; frozen ones are constants of the step and come back as
the very same arrays. A non-finite loss or gradient norm leaves the state untouched (the host decides
whether to stop), so a checkpoint can never hold a poisoned state.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from qwen2vl_jax import sharding
from qwen2vl_jax.api import MODEL_KEYS
from qwen2vl_jax.model.attention import segment_bound
from qwen2vl_jax.model.qwen2vl import Qwen2VLModule
from qwen2vl_jax.train import optim
from qwen2vl_jax.train.loss import LossSums, chunked_token_sums, token_sums
from qwen2vl_jax.train.state import TrainState


def forward_sums(module: Qwen2VLModule, params, batch: dict, loss_chunk: int = 0, rng=None) -> LossSums:
    """Loss sums of one micro-batch (fields (B, ...), positions (3, B, L))."""
    inputs = {k: batch[k] for k in MODEL_KEYS if k in batch}
    rngs = None if rng is None else {"dropout": rng}
    if loss_chunk:
        h, _ = module.apply({"params": params}, inputs, method=Qwen2VLModule.hidden, rngs=rngs)
        head = lambda x: module.apply({"params": params}, x, method=Qwen2VLModule.logits)
        return chunked_token_sums(head, h, batch["labels"], batch["loss_mask"], loss_chunk)
    logits = module.apply({"params": params}, inputs, rngs=rngs)
    return token_sums(logits, batch["labels"], batch["loss_mask"])


def compute_grads(module: Qwen2VLModule, params: dict, batch: dict, parts, *, z_loss: float = 0.0,
                  loss_chunk: int = 0, rng=None, grad_shardings=None) -> tuple[dict, dict]:
    """(gradients of the trainable parts, metrics) for a stacked batch of k micro-batches.

    `grad_shardings` (those of the trainable params) pins the gradients and their accumulator to the
    params' layout, so FSDP reduce-scatters gradients instead of keeping whole copies."""
    trainable, frozen = optim.split(params, parts)
    pin = (lambda t: t) if grad_shardings is None else \
        (lambda t: jax.lax.with_sharding_constraint(t, grad_shardings))
    n_targets = jnp.maximum(jnp.sum(batch["loss_mask"].astype(jnp.float32)), 1.0)
    k = batch["input_ids"].shape[0]

    def micro(mb, i):
        def loss_fn(tr):
            key = None if rng is None else jax.random.fold_in(rng, i)
            sums = forward_sums(module, optim.merge(tr, frozen), mb, loss_chunk, key)
            return (sums.ce + z_loss * sums.z) / n_targets, sums
        (_, sums), g = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
        return pin(g), sums

    if k == 1:   # no accumulator buffer when there is nothing to accumulate
        grads, sums = micro(jax.tree.map(lambda x: x[0], batch), 0)
    else:
        def body(carry, xs):
            g_acc, s_acc = carry
            mb, i = xs
            g, s = micro(mb, i)
            return (jax.tree.map(jnp.add, g_acc, g), s_acc + s), None
        zeros = (pin(jax.tree.map(jnp.zeros_like, trainable)),
                 LossSums(*(jnp.zeros((), jnp.float32) for _ in LossSums._fields)))
        (grads, sums), _ = jax.lax.scan(body, zeros, (batch, jnp.arange(k)))
    metrics = {"loss": sums.ce / n_targets, "z_loss": sums.z / n_targets, "accuracy": sums.correct / n_targets,
               "target_tokens": n_targets}
    return grads, metrics


def train_step(state: TrainState, batch: dict, *, module: Qwen2VLModule, tx: optim.Optimizer, parts=None,
               schedules: dict[str, Callable] | None = None, z_loss: float = 0.0, loss_chunk: int = 0,
               grad_shardings=None):
    """One optimizer step of `tx` (`optim.make_optimizer`) over its parameter groups (`parts`, when given,
    must select the same params). Returns (new state, metrics). `StepFn` jits it."""
    if not isinstance(tx, optim.Optimizer):
        raise TypeError(f"train_step takes the optimizer of optim.make_optimizer, got {type(tx).__name__}")
    groups = tx.groups if parts is None else optim.as_groups(parts)
    rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    grads, metrics = compute_grads(module, state.params, batch, groups, z_loss=z_loss, loss_chunk=loss_chunk,
                                   rng=rng, grad_shardings=grad_shardings)
    trainable, frozen = optim.split(state.params, groups)
    schedules = optim.schedules(tx.cfg, tx.groups) if schedules is None else schedules
    lrs = {f"lr/{p}": s(state.step) for p, s in schedules.items()}
    # AdamW fused per leaf with the apply and the guard: fewer temporaries than tx.update + apply_updates.
    new_trainable, opt_state, norms = optim.fused_update(tx, grads, state.opt_state, trainable, metrics["loss"])
    new_state = TrainState(step=state.step + 1, params=optim.merge(new_trainable, frozen), opt_state=opt_state,
                           rng=state.rng)
    return new_state, {**metrics, **norms, **lrs}


def batch_shardings(mesh: Mesh, keys, rules=sharding.RULES) -> dict:
    """NamedShardings of a stacked batch: rows split over the batch mesh axes, the micro-batch axis not."""
    return {k: sharding.batch_sharding(mesh, k, stacked=True, rules=rules) for k in keys}


class StepFn:
    """`train_step` jitted with explicit in/out shardings and the old state donated; traced under the mesh
    and the logical-axis rules so the model's activation constraints apply. One jitted function per set of
    batch fields (a run without images has no vision fields); jax caches one program per bucket shape."""

    def __init__(self, mesh: Mesh, state_shardings: TrainState, rules=sharding.RULES, max_segment_len: int = 0,
                 **kw: Any):
        self.mesh, self.rules, self.state_shardings = mesh, rules, state_shardings
        self.max_segment_len = max_segment_len   # the data's longest text segment, for the attention kernels
        groups = kw["tx"].groups if kw.get("parts") is None else kw["parts"]
        self.kw = {"grad_shardings": optim.split(state_shardings.params, groups)[0], **kw}
        self._jits: dict[tuple, Any] = {}

    def batch_shardings(self, keys) -> dict:
        return batch_shardings(self.mesh, keys, self.rules)

    def _jit(self, keys):
        keys = tuple(sorted(keys))
        if keys not in self._jits:
            fn = lambda state, batch: train_step(state, batch, **self.kw)
            self._jits[keys] = jax.jit(fn, in_shardings=(self.state_shardings, self.batch_shardings(keys)),
                                       out_shardings=(self.state_shardings, None), donate_argnums=0)
        return self._jits[keys]

    def __call__(self, state: TrainState, batch: dict):
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules), segment_bound(self.max_segment_len):
            return self._jit(batch)(state, batch)

    def lower(self, state, batch):
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules), segment_bound(self.max_segment_len):
            return self._jit(batch).lower(state, batch)
