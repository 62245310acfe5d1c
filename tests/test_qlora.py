"""QLoRA: frozen bases stored in int8 / int4 / nf4 and dequantised on the fly. The dequantised weights' error
against the bf16 ones per format, the forward pass is exactly the model with the dequantised kernels, the
adapters train over a quantised base as over a bf16 one, and LoRA dropout draws its own mask per layer."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qwen2vl_jax import api, lora, quant, sharding
from qwen2vl_jax.model.qwen2vl import Qwen2VLModule
from qwen2vl_jax.train import optim, state as S
from qwen2vl_jax.train.batches import stack_micro_batches
from qwen2vl_jax.train.config import LORA_GROUPS, OptimConfig
from qwen2vl_jax.train.step import StepFn
from train_utils import packed, tiny_config

# Relative RMS error of the dequantised weights (normal(0, 0.02), 512 x 384, group 64), measured: bf16 0.0017,
# int8 0.0065, nf4 0.092, int4 0.107. The bounds leave a 15% margin; they are each format's precision.
BOUNDS = {"int8": 0.0075, "nf4": 0.106, "int4": 0.123}


def _rel(a, b):
    return float(jnp.sqrt(jnp.mean((a - b) ** 2)) / jnp.sqrt(jnp.mean(b ** 2)))


@pytest.mark.parametrize("fmt", ["int8", "nf4", "int4"])
def test_dequantised_error_per_format(fmt):
    w = jax.random.normal(jax.random.key(0), (2, 512, 384), jnp.float32) * 0.02
    bf16 = w.astype(jnp.bfloat16).astype(jnp.float32)
    d = quant.quantize(bf16, fmt, 64)
    back = quant.dequantize(d["kernel_q"], d["kernel_scale"], fmt)
    err, err_bf16 = _rel(back, bf16), _rel(bf16, w)
    print(f"{fmt}: relative RMS error vs bf16 {err:.4f} (bf16 vs f32: {err_bf16:.4f})")
    assert err <= BOUNDS[fmt]
    bytes_per = (d["kernel_q"].nbytes + d["kernel_scale"].nbytes) / w.size
    assert bytes_per <= {"int8": 1.01, "nf4": 0.5 + 4 / 64, "int4": 0.5 + 4 / 64}[fmt]
    # The codes are a fixed point: quantising the dequantised kernel gives the same codes and scales.
    again = quant.quantize(back, fmt, 64)
    assert np.array_equal(np.asarray(again["kernel_q"]), np.asarray(d["kernel_q"]))
    np.testing.assert_allclose(np.asarray(again["kernel_scale"]), np.asarray(d["kernel_scale"]), rtol=1e-6)
    # Each group's absmax element is exact (up to the scale's rounding); int8's group is the whole column.
    i = jnp.argmax(jnp.abs(bf16[0, :(512 if fmt == "int8" else 64), 0]))
    np.testing.assert_allclose(float(back[0, i, 0]), float(bf16[0, i, 0]), rtol=1e-6)


@pytest.mark.parametrize("fmt", ["nf4", pytest.param("int8", marks=pytest.mark.slow)])
def test_quantised_forward_is_the_dequantised_model(fmt):
    cfg = tiny_config()
    base = api.Qwen2VL.init(cfg, seed=0)
    model = base.add_adapter(r=4, targets="all-linear", quant=fmt, quant_group=32, base_dtype="float32")
    q = model.params["model"]["layers"]["q_proj"]
    assert "kernel" not in q and q["kernel_q"].dtype == (jnp.int8 if fmt == "int8" else jnp.uint8)
    assert "kernel" in model.params["lm_head"]   # the head is not quantised
    # Give the adapters weight, so the comparison covers them too.
    model.params = jax.tree_util.tree_map_with_path(
        lambda p, x: x + 0.05 if p[-1].key == "lora_b" else x, model.params)
    plain = model.merge_adapter()
    batch = packed(cfg, 2, 1, seed=1)
    a = np.asarray(model.packed_logits(batch))
    b = np.asarray(plain.packed_logits(batch))
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)
    assert np.abs(a - np.asarray(base.packed_logits(batch))).max() > 1e-3


def _train(adapter, steps=12, dropout_rng=False):
    cfg = tiny_config()
    ocfg = OptimConfig(lr=3e-3, warmup_steps=2, decay_steps=50, clip_norm=1.0, weight_decay=0.0)
    module = lora.adapted(Qwen2VLModule(cfg), adapter)
    groups = optim.Groups(LORA_GROUPS)
    tx = optim.make_optimizer(ocfg, groups)
    mesh = sharding.make_mesh(1, 1, 1)
    sh = S.state_shardings(module, tx, groups, mesh)
    base = api.Qwen2VL.init(cfg, seed=0).params
    params = lora.build(base, adapter, jax.random.key(1))
    state = S.init_state(module, tx, groups, sh, seed=0, params=params)
    step = StepFn(mesh, sh, module=module, tx=tx)
    batch = stack_micro_batches([packed(cfg, 8, 4, seed=2)])
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    losses = []
    for _ in range(steps):
        state, m = step(state, batch)
        losses.append(float(m["loss"]))
    return losses, state


@pytest.mark.slow
def test_qlora_trains_like_bf16_lora():
    """The same adapters on the same data over a bf16 base and over int8 and nf4 bases: the loss curves start
    at the quantised models' losses and fall as the bf16 one does (printed side by side; seen, 12 steps:
    bf16 6.862 -> 6.099, int8 6.862 -> 6.099, nf4 6.859 -> 6.097)."""
    common = dict(r=8, alpha=16, targets="all-linear", quant_group=32)
    curves = {fmt: _train(lora.Adapter(**common, quant=q, base_dtype="bfloat16"))[0]
              for fmt, q in (("bf16", "none"), ("int8", "int8"), ("nf4", "nf4"))}
    for fmt, c in curves.items():
        print(fmt, " ".join(f"{x:.3f}" for x in c))
    ref = np.array(curves["bf16"])
    assert ref[-1] < ref[0] - 0.5
    for fmt, tol in (("int8", 0.01), ("nf4", 0.03)):
        c = np.array(curves[fmt])
        assert abs(c[0] - ref[0]) <= 1e-3 * ref[0], fmt   # B = 0: the quantised base's loss
        assert abs(c[-1] - ref[-1]) <= tol * (ref[0] - ref[-1]) + 0.01 * ref[-1], (fmt, c[-1], ref[-1])


def test_frozen_base_is_untouched_and_only_adapters_have_state():
    adapter = lora.Adapter(r=4, targets="llm", quant="int8")
    losses, state = _train(adapter, steps=2)
    paths = ["/".join(k.key for k in p) for p, _ in jax.tree_util.tree_flatten_with_path(state.opt_state.mu)[0]]
    assert paths and all(p.endswith(("lora_a", "lora_b")) for p in paths)
    assert all(p.startswith("model/layers/") for p in paths)


def test_dropout_masks_differ_per_layer():
    """LoRA dropout inside the scanned layers: each layer draws its own mask (the scan splits the dropout rng),
    the same rng gives the same loss, another rng another."""
    cfg = tiny_config()
    adapter = lora.Adapter(r=4, targets="llm", dropout=0.5)
    model = api.Qwen2VL.init(cfg, seed=0).add_adapter(adapter)
    model.params = jax.tree_util.tree_map_with_path(
        lambda p, x: x + 0.1 if p[-1].key == "lora_b" else x, model.params)
    batch = {k: jnp.asarray(v) for k, v in packed(cfg, 2, 1, seed=1).items() if k in api.MODEL_KEYS}
    keys = []

    def spy(next_fun, args, kwargs, context):
        if context.method_name == "__call__" and context.module.path[-1:] == ("q_proj",):
            k = jax.random.key_data(context.module.make_rng("dropout"))
            jax.debug.callback(lambda k: keys.append(np.asarray(k)), k)
        return next_fun(*args, **kwargs)

    import flax.linen as nn
    f = lambda rng: model.module.apply({"params": model.params}, batch, rngs={"dropout": rng})
    with nn.intercept_methods(spy):
        jax.block_until_ready(jax.jit(f)(jax.random.key(0)))
    assert len(keys) == cfg.text.num_hidden_layers and not np.array_equal(keys[0], keys[1])
    a, b, c = (np.asarray(jax.jit(f)(jax.random.key(k))) for k in (0, 0, 1))
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    no_dropout = np.asarray(model.packed_logits(batch))   # inference: no rng, no dropout
    assert not np.array_equal(a, no_dropout)


@pytest.mark.parametrize("fmt", ["none", "int8", "nf4"])
def test_train_step_keeps_no_float_copy_of_the_frozen_base(fmt):
    """The compiled LoRA step over a bf16 / int8 / nf4 base: no float32 array of a stacked base kernel's
    shape anywhere (neither a dequantised / upcast copy of the stack nor the per-layer float kernels saved
    for the backward pass), and no dot that makes a base kernel's gradient."""
    cfg = tiny_config()
    # Groups of 16 rows: no 4-bit (groups, rows, out) intermediate has a stacked kernel's shape either.
    adapter = lora.Adapter(r=4, targets="all-linear", quant=fmt, quant_group=16, base_dtype="bfloat16")
    module = lora.adapted(Qwen2VLModule(cfg), adapter)
    groups = optim.Groups(LORA_GROUPS)
    tx = optim.make_optimizer(OptimConfig(lr=1e-3, warmup_steps=0), groups)
    mesh = sharding.make_mesh(1, 1, 1)
    sh = S.state_shardings(module, tx, groups, mesh)
    state = S.init_state(module, tx, groups, sh, seed=0,
                         params=lora.build(api.Qwen2VL.init(cfg, seed=0).params, adapter, jax.random.key(1)))
    # One row of 48 patches: no activation has a stacked kernel's shape.
    batch = {k: jnp.asarray(v) for k, v in stack_micro_batches([packed(cfg, 2, 1, seed=2, patch_len=48)]).items()}
    hlo = StepFn(mesh, sh, module=module, tx=tx).lower(state, batch).compile().as_text()
    t, v = cfg.text, cfg.vision
    n, e, d, i = t.num_hidden_layers, v.embed_dim, t.hidden_size, t.intermediate_size
    stacked = [(n, d, i), (n, i, d), (v.depth, e, v.mlp_dim), (v.depth, v.mlp_dim, e)]
    for s in stacked:
        assert f"f32[{','.join(map(str, s))}]" not in hlo, s
    # A weight gradient is a dot whose output has a kernel's (in, out) shape.
    dots = [line for line in hlo.splitlines() if " dot(" in line]
    assert dots
    for s in stacked:
        assert not [x for x in dots if f"= f32[{s[1]},{s[2]}]" in x], s
