"""The shipped run configs: composed from a base, a size and a stage (`base:`), each one loads and validates,
names a model that exists, and the stages' rule lists train exactly the paper's parts."""

import glob
import os
import sys

import jax
import numpy as np
import pytest

from qwen2vl_jax import config as C
from qwen2vl_jax.train import optim
from qwen2vl_jax.train.config import STAGE_PARTS, RunConfigError, load, param_groups, read_yaml
from qwen2vl_jax.train.loop import model_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FRAGMENTS = ("base", "sizes", "stages")   # pieces that the run configs compose, not runs of their own
SHIPPED = sorted(p for p in glob.glob(os.path.join(ROOT, "configs", "**", "*.yaml"), recursive=True)
                 if os.path.relpath(p, os.path.join(ROOT, "configs")).split(os.sep)[0] not in FRAGMENTS)


def test_every_size_and_stage_is_shipped():
    names = {os.path.relpath(p, os.path.join(ROOT, "configs")) for p in SHIPPED}
    for st in (1, 2, 3):
        assert {f"stage{st}_{s}.yaml" for s in ("2b", "7b", "72b")} <= names
        assert {f"qwen2_5_vl/stage{st}_{s}.yaml" for s in ("3b", "7b", "32b", "72b")} <= names
        assert {f"qwen3_vl/stage{st}_{s}.yaml" for s in ("2b", "4b", "8b", "32b")} <= names


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: os.path.relpath(p, os.path.join(ROOT, "configs")))
def test_shipped_config_composes_and_validates(path):
    if path.endswith("eval.yaml"):   # eval.py's config
        import importlib.util
        spec = importlib.util.spec_from_file_location("eval_cli", os.path.join(ROOT, "eval.py"))
        mod = importlib.util.module_from_spec(spec)
        sys.modules["eval_cli"] = mod
        spec.loader.exec_module(mod)
        mod.load_config(path, [])
        return
    cfg = load(path)   # validates
    model_config(cfg)   # the preset exists
    groups = param_groups(cfg)
    assert groups.trained, path


def test_stage_rules_are_the_paper_parts():
    """Each stage's rule list splits the model's params exactly as the stage's parts do, with the paper's
    learning rates (stage 2: the ViT at 2e-5, the rest at 1e-4)."""
    shapes = jax.tree.map(lambda x: 0, _abstract(C.tiny()))
    for st in (1, 2, 3):
        cfg = load(os.path.join(ROOT, "configs", f"stage{st}_2b.yaml"))
        by_rules = optim.split(shapes, param_groups(cfg))
        by_parts = optim.split(shapes, STAGE_PARTS[st])
        assert jax.tree.structure(by_rules) == jax.tree.structure(by_parts), st
    cfg = load(os.path.join(ROOT, "configs", "stage2_7b.yaml"))
    s = optim.schedules(cfg.optim, param_groups(cfg))
    peak = cfg.optim.warmup_steps
    np.testing.assert_allclose([float(s[p](peak)) for p in ("vit", "merger", "llm")], [2e-5, 1e-4, 1e-4], rtol=1e-6)


def _abstract(config):
    from qwen2vl_jax import api
    from qwen2vl_jax.model.qwen2vl import Qwen2VLModule
    import flax.linen as nn
    return nn.meta.unbox(api.abstract_params(Qwen2VLModule(config)))


def test_composition_order_and_errors(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.yaml").write_text("steps: 1\noptim: {lr: 0.1, b1: 0.5}\ndata: {buckets: [[64, 16]]}\n")
    (tmp_path / "b.yaml").write_text("steps: 2\noptim: {lr: 0.2}\n")
    (tmp_path / "run.yaml").write_text("base: [sub/a.yaml, b.yaml]\noptim: {b2: 0.9}\ndata: {buckets: [[32, 8]]}\n")
    raw = read_yaml(str(tmp_path / "run.yaml"))
    # later bases override earlier ones, the file overrides its bases; mappings merge, lists are replaced
    assert raw == {"steps": 2, "optim": {"lr": 0.2, "b1": 0.5, "b2": 0.9}, "data": {"buckets": [[32, 8]]}}
    assert load(str(tmp_path / "run.yaml"), ["steps=5"]).steps == 5
    (tmp_path / "loop.yaml").write_text("base: loop2.yaml\n")
    (tmp_path / "loop2.yaml").write_text("base: loop.yaml\n")
    with pytest.raises(RunConfigError, match="cycle"):
        read_yaml(str(tmp_path / "loop.yaml"))
    (tmp_path / "missing.yaml").write_text("base: nope.yaml\n")
    with pytest.raises(RunConfigError, match=r"nope.yaml: config file not found \(the base of .*missing.yaml\)"):
        read_yaml(str(tmp_path / "missing.yaml"))
    (tmp_path / "bad.yaml").write_text("base: {a: 1}\n")
    with pytest.raises(RunConfigError, match="base must be a config file or a list"):
        read_yaml(str(tmp_path / "bad.yaml"))
