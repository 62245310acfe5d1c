"""Qwen2.5-VL against transformers 4.57.6 `Qwen2_5_VLForConditionalGeneration` on tiny random models (f32,
eager): logits, the windowed vision tower, rope_index with absolute time, greedy generation, packing."""

import numpy as np
import pytest
import torch

import hf_models
import qwen2vl_jax as qv
from qwen2vl_jax.inputs import batch_from_hf
from qwen2vl_jax.positions import vision_window_index

# The 112-px shape (windows of 4x4 merged tokens, as the releases) runs with the slow tests.
SHAPES = ["w56_mid", "w84_first_tied", pytest.param("w112_last", marks=pytest.mark.slow)]
CASES = ["single_image", "two_images", "edge_windows", "video_and_image", "two_videos_fps", "left_padded_batch",
         "left_padded_mixed", "text_only"]


@pytest.fixture(scope="module")
def loaded(hf_checkpoints_2_5):
    return {name: (cfg, hf, qv.load_pretrained(path)) for name, (cfg, hf, path) in hf_checkpoints_2_5.items()}


def test_loaded_config_round_trips(loaded):
    for name, (cfg, _, ours) in loaded.items():
        assert ours.config == cfg, name


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("case", CASES)
def test_logits_match_reference(loaded, shape, case):
    cfg, hf, ours = loaded[shape]
    inputs = hf_models.cases_2_5(cfg)[case]
    err = hf_models.logits_error(hf, ours, inputs)
    assert err <= 1e-4, f"{shape}/{case}: max |logits diff| {err:.2e}"


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("case", ["single_image", "two_images", "edge_windows", "two_videos_fps",
                                  "left_padded_mixed"])
def test_vision_tower_matches_reference(loaded, shape, case):
    cfg, hf, ours = loaded[shape]
    inputs = hf_models.cases_2_5(cfg)[case]
    batch, _ = batch_from_hf(cfg, **inputs)
    merged = np.asarray(ours.module.apply({"params": ours.params}, batch["patches"], batch["patch_segment_ids"],
                                          batch["patch_positions"], batch["patch_window_ids"],
                                          method="encode_vision"))
    for pv_key, grid_key in (("pixel_values", "image_grid_thw"), ("pixel_values_videos", "video_grid_thw")):
        if inputs.get(grid_key) is None:
            continue
        with torch.no_grad():
            ref = hf.model.visual(torch.from_numpy(inputs[pv_key]), grid_thw=torch.tensor(inputs[grid_key])).numpy()
        tok = cfg.image_token_id if pv_key == "pixel_values" else cfg.video_token_id
        rows, cols = np.nonzero(batch["input_ids"] == tok)
        got = merged[rows, batch["vision_index"][rows, cols]]
        err = np.abs(got - ref).max()
        assert err <= 1e-5, f"{shape}/{case}/{pv_key}: max |vision diff| {err:.2e}"


@pytest.mark.parametrize("case", CASES)
def test_rope_index_matches_reference(loaded, case):
    cfg, hf, _ = loaded["w56_mid"]
    inputs = hf_models.cases_2_5(cfg)[case]
    t = hf_models.to_torch(inputs)
    ref_pos, ref_delta = hf.model.get_rope_index(t["input_ids"], t.get("image_grid_thw"), t.get("video_grid_thw"),
                                                 t.get("second_per_grid_ts"), t.get("attention_mask"))
    pos, delta = qv.rope_index(cfg, inputs["input_ids"], inputs.get("image_grid_thw"), inputs.get("video_grid_thw"),
                               inputs.get("attention_mask"), inputs.get("second_per_grid_ts"))
    np.testing.assert_array_equal(pos, ref_pos.numpy())
    np.testing.assert_array_equal(delta, ref_delta.numpy().reshape(-1))


def test_rope_index_absolute_time_by_hand():
    """A 3-step video at 1 fps (2 s per temporal patch, 2 tokens per second): time 0, 4, 8; text resumes at 9."""
    cfg = qv.config.tiny_2_5()
    ids = [5] + hf_models.vision_ids(cfg, (3, 2, 2), video=True) + [6]
    pos, delta = qv.rope_index(cfg, [ids], video_grid_thw=[[3, 2, 2]], second_per_grid_ts=[2.0])
    np.testing.assert_array_equal(pos[0, 0], [0, 1, 2, 6, 10, 11, 12])
    np.testing.assert_array_equal(pos[1, 0], [0, 1, 2, 2, 2, 11, 12])
    assert delta.tolist() == [13 - len(ids)]


