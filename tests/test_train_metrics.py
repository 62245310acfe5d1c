"""FLOPs counting against the parameter count (2 FLOPs per weight per token and pass), per stage; the
metrics file on resume; device peaks."""

import json

import flax.linen as nn
import jax
import numpy as np
import pytest

from qwen2vl_jax import api, config as C
from qwen2vl_jax.model.qwen2vl import Qwen2VLModule
from qwen2vl_jax.train import metrics
from qwen2vl_jax.train.config import STAGE_PARTS


def _kernel_params(tree) -> int:
    return sum(int(np.prod(x.shape)) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]
               if p[-1].key == "kernel")


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_step_flops_from_parameter_counts(stage):
    cfg = C.tiny()
    shapes = nn.meta.unbox(api.abstract_params(Qwen2VLModule(cfg)))
    n_llm = _kernel_params(shapes["model"]) + _kernel_params(shapes["lm_head"])   # every matmul weight
    n_vit = _kernel_params(shapes["visual"]["blocks"]) + _kernel_params(shapes["visual"]["patch_embed"])
    n_merger = _kernel_params(shapes["visual"]["merger"])
    # Two rows: segments of 5 and 3 tokens, then 4 tokens; one row holds 2 images of 8 and 4 patches.
    seg = np.array([[1, 1, 1, 1, 1, 2, 2, 2, 0], [1, 1, 1, 1, 0, 0, 0, 0, 0]])
    pseg = np.array([[1] * 8 + [2] * 4, [0] * 12])
    batch = {"segment_ids": seg[None], "patch_segment_ids": pseg[None]}
    tokens, patches = 12, 12
    passes = {1: (4, 6, 6), 2: (6, 6, 6), 3: (6, 2, 2)}[stage]   # (llm, merger, vit) FLOPs per weight per token
    t, v = cfg.text, cfg.vision
    llm_pairs = 15 + 6 + 10            # causal n(n+1)/2 for 5, 3, 4
    vit_pairs = 64 + 16
    attn_llm = 2 * t.num_hidden_layers * t.num_attention_heads * t.head_dim * llm_pairs * 2   # fwd FLOPs
    attn_vit = 2 * v.depth * v.embed_dim * vit_pairs * 2
    llm_bwd = 1 + 2                    # attention backward is twice its forward, always needed in the LLM
    vit_bwd = 1 + 2 * (stage != 3)
    n_pixels = _kernel_params(shapes["visual"]["patch_embed"])   # reads the pixels: no input gradient
    expect = (passes[0] * n_llm * tokens + passes[1] * n_merger * patches / 4 + passes[2] * n_vit * patches
              - 2 * (stage != 3) * n_pixels * patches + attn_llm * llm_bwd + attn_vit * vit_bwd)
    got = metrics.step_flops(cfg, batch, STAGE_PARTS[stage])
    assert got == pytest.approx(expect, rel=1e-12)


def test_metrics_log_drops_records_past_the_resume_step(tmp_path):
    log = metrics.MetricsLog(str(tmp_path))
    for s in range(1, 6):
        log.write(s, {"loss": float(10 - s), "nan": float("nan")})
    log.close()
    log = metrics.MetricsLog(str(tmp_path), resume_step=3)
    log.write(4, {"loss": 0.5})
    log.close()
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and rows[-1]["loss"] == 0.5 and rows[0]["nan"] is None


def test_peak_flops():
    assert metrics.peak_flops("TPU v5 lite") == 197e12
    assert metrics.peak_flops("TPU v5p") == 459e12
    assert metrics.peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert metrics.peak_flops("cpu") is None
    assert metrics.peak_flops("cpu", 2.0) == 2e12


def _dot_flops(hlo: str) -> float:
    """2 x output elements x contracted size, summed over the dot instructions of compiled HLO text."""
    import math
    import re
    shapes = {m.group(1): [int(x) for x in m.group(2).split(",") if x]
              for m in re.finditer(r"%?([\w.\-]+) = \w+\[([\d,]*)\]", hlo)}
    total = 0.0
    for m in re.finditer(r"= \w+\[([\d,]*)\]\S* dot\(%?([\w.\-]+), %?[\w.\-]+\).*?lhs_contracting_dims=\{([\d,]*)\}",
                         hlo):
        out = [int(x) for x in m.group(1).split(",") if x]
        k = math.prod(shapes[m.group(2)][int(d)] for d in m.group(3).split(",") if d)
        total += 2 * math.prod(out) * k
    return total


@pytest.mark.parametrize("parts", [("vit", "merger", "llm"), ("merger", "llm"),
                                   pytest.param(("llm",), marks=pytest.mark.slow),
                                   pytest.param(("vit", "merger"), marks=pytest.mark.slow)])
def test_step_flops_match_xla_cost_analysis(parts):
    """The derived count against XLA's compiled gradient (one layer and one ViT block, so that the scanned
    stacks, which cost analysis counts once, are counted right), after adding what the dense path computes
    beyond the causal pairs (the masked upper triangle): equal to the HLO's dot FLOPs, and within 2% below
    cost analysis's total (which adds the elementwise work: norms, softmax, activations)."""
    import dataclasses
    from qwen2vl_jax.train import optim
    from qwen2vl_jax.train.step import forward_sums
    t = C.tiny()
    cfg = dataclasses.replace(
        t, vision=dataclasses.replace(t.vision, depth=1, embed_dim=128, num_heads=2, hidden_size=256),
        text=dataclasses.replace(t.text, hidden_size=256, intermediate_size=1024, num_hidden_layers=1,
                                 num_attention_heads=4, num_key_value_heads=2, mrope_section=(8, 12, 12)))
    L, P = 256, 256
    module = Qwen2VLModule(cfg, attn_impl="xla")
    params = nn.meta.unbox(api.abstract_params(module))
    batch = {k: np.array(v) for k, v in api.dummy_batch(cfg, 1, L, P).items()}
    batch.update(labels=np.zeros((1, L), np.int32), loss_mask=np.ones((1, L), np.float32))
    batch["vision_index"][0, :P // 4] = np.arange(P // 4)
    trainable, frozen = optim.split(params, parts)
    grad = jax.jit(jax.grad(lambda tr, fr, b: forward_sums(module, optim.merge(tr, fr), b).ce))
    compiled = grad.lower(trainable, frozen, batch).compile()
    cost = compiled.cost_analysis()
    xla = (cost[0] if isinstance(cost, list) else cost)["flops"]
    # QK^T and PV over the masked half: 2 matmuls x 2 FLOPs a multiply-add, forward + 2x backward
    masked = 2 * 2 * cfg.text.hidden_size * (L * L - L * (L + 1) / 2) * 3
    ours = metrics.step_flops(cfg, {k: v[None] for k, v in batch.items()}, parts) + masked
    assert ours == pytest.approx(_dot_flops(compiled.as_text()), rel=1e-3)
    assert 1.0 < xla / ours < 1.02
