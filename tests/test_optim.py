"""The optimizer: parameter groups by rules, one AdamW path equal to optax's own (per group lr and decay, the
global-norm clip), the fused per-leaf update equal to it; and AdamW with bfloat16-stored moments (`optim.moments_dtype`): the moments are stored in bf16, the maths is
optax's float32 AdamW with only the storage rounded, it tracks the float32 optimizer within the bound that
bf16 rounding allows, and the state survives an orbax checkpoint bit for bit."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from qwen2vl_jax import sharding
from qwen2vl_jax.model.qwen2vl import Qwen2VLModule
from qwen2vl_jax.train import checkpoint as ck, optim, state as S
from qwen2vl_jax.train.config import OptimConfig, RunConfigError, load
from train_utils import random_params, tiny_config

U_BF16 = 2.0 ** -8   # unit roundoff of bfloat16 (8 significant bits, round to nearest)
OCFG = OptimConfig(lr=1e-2, warmup_steps=0, decay_steps=100, end_lr_ratio=1.0, b1=0.9, b2=0.95,
                   weight_decay=0.1, clip_norm=0.0)
BF16 = dataclasses.replace(OCFG, moments_dtype="bfloat16")
PARTS = ("llm",)


def _problem(seed=0):
    """An llm-part-shaped tree (kernel decayed, bias not) and a separable loss -sum(q p^2) / 2 whose gradients
    grow in magnitude and keep their signs as AdamW moves p away from 0: every moment's magnitude only grows,
    the regime of the bound in `test_bf16_tracks_float32`. (Weight decay, 0.1 |p| < 1, never reverses a step.)"""
    rng = np.random.default_rng(seed)
    sign = lambda shape: np.where(rng.random(shape) < 0.5, -1.0, 1.0)
    params = {"model": {"proj": {"kernel": jnp.asarray(sign((16, 8)) * rng.uniform(1, 3, (16, 8)), jnp.float32),
                                 "bias": jnp.asarray(sign(8) * rng.uniform(1, 3, 8), jnp.float32)}}}
    q = jax.tree.map(lambda x: jnp.asarray(rng.uniform(0.5, 2.0, x.shape), jnp.float32), params)

    def loss(p):
        return -0.5 * sum(jnp.sum(c * jnp.square(x)) for c, x in zip(jax.tree.leaves(q), jax.tree.leaves(p)))
    return params, loss


def _run(tx, params, loss, steps, round_moments=None):
    @jax.jit
    def step(p, s):
        g = jax.grad(loss)(p)
        u, s = tx.update(g, s, p)
        if round_moments is not None:
            s = round_moments(s)
        return optax.apply_updates(p, u), s
    s = tx.init(params)
    traj = [params]
    for _ in range(steps):
        params, s = step(params, s)
        traj.append(params)
    return traj, s


def _flat(p):
    return np.concatenate([np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(p)])


def _adam_states(s):
    return [x for x in jax.tree.leaves(s, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
            if isinstance(x, optax.ScaleByAdamState)]


def test_moments_stored_in_bf16():
    params, loss = _problem()
    _, s = _run(optim.make_optimizer(BF16, PARTS), params, loss, 2)
    (adam,) = _adam_states(s)
    for leaf in jax.tree.leaves((adam.mu, adam.nu)):
        assert leaf.dtype == jnp.bfloat16
    assert adam.count.dtype == jnp.int32 and int(adam.count) == 2
    # float32 (the default) is optax's own AdamW, unchanged.
    (adam32,) = _adam_states(_run(optim.make_optimizer(OCFG, PARTS), params, loss, 1)[1])
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves((adam32.mu, adam32.nu)))


def test_float32_storage_is_optax_adamw_bit_for_bit():
    """The custom transformation with float32 storage computes exactly what optax.scale_by_adam does."""
    params, loss = _problem()
    ref = optax.scale_by_adam(b1=0.9, b2=0.95, eps=1e-8)
    ours = optim.scale_by_adam_stored(0.9, 0.95, 1e-8, jnp.float32)
    a, _ = _run(ref, params, loss, 5)
    b, _ = _run(ours, params, loss, 5)
    for x, y in zip(a, b):
        assert np.array_equal(_flat(x), _flat(y))


def test_bf16_is_float32_maths_with_rounded_storage():
    """bf16 storage == optax's float32 AdamW whose moments are rounded to bf16 after every step: the update
    is computed from the unrounded float32 moments, only what is kept is rounded. The first step is therefore
    bit-identical to the float32 optimizer."""
    params, loss = _problem()
    rnd = lambda t: jax.tree.map(lambda x: x.astype(jnp.bfloat16).astype(jnp.float32)
                                 if x.dtype == jnp.float32 and x.ndim else x, t)

    def round_moments(s):
        return jax.tree.map(lambda x: optax.ScaleByAdamState(x.count, rnd(x.mu), rnd(x.nu))
                            if isinstance(x, optax.ScaleByAdamState) else x, s,
                            is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))

    ours, _ = _run(optim.make_optimizer(BF16, PARTS), params, loss, 10)
    simulated, _ = _run(optim.make_optimizer(OCFG, PARTS), params, loss, 10, round_moments)
    exact32, _ = _run(optim.make_optimizer(OCFG, PARTS), params, loss, 1)
    assert np.array_equal(_flat(ours[1]), _flat(exact32[1]))
    for x, y in zip(ours, simulated):
        assert np.array_equal(_flat(x), _flat(y))


def test_bf16_tracks_float32():
    """Over 20 steps the bf16-moment trajectory stays within the rounding bound of the float32 one.

    Bound: each store rounds a moment by a relative u = 2^-8. While the gradients keep their signs and grow,
    the moments' magnitudes only grow, so the errors summed through the EMA stay below u / (1 - b1) of mu and
    u / (1 - b2) of nu, i.e. u / (2 (1 - b2)) of sqrt(nu). Every update, and hence the whole displacement
    from the start, is then off by at most u (1 / (1 - b1) + 1 / (2 (1 - b2))) = 20 u ~ 7.8% relative (the
    different trajectories' gradients differ by a second-order amount at this lr)."""
    params, loss = _problem()
    steps = 20
    f32, _ = _run(optim.make_optimizer(OCFG, PARTS), params, loss, steps)
    b16, _ = _run(optim.make_optimizer(BF16, PARTS), params, loss, steps)
    grads = [_flat(jax.grad(loss)(p)) for p in f32]
    assert all(np.all(np.abs(b) > np.abs(a)) and np.all(np.sign(b) == np.sign(a)) for a, b in zip(grads, grads[1:]))
    bound = U_BF16 * (1 / (1 - OCFG.b1) + 1 / (2 * (1 - OCFG.b2)))
    p0, worst = _flat(params), 0.0
    for t in range(1, steps + 1):
        d32, d16 = _flat(f32[t]) - p0, _flat(b16[t]) - p0
        rel = np.linalg.norm(d16 - d32) / np.linalg.norm(d32)
        assert rel <= bound, (t, rel)
        worst = max(worst, rel)
    print(f"bf16 vs f32 moments: worst relative displacement error {worst:.2e} (bound {bound:.2e})")
    assert float(loss(b16[-1])) < float(loss(params))   # and it does optimise


def test_config_key_and_validation():
    cfg = load(None, ["optim.moments_dtype=bfloat16"])
    assert cfg.optim.moments_dtype == "bfloat16"
    assert load(None).optim.moments_dtype == "float32"
    with pytest.raises(RunConfigError, match="moments_dtype must be float32 or bfloat16"):
        load(None, ["optim.moments_dtype=float16"])
    with pytest.raises(RunConfigError, match="needs b1, b2 <= 0.99"):
        load(None, ["optim.moments_dtype=bfloat16", "optim.b2=0.999"])


def test_bf16_state_checkpoint_round_trip(tmp_path):
    cfg = tiny_config()
    module = Qwen2VLModule(cfg)
    parts = ("merger", "llm")
    tx = optim.make_optimizer(dataclasses.replace(BF16, clip_norm=1.0), parts)
    shardings = S.state_shardings(module, tx, parts, sharding.make_mesh(1, 1, 1))
    params = random_params(module, 0)
    trainable = optim.split(params, parts)[0]
    opt = jax.jit(lambda t: tx.update(jax.tree.map(lambda x: x * 0.5, t), tx.init(t), t)[1])(trainable)
    st = jax.device_put(S.TrainState(step=jnp.asarray(1, jnp.int32), params=params, opt_state=opt,
                                     rng=jax.random.key_data(jax.random.key(0))), shardings)
    ckpts = ck.Checkpoints(str(tmp_path), keep=1)
    ckpts.save(st, 1, None, cfg, {})
    ckpts.wait()
    back, _ = ckpts.restore(S.abstract_state(module, tx, parts, shardings), 1)
    ckpts.close()
    adams = _adam_states(back.opt_state)
    assert len(adams) == 1   # one state over the trainable tree (merger and llm)
    assert {x.dtype for a in adams for x in jax.tree.leaves((a.mu, a.nu))} == {jnp.dtype(jnp.bfloat16)}
    la, lb = jax.tree.leaves(st), jax.tree.leaves(back)
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        assert x.dtype == y.dtype and np.array_equal(np.asarray(x), np.asarray(y))


def _three_part_tree(rng):
    shapes = {"visual": {"blocks": {"qkv": {"kernel": (2, 6, 9), "bias": (2, 9)}},
                         "merger": {"mlp_0": {"kernel": (6, 5), "bias": (5,)}}},
              "model": {"norm": {"scale": (5,)}, "embed_tokens": {"embedding": (7, 5)}}}
    return jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s), jnp.float32), shapes,
                        is_leaf=lambda x: isinstance(x, tuple))


