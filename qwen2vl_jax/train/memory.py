"""Per-chip memory of a training run, estimated from the run config and the model's param shapes (nothing
is allocated or compiled). The TPU compiler's own figure (`train.py ... compile_for=SLICE`, aot.py) is the
one to plan with; this estimate is within 6% of it on the nine shipped Qwen2-VL stage configs
(docs/memory.md).

    python -m qwen2vl_jax.train.memory configs/stage2_7b.yaml [--devices N] [key=value ...]

Counts, per chip:
- params: float32 master weights, each sharded as its logical axes map onto the mesh (RULES); with LoRA
  (`lora.r` > 0) the frozen base in its stored dtype (bfloat16, or int8 / 4-bit codes and their scales);
- optimizer: AdamW mu and nu of the trainable parts only, in `optim.moments_dtype` (float32: 4 bytes each
  per param, bfloat16: 2);
- grads: float32 gradients of the trainable parts (twice with grad_accum > 1: the accumulator and the
  micro-batch's gradient);
- grad_temps: two more float32 copies of the trainable parts, which the compiler's buffer assignment holds
  while the backward scans stack the per-layer gradients and add them in;
- batch: this chip's rows of the stacked batch;
- activations: what the backward pass keeps across the scanned layers under the remat policy, from the
  model's own matmuls (matmuls.py): the layer inputs with `full`; every weight matmul's output with
  `dots_no_batch` (and the attention output with `dots`); everything with `none`; for this chip's rows, each
  width split where its param's output axis maps onto `tensor`; a training ViT's stack twice (the compiler
  holds a second buffer of it for the backward scan); nothing for a frozen ViT;
- transient: the largest single-layer working set while one layer's backward runs (its activations and
  their gradients, the dense L x L attention scores when attention is the `xla` kind, one layer's weights
  gathered in the compute dtype), or one chunk of logits with the gathered LM head (its gradient stays
  sharded).
"""

from __future__ import annotations

import argparse
import math

import flax.linen as nn
import jax

from qwen2vl_jax import api, sharding
from qwen2vl_jax.config import Qwen2VLConfig
from qwen2vl_jax.model.qwen2vl import Qwen2VLModule
from qwen2vl_jax.train import optim
from qwen2vl_jax.train.config import RunConfig, RunConfigError, adapter, load, param_groups
from qwen2vl_jax.train.matmuls import attention_width, matmuls

GiB = 2 ** 30


def mesh_sizes(cfg: RunConfig, devices: int) -> dict[str, int]:
    sizes = {"data": cfg.mesh.data, "fsdp": cfg.mesh.fsdp, "tensor": cfg.mesh.tensor}
    known = math.prod(v for v in sizes.values() if v != -1)
    for k, v in sizes.items():
        if v == -1:
            sizes[k] = devices // known
    if math.prod(sizes.values()) != devices:
        raise ValueError(f"mesh {sizes} does not cover {devices} devices")
    return sizes


def _shards(spec, sizes) -> int:
    n = 1
    for axis in sharding.logical_to_mesh_spec(spec):
        for a in ((axis,) if isinstance(axis, str) else (axis or ())):
            n *= sizes[a]
    return n


def _param_shards(spec, shape, sizes) -> int:
    """How many ways a param of `shape` splits: as `state.param_shardings` places it (`sharding.fit_spec`: a
    dim its mesh axes do not divide stays whole)."""
    n = 1
    for axis in sharding.fit_spec(spec or (), shape, sizes):
        for a in ((axis,) if isinstance(axis, str) else (axis or ())):
            n *= sizes[a]
    return n


MOMENT_BYTES = {"float32": 4, "bfloat16": 2}


