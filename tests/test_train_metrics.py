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
    expect = (passes[0] * n_llm * tokens + passes[1] * n_merger * patches / 4 + passes[2] * n_vit * patches
              + attn_llm * llm_bwd + attn_vit * vit_bwd)
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
