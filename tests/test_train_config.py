"""Run configs: every shipped YAML loads, overrides are typed, mistakes name the key, stage masks, schedule."""

import glob
import os

import numpy as np
import pytest

from qwen2vl_jax.train import optim
from qwen2vl_jax.train.config import RunConfigError, load, trainable_parts

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_CONFIGS = sorted(p for p in glob.glob(os.path.join(ROOT, "configs", "*.yaml"))
                       if not os.path.basename(p).startswith("eval"))


def test_shipped_configs_load():
    names = {os.path.basename(p) for p in TRAIN_CONFIGS}
    assert {"demo.yaml"} | {f"stage{s}_{m}.yaml" for s in (1, 2, 3) for m in ("2b", "7b", "72b")} <= names
    for path in TRAIN_CONFIGS:
        cfg = load(path)
        name = os.path.basename(path)
        if name.startswith("stage"):
            assert cfg.stage == int(name[5]), name
            assert cfg.model == name.split("_")[1][:-5], name
            assert cfg.dtype == "bfloat16" and cfg.remat != "none", name


def test_overrides_are_typed():
    cfg = load(os.path.join(ROOT, "configs", "demo.yaml"),
               ["steps=12", "mesh.fsdp=4", "optim.lr=3e-4", "optim.part_lr.vit=1e-5", "data.buckets=[[128, 32]]",
                "trainable=merger,llm", "export_hf=false", "workdir=/tmp/x", "init_from="])
    assert cfg.steps == 12 and cfg.mesh.fsdp == 4 and cfg.workdir == "/tmp/x" and cfg.init_from == ""
    assert cfg.optim.lr == 3e-4 and isinstance(cfg.optim.lr, float) and cfg.optim.part_lr == {"vit": 1e-5}
    assert cfg.data.buckets == [[128, 32]] and cfg.export_hf is False
    assert trainable_parts(cfg) == ("merger", "llm")


@pytest.mark.parametrize("override, message", [
    ("optim.lrr=1", "override 'optim.lrr=1': unknown key optim.lrr; did you mean optim.lr"),
    ("stepz=3", "unknown key stepz; did you mean steps"),
    ("steps.x=3", "steps has no sub-keys"),
    ("steps=many", "steps = 'many' is not a valid int"),
    ("steps=2.5", "steps = 2.5 is not a valid int"),
    ("stage=4", "stage must be 1, 2 or 3"),
    ("trainable=vit,lm", "trainable must be a non-empty subset"),
    ("remat=some", "remat must be none, full, dots or dots_no_batch"),
    ("init.vision=/x", "init.vision and init.llm go together"),
    ("steps", "is not key=value"),
    ("data.buckets=[[512, 30]]", "data.buckets: bucket \\(512, 30\\): .* multiple of 4"),
    ("data.buckets=atuo", "data.buckets must be auto or a list"),
    ("data.buckets=[[1, 2, 3]]", "data.buckets: bucket \\[1, 2, 3\\] is not a pair"),
    ("dtype=f16", "dtype must be auto, float32 or bfloat16"),
])
def test_mistakes_name_the_key(override, message):
    with pytest.raises(RunConfigError, match=message):
        load(os.path.join(ROOT, "configs", "demo.yaml"), [override])


def test_unknown_key_in_file_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("steps: 3\nmesh: {data: 1, fsd: 2}\n")
    with pytest.raises(RunConfigError, match=r"bad.yaml: unknown key mesh.fsd; did you mean mesh.fsdp"):
        load(str(path))


def test_parts_split_and_merge():
    params = {"visual": {"patch_embed": {"kernel": 1}, "blocks": {"qkv": {"kernel": 2}},
                         "merger": {"mlp_0": {"kernel": 3}}},
              "model": {"embed_tokens": {"embedding": 4}, "norm": {"scale": 5}}, "lm_head": {"kernel": 6}}
    train, frozen = optim.split(params, ("merger", "llm"))
    assert train == {"visual": {"merger": {"mlp_0": {"kernel": 3}}},
                     "model": {"embed_tokens": {"embedding": 4}, "norm": {"scale": 5}}, "lm_head": {"kernel": 6}}
    assert frozen == {"visual": {"patch_embed": {"kernel": 1}, "blocks": {"qkv": {"kernel": 2}}}}
    assert optim.merge(train, frozen) == params


def test_schedule_warmup_cosine_floor():
    cfg = load(os.path.join(ROOT, "configs", "demo.yaml"),
               ["optim.lr=1.0", "optim.warmup_steps=10", "optim.decay_steps=100", "optim.end_lr_ratio=0.1",
                "optim.part_lr.vit=0.5"]).optim
    s = optim.schedules(cfg, ("vit", "llm"))
    lr = np.array([float(s["llm"](i)) for i in (0, 5, 10, 60, 110, 500)])
    # warmup 0 -> 1 over 10 steps; cosine to 0.1 over the next 100; flat after
    expect = [0.0, 0.5, 1.0, 0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * 50 / 100)), 0.1, 0.1]
    np.testing.assert_allclose(lr, expect, rtol=1e-6, atol=1e-7)
    assert float(s["vit"](10)) == pytest.approx(0.5)