def state_bytes(config: Qwen2VLConfig, parts, sizes: dict[str, int], grad_accum: int,
                moments_dtype: str = "float32", adapter=None) -> dict[str, float]:
    """Per-chip bytes of params, optimizer state (mu and nu in `moments_dtype`) and gradients. With a LoRA
    `adapter`, the params are the adapted tree's (the frozen base in its stored dtype, quantised or not)."""
    from qwen2vl_jax import lora
    boxed = api.abstract_params(lora.adapted(Qwen2VLModule(config), adapter))
    specs = nn.get_partition_spec(boxed)
    shapes = nn.meta.unbox(boxed)
    stored = jax.tree.map(lambda s, spec: math.prod(s.shape) * s.dtype.itemsize / _param_shards(spec, s.shape, sizes), shapes,
                          specs, is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct))
    per_leaf = jax.tree.map(lambda s, spec: math.prod(s.shape) * 4 / _param_shards(spec, s.shape, sizes), shapes, specs,
                            is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct))
    trainable, _ = optim.split(per_leaf, parts)
    p, t = sum(jax.tree.leaves(stored)), sum(jax.tree.leaves(trainable))
    # The compiler's buffer assignment holds each trained stacked weight's float32 gradient four times over
    # with grad_accum > 1 (docs/memory.md): the accumulator and the micro-batch's gradient (`grads`), and two
    # more while the backward scans stack the per-layer gradients and add them in (`grad_temps`).
    return {"params": p, "optimizer": 2 * t * MOMENT_BYTES[moments_dtype] / 4,
            "grads": t * (2 if grad_accum > 1 else 1), "grad_temps": 2 * t}


def _act_shards(axis, sizes) -> int:
    """How many ways an activation whose width is a param's output `axis` splits: over the tensor axis only
    (rows already split over data x fsdp; the fsdp split of the weight itself is gathered before use)."""
    return _shards((axis,), {**sizes, "data": 1, "fsdp": 1})


def _layer(config: Qwen2VLConfig, part: str, sizes: dict[str, int], policy: str) -> tuple[float, float, float]:
    """(elements kept per item per scanned layer under `policy`, the layer's full set (what its backward
    recomputes), one layer's weight count), from the model's own matmuls (matmuls.py): every matmul output
    of the layer, split as its logical axis maps onto the mesh."""
    layer = [m for m in matmuls(config) if m.part == part and m.layers > 1]
    if not layer:
        return 0.0, 0.0, 0.0
    width = lambda m: m.shape[-1] / _act_shards(m.out_axis, sizes)
    outs = sum(width(m) for m in layer)
    carry = config.text.hidden_size if part == "llm" else config.vision.embed_dim
    _, q = attention_width(config, part)
    t = _act_shards("heads", sizes)
    mlp = max(width(m) for m in layer if m.out_axis in ("mlp", "vit_mlp"))
    attn_out = q / t
    # + the attention output, two norms' outputs, q and k after rotary, the MLP's activation
    full = carry + outs + attn_out + 2 * carry + 2 * q / t + mlp
    # `full` keeps each layer's input; the dot policies keep the matmul outputs instead, from which the layer's
    # input is not needed again (jax's saved residuals, tests/test_train_config.py)
    kept = {"full": carry, "dots_no_batch": outs, "dots": outs + attn_out, "none": full}[policy]
    return kept, full, sum(math.prod(m.shape) for m in layer) / t


def batch_bytes(cfg: RunConfig, config: Qwen2VLConfig, rows: float) -> float:
    """This chip's share of the step's stacked batch (batches.stack_micro_batches): int32 / float32 fields."""
    L = max(b[0] for b in cfg.data.buckets)
    P = max(b[1] for b in cfg.data.buckets)
    per_row = L * (5 + 3) * 4 + (P * (config.vision.patch_dim + 3) * 4 if P else 0)
    return cfg.grad_accum * rows * per_row


