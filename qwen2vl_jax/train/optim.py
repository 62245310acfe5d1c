"""What trains and how: parameter groups by rules, AdamW with warmup + cosine, per-group learning rates.

A group is a rule: a regular expression searched in a param's path (its keys joined by "/", e.g.
`model/layers/q_proj/kernel`, `visual/blocks/fc1/lora_a`) and what to do with the params it matches: freeze
them, or train them with a learning-rate multiplier and with or without weight decay. Rules are ordered and
the first match wins; a param no rule matches is frozen. The paper's stages are three rule lists
(`configs/stage*.yaml`); the three parts of the model (`vit`, `merger`, `llm`) are the rules `PART_RULES`.
Frozen params are cut out of the tree that is differentiated and optimised, so they get no gradient buffers
and no optimizer state, and the step passes them through untouched (bit-identical).

The optimizer state is one `optax.ScaleByAdamState` (count, mu, nu) over the trainable tree, whatever the
groups: the update is optax's AdamW per group (`optax.adamw` chained after `optax.clip_by_global_norm`),
step for step, written with optax's public moment functions.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import optax

from qwen2vl_jax import target
from qwen2vl_jax.train.config import GroupConfig, OptimConfig

# The three parts of the model as rules: the ViT (patch embedding + blocks), the 2x2 merger, the LLM.
# The merger part holds every merger: the 2x2 one and Qwen3-VL's DeepStack mergers (`visual/deepstack/<i>`).
PART_RULES = {"vit": r"^visual/(?!(merger|deepstack)/)", "merger": r"^visual/(merger|deepstack)/",
              "llm": r"^(?!visual/)"}
# Weight decay by default on matrices only: kernels, embeddings and LoRA factors (quantised bases never train).
DECAYED = ("kernel", "embedding", "lora_a", "lora_b")


@dataclasses.dataclass(frozen=True)
class Group:
    """One rule: params whose path matches `match` (re.search) are frozen (`train=False`) or trained with peak
    learning rate `lr_mult * OptimConfig.lr`, decayed or not (`decay=None`: matrices only, see DECAYED)."""
    match: str
    name: str = ""
    train: bool = True
    lr_mult: float = 1.0
    decay: bool | None = None

    def __post_init__(self):
        try:
            re.compile(self.match)
        except re.error as e:
            raise ValueError(f"parameter group {self.name or self.match!r}: bad regex {self.match!r} ({e})") from None


def path_str(keys: Sequence) -> str:
    return "/".join(str(getattr(k, "key", k)) for k in keys)


def groups(spec, cfg: OptimConfig | None = None) -> tuple[Group, ...]:
    """The rules of `spec`: a sequence of `Group`s / `GroupConfig`s / dicts, or of part names (`vit`, `merger`,
    `llm`: the parts trained, each its own group with `cfg.part_lr` as its peak learning rate)."""
    if isinstance(spec, Groups):
        return spec.rules
    spec = tuple(spec)
    if spec and all(isinstance(s, str) for s in spec):
        unknown = [s for s in spec if s not in PART_RULES]
        if unknown:
            raise ValueError(f"unknown parts {unknown}; parts are {list(PART_RULES)}")
        part_lr = {} if cfg is None else cfg.part_lr
        lr = 1.0 if cfg is None else cfg.lr

        def mult(p):
            if p not in part_lr:
                return 1.0
            if lr == 0:
                raise ValueError(f"optim.part_lr.{p} needs optim.lr > 0 (part learning rates are multiples of it)")
            return part_lr[p] / lr
        return tuple(Group(PART_RULES[p], name=p, lr_mult=mult(p)) for p in spec)
    out = []
    for i, s in enumerate(spec):
        if isinstance(s, GroupConfig):
            s = dataclasses.asdict(s)
        if isinstance(s, dict):
            s = Group(**s)
        if not isinstance(s, Group):
            raise ValueError(f"parameter group {i}: expected a mapping {{match: REGEX, ...}}, got {s!r}")
        out.append(dataclasses.replace(s, name=s.name or (f"frozen{i}" if not s.train else f"group{i}")))
    names = {}
    for g in out:
        if g.train and g.name in names and names[g.name] != (g.lr_mult, g.decay):
            raise ValueError(f"parameter groups named {g.name!r} differ in lr_mult or decay; give them other names")
        names.setdefault(g.name, (g.lr_mult, g.decay))
    return tuple(out)


class Groups:
    """Compiled rules: `label(path)` is the name of the trained group a param belongs to, or None (frozen)."""

    def __init__(self, spec, cfg: OptimConfig | None = None):
        self.rules = groups(spec, cfg)
        self._res = [re.compile(g.match) for g in self.rules]

    def rule(self, keys) -> Group | None:
        s = path_str(keys)
        for g, r in zip(self.rules, self._res):
            if r.search(s):
                return g
        return None

    def label(self, keys) -> str | None:
        g = self.rule(keys)
        return g.name if g is not None and g.train else None

    def decayed(self, keys) -> bool:
        g = self.rule(keys)
        if g is not None and g.decay is not None:
            return g.decay
        return str(getattr(keys[-1], "key", keys[-1])) in DECAYED

    @property
    def trained(self) -> dict[str, Group]:
        """The trained groups by name, in rule order."""
        out = {}
        for g in self.rules:
            if g.train:
                out.setdefault(g.name, g)
        return out

    def parts(self) -> tuple[str, ...]:
        """The parts (vit, merger, llm) whose layers train, in whole or through adapters."""
        reps = {"vit": ("visual", "blocks", "qkv"), "merger": ("visual", "merger", "mlp_0"),
                "llm": ("model", "layers", "q_proj")}
        return tuple(p for p, keys in reps.items()
                     if any(self.label(keys + (leaf,)) is not None for leaf in ("kernel", "lora_a")))

    def __repr__(self):
        return f"Groups({list(self.rules)})"


def as_groups(spec, cfg: OptimConfig | None = None) -> Groups:
    return spec if isinstance(spec, Groups) else Groups(spec, cfg)


def part_of(path: tuple[str, ...]) -> str:
    """The part (vit, merger, llm) a param belongs to, from its path in the params tree."""
    if path[0] == "visual":
        return "merger" if path[1] in ("merger", "deepstack") else "vit"
    return "llm"


def split(params: dict, spec) -> tuple[dict, dict]:
    """(trainable, frozen): two nested dicts that together hold every leaf of `params` once. `spec`: rules or
    part names, as `groups` takes them."""
    g = as_groups(spec)

    def go(tree, path):
        if not isinstance(tree, dict):
            return (tree, None) if g.label(path) is not None else (None, tree)
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


def schedule(cfg: OptimConfig, peak: float) -> Callable:
    """Linear warmup from 0, then cosine to `end_lr_ratio * peak` over `decay_steps`, then flat."""
    return optax.warmup_cosine_decay_schedule(0.0, peak, cfg.warmup_steps, cfg.warmup_steps + cfg.decay_steps,
                                              end_value=peak * cfg.end_lr_ratio)


def schedules(cfg: OptimConfig, spec) -> dict[str, Callable]:
    """Learning-rate schedule of each trained group (for the optimizer and for logging)."""
    return {name: schedule(cfg, cfg.lr * g.lr_mult) for name, g in as_groups(spec, cfg).trained.items()}


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


def _adam(cfg: OptimConfig) -> optax.GradientTransformation:
    if cfg.moments_dtype == "float32":
        return optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2, eps=cfg.eps)
    return scale_by_adam_stored(cfg.b1, cfg.b2, cfg.eps, MOMENTS_DTYPES[cfg.moments_dtype])


class Optimizer(optax.GradientTransformation):
    """What `make_optimizer` returns: an optax GradientTransformation that also carries its config and groups,
    so that the train step can run the same maths fused per leaf (`fused_update`)."""


def make_optimizer(cfg: OptimConfig, spec) -> Optimizer:
    """Clip by the global norm of all trainable gradients, then AdamW with each group's own schedule.

    The same maths as `optax.chain(optax.clip_by_global_norm(clip), optax.multi_transform({group:
    optax.adamw(schedule, mask=decay)}, labels))`; the state is one `optax.ScaleByAdamState` over the
    trainable tree (the groups all step together, so they share the count). Apply it to the trainable tree of
    `split(params, spec)` only: frozen params hold no state.
    """
    g = as_groups(spec, cfg)
    lrs = schedules(cfg, g)
    adam = _adam(cfg)

    def update(grads, state, params):
        if cfg.clip_norm > 0:
            grads, _ = optax.clip_by_global_norm(cfg.clip_norm).update(grads, optax.EmptyState())
        u, new_state = adam.update(grads, state, params)
        rates = {name: s(state.count) for name, s in lrs.items()}

        def leaf(path, u, p):
            keys = tuple(k.key for k in path)
            if g.decayed(keys) and cfg.weight_decay != 0.0:
                u = u + cfg.weight_decay * p
            return jnp.array(-1 * rates[_label(g, keys)], dtype=u.dtype) * u
        return jax.tree_util.tree_map_with_path(leaf, u, params), new_state

    out = Optimizer(adam.init, update)
    out.cfg, out.groups = cfg, g
    return out


def _label(g: Groups, keys) -> str:
    name = g.label(keys)
    if name is None:
        raise ValueError(f"param {path_str(keys)} is frozen by the parameter groups but was given to the "
                         f"optimizer; pass the trainable tree of split(params, groups)")
    return name


def fused_update(tx: Optimizer, grads: dict, opt_state: optax.ScaleByAdamState, params: dict, loss):
    """The whole optimizer step of `tx` (from `make_optimizer`), one elementwise expression per leaf.

    Takes the trainable `grads` and `params` and `tx`'s state, and returns (new params, new state, metrics)
    with the state in the same structure. Each leaf's clipped gradient, both moments, the decayed and scaled
    update, the new param and the guard (`finite`: loss and gradient norm finite, else every array stays as
    it was) are one expression per leaf, not passes over whole trees; the clipped gradient is never stored
    and the donated moments are updated without a copy (the whole step's XLA temporaries on the 0.58B model,
    full remat, bf16 moments: 5.47 -> 2.90 GiB). The maths is `tx.update` then `optax.apply_updates`, op for
    op; XLA fuses and rounds the one expression differently, so the moments and params agree to a few ulp,
    not bit for bit. Metrics: grad_norm (before clipping), finite, param_norm (of the params kept).
    """
    cfg, g = tx.cfg, tx.groups
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
    count = optax.safe_increment(opt_state.count)
    rates = {name: -1 * s(opt_state.count) for name, s in schedules(cfg, g).items()}

    def leaf(path, g_, p, m_old, v_old):
        keys = tuple(k.key for k in path)
        step_size = rates[_label(g, keys)]
        if cfg.clip_norm > 0:
            g_ = jax.lax.select(trigger, g_, (g_ * inv_norm.astype(g_.dtype)) * cfg.clip_norm)
        dtype = g_.dtype
        if stored != jnp.float32:   # scale_by_adam_stored: float32 maths, rounded storage
            g_, m_old, v_old = g_.astype(jnp.float32), m_old.astype(jnp.float32), v_old.astype(jnp.float32)
        m = optax.tree.update_moment(g_, m_old, cfg.b1, 1)
        v = optax.tree.update_moment_per_elem_norm(g_, v_old, cfg.b2, 2)
        m_hat = optax.tree.bias_correction(m, cfg.b1, count)
        v_hat = optax.tree.bias_correction(v, cfg.b2, count)
        if stored == jnp.float32:
            u = m_hat / (jnp.sqrt(v_hat + 0.0) + cfg.eps)
        else:
            u = (m_hat / (jnp.sqrt(v_hat) + cfg.eps)).astype(dtype)
        if g.decayed(keys) and cfg.weight_decay != 0.0:
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
        if target.platform() != "cpu":
            m_keep, v_keep = m, v
        else:
            first = new_p.reshape(-1)[0].astype(jnp.float32)
            zero = (jnp.where(jnp.isfinite(first), first, 0.0) * 0.0).astype(m.dtype)
            m_keep = (1 - cfg.b1) * g_ + (cfg.b1 * m_old + zero)
            v_keep = (1 - cfg.b2) * jnp.square(g_) + (cfg.b2 * v_old + zero)
        return new_p, keep(m_keep.astype(stored), m_old.astype(stored)), keep(v_keep.astype(stored),
                                                                              v_old.astype(stored))

    if jax.tree.structure(grads) != jax.tree.structure(opt_state.mu):
        raise ValueError("fused_update: the gradients' tree is not the optimizer state's; pass the trainable tree "
                         "of split(params, groups) and the state of make_optimizer(cfg, groups)")
    out = jax.tree_util.tree_map_with_path(leaf, grads, params, opt_state.mu, opt_state.nu)
    is_triple = lambda x: isinstance(x, tuple) and len(x) == 3 and not isinstance(x[0], tuple)
    pick = lambda i: jax.tree.map(lambda t: t[i], out, is_leaf=is_triple)
    params_out = pick(0)
    state_out = optax.ScaleByAdamState(count=keep(count, opt_state.count), mu=pick(1), nu=pick(2))
    metrics = {"grad_norm": grad_norm, "finite": finite, "param_norm": optax.tree.norm(params_out)}
    return params_out, state_out, metrics
