"""LoRA / QLoRA on a mesh of 8 simulated CPU devices: `load_pretrained(base, adapter=DIR, mesh=mesh)` equals the
unsharded load, and a sharded QLoRA train step equals the single-device one, with the adapters and the 4-bit
codes and scales each split as their logical axes say (the scales' group axis over FSDP where it divides)."""

import json
import os
import subprocess
import sys
import textwrap

import jax
import pytest

ENV = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}

LOAD = textwrap.dedent("""
    import sys, numpy as np
    sys.path.insert(0, {tests!r})
    import jax, hf_models, qwen2vl_jax as qv
    from jax.sharding import PartitionSpec as P
    from qwen2vl_jax.sharding import make_mesh
    assert jax.device_count() == 8
    path, adapter = {path!r}, {adapter!r}
    cfg = qv.Qwen2VLConfig.from_pretrained(path)
    sharded = qv.load_pretrained(path, adapter=adapter, mesh=make_mesh(data=2, fsdp=2, tensor=2))
    plain = qv.load_pretrained(path, adapter=adapter)
    assert sharded.adapter == plain.adapter and plain.adapter.quant == "nf4", plain.adapter
    q = sharded.params["model"]["layers"]["q_proj"]                 # (layers, embed, heads)
    specs = {{k: q[k].sharding.spec for k in q}}
    assert specs == {{"kernel_q": P(None, "fsdp", "tensor"), "kernel_scale": P(None, "fsdp", "tensor"),
                     "lora_a": P(None, "fsdp"), "lora_b": P(None, None, "tensor"), "bias": P(None, "tensor")}}, specs
    scale = q["kernel_scale"]
    assert {{s.data.shape for s in scale.addressable_shards}} == {{(2, scale.shape[1] // 2, scale.shape[2] // 2)}}
    assert sharded.params["lm_head"]["kernel"].sharding.spec == P("fsdp", "tensor")   # the head: not quantised
    for (p, a), b in zip(jax.tree_util.tree_flatten_with_path(sharded.params)[0], jax.tree.leaves(plain.params)):
        assert a.dtype == b.dtype and np.array_equal(np.asarray(a), np.asarray(b)), jax.tree_util.keystr(p)
    inputs = hf_models.cases(cfg)["two_images"]
    a, b = np.asarray(sharded(**inputs)), np.asarray(plain(**inputs))
    print(float(np.abs(a - b).max()))
""")


