"""Every example inside a packed row gets the logits it gets alone (images, a video, text-only mixed)."""

import numpy as np
import pytest

import hf_models
import qwen2vl_jax as qv
from qwen2vl_jax.data.packing import pack_examples


def _examples(cfg):
    g1, g2, gv, g3 = (1, 4, 6), (1, 2, 4), (4, 4, 4), (1, 6, 2)
    return [
        dict(input_ids=np.array(hf_models.text(3) + hf_models.vision_ids(cfg, g1) + hf_models.text(5, 30)),
             pixel_values=hf_models.pixels([g1], 1), image_grid_thw=np.array([g1])),
        dict(input_ids=np.array(hf_models.text(9, seed=3))),
        dict(input_ids=np.array(hf_models.text(2) + hf_models.vision_ids(cfg, gv, video=True) +
                                hf_models.text(2, 40) + hf_models.vision_ids(cfg, g2) + hf_models.text(3, 50)),
             pixel_values=hf_models.pixels([g2], 2), image_grid_thw=np.array([g2]),
             pixel_values_videos=hf_models.pixels([gv], 3), video_grid_thw=np.array([gv])),
        dict(input_ids=np.array(hf_models.text(4, 60) + hf_models.vision_ids(cfg, g3) + hf_models.text(2)),
             pixel_values=hf_models.pixels([g3], 4), image_grid_thw=np.array([g3])),
    ]


@pytest.mark.parametrize("impl", ["xla", "blockwise"])
def test_packed_logits_equal_alone(hf_checkpoints, impl):
    cfg, _, path = hf_checkpoints["tiny"]
    model = qv.load_pretrained(path, attn_impl=impl)
    alone_model = qv.load_pretrained(path, attn_impl="xla")
    examples = _examples(cfg)
    rows = pack_examples(examples, text_len=96, patch_len=160, config=cfg)
    assert rows["input_ids"].shape[0] < len(examples)          # something really was packed together
    assert (np.bincount(rows["segment_ids"][rows["segment_ids"] > 0]) > 0).sum() >= 2
    packed = np.asarray(model.packed_logits(rows))
    for i, ex in enumerate(examples):
        alone = np.asarray(alone_model(ex["input_ids"][None], pixel_values=ex.get("pixel_values"),
                                       image_grid_thw=ex.get("image_grid_thw"),
                                       pixel_values_videos=ex.get("pixel_values_videos"),
                                       video_grid_thw=ex.get("video_grid_thw")))[0]
        got = packed[rows["example_index"] == i]
        assert got.shape == alone.shape
        err = np.abs(got - alone).max()
        assert err <= 1e-4, f"example {i} ({impl}): max |packed - alone| {err:.2e}"