def test_window_index_by_hand():
    """A 6x10-patch image (3x5 merged tokens) in windows of 2x2 merged tokens: windows of 4, 4, 2 / 2, 2, 1
    tokens, row-major, cut at the right and bottom edges."""
    index, sizes = vision_window_index([[1, 6, 10]], 2, 2)
    assert index.tolist() == [0, 1, 5, 6, 2, 3, 7, 8, 4, 9, 10, 11, 12, 13, 14]
    assert sizes.tolist() == [16, 16, 8, 8, 8, 4]


def test_greedy_tokens_match_reference(loaded):
    cfg, hf, ours = loaded["w84_first_tied"]
    inputs = hf_models.cases_2_5(cfg)["left_padded_mixed"]
    with torch.no_grad():
        ref = hf.generate(**hf_models.to_torch(inputs), max_new_tokens=6, do_sample=False, eos_token_id=None,
                          pad_token_id=cfg.pad_token_id).numpy()
    out = ours.generate(**inputs, max_new_tokens=6)
    np.testing.assert_array_equal(out, ref)


def test_packed_equals_alone(loaded):
    """Examples packed into one row (images and a video, windows cut at edges) give the logits each gives
    alone: windows never reach across images or examples."""
    cfg, _, ours = loaded["w56_mid"]
    c = hf_models.cases_2_5(cfg)
    names = ["edge_windows", "two_videos_fps", "single_image"]
    examples = []
    for n in names:
        ex = {k: v for k, v in c[n].items() if v is not None}
        ex["input_ids"] = np.asarray(ex["input_ids"]).reshape(-1)
        examples.append(ex)
    rows = qv.pack_examples(examples, text_len=512, patch_len=1024, config=cfg)
    assert rows["input_ids"].shape[0] == 1
    packed = np.asarray(ours.packed_logits(rows))
    for i, (n, ex) in enumerate(zip(names, examples)):
        alone = np.asarray(ours(ex["input_ids"][None], pixel_values=ex.get("pixel_values"),
                                image_grid_thw=ex.get("image_grid_thw"),
                                pixel_values_videos=ex.get("pixel_values_videos"),
                                video_grid_thw=ex.get("video_grid_thw"),
                                second_per_grid_ts=ex.get("second_per_grid_ts")))[0]
        got = packed[0][rows["example_index"][0] == i]
        err = np.abs(got - alone).max()
        assert err <= 1e-4, f"{n}: packed vs alone {err:.2e}"


def test_window_blocks_agree_across_attention_backends():
    """A row of 1056 patches (an image, a 2-step video, a small image; windows cut at edges) through the
    windowed tower: the block-sparse backends (blockwise, splash in interpret mode) equal the dense one."""
    from qwen2vl_jax.model.qwen2vl import Qwen2VLModule
    from train_utils import random_params
    cfg = qv.config.tiny_2_5()
    grids = [(1, 20, 14), (2, 10, 12), (1, 8, 8)]
    ids = sum((hf_models.vision_ids(cfg, g, video=g[0] > 1) for g in grids), [])
    img, vid = [g for g in grids if g[0] == 1], [g for g in grids if g[0] > 1]
    b, _ = batch_from_hf(cfg, np.asarray([ids]), pixel_values=hf_models.pixels(img), image_grid_thw=img,
                         pixel_values_videos=hf_models.pixels(vid, 1), video_grid_thw=vid)
    params = random_params(Qwen2VLModule(cfg), 1)
    out = {impl: np.asarray(Qwen2VLModule(cfg, attn_impl=impl).apply(
        {"params": params}, b["patches"], b["patch_segment_ids"], b["patch_positions"], b["patch_window_ids"],
        method="encode_vision")) for impl in ("xla", "blockwise", "splash_interpret")}
    for impl in ("blockwise", "splash_interpret"):
        assert np.abs(out[impl] - out["xla"]).max() <= 1e-5, impl
