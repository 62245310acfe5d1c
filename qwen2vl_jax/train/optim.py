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


def make_optimizer(cfg: OptimConfig, parts: Iterable[str]) -> "Optimizer":
    """Clip by the global norm of all trainable gradients, then AdamW with each part's own schedule.

    Apply it to the trainable tree of `split` only: parts absent from the tree hold no state.
    """
    tx = optax.multi_transform({p: adamw(cfg, s) for p, s in schedules(cfg, parts).items()}, _labels)
    if cfg.clip_norm > 0:
        tx = optax.chain(optax.clip_by_global_norm(cfg.clip_norm), tx)
    out = Optimizer(tx.init, tx.update)
    out.cfg, out.parts = cfg, tuple(parts)
    return out


class Optimizer(optax.GradientTransformation):
    """What `make_optimizer` returns: an optax GradientTransformation that also carries its config and parts,
    so that the train step can run the same maths fused per leaf (`fused_update`)."""


def fused_update(cfg: OptimConfig, parts: Iterable[str], grads: dict, opt_state, params: dict, loss):
    """The whole optimizer step of `make_optimizer(cfg, parts)`, one elementwise expression per leaf.

    Takes the trainable `grads` and `params` and the state that `make_optimizer` builds, and returns
    (new params, new state, metrics) with the state in that same structure (checkpoints do not change). Each
    leaf's clipped gradient, both moments, the decayed and scaled update, the new param and the guard
    (`finite`: loss and gradient norm finite, else every array stays as it was) are one expression per leaf,
    not passes over whole trees; the clipped gradient is never stored and the donated moments are updated
    without a copy (the whole step's XLA temporaries on the 0.58B model, full remat, bf16 moments:
    5.47 -> 2.90 GiB). The maths is optax's, op for op (`tx.update` then
    `optax.apply_updates`); XLA fuses and rounds the one expression differently from optax's chain, so the
    moments and params agree to a few ulp, not bit for bit.
    Metrics: grad_norm (before clipping), finite, param_norm (of the params kept).
    """
    if cfg.clip_norm > 0:
        clip_state, part_state = opt_state
    else:
        clip_state, part_state = None, opt_state
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    keep = lambda new, old: jnp.where(finite, new, old)
    trigger = jnp.squeeze(grad_norm < cfg.clip_norm)
    # optax's clip is (g / norm) * clip, which XLA compiles as g * (1 / norm) * clip; written that way here,
    # with the reciprocal a scalar, the clipped gradient is cheap enough for XLA to recompute inside each
    # fusion that reads it instead of holding a clipped copy of every gradient (0.58B model: the step's
    # temporaries 5.47 -> 3.74 GiB), and the result is the same bits.
    inv_norm = 1.0 / grad_norm
    stored = MOMENTS_DTYPES[cfg.moments_dtype]
    decay = _decay_mask(params)

    def one_part(part, lr, inner):
        (adam, decay_state, sched) = inner.inner_state
        count = optax.safe_increment(adam.count)
        step_size = -1 * lr(sched.count)

        def leaf(g, p, m_old, v_old, decayed):
            if cfg.clip_norm > 0:
                g = jax.lax.select(trigger, g, (g * inv_norm.astype(g.dtype)) * cfg.clip_norm)
            dtype = g.dtype
            if stored != jnp.float32:   # scale_by_adam_stored: float32 maths, rounded storage
                g, m_old, v_old = g.astype(jnp.float32), m_old.astype(jnp.float32), v_old.astype(jnp.float32)
            m = optax.tree.update_moment(g, m_old, cfg.b1, 1)
            v = optax.tree.update_moment_per_elem_norm(g, v_old, cfg.b2, 2)
            m_hat = optax.tree.bias_correction(m, cfg.b1, count)
            v_hat = optax.tree.bias_correction(v, cfg.b2, count)
            if stored == jnp.float32:
                u = m_hat / (jnp.sqrt(v_hat + 0.0) + cfg.eps)
            else:
                u = (m_hat / (jnp.sqrt(v_hat) + cfg.eps)).astype(dtype)
            if decayed and cfg.weight_decay != 0.0:
                u = u + cfg.weight_decay * p
            u = jnp.array(step_size, dtype=u.dtype) * u
            new_p = keep(jnp.asarray(p + u).astype(jnp.asarray(p).dtype), p)
            # The stored moments overwrite the donated old ones in place, and the new param reads the old ones.
            # XLA computes the new param and each stored moment in separate fusions; nothing orders the param's
            # read before the moments' writes, so XLA copies every old moment first (0.58B model, bf16 moments:
            # ~1.1 GiB of copies at the step's peak). So the stored moments take a data dependency on the new
            # param (an exact zero made from one of its elements), and are written as a different expression
            # of the same sums, so that XLA recomputes them after the param instead of keeping f32 moments
            # from before it. The sums are the same but for rounding (a few ulp; bf16 storage: the same bits).
            # CPU only: on a sharded TPU/GPU param the element would be a cross-device read per leaf, and
            # those backends' memory was not measured with it; they keep optax's expressions.
            if jax.default_backend() != "cpu":
                return new_p, m.astype(stored), v.astype(stored)
            first = new_p.reshape(-1)[0].astype(jnp.float32)
            zero = (jnp.where(jnp.isfinite(first), first, 0.0) * 0.0).astype(m.dtype)
            m_keep = (1 - cfg.b1) * g + (cfg.b1 * m_old + zero)
            v_keep = (1 - cfg.b2) * jnp.square(g) + (cfg.b2 * v_old + zero)
            return new_p, m_keep.astype(stored), v_keep.astype(stored)

        flat_mu, mu_def = jax.tree_util.tree_flatten_with_path(adam.mu)
        flat_nu = jax.tree_util.tree_leaves(adam.nu)
        new = {}
        for (path, m), v in zip(flat_mu, flat_nu):
            keys = tuple(k.key for k in path)
            g, p = _at(grads, keys), _at(params, keys)
            new[keys] = leaf(g, p, m, v, _at(decay, keys))
        mus = [keep(new[tuple(k.key for k in path)][1], m) for path, m in flat_mu]
        nus = [keep(new[tuple(k.key for k in path)][2], v) for (path, _), v in zip(flat_mu, flat_nu)]
        adam = optax.ScaleByAdamState(count=keep(count, adam.count), mu=jax.tree_util.tree_unflatten(mu_def, mus),
                                      nu=jax.tree_util.tree_unflatten(mu_def, nus))
        sched = sched._replace(count=keep(optax.safe_increment(sched.count), sched.count))
        return {k: n[0] for k, n in new.items()}, \
            inner._replace(inner_state=(adam, decay_state, sched))

    new_params, inner_states = {}, {}
    for part, lr in schedules(cfg, parts).items():
        if part not in part_state.inner_states:
            continue
        leaves, inner_states[part] = one_part(part, lr, part_state.inner_states[part])
        new_params.update(leaves)
    missing = [k for k in _paths(params) if k not in new_params]
    if missing:
        raise ValueError(f"fused_update: params {missing[:3]} have no optimizer state; pass the trainable tree "
                         f"of split(params, parts) and the state of make_optimizer(cfg, parts)")
    params_out = jax.tree_util.tree_map_with_path(lambda path, _: new_params[tuple(k.key for k in path)], params)
    state_out = part_state._replace(inner_states=inner_states)
    if clip_state is not None:
        state_out = (clip_state, state_out)
    metrics = {"grad_norm": grad_norm, "finite": finite, "param_norm": optax.tree.norm(params_out)}
    return params_out, state_out, metrics


def _at(tree, keys):
    for k in keys:
        tree = tree[k]
    return tree


def _paths(tree):
    return [tuple(k.key for k in path) for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