def activation_bytes(cfg: RunConfig, config: Qwen2VLConfig, sizes: dict[str, int]) -> dict[str, float]:
    """Per-chip bytes kept for the backward pass, and the largest transient working set."""
    t = sizes["tensor"]
    rows = cfg.data.batch_size / (sizes["data"] * sizes["fsdp"])
    if cfg.data.buckets == "auto":
        raise RunConfigError("the memory estimate needs the row shapes: give data.buckets (a run with buckets: "
                             "auto prints the ones it sized from the data)")
    L = max(b[0] for b in cfg.data.buckets)
    P = max(b[1] for b in cfg.data.buckets)
    b = 4 if cfg.dtype == "float32" else 2   # auto is bfloat16 on the accelerators this plans for
    tc, vc = config.text, config.vision
    dense = cfg.attn_impl == "xla"   # `auto` is splash on TPU: no L x L scores are kept
    policy = "none" if cfg.remat == "none" else cfg.remat

    kept_t, full_t, text_layer_params = _layer(config, "llm", sizes, policy)
    kept_v, full_v, vit_layer_params = _layer(config, "vit", sizes, policy) if P else (0.0, 0.0, 0.0)
    text_tokens, patches = rows * L, rows * P
    # No gradient reaches a frozen ViT (stage 3), so nothing of its forward pass is kept.
    parts = param_groups(cfg).parts()   # the parts that train, in whole or through adapters
    vit_kept = "vit" in parts
    merger_kept = vit_kept or "merger" in parts
    # A training ViT's saved stack is held twice in the compiler's figure: the forward scan's stacked
    # residuals and a second buffer of the same size that the backward scan reads them from (measured on
    # the nine shipped configs, docs/memory.md; the LLM's stack is held once).
    saved = (tc.num_hidden_layers * kept_t * text_tokens + 2 * vit_kept * vc.depth * kept_v * patches) * b
    merger = merger_kept * patches / vc.merge_unit * sum(
        m.shape[0] + m.shape[-1] / _act_shards(m.out_axis, sizes) for m in matmuls(config) if m.part == "merger") * b
    # Dense attention materialises (rows, heads/t, L, L) f32 scores; under `none`/`dots` every layer keeps them.
    scores_t = rows * tc.num_attention_heads / t * L * L * 4 if dense else 0.0
    scores_v = rows * vc.num_heads / t * P * P * 4 if dense and P else 0.0
    if dense and policy in ("none", "dots"):
        saved += tc.num_hidden_layers * 2 * scores_t + vit_kept * vc.depth * 2 * scores_v
    vocab = tc.vocab_size / t
    # the LM head (or tied embedding) gathered over fsdp in the compute dtype; its float32 gradient is
    # reduce-scattered chunk by chunk and stays sharded (the compiler's buffer assignment for stage2_7b holds
    # bf16[3584,38016] gathered and only f32[224,38016] gradients)
    head = vocab * tc.hidden_size * b
    if cfg.loss_chunk:
        logits_kept = text_tokens * tc.hidden_size * b
        logits_transient = rows * cfg.loss_chunk * vocab * (b + 4 + 4) + head
    else:
        logits_kept = text_tokens * vocab * b
        logits_transient = text_tokens * vocab * (4 + 4) + head
    layer_weights = lambda n: n * b * 2   # one layer gathered (and the next prefetched)
    transient = max(2 * full_t * text_tokens * b + 3 * scores_t + layer_weights(text_layer_params),
                    2 * full_v * patches * b + 3 * scores_v + layer_weights(vit_layer_params),
                    logits_transient)
    return {"batch": batch_bytes(cfg, config, rows), "activations": saved + merger + logits_kept,
            "transient": transient}


def estimate(cfg: RunConfig, devices: int, config: Qwen2VLConfig | None = None) -> dict[str, float]:
    """GiB per chip: params, optimizer, grads, batch, activations, transient, total."""
    from qwen2vl_jax.train.loop import model_config
    config = config or model_config(cfg)
    sizes = mesh_sizes(cfg, devices)
    out = {**state_bytes(config, param_groups(cfg), sizes, cfg.grad_accum, cfg.optim.moments_dtype, adapter(cfg)),
           **activation_bytes(cfg, config, sizes)}
    out["total"] = sum(out.values())
    return {k: v / GiB for k, v in out.items()}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description="Per-chip memory estimate of a training config.")
    ap.add_argument("config")
    ap.add_argument("--devices", type=int, default=None, help="chips (default: the mesh's product)")
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args(argv)
    cfg = load(a.config, a.overrides)
    devices = a.devices or math.prod(v for v in (cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor))
    if devices < 1:
        raise SystemExit("give --devices when a mesh axis is -1")
    est = estimate(cfg, devices)
    print(" | ".join(f"{k} {v:.1f} GiB" for k, v in est.items()))


if __name__ == "__main__":
    main()
