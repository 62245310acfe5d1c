"""Compile once: one compilation per bucket shape, and a program whose size does not grow with depth."""

import dataclasses

import jax
import numpy as np

import qwen2vl_jax as qv
from qwen2vl_jax.api import dummy_batch


def test_one_compilation_per_bucket_shape():
    cfg = qv.config.tiny()
    model = qv.Qwen2VL.init(cfg, seed=0)
    rng = np.random.default_rng(0)
    buckets = [(16, 8), (32, 16)]
    for step in range(6):
        text_len, patch_len = buckets[step % 2]
        batch = {k: np.asarray(v) for k, v in dummy_batch(cfg, 2, text_len, patch_len).items()}
        batch["input_ids"] = rng.integers(0, 900, batch["input_ids"].shape).astype(np.int32)
        batch["patches"] = rng.standard_normal(batch["patches"].shape).astype(np.float32)
        model.packed_logits(batch)
    assert model._logits_fn._cache_size() == len(buckets)


def test_program_size_does_not_grow_with_depth():
    def hlo_size(layers, depth):
        base = qv.config.tiny()
        cfg = dataclasses.replace(base, text=dataclasses.replace(base.text, num_hidden_layers=layers),
                                  vision=dataclasses.replace(base.vision, depth=depth))
        model = qv.Qwen2VL.init(cfg)
        return len(model._logits_fn.lower(model.params, dummy_batch(cfg)).as_text())
    small, deep = hlo_size(2, 2), hlo_size(16, 16)
    assert abs(deep - small) / small < 0.02, (small, deep)
