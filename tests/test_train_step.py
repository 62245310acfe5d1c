"""The train step on one device: the loss against a hand computation, gradient accumulation against one big
batch, stage masks leaving frozen parts bit-identical with no optimizer state, the NaN guard."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qwen2vl_jax import sharding
from qwen2vl_jax.model.qwen2vl import Qwen2VLModule
from qwen2vl_jax.train import optim, state as S
from qwen2vl_jax.train.batches import STEP_KEYS, stack_micro_batches
from qwen2vl_jax.train.config import STAGE_PARTS, OptimConfig
from qwen2vl_jax.train.loss import chunked_token_sums, token_sums
from qwen2vl_jax.train.step import StepFn, compute_grads
from train_utils import packed, random_params, stack, text_packed, tiny_config


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def _tree_rel(a, b):
    return max(_rel(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.fixture(scope="module")
def tiny():
    cfg = tiny_config()
    module = Qwen2VLModule(cfg)
    return cfg, module, random_params(module, 0)


def test_token_sums_by_hand():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 3, 5)).astype(np.float32)
    labels = rng.integers(0, 5, (2, 3)).astype(np.int32)
    mask = np.array([[1, 0, 1], [0, 1, 1]], np.float32)
    lse = np.log(np.exp(logits.astype(np.float64)).sum(-1))
    tgt = np.take_along_axis(logits, labels[..., None], -1)[..., 0]
    s = jax.jit(token_sums)(logits, labels, mask)
    np.testing.assert_allclose(float(s.ce), ((lse - tgt) * mask).sum(), rtol=1e-6)
    np.testing.assert_allclose(float(s.z), (lse ** 2 * mask).sum(), rtol=1e-6)
    assert float(s.correct) == ((logits.argmax(-1) == labels) * mask).sum()


def test_chunked_loss_equals_whole_rows():
    rng = np.random.default_rng(1)
    h = jnp.asarray(rng.normal(size=(2, 12, 8)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(8, 50)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, 50, (2, 12)), jnp.int32)
    mask = jnp.asarray(rng.integers(0, 2, (2, 12)), jnp.float32)
    whole = lambda w: token_sums(h @ w, labels, mask).ce
    chunked = lambda w: chunked_token_sums(lambda x: x @ w, h, labels, mask, 4).ce
    assert _rel(jax.jit(chunked)(w), jax.jit(whole)(w)) < 1e-6
    assert _rel(jax.jit(jax.grad(chunked))(w), jax.jit(jax.grad(whole))(w)) < 1e-5


def test_accumulation_and_normalisation(tiny):
    """k=2 micro-batches of 2 rows == one batch of 4 rows (same loss and gradients), and the loss is
    sum(CE) / target tokens of the whole batch, recomputed here from the model's logits, so a row holding
    two packed examples weighs what its tokens weigh and micro-batches with different target counts are
    not averaged as equals. (Text-only rows: the normalisation does not involve the vision tower, and the
    program compiles in half the time; accumulation with images runs in test_train_sharded.)"""
    cfg, module, params = tiny
    b1 = text_packed(cfg, ["red", "blue", "green", "yellow"], 2)
    b2 = text_packed(cfg, ["a long answer here", "no", "purple", "it is orange"], 2)
    assert b1["loss_mask"].sum() != b2["loss_mask"].sum()   # a mean of means would differ
    assert (b1["segment_ids"].max(1) == 2).all()            # two examples in each row
    big = {k: np.concatenate([b1[k], b2[k]], axis=1 if k == "positions" else 0) for k in b1}
    grads = jax.jit(lambda p, b: compute_grads(module, p, b, STAGE_PARTS[2]))
    g_acc, m_acc = grads(params, stack(b1, b2))
    g_big, m_big = grads(params, stack(big))
    assert _rel(m_acc["loss"], m_big["loss"]) < 1e-6
    assert _tree_rel(g_acc, g_big) < 1e-5
    assert float(m_acc["target_tokens"]) == float(m_big["target_tokens"]) == big["loss_mask"].sum()

    inputs = {k: big[k] for k in STEP_KEYS if k in big and k not in ("labels", "loss_mask")}
    logits = np.asarray(jax.jit(lambda p, x: module.apply({"params": p}, x))(params, inputs), np.float64)
    top = logits.max(-1, keepdims=True)
    lse = np.log(np.exp(logits - top).sum(-1)) + top[..., 0]
    ce = lse - np.take_along_axis(logits, big["labels"][..., None].astype(np.int64), -1)[..., 0]
    assert _rel(m_big["loss"], (ce * big["loss_mask"]).sum() / big["loss_mask"].sum()) < 1e-5


@pytest.fixture(scope="module")
def stage_steps(tiny):
    """stage -> (jitted step, shardings, tx): built once, shared by the tests that use the same program."""
    cfg, module, _ = tiny
    mesh = sharding.make_mesh(1, 1, 1)
    out = {}
    for stage in (1, 3):
        parts = STAGE_PARTS[stage]
        ocfg = OptimConfig(lr=1e-2, warmup_steps=0, decay_steps=10)
        tx = optim.make_optimizer(ocfg, parts)
        sh = S.state_shardings(module, tx, parts, mesh)
        out[stage] = (StepFn(mesh, sh, module=module, tx=tx, parts=parts, schedules=optim.schedules(ocfg, parts)),
                      sh, tx)
    return out


# Stage 1 compiles a second full step program; it runs with -m slow (and the assembly tests train stage 1).
@pytest.mark.parametrize("stage", [pytest.param(1, marks=pytest.mark.slow), 3])
def test_stage_masks(tiny, stage_steps, stage):
    """Frozen parts come out bit-identical and have no optimizer state; trainable ones move."""
    cfg, module, params = tiny
    parts = STAGE_PARTS[stage]
    step, sh, tx = stage_steps[stage]
    state = S.init_state(module, tx, parts, sh, seed=0, params=params)
    before = jax.tree.map(np.asarray, state.params)
    opt_paths = {tuple(getattr(k, "key", None) for k in p) for p, _ in
                 jax.tree_util.tree_flatten_with_path(state.opt_state)[0]}
    batch = stack_micro_batches([packed(cfg, 4, 2, seed=4)])
    for _ in range(2):
        state, m = step(state, {k: jnp.asarray(v) for k, v in batch.items()})
    assert bool(m["finite"]) and int(state.step) == 2
    frozen_parts = {"vit", "merger", "llm"} - set(parts)
    flat_before = jax.tree_util.tree_flatten_with_path(before)[0]
    flat_after = jax.tree.leaves(state.params)
    for (path, old), new in zip(flat_before, flat_after):
        keys = tuple(k.key for k in path)
        part = optim.part_of(keys)
        if part in frozen_parts:
            assert np.array_equal(old, np.asarray(new)), keys
            assert not any(keys == p[-len(keys):] for p in opt_paths), f"optimizer state for frozen {keys}"
        elif keys[-1] == "kernel":
            assert not np.array_equal(old, np.asarray(new)), f"trainable {keys} did not move"


def test_nan_step_leaves_state_untouched(tiny, stage_steps):
    cfg, module, params = tiny
    parts = STAGE_PARTS[3]
    step, sh, tx = stage_steps[3]
    bad = jax.tree.map(lambda x: x, params)
    bad["model"]["norm"]["scale"] = params["model"]["norm"]["scale"].at[0].set(jnp.nan)
    state = S.init_state(module, tx, parts, sh, seed=0, params=bad)
    before = jax.tree.map(np.asarray, (state.params, state.opt_state))
    batch = stack_micro_batches([packed(cfg, 4, 2, seed=4)])
    state, m = step(state, {k: jnp.asarray(v) for k, v in batch.items()})
    assert not bool(m["finite"]) and not np.isfinite(float(m["loss"]))
    after = jax.tree.map(np.asarray, (state.params, state.opt_state))
    for x, y in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
        np.testing.assert_array_equal(x, y)
    assert int(state.step) == 1
