"""What trains and how: parts of the model, stage masks, AdamW with warmup + cosine, per-part learning rates.

The params split into three parts (the paper's training stages freeze and unfreeze them as units):
`vit` (patch embedding + ViT blocks), `merger` (the 2x2 PatchMerger) and `llm` (embeddings, decoder, head).
A stage trains a subset. Frozen parts are cut out of the tree that is differentiated and optimised, so they
get no gradient buffers and no optimizer state, and the step passes them through untouched (bit-identical).
"""

from __future__ import annotations

from typing import Callable, Iterable

import jax
import jax.numpy as jnp
import optax

from qwen2vl_jax.train.config import OptimConfig


def part_of(path: tuple[str, ...]) -> str:
    """The part a param belongs to, from its path in the params tree."""
    if path[0] == "visual":
        return "merger" if path[1] == "merger" else "vit"
    return "llm"


def split(params: dict, parts: Iterable[str]) -> tuple[dict, dict]:
    """(trainable, frozen): two nested dicts that together hold every leaf of `params` once."""
    parts = frozenset(parts)

    def go(tree, path):
        if not isinstance(tree, dict):
            return (tree, None) if part_of(path) in parts else (None, tree)
        train, frozen = {}, {}
        for k, v in tree.items():
            t, f = go(v, path + (k,))
            if t is not None:
                train[k] = t
            if f is not None:
                frozen[k] = f
        return train or None, frozen or None

    train, frozen = go(params, ())
    return train or {}, frozen or {}


def merge(a: dict, b: dict) -> dict:
    """The union of two disjoint nested dicts (the inverse of `split`)."""
    out = dict(a)
    for k, v in b.items():
        out[k] = merge(out[k], v) if k in out and isinstance(v, dict) else v
    return out


def _labels(params) -> dict:
    return jax.tree_util.tree_map_with_path(lambda p, _: part_of(tuple(k.key for k in p)), params)


def _decay_mask(params) -> dict:
    # Norm scales and biases are not decayed; their stacked (layers, D) shapes rule out an ndim test.
    return jax.tree_util.tree_map_with_path(lambda p, _: p[-1].key in ("kernel", "embedding"), params)


def schedule(cfg: OptimConfig, peak: float) -> Callable:
    """Linear warmup from 0, then cosine to `end_lr_ratio * peak` over `decay_steps`, then flat."""
    return optax.warmup_cosine_decay_schedule(0.0, peak, cfg.warmup_steps, cfg.warmup_steps + cfg.decay_steps,
                                              end_value=peak * cfg.end_lr_ratio)


def schedules(cfg: OptimConfig, parts: Iterable[str]) -> dict[str, Callable]:
    """Learning-rate schedule of each trainable part (for the optimizer and for logging)."""
    return {p: schedule(cfg, cfg.part_lr.get(p, cfg.lr)) for p in parts}


MOMENTS_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def scale_by_adam_stored(b1: float, b2: float, eps: float, dtype) -> optax.GradientTransformation:
    """Adam's scaling with both moments *stored* in `dtype` (e.g. bfloat16, half the memory of float32).

    Each step reads the stored moments as float32, does all of Adam's maths in float32 (the same as
    `optax.scale_by_adam`), returns the float32 update and only then rounds the new moments to `dtype`. So
    the rounding touches what is kept for the next step, never the update of this one. The state is an
    `optax.ScaleByAdamState` (count, mu, nu) with the params' shapes, as optax's own.
    """
    def init(params):
        zeros = lambda p: jnp.zeros(p.shape, dtype)
        return optax.ScaleByAdamState(count=jnp.zeros([], jnp.int32), mu=jax.tree.map(zeros, params),
                                      nu=jax.tree.map(zeros, params))

    def update(updates, state, params=None):
        del params
        f32 = lambda t: jax.tree.map(lambda x: x.astype(jnp.float32), t)
        g = f32(updates)
        mu = optax.tree.update_moment(g, f32(state.mu), b1, 1)
        nu = optax.tree.update_moment_per_elem_norm(g, f32(state.nu), b2, 2)
        count = optax.safe_increment(state.count)
        mu_hat = optax.tree.bias_correction(mu, b1, count)
        nu_hat = optax.tree.bias_correction(nu, b2, count)
        out = jax.tree.map(lambda m, v, u: (m / (jnp.sqrt(v) + eps)).astype(u.dtype), mu_hat, nu_hat, updates)
        store = lambda t: jax.tree.map(lambda x: x.astype(dtype), t)
        return out, optax.ScaleByAdamState(count=count, mu=store(mu), nu=store(nu))

    return optax.GradientTransformation(init, update)


def adamw(cfg: OptimConfig, lr) -> optax.GradientTransformation:
    """AdamW of one part: optax's own with float32 moments, else the same chain with stored-`dtype` moments."""
    if cfg.moments_dtype == "float32":
        return optax.adamw(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay, mask=_decay_mask)
    return optax.chain(scale_by_adam_stored(cfg.b1, cfg.b2, cfg.eps, MOMENTS_DTYPES[cfg.moments_dtype]),
                       optax.add_decayed_weights(cfg.weight_decay, _decay_mask),
                       optax.scale_by_learning_rate(lr))


def make_optimizer(cfg: OptimConfig, parts: Iterable[str]) -> optax.GradientTransformation:
    """Clip by the global norm of all trainable gradients, then AdamW with each part's own schedule.

    Apply it to the trainable tree of `split` only: parts absent from the tree hold no state.
    """
    tx = optax.multi_transform({p: adamw(cfg, s) for p, s in schedules(cfg, parts).items()}, _labels)
    if cfg.clip_norm > 0:
        tx = optax.chain(optax.clip_by_global_norm(cfg.clip_norm), tx)
    return tx