def test_per_part_lr_and_decay_mask():
    """One AdamW step: a part with lr 0 stays put, the others move by lr (first Adam step = lr * sign(g));
    with zero gradients only kernels and embeddings decay, norm scales and biases do not."""
    import jax
    import jax.numpy as jnp
    cfg = load(os.path.join(ROOT, "configs", "demo.yaml"),
               ["optim.lr=0.1", "optim.part_lr.vit=0", "optim.warmup_steps=0", "optim.weight_decay=0.5",
                "optim.clip_norm=0"]).optim
    ones = lambda *s: jnp.ones(s, jnp.float32)
    params = {"visual": {"blocks": {"fc1": {"kernel": ones(2, 3)}}, "merger": {"mlp_0": {"kernel": ones(3)}}},
              "model": {"norm": {"scale": ones(3)}, "embed_tokens": {"embedding": ones(4, 3)}}}
    tx = optim.make_optimizer(cfg, ("vit", "merger", "llm"))
    grads = jax.tree.map(lambda x: -jnp.ones_like(x), params)
    updates, _ = tx.update(grads, tx.init(params), params)
    new = jax.tree.map(lambda p, u: p + u, params, updates)
    np.testing.assert_array_equal(new["visual"]["blocks"]["fc1"]["kernel"], 1.0)
    # merger kernel: +0.1 (Adam) - 0.1 * 0.5 * 1 (decay); norm scale: +0.1, no decay
    np.testing.assert_allclose(new["visual"]["merger"]["mlp_0"]["kernel"], 1.05, rtol=1e-6)
    np.testing.assert_allclose(new["model"]["norm"]["scale"], 1.1, rtol=1e-6)
    np.testing.assert_allclose(new["model"]["embed_tokens"]["embedding"], 1.05, rtol=1e-6)


def test_memory_estimate_counts_every_param():
    """Params / optimizer bytes of the estimator against the exact parameter counts of docs/design.md "Model sizes"."""
    from qwen2vl_jax.train.memory import GiB, estimate
    total, vision = 8_291_375_616, 675_759_104        # 7B: all, and vision tower incl. merger
    for stage, trained in ((1, vision), (2, total), (3, total - vision)):
        cfg = load(os.path.join(ROOT, "configs", f"stage{stage}_7b.yaml"),
                   ["mesh.fsdp=1", "mesh.tensor=1", "data.batch_size=1", "grad_accum=1"])
        e = estimate(cfg, 1)
        assert e["params"] * GiB == pytest.approx(4 * total, rel=1e-12)
        assert e["optimizer"] * GiB == pytest.approx(8 * trained, rel=1e-12)
        assert e["grads"] * GiB == pytest.approx(4 * trained, rel=1e-12)
        # bfloat16 moments: 2 bytes each of mu and nu per trained param; nothing else changes
        e16 = estimate(load(os.path.join(ROOT, "configs", f"stage{stage}_7b.yaml"),
                            ["mesh.fsdp=1", "mesh.tensor=1", "data.batch_size=1", "grad_accum=1",
                             "optim.moments_dtype=bfloat16"]), 1)
        assert e16["optimizer"] * GiB == pytest.approx(4 * trained, rel=1e-12)
        assert e16["total"] - e["total"] == pytest.approx(-4 * trained / GiB, rel=1e-12)
    sharded = estimate(load(os.path.join(ROOT, "configs", "stage2_7b.yaml")), 64)   # fsdp 16 x tensor 4
    assert 4 * total / 64 <= sharded["params"] * GiB <= 4 * total / 16              # norms are replicated


@pytest.mark.parametrize("remat", ["full", "dots_no_batch"])
def test_memory_estimate_keeps_what_jax_saves(remat):
    """The estimate's per-layer residuals (derived from the param shapes) are the ones jax saves across the
    scanned layers of the 2B's ViT and LLM (2 layers each, splash attention, traced only)."""
    import dataclasses
    import math
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    from jax._src.ad_checkpoint import saved_residuals   # what print_saved_residuals prints
    from qwen2vl_jax import api, config as C
    from qwen2vl_jax.model.qwen2vl import Qwen2VLModule
    from qwen2vl_jax.train import memory
    from qwen2vl_jax.train.step import forward_sums
    c = C.preset("2b")
    c = dataclasses.replace(c, text=dataclasses.replace(c.text, num_hidden_layers=2),
                            vision=dataclasses.replace(c.vision, depth=2))
    L, P = 256, 512
    module = Qwen2VLModule(c, dtype=jnp.bfloat16, remat=remat, attn_impl="splash")
    params = nn.meta.unbox(api.abstract_params(module))
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in api.dummy_batch(c, 1, L, P).items()}
    batch.update(labels=jax.ShapeDtypeStruct((1, L), jnp.int32), loss_mask=jax.ShapeDtypeStruct((1, L), jnp.float32))
    saved = saved_residuals(lambda p, b: forward_sums(module, p, b, loss_chunk=128).ce, params, batch)
    stacked = [aval for aval, what in saved if "output of scan" in what]   # (layers, rows, items, width...)
    # the ViT's qkv is saved as (layers, rows, P, 3, E): q, k and v side by side
    per_layer = {n: sum(math.prod(a.shape[3:]) for a in stacked if a.shape[2] == n) for n in (L, P)}
    sizes = {"data": 1, "fsdp": 1, "tensor": 1}
    assert per_layer[L] == memory._layer(c, "llm", sizes, remat)[0]
    assert per_layer[P] == memory._layer(c, "vit", sizes, remat)[0]
    assert all(a.dtype == jnp.bfloat16 and a.shape[0] == 2 for a in stacked)
