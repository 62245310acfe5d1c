"""orbax checkpoints: exact round trip of the train state and data state, `restore_params` from every kind of
path, and the HF export reading back bit for bit."""

import jax
import numpy as np
import pytest

import qwen2vl_jax as qv
from qwen2vl_jax import sharding
from qwen2vl_jax.model.qwen2vl import Qwen2VLModule
from qwen2vl_jax.train import checkpoint as ck, optim, state as S
from qwen2vl_jax.train.config import OptimConfig
from train_utils import random_params, tiny_config

PARTS = ("merger", "llm")   # stage-3-like: the ViT frozen, so its optimizer state must be absent


@pytest.fixture(scope="module")
def setup():
    cfg = tiny_config()
    module = Qwen2VLModule(cfg)
    tx = optim.make_optimizer(OptimConfig(lr=1e-3, warmup_steps=1, decay_steps=10), PARTS)
    mesh = sharding.make_mesh(1, 1, 1)
    shardings = S.state_shardings(module, tx, PARTS, mesh)
    return cfg, module, tx, shardings


def _state(setup, seed):
    cfg, module, tx, shardings = setup
    params = random_params(module, seed)

    @jax.jit   # one program instead of hundreds of eager ops
    def opt_state(trainable):
        # Non-trivial optimizer state: one AdamW update moves mu, nu and the counts.
        opt = tx.init(trainable)
        return tx.update(jax.tree.map(lambda x: x * 0.5, trainable), opt, trainable)[1]

    opt = opt_state(optim.split(params, PARTS)[0])
    st = S.TrainState(step=jax.numpy.asarray(seed + 1, jax.numpy.int32), params=params, opt_state=opt,
                      rng=jax.random.key_data(jax.random.key(seed)))
    return jax.device_put(st, shardings)


def _equal(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(la) == len(lb) and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb))


def test_round_trip_and_restore_params(setup, tmp_path):
    cfg, module, tx, shardings = setup
    ckpts = ck.Checkpoints(str(tmp_path), keep=2)
    s1, s2 = _state(setup, 1), _state(setup, 2)
    ckpts.save(s1, 1, {"epoch": 0, "index": 7}, cfg, {"stage": 3})
    ckpts.save(s2, 2, {"epoch": 0, "index": 9}, cfg, {"stage": 3})
    ckpts.wait()
    assert ckpts.latest_step() == 2
    # The frozen ViT has no optimizer state at all.
    mu = s2.opt_state.mu
    assert "blocks" not in str(jax.tree_util.tree_structure(mu))

    restored, data = ckpts.restore(S.abstract_state(module, tx, PARTS, shardings), step=1)
    assert data == {"epoch": 0, "index": 7}
    assert jax.tree_util.tree_structure(restored) == jax.tree_util.tree_structure(s1)
    assert _equal(restored, s1)

    for path in (tmp_path, tmp_path / "checkpoints", tmp_path / "checkpoints" / "2"):
        got_cfg, params = ck.restore_params(str(path))
        assert got_cfg == cfg
        assert _equal(params, s2.params)
    got_cfg, params = ck.restore_params(str(tmp_path / "checkpoints" / "1"))
    assert _equal(params, s1.params)
    ckpts.close()


def test_restore_params_names_a_bad_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="no orbax checkpoint here"):
        ck.restore_params(str(tmp_path))


def test_export_hf_reads_back(setup, tmp_path):
    cfg, module, *_ = setup
    params = random_params(module, 3)
    ck.export_hf(params, cfg, str(tmp_path / "hf"))
    model = qv.load_pretrained(str(tmp_path / "hf"))
    assert model.config == cfg
    assert _equal(model.params, params)


def _run_cfg(tmp_path, *overrides):
    from qwen2vl_jax.train.config import load
    return load(None, [f"workdir={tmp_path / 'run'}", *overrides])


def test_init_from_hf_and_orbax(setup, tmp_path):
    from qwen2vl_jax.train import loop
    cfg, module, tx, shardings = setup
    params = random_params(module, 4)
    ck.export_hf(params, cfg, str(tmp_path / "hf"))
    run = _run_cfg(tmp_path, f"init_from={tmp_path / 'hf'}", "model=7b")   # init_from's config wins
    assert loop.model_config(run) == cfg
    got = loop.initial_params(run, cfg, shardings.params, log=lambda s: None)
    assert _equal(got, params)

    ckpts = ck.Checkpoints(str(tmp_path / "orbax"))
    ckpts.save(_state(setup, 5), 5, {}, cfg, {})
    ckpts.close()
    run = _run_cfg(tmp_path, f"init_from={tmp_path / 'orbax'}")
    assert loop.model_config(run) == cfg
    got = loop.initial_params(run, cfg, shardings.params, log=lambda s: None)
    assert _equal(got, _state(setup, 5).params)


