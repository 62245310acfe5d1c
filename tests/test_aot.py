"""The TPU compiler on a CPU: the tiny model's train step with splash attention compiled for a v5p slice
(Mosaic compiles the Pallas kernels), the splash kernel alone forward and backward at packed shapes, and
`train.py compile_for=...`'s verdict. Needs libtpu (the `tpu` extra); slice names need nothing."""

import importlib.util
import json
import os
import sys

import pytest

from qwen2vl_jax.train import aot
from qwen2vl_jax.train.config import RunConfigError, load

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason="the TPU compiler is the `tpu` extra (libtpu)")


@pytest.mark.parametrize("name, topology, chips", [
    ("v5p-8", "v5p:2x2x1", 4), ("v5p-128", "v5p:4x4x4", 64), ("v5p-256", "v5p:4x4x8", 128),
    ("v5p-512", "v5p:4x8x8", 256), ("v5p:4x4x8", "v5p:4x4x8", 128), ("v6e-256", "v6e:16x16", 256),
    ("v5e-16", "v5e:4x4", 16), ("v5litepod-8", "v5e:2x4", 8), ("v4-32", "v4:2x2x4", 16)])
def test_slice_names(name, topology, chips):
    sl = aot.parse_slice(name)
    assert (sl.topology, sl.chips) == (topology, chips)


@pytest.mark.parametrize("name, message", [("v5p-12", "not one Cloud TPU makes"), ("v5p-7", "2 TensorCore"),
                                           ("tpu-64", "name a TPU slice"), ("v5p:4x4", "3 sides")])
def test_bad_slice_names(name, message):
    with pytest.raises(RunConfigError, match=message):
        aot.parse_slice(name)


def _tiny(buckets):
    return load(None, ["model=tiny", f"data.buckets={buckets}", "data.batch_size=4", "mesh.fsdp=4",
                       "remat=full", "grad_accum=2", "dtype=bfloat16", "attn_impl=splash"])


@needs_libtpu
@pytest.mark.parametrize("buckets", [[[256, 128]], pytest.param([[256, 128], [512, 64]], marks=pytest.mark.slow)])
def test_tiny_train_step_compiles_for_v5p_with_mosaic(monkeypatch, buckets):
    """Every bucket is compiled (~20 s each on 2 cores); the programs hold Mosaic kernels (the splash forward
    and both backward passes), and the per-chip memory is the compiler's."""
    seen = []
    real = aot.memory

    def spy(compiled):
        seen.append(compiled.as_text())
        return real(compiled)
    monkeypatch.setattr(aot, "memory", spy)
    result = aot.compile_for(_tiny(buckets), "v5p:2x2x1", log=lambda s: None)
    assert result["fits"] and result["attention"] == "splash" and result["device_kind"].startswith("TPU v5")
    assert [p["bucket"] for p in result["programs"]] == buckets
    for p, hlo in zip(result["programs"], seen):
        assert hlo.count('custom_call_target="tpu_custom_call"') >= 6   # ViT + LLM: fwd, dq, dkv each
        assert 0 < p["arguments_gib"] < p["total_gib"] < 1 and p["temporaries_gib"] > 0
        assert p["aliases_gib"] > 0   # the donated state is updated in place


@needs_libtpu
@pytest.mark.parametrize("causal, heads, kv_heads, length, bound", [
    (True, 8, 2, 2048, 300),                                       # LLM rows, GQA 4:1
    pytest.param(True, 12, 2, 8192, 1024, marks=pytest.mark.slow),  # the 2B's LLM heads at its bucket
    pytest.param(False, 16, 16, 4096, 700, marks=pytest.mark.slow)])  # ViT rows (MHA, 16 heads)