@pytest.mark.parametrize("moments", ["float32", "bfloat16"])
@pytest.mark.parametrize("parts", [("vit", "merger", "llm"), ("merger", "llm")])
def test_fused_update_is_optax(moments, parts):
    _fused_update_is_optax(moments, parts)


@pytest.mark.parametrize("moments", ["float32", "bfloat16"])
def test_fused_update_accelerator_form(moments, monkeypatch):
    """TPUs and GPUs take the update without the CPU's ordering of the moment writes: the same checks."""
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    _fused_update_is_optax(moments, ("vit", "merger", "llm"))


def _fused_update_is_optax(moments, parts):
    """train_step's fused per-leaf update against tx.update + apply_updates + the guard, with the clip acting on
    some steps and not on others: the same optimizer state to a few ulp (counts exactly), params to a few ulp; a non-finite step
    leaves everything as it was."""
    rng = np.random.default_rng(0)
    cfg = OptimConfig(lr=1e-2, warmup_steps=2, decay_steps=10, b1=0.9, b2=0.95, weight_decay=0.1, clip_norm=1.0,
                      moments_dtype=moments)
    tx = optim.make_optimizer(cfg, parts)
    p, _ = optim.split(_three_part_tree(rng), parts)
    s = tx.init(p)

    @jax.jit
    def reference(p, s, g):
        u, s = tx.update(g, s, p)
        new = optax.apply_updates(p, u)
        return new, s, optax.tree.norm(new)

    fused = jax.jit(lambda p, s, g, loss: optim.fused_update(tx, g, s, p, loss))
    for step, scale in enumerate([3.0, 0.01, 1.5, 0.02, 5.0]):   # global norms above and below clip_norm 1
        g = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape) * scale, jnp.float32), p)
        p_ref, s_ref, norm_ref = reference(p, s, g)
        p_new, s_new, m = fused(p, s, g, jnp.float32(1.0))
        assert bool(m["finite"]) and (float(m["grad_norm"]) > 1.0) == (scale > 1.0)
        assert jax.tree.structure(s_new) == jax.tree.structure(s_ref)
        # Counts: the same. Moments: the clip, both moment updates and the new param are one expression per
        # leaf, which XLA compiles into other fusions than optax's chain (the clipped gradient is recomputed in
        # each instead of stored), with other roundings and contractions: f32 moments agree to a few units in
        # the last place of the leaf's largest moment (an element near zero, where m's two terms cancel, can
        # be many of its own ulps off); bf16-stored ones to one bf16 rounding.
        for a, b in zip(jax.tree.leaves(s_ref), jax.tree.leaves(s_new)):
            assert a.dtype == b.dtype, step
            if a.dtype == jnp.float32:
                scale = float(np.abs(np.asarray(a)).max())
                np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=0,
                                           atol=8 * np.finfo(np.float32).eps * scale, err_msg=str(step))
            elif jnp.issubdtype(a.dtype, jnp.floating):   # bf16: at most one step of the stored bits
                bits = lambda x: np.asarray(x).view(np.int16).astype(np.int32)
                assert np.abs(bits(a) - bits(b)).max() <= 1, step
            else:
                assert np.array_equal(np.asarray(a), np.asarray(b)), step
        # The new params move a few elements by a few units in the last place (seen: <= 21 ulp on 2 of 108).
        for a, b in zip(jax.tree.leaves(p_ref), jax.tree.leaves(p_new)):
            np.testing.assert_array_max_ulp(np.asarray(a), np.asarray(b), maxulp=32)
        np.testing.assert_allclose(float(m["param_norm"]), float(norm_ref), rtol=1e-6)   # summation order
        p, s = p_new, s_new
    g = jax.tree.map(lambda x: x.at[(0,) * x.ndim].set(jnp.nan), g)
    for loss, grads in ((jnp.float32(jnp.nan), jax.tree.map(jnp.zeros_like, g)), (jnp.float32(1.0), g)):
        p_new, s_new, m = fused(p, s, grads, loss)
        assert not bool(m["finite"])
        for a, b in zip(jax.tree.leaves((p, s)), jax.tree.leaves((p_new, s_new))):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# -- parameter groups ---------------------------------------------------------------------------------------