def test_init_from_clip_and_qwen2_writes_the_report(setup, tmp_path):
    """`init.vision=DIR init.llm=DIR` assembles the stage-1 start (assemble.py) and records how."""
    from test_assemble import _hf_clip, _qwen2
    from qwen2vl_jax.assemble import assemble_params
    from qwen2vl_jax.train import loop
    cfg, module, tx, shardings = setup
    _hf_clip(tmp_path / "clip")
    _qwen2(tmp_path / "qwen2")
    run = _run_cfg(tmp_path, f"init.vision={tmp_path / 'clip'}", f"init.llm={tmp_path / 'qwen2'}", "seed=3")
    lines = []
    got = loop.initial_params(run, cfg, shardings.params, log=lines.append)
    want, report = assemble_params(cfg, vision=str(tmp_path / "clip"), llm=str(tmp_path / "qwen2"), seed=3)
    assert _equal(got, want)
    assert lines == [report.to_text()]
    assert (tmp_path / "run" / "load_report.txt").read_text().strip() == report.to_text().strip()


# -- checkpoints written before the per-group optimizer ----------------------------------------------------

def _old_tx(ocfg, parts):
    """The optimizer of earlier versions (before parameter groups), as their make_optimizer built it: optax's
    own chain, one AdamW per part behind the global-norm clip; its state is what their checkpoints hold."""
    import optax
    labels = lambda p: jax.tree_util.tree_map_with_path(lambda k, _: optim.part_of(tuple(x.key for x in k)), p)
    decay = lambda p: jax.tree_util.tree_map_with_path(lambda k, _: k[-1].key in ("kernel", "embedding"), p)
    tx = optax.multi_transform({p: optax.adamw(optim.schedule(ocfg, ocfg.lr), b1=ocfg.b1, b2=ocfg.b2,
                                                eps=ocfg.eps, weight_decay=ocfg.weight_decay, mask=decay)
                                for p in parts}, labels)
    return optax.chain(optax.clip_by_global_norm(ocfg.clip_norm), tx) if ocfg.clip_norm > 0 else tx


def _as_old(old_tx, trainable, new_opt):
    """`new_opt` (today's ScaleByAdamState) in the old layout: each part's Adam and schedule counts the count,
    its mu and nu today's over its own leaves (the other parts' masked)."""
    import optax
    old = old_tx.init(trainable)
    is_masked = lambda x: isinstance(x, optax.MaskedNode)

    def fill(node):
        if isinstance(node, optax.ScaleByAdamState):
            pick = lambda mine, full: jax.tree.map(lambda m, f: m if is_masked(m) else f, mine, full,
                                                   is_leaf=is_masked)
            return optax.ScaleByAdamState(count=new_opt.count, mu=pick(node.mu, new_opt.mu),
                                          nu=pick(node.nu, new_opt.nu))
        if isinstance(node, optax.ScaleByScheduleState):
            return optax.ScaleByScheduleState(count=new_opt.count)
        return node
    is_state = lambda x: isinstance(x, (optax.ScaleByAdamState, optax.ScaleByScheduleState))
    return jax.tree.map(fill, old, is_leaf=is_state)