def test_splash_kernel_compiles_forward_and_backward(causal, heads, kv_heads, length, bound):
    """The kernel alone at packed shapes, through Mosaic: several grid widths (lax.switch branches), causal
    and not, GQA and not."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import Mesh, NamedSharding, PartitionSpec
    from qwen2vl_jax.model.splash import grid_widths, splash_attention
    from qwen2vl_jax.model.segment_blocks import range_bound

    dev = aot.tpu_devices(aot.parse_slice("v5p:2x2x1"))[0]
    one = NamedSharding(Mesh([dev], ("x",)), PartitionSpec())
    widths = grid_widths(length // 512, range_bound(bound, 512, 512, length // 512, causal))
    assert len(widths) >= 2

    def loss(q, k, v, seg):
        out = splash_attention(q, k, v, seg, seg, causal=causal, scale=0.125, max_segment_len=bound)
        return jnp.sum(out.astype(jnp.float32) ** 2)
    spec = lambda *s, d=jnp.bfloat16: jax.ShapeDtypeStruct(s, d, sharding=one)
    args = (spec(2, length, heads, 128), spec(2, length, kv_heads, 128), spec(2, length, kv_heads, 128),
            spec(2, length, d=jnp.int32))
    hlo = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))).lower(*args).compile().as_text()
    # every width has its forward, dQ and dK/dV kernels
    assert hlo.count('custom_call_target="tpu_custom_call"') >= 3 * len(widths)


def _train_script():
    spec = importlib.util.spec_from_file_location("train_cli", os.path.join(ROOT, "train.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules["train_cli"] = mod
    spec.loader.exec_module(mod)
    return mod


@needs_libtpu
def test_compile_for_does_not_fit_is_one_line_and_exit_2(monkeypatch, capsys):
    monkeypatch.setitem(aot.CHIPS, "v5p", ("v5p", 2, 2 ** 20, True))   # a chip of 1 MiB
    argv = ["model=tiny", "data.buckets=[[256, 128]]", "data.batch_size=4", "mesh.fsdp=4", "compile_for=v5p-8"]
    assert _train_script().main(argv) == 2
    out, err = capsys.readouterr()
    result = json.loads(out.strip().splitlines()[-1])
    assert result["fits"] is False and result["topology"] == "v5p:2x2x1" and result["hbm_gib"] == 0.0
    line = [s for s in err.strip().splitlines() if s.startswith("train.py:")]
    assert len(line) == 1 and "does not fit" in line[0] and "remat=full" in line[0], err


def _gathered_shapes(hlo: str) -> list[str]:
    """The result types of every all-gather in a compiled HLO text (`%all-gather.3 = bf16[1,512,64]{...}
    all-gather(...)`; the async form's result is a tuple)."""
    import re
    return [m.group(1) for m in re.finditer(r"= (\(.*?\)|\S+) all-gather(?:-start)?\(", hlo)]


@needs_libtpu
def test_heads_split_over_the_tensor_axis_in_the_compiled_step():
    """8 chips, fsdp 2 x tensor 4, LLM of 8 query / 4 kv heads: inside shard_map each chip's splash kernels
    take heads / tensor (2 query heads, 1 kv head), and no all-gather rebuilds q, k or v across chips."""
    import dataclasses
    import re
    from qwen2vl_jax import config as C, sharding

    t = C.tiny()
    config = dataclasses.replace(t, text=dataclasses.replace(t.text, num_attention_heads=8, num_key_value_heads=4,
                                                            mrope_section=(1, 1, 2)))
    cfg = load(None, ["model=tiny", "data.batch_size=2", "mesh.fsdp=2", "mesh.tensor=4", "dtype=bfloat16",
                      "attn_impl=splash", "data.buckets=[[512, 0]]"])   # text rows only: the LLM's attention
    mesh = sharding.make_mesh(1, 2, 4, devices=aot.tpu_devices(aot.parse_slice("v5p:2x2x2")))
    [(_, compiled, _)] = aot.compiled_steps(cfg, mesh, config)
    hlo = compiled.as_text()
    hd = config.text.head_dim
    kernels = [l for l in hlo.splitlines() if 'custom_call_target="tpu_custom_call"' in l]
    outs = {name: re.search(r"bf16\[(\d+),512,%d\]" % hd, line).group(1)
            for line in kernels for name in ("fwd", "dq", "dkv") if f"splash_mha_{name}" in line}
    assert outs == {"fwd": "2", "dq": "2", "dkv": "1"}, outs   # heads / tensor: 8 / 4 query, 4 / 4 kv
    gathers = _gathered_shapes(hlo)
    qkv_like = re.compile(r"bf16\[1,512,(\d+,%d|%d|%d)\]" % (hd, 8 * hd, 4 * hd))
    assert gathers and not [g for g in gathers if qkv_like.search(g)], gathers


@needs_libtpu
def test_vit_heads_split_over_the_tensor_axis_in_the_compiled_step():
    """The ViT's fused qkv under fsdp 2 x tensor 4 (8 heads): each chip's ViT splash kernels take heads / tensor
    (2 of 8), and no all-gather rebuilds the patches' q, k, v or qkv across chips (only the layer's weight,
    E / fsdp x 3E, is regathered). The LLM's heads do not divide here (4 / 2): only the ViT is checked."""
    import dataclasses
    import re
    from qwen2vl_jax import config as C, sharding

    t = C.tiny()
    config = dataclasses.replace(t, vision=dataclasses.replace(t.vision, embed_dim=64, num_heads=8))
    P, hd = 512, config.vision.head_dim
    cfg = load(None, ["model=tiny", "data.batch_size=2", "mesh.fsdp=2", "mesh.tensor=4", "dtype=bfloat16",
                      "attn_impl=splash", "remat=dots_no_batch", f"data.buckets=[[256, {P}]]"])
    mesh = sharding.make_mesh(1, 2, 4, devices=aot.tpu_devices(aot.parse_slice("v5p:2x2x2")))
    [(_, compiled, _)] = aot.compiled_steps(cfg, mesh, config)
    hlo = compiled.as_text()
    kernels = [l for l in hlo.splitlines() if 'custom_call_target="tpu_custom_call"' in l]
    outs = {name: m.group(1) for line in kernels for name in ("fwd", "dq", "dkv") if f"splash_mha_{name}" in line
            for m in [re.search(r"bf16\[(\d+),%d,%d\]" % (P, hd), line)] if m}
    assert outs.get("dq") == "2" and outs.get("dkv") == "2", outs   # 8 heads / tensor 4, per chip
    gathers = _gathered_shapes(hlo)
    # any gather of a (rows, patches, ...) activation: q / k / v (heads x head_dim), qkv (3E), or E wide
    patch_acts = re.compile(r"bf16\[(\d+,)?%d,[0-9,]+\]" % P)
    assert gathers and not [g for g in gathers if patch_acts.search(g)], [g for g in gathers if patch_acts.search(g)]


@needs_libtpu
@pytest.mark.slow
@pytest.mark.parametrize("config, overrides", [
    ("stage1_2b", []),               # dots_no_batch, the ViT trains (its stack twice): 0.95 measured
    ("stage2_2b", ["remat=full"]),   # full remat, everything trains (grads, grad_temps): 0.93 measured
])
def test_memory_estimate_within_10_percent_of_the_compiler(config, overrides):
    """A shipped config at its slice (v5p-32, 16 chips) and bucket (8192 tokens, 16384 patches per row), cut
    to 2 ViT blocks and 2 LLM layers (2-4 minutes to compile on 2 cores): the estimate (memory.py, derived
    from the param shapes) is within 10% of the compiler's per-chip total."""
    import dataclasses
    from qwen2vl_jax import sharding
    from qwen2vl_jax.train import loop, memory

    cfg = load(os.path.join(ROOT, "configs", f"{config}.yaml"), overrides)
    sl = aot.parse_slice("v5p-32")
    mesh = sharding.make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor, devices=aot.tpu_devices(sl))
    c = loop.model_config(aot.for_tpu(cfg))
    c = dataclasses.replace(c, vision=dataclasses.replace(c.vision, depth=2),
                            text=dataclasses.replace(c.text, num_hidden_layers=2))
    [(_, compiled, _)] = aot.compiled_steps(cfg, mesh, c)
    compiler = aot.memory(compiled)["total"] / aot.GiB
    estimate = memory.estimate(aot.for_tpu(cfg), sl.chips, c)["total"]
    assert 0.9 <= estimate / compiler <= 1.1, (estimate, compiler)


def test_steps_are_traced_with_the_target_platforms_code_paths():
    """On this CPU host a Dense layer takes the CPU-only weight-gradient VJP; traced for a TPU (as
    compile_for traces the step) it is the plain dot a TPU host runs."""
    import jax
    import jax.numpy as jnp
    from qwen2vl_jax import target
    from qwen2vl_jax.model import layers

    x, w = jnp.ones((4, 8)), jnp.ones((8, 16))
    traced = lambda: str(jax.make_jaxpr(lambda x, w: layers.linear(x, w, (((1,), (0,)), ((), ()))))(x, w))
    assert target.platform() == jax.default_backend() == "cpu"
    assert "custom_vjp" in traced()
    with target.tracing_for("tpu"):
        assert target.platform() == "tpu"
        assert "custom_vjp" not in traced()
    assert target.platform() == "cpu"
    with pytest.raises(ValueError, match="unknown platform"):
        with target.tracing_for("tpu7"):
            pass
