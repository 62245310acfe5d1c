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