def test_old_optimizer_layout_resumes_bit_for_bit(setup, tmp_path):
    """A checkpoint whose optimizer state has the per-part layout restores into today's state exactly, and
    the run continues from it bit for bit as from the state it was written from."""
    import jax.numpy as jnp
    from qwen2vl_jax.train.batches import stack_micro_batches
    from qwen2vl_jax.train.step import StepFn
    from train_utils import text_packed
    cfg, module, tx, shardings = setup
    mesh = sharding.make_mesh(1, 1, 1)
    step = StepFn(mesh, shardings, module=module, tx=tx, parts=PARTS)
    batch = {k: jnp.asarray(v) for k, v in stack_micro_batches([text_packed(cfg, ["red", "blue"], 2, 96)]).items()}
    state = S.init_state(module, tx, PARTS, shardings, seed=0, params=random_params(module, 3))
    for _ in range(2):
        state, _ = step(state, batch)
    state = jax.tree.map(np.asarray, state)   # host copies: the next step donates the device buffers
    old_opt = _as_old(_old_tx(tx.cfg, PARTS), optim.split(state.params, PARTS)[0], state.opt_state)
    assert hasattr(old_opt[1], "inner_states")   # (clip state, per-part states)
    ckpts = ck.Checkpoints(str(tmp_path), async_save=False)
    ckpts.save(S.TrainState(step=state.step, params=state.params, opt_state=old_opt, rng=state.rng), 2,
               {"epoch": 0, "index": 4}, cfg, {"stage": 3})
    ckpts.wait()
    restored, data = ckpts.restore(S.abstract_state(module, tx, PARTS, shardings))
    ckpts.close()
    assert data == {"epoch": 0, "index": 4}
    assert jax.tree_util.tree_structure(restored) == jax.tree_util.tree_structure(
        jax.device_put(state, shardings))
    assert _equal(restored, state)
    assert all(x.sharding == s for x, s in zip(jax.tree.leaves(restored), jax.tree.leaves(shardings)))
    resumed, _ = step(restored, batch)
    straight, _ = step(jax.device_put(state, shardings), batch)
    assert _equal(resumed, straight)


def test_old_optimizer_layout_really_written_by_optax(setup, tmp_path):
    """The old chain's own update (how the earlier optimizer stepped) -> the checkpoint -> today's state holds
    each part's moments and the shared count, exactly; other parameter groups are refused in one line."""
    cfg, module, tx, shardings = setup
    old_tx = _old_tx(tx.cfg, PARTS)
    params = random_params(module, 5)
    trainable = optim.split(params, PARTS)[0]

    @jax.jit
    def two_updates(p):
        st = old_tx.init(p)
        for scale in (0.5, -0.25):
            st = old_tx.update(jax.tree.map(lambda x: x * scale, p), st, p)[1]
        return st
    old_opt = two_updates(trainable)
    ckpts = ck.Checkpoints(str(tmp_path), async_save=False)
    ckpts.save(S.TrainState(step=jax.numpy.asarray(2, jax.numpy.int32), params=params, opt_state=old_opt,
                            rng=jax.random.key_data(jax.random.key(0))), 2, None, cfg, {})
    ckpts.wait()
    restored, _ = ckpts.restore(S.abstract_state(module, tx, PARTS, shardings))
    parts = old_opt[1].inner_states
    assert int(restored.opt_state.count) == 2
    for (path, m), v in zip(jax.tree_util.tree_flatten_with_path(restored.opt_state.mu)[0],
                            jax.tree.leaves(restored.opt_state.nu)):
        keys = tuple(k.key for k in path)
        adam = parts[optim.part_of(keys)].inner_state[0]
        node_m, node_v = adam.mu, adam.nu
        for k in keys:
            node_m, node_v = node_m[k], node_v[k]
        assert np.array_equal(np.asarray(m), np.asarray(node_m)) and np.array_equal(np.asarray(v), np.asarray(node_v))

    # Without the clip (clip_norm = 0) the old state was the per-part state alone, not a chain.
    import dataclasses
    unclipped = _old_tx(dataclasses.replace(tx.cfg, clip_norm=0.0), PARTS).init(trainable)
    assert hasattr(unclipped, "inner_states")
    ckpts.save(S.TrainState(step=jax.numpy.asarray(3, jax.numpy.int32), params=params, opt_state=unclipped,
                            rng=jax.random.key_data(jax.random.key(0))), 3, None, cfg, {})
    ckpts.wait()
    fresh, _ = ckpts.restore(S.abstract_state(module, tx, PARTS, shardings), step=3)
    assert int(fresh.opt_state.count) == 0 and not any(np.asarray(x).any() for x in jax.tree.leaves(fresh.opt_state.mu))
    assert jax.tree.structure(fresh.opt_state.mu) == jax.tree.structure(restored.opt_state.mu)

    other = ("llm",)   # a run that trains other groups than the checkpoint's
    tx2 = optim.make_optimizer(tx.cfg, other)
    sh2 = S.state_shardings(module, tx2, other, sharding.make_mesh(1, 1, 1))
    with pytest.raises(ValueError, match=r"checkpoints/2: its optimizer state has the layout.*init_from="):
        ckpts.restore(S.abstract_state(module, tx2, other, sh2), step=2)
    ckpts.close()