def test_group_rules_first_match_wins():
    g = optim.Groups([{"match": r"^visual/merger/", "name": "merger", "lr_mult": 2.0},
                      {"match": r"/norm\d?/", "train": False},
                      {"match": r"^visual/", "name": "vit", "lr_mult": 0.1, "decay": False},
                      {"match": r"/lora_[ab]$", "name": "lora"}])
    assert g.label(("visual", "merger", "mlp_0", "kernel")) == "merger"
    assert g.label(("visual", "blocks", "norm1", "scale")) is None          # the frozen rule comes first
    assert g.label(("visual", "blocks", "qkv", "kernel")) == "vit"
    assert g.label(("model", "layers", "q_proj", "lora_a")) == "lora"
    assert g.label(("model", "layers", "q_proj", "kernel")) is None         # no rule: frozen
    assert not g.decayed(("visual", "blocks", "qkv", "kernel"))              # the rule's decay: false
    assert g.decayed(("model", "layers", "q_proj", "lora_b")) and not g.decayed(("model", "norm", "scale"))
    assert set(g.trained) == {"merger", "vit", "lora"} and g.parts() == ("vit", "merger", "llm")
    with pytest.raises(ValueError, match="bad regex"):
        optim.Groups([{"match": "(", "name": "x"}])
    with pytest.raises(ValueError, match="differ in lr_mult"):
        optim.Groups([{"match": "a", "name": "x"}, {"match": "b", "name": "x", "lr_mult": 2.0}])
    # Part names are the three part rules.
    parts = optim.Groups(("merger", "llm"))
    tree = _three_part_tree(np.random.default_rng(0))
    train, frozen = optim.split(tree, parts)
    assert set(train) == {"visual", "model"} and set(train["visual"]) == {"merger"}
    assert set(frozen) == {"visual"} and set(frozen["visual"]) == {"blocks"}