@pytest.mark.slow   # an 8-device subprocess: ~1 min on 2 cores
def test_load_pretrained_with_adapter_onto_mesh(hf_checkpoints, tmp_path):
    import numpy as np
    import qwen2vl_jax as qv
    _, _, path = hf_checkpoints["tiny"]
    base = qv.load_pretrained(path)
    model = base.add_adapter(r=4, alpha=8, targets="all-linear", quant="nf4", quant_group=16)
    # Non-trivial adapters (B is zero at init), so the comparison covers them.
    model.params = jax.tree_util.tree_map_with_path(
        lambda p, x: x + 0.05 * jax.random.normal(jax.random.key(len(jax.tree_util.keystr(p))), x.shape)
        if p[-1].key == "lora_b" else x, model.params)
    adapter = str(tmp_path / "adapter")
    model.save_adapter(adapter)
    assert os.path.exists(os.path.join(adapter, "base_quant.json"))
    # Unsharded, the loaded model is the one that saved the adapter, and not the base.
    import hf_models
    inputs = hf_models.cases(base.config)["two_images"]
    loaded = qv.load_pretrained(path, adapter=adapter)
    assert np.array_equal(np.asarray(loaded(**inputs)), np.asarray(model(**inputs)))
    assert np.abs(np.asarray(loaded(**inputs)) - np.asarray(base(**inputs))).max() > 1e-2

    script = LOAD.format(tests=os.path.dirname(os.path.abspath(__file__)), path=path, adapter=adapter)
    r = subprocess.run([sys.executable, "-c", script], env={**os.environ, **ENV}, capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stderr[-4000:]
    err = float(r.stdout.strip().splitlines()[-1])
    print("logits max abs diff, sharded vs unsharded:", err)
    assert err <= 1e-5


STEP = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, {tests!r})
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import PartitionSpec as P
    from qwen2vl_jax import api, lora, sharding
    from qwen2vl_jax.model.qwen2vl import Qwen2VLModule
    from qwen2vl_jax.train import optim, state as S
    from qwen2vl_jax.train.batches import stack_micro_batches
    from qwen2vl_jax.train.config import LORA_GROUPS, OptimConfig
    from qwen2vl_jax.train.step import StepFn
    from train_utils import packed, tiny_config
    assert jax.device_count() == 8

    cfg = tiny_config()
    adapter = lora.Adapter(r=4, alpha=8, targets="all-linear", quant="nf4", quant_group=16, base_dtype="float32")
    module = lora.adapted(Qwen2VLModule(cfg), adapter)
    groups = optim.Groups(LORA_GROUPS)
    ocfg = OptimConfig(lr=1e-3, warmup_steps=0, decay_steps=10, weight_decay=0.0)
    tx = optim.make_optimizer(ocfg, groups)
    params = lora.build(api.Qwen2VL.init(cfg, seed=0).params, adapter, jax.random.key(1))
    params = jax.tree_util.tree_map_with_path(      # B non-zero: gradients reach A too
        lambda p, x: x + 0.02 * jax.random.normal(jax.random.key(7), x.shape) if p[-1].key == "lora_b" else x,
        params)
    params = jax.tree.map(np.asarray, params)
    batch = stack_micro_batches([packed(cfg, 8, 4, seed=5)])
    one = jax.devices()[0]
    out = {{}}
    for name, mesh in (("single", sharding.make_mesh(1, 1, 1, devices=[one])),
                       ("sharded", sharding.make_mesh(data=1, fsdp=4, tensor=2))):
        sh = S.state_shardings(module, tx, groups, mesh)
        state = S.init_state(module, tx, groups, sh, seed=0, params=params)
        if name == "sharded":
            q = state.params["model"]["layers"]["q_proj"]          # input 64 = 4 groups of 16: split 4 ways
            assert q["kernel_scale"].sharding.spec == P(None, "fsdp", "tensor"), q["kernel_scale"].sharding
            assert q["kernel_q"].sharding.spec == P(None, "fsdp", "tensor")
            qkv = state.params["visual"]["blocks"]["qkv"]          # input 32 = 2 groups: 4 ways do not divide
            assert qkv["kernel_scale"].sharding.spec == P(None, None, "tensor"), qkv["kernel_scale"].sharding
            assert qkv["kernel_q"].sharding.spec == P(None, "fsdp", "tensor")
            shapes = {{s.data.shape for s in q["kernel_scale"].addressable_shards}}
            assert shapes == {{(2, 1, q["kernel_scale"].shape[2] // 2)}}, shapes
        step = StepFn(mesh, sh, module=module, tx=tx)
        state, m = step(state, {{k: jnp.asarray(v) for k, v in batch.items()}})
        for got, want in zip(jax.tree.leaves((state.params, state.opt_state)),
                             jax.tree.leaves((sh.params, sh.opt_state))):
            assert got.sharding.is_equivalent_to(want, got.ndim), (got.sharding, want)
        out[name] = ({{k: float(v) for k, v in m.items()}}, jax.tree.map(np.asarray, state.params))

    def rel(a, b):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))
    (m1, p1), (m8, p8) = out["single"], out["sharded"]
    frozen_equal = all(np.array_equal(a, b) for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(p8)[0],
                                                                 jax.tree.leaves(p1))
                       if path[-1].key not in ("lora_a", "lora_b"))
    moved = max(rel(a, b) for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(p8)[0], jax.tree.leaves(p1))
                if path[-1].key in ("lora_a", "lora_b"))
    print(json.dumps({{"loss_rel": rel(m8["loss"], m1["loss"]), "grad_norm_rel": rel(m8["grad_norm"], m1["grad_norm"]),
                      "adapters_after_step_rel": moved, "frozen_equal": frozen_equal}}))
""")


@pytest.mark.slow   # an 8-device subprocess compiling two train steps: ~1-2 min on 2 cores
def test_sharded_qlora_step_equals_single_device():
    script = STEP.format(tests=os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "-c", script], env={**os.environ, **ENV}, capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stderr[-4000:]
    figures = json.loads(r.stdout.strip().splitlines()[-1])
    print(figures)
    assert figures["frozen_equal"], figures
    assert figures["loss_rel"] <= 1e-5 and figures["grad_norm_rel"] <= 1e-5, figures
    assert figures["adapters_after_step_rel"] <= 1e-5, figures


def test_scale_axes_take_the_input_axis():
    """`lora.logical_axes`: a 4-bit kernel's scales carry the kernel's input axis on their group axis, int8's
    single row of scales none; `sharding.fit_spec` keeps a dim whole where the mesh does not divide it."""
    from qwen2vl_jax import lora, sharding
    base = {"d": {"kernel": ("layers", "embed", "heads")}}
    for fmt, groups, want in (("nf4", 4, ("layers", "embed", "heads")), ("int8", 1, ("layers", None, "heads"))):
        tree = {"d": {"kernel_q": jax.ShapeDtypeStruct((2, 32, 64), "uint8"),
                      "kernel_scale": jax.ShapeDtypeStruct((2, groups, 64), "float32")}}
        axes = lora.logical_axes(tree, base)
        assert axes["d"]["kernel_scale"] == want, (fmt, axes)
        assert axes["d"]["kernel_q"] == ("layers", "embed", "heads")
    sizes = {"data": 1, "fsdp": 4, "tensor": 2}
    spec = sharding.fit_spec(("layers", "embed", "heads"), (2, 8, 64), sizes)
    assert spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    assert sharding.fit_spec(("layers", "embed", "heads"), (2, 6, 64), sizes) == jax.sharding.PartitionSpec(
        None, None, "tensor")
    assert sharding.fit_spec(("layers", "embed", "heads"), (2, 6, 3), sizes) == jax.sharding.PartitionSpec()