GROUPS = [{"match": r"^visual/merger/", "name": "merger", "lr_mult": 3.0},
          {"match": r"^visual/blocks/.*/bias$", "train": False},
          {"match": r"^visual/", "name": "vit", "lr_mult": 0.5},
          {"match": r"/norm/", "name": "norms", "decay": True},
          {"match": r".", "name": "rest", "lr_mult": 1.0, "decay": False}]


def _optax_reference(cfg, groups):
    """optax's own AdamW per group (clip in front, multi_transform over the group labels)."""
    g = optim.Groups(groups, cfg)
    labels = lambda t: jax.tree_util.tree_map_with_path(lambda p, _: g.label(tuple(k.key for k in p)), t)
    decay = lambda t: jax.tree_util.tree_map_with_path(lambda p, _: g.decayed(tuple(k.key for k in p)), t)
    inner = {name: optax.adamw(optim.schedule(cfg, cfg.lr * r.lr_mult), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                               weight_decay=cfg.weight_decay, mask=decay) for name, r in g.trained.items()}
    return optax.chain(optax.clip_by_global_norm(cfg.clip_norm), optax.multi_transform(inner, labels))


def test_optimizer_is_optax_adamw_per_group():
    """make_optimizer over five rules (a frozen one, per-group lr multipliers, decay forced on and off) against
    optax.adamw per group behind optax.clip_by_global_norm, over steps with the clip acting and not: the
    params after each step agree to rounding (the lr of a group is applied as optax applies it)."""
    rng = np.random.default_rng(1)
    cfg = OptimConfig(lr=1e-2, warmup_steps=2, decay_steps=10, b1=0.9, b2=0.95, weight_decay=0.1, clip_norm=1.0)
    tx = optim.make_optimizer(cfg, GROUPS)
    ref = _optax_reference(cfg, GROUPS)
    p, frozen = optim.split(_three_part_tree(rng), tx.groups)
    assert frozen == {"visual": {"blocks": {"qkv": {"bias": frozen["visual"]["blocks"]["qkv"]["bias"]}}}}
    assert set(optim.schedules(cfg, tx.groups)) == {"merger", "vit", "norms", "rest"}
    ours_p, ref_p = p, p
    s, rs = tx.init(p), ref.init(p)
    assert isinstance(s, optax.ScaleByAdamState)   # one public optax state over the trainable tree
    fused = jax.jit(lambda p, s, g: optim.fused_update(tx, g, s, p, jnp.float32(1.0)))
    fp, fs = p, s
    step = jax.jit(lambda t, p, s, g: optax.apply_updates(p, t.update(g, s, p)[0]), static_argnums=0)
    upd = lambda t: jax.jit(lambda p, s, g: t.update(g, s, p))
    ours_u, ref_u = upd(tx), upd(ref)
    for i, scale in enumerate([3.0, 0.01, 1.5, 0.02, 5.0, 0.3]):
        g = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape) * scale, jnp.float32), ours_p)
        u1, s = ours_u(ours_p, s, g)
        u2, rs = ref_u(ref_p, rs, g)
        ours_p, ref_p = optax.apply_updates(ours_p, u1), optax.apply_updates(ref_p, u2)
        for a, b in zip(jax.tree.leaves(ref_p), jax.tree.leaves(ours_p)):
            np.testing.assert_array_max_ulp(np.asarray(a), np.asarray(b), maxulp=4)
        fp, fs, m = fused(fp, fs, g)
        for a, b in zip(jax.tree.leaves(ref_p), jax.tree.leaves(fp)):
            np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-6, err_msg=str(i))
        assert int(fs.count) == i + 1
    # The learning rates: merger 3x, vit 0.5x of the peak; every group moved.
    assert not any(np.array_equal(np.asarray(a), np.asarray(b))
                   for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(ours_p)))


def test_config_groups_and_stage_rules():
    cfg = load(None, ["optim.groups=[{match: '^visual/merger/', lr_mult: 2}, {match: '^model/', name: llm}]"])
    g = optim.Groups(cfg.optim.groups, cfg.optim)
    assert [r.name for r in g.rules] == ["group0", "llm"] and g.rules[0].lr_mult == 2.0
    with pytest.raises(RunConfigError, match="not a valid regex"):
        load(None, ["optim.groups=[{match: '('}]"])
    with pytest.raises(RunConfigError, match="trains nothing"):
        load(None, ["optim.groups=[{match: '.', train: false}]"])
    with pytest.raises(RunConfigError, match="part_lr or optim.groups"):
        load(None, ["optim.groups=[{match: '.'}]", "optim.part_lr.vit=1e-5"])
