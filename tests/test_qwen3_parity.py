"""Qwen3-VL against transformers 4.57.6 `Qwen3VLForConditionalGeneration` on tiny random models (f32, eager):
logits, the vision tower and each DeepStack feature, rope_index with per-frame video spans, greedy generation,
packing, gradients."""

import numpy as np
import pytest
import torch

import hf_models
import qwen2vl_jax as qv
from qwen2vl_jax.inputs import batch_from_hf
from qwen2vl_jax.model.rope import mrope_streams

# The three-level shape runs with the slow tests (the default run keeps one and two levels, both tables).
SHAPES = [pytest.param(n, marks=pytest.mark.slow) if n == "p36_three_levels" else n for n in hf_models.CONFIGS_3]
CASES = ["odd_image", "two_images", "video_and_image", "left_padded_mixed", "text_only"]


@pytest.fixture(scope="module")
def loaded(hf_checkpoints_3):
    return {name: (cfg, hf, qv.load_pretrained(path)) for name, (cfg, hf, path) in hf_checkpoints_3.items()}


def test_loaded_config_round_trips(loaded):
    for name, (cfg, _, ours) in loaded.items():
        assert ours.config == cfg, name


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("case", CASES)
def test_logits_match_reference(loaded, shape, case):
    cfg, hf, ours = loaded[shape]
    inputs = hf_models.cases_3(cfg)[case]
    err = hf_models.logits_error(hf, ours, inputs)
    assert err <= 1e-4, f"{shape}/{case}: max |logits diff| {err:.2e}"


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("case", ["odd_image", "two_images", "video_and_image", "left_padded_mixed"])
def test_vision_tower_and_deepstack_match_reference(loaded, shape, case):
    cfg, hf, ours = loaded[shape]
    inputs = hf_models.cases_3(cfg)[case]
    batch, _ = batch_from_hf(cfg, **inputs)
    merged, deep = ours.module.apply({"params": ours.params}, batch["patches"], batch["patch_segment_ids"],
                                     batch["patch_positions"], method="encode_vision_deepstack")
    merged, deep = np.asarray(merged), np.asarray(deep)
    assert deep.shape[0] == len(cfg.vision.deepstack_visual_indexes)
    for pv_key, grid_key in (("pixel_values", "image_grid_thw"), ("pixel_values_videos", "video_grid_thw")):
        if inputs.get(grid_key) is None:
            continue
        with torch.no_grad():
            ref, ref_deep = hf.model.visual(torch.from_numpy(inputs[pv_key]), grid_thw=torch.tensor(inputs[grid_key]))
        tok = cfg.image_token_id if pv_key == "pixel_values" else cfg.video_token_id
        rows, cols = np.nonzero(batch["input_ids"] == tok)
        at = batch["vision_index"][rows, cols]
        err = np.abs(merged[rows, at] - ref.numpy()).max()
        assert err <= 1e-5, f"{shape}/{case}/{pv_key}: max |vision diff| {err:.2e}"
        for j, r in enumerate(ref_deep):
            err = np.abs(deep[j, rows, at] - r.numpy()).max()
            assert err <= 1e-5, f"{shape}/{case}/{pv_key}: DeepStack level {j}: max diff {err:.2e}"


@pytest.mark.parametrize("case", CASES)
def test_rope_index_matches_reference(loaded, case):
    cfg, hf, _ = loaded["p16_two_levels"]
    inputs = hf_models.cases_3(cfg)[case]
    t = hf_models.to_torch(inputs)
    ref_pos, ref_delta = hf.model.get_rope_index(t["input_ids"], t.get("image_grid_thw"), t.get("video_grid_thw"),
                                                 t.get("attention_mask"))
    pos, delta = qv.rope_index(cfg, inputs["input_ids"], inputs.get("image_grid_thw"), inputs.get("video_grid_thw"),
                               inputs.get("attention_mask"))
    np.testing.assert_array_equal(pos, ref_pos.numpy())
    np.testing.assert_array_equal(delta, ref_delta.numpy().reshape(-1))


def test_interleaved_mrope_streams_by_hand():
    """[24, 20, 20] over 64 pairs: h at 1, 4, ..., 58, w at 2, 5, ..., 59, t elsewhere (0, 3, ..., 57, 60-63)."""
    s = mrope_streams(128, (24, 20, 20), interleaved=True)
    assert np.flatnonzero(s == 1).tolist() == list(range(1, 60, 3))
    assert np.flatnonzero(s == 2).tolist() == list(range(2, 60, 3))
    assert np.flatnonzero(s == 0).tolist() == list(range(0, 60, 3)) + [60, 61, 62, 63]


def test_video_frames_are_spans_at_time_zero():
    """A 2-step video: each frame is its own span; both start at text position + 0 in t, and the text after
    frame 0 (its end, the next timestamp, its start) continues from the frame's max + 1."""
    cfg = hf_models.qwen3_config()
    ids = [5] + hf_models.video_ids_3(cfg, (2, 4, 4), stamps=[[7], [8]]) + [6]
    pos, _ = qv.rope_index(cfg, [ids], video_grid_thw=[[2, 4, 4]])
    # 5 | 7 <s> v v v v <e> | 8 <s> v v v v <e> | 6
    np.testing.assert_array_equal(pos[0, 0], [0, 1, 2, 3, 3, 3, 3, 5, 6, 7, 8, 8, 8, 8, 10, 11])
    np.testing.assert_array_equal(pos[2, 0], [0, 1, 2, 3, 4, 3, 4, 5, 6, 7, 8, 9, 8, 9, 10, 11])


def test_greedy_tokens_match_reference(loaded):
    cfg, hf, ours = loaded["p400_one_level_tied"]
    inputs = hf_models.cases_3(cfg)["left_padded_mixed"]
    with torch.no_grad():
        ref = hf.generate(**hf_models.to_torch(inputs), max_new_tokens=6, do_sample=False, eos_token_id=None,
                          pad_token_id=cfg.pad_token_id).numpy()
    out = ours.generate(**inputs, max_new_tokens=6)
    np.testing.assert_array_equal(out, ref)


def test_packed_equals_alone(loaded):
    """Examples packed into one row (images, a video with per-frame spans) give the logits each gives alone:
    the DeepStack additions follow the packed vision_index and the position table each image's own grid."""
    cfg, _, ours = loaded["p16_two_levels"]
    c = hf_models.cases_3(cfg)
    names = ["two_images", "video_and_image", "odd_image"]
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
                                video_grid_thw=ex.get("video_grid_thw")))[0]
        got = packed[0][rows["example_index"][0] == i]
        err = np.abs(got - alone).max()
        assert err <= 1e-4, f"{n}: packed vs alone {err:.2e}"


@pytest.mark.slow   # ~40 s each on 2 cores (the backward pass compiles)
@pytest.mark.parametrize("shape,case", [("p16_two_levels", "odd_image"), ("p16_two_levels", "video_and_image"),
                                        ("p400_one_level_tied", "video_and_image")])
def test_gradients_match_torch_autograd(loaded, shape, case):
    """d(sum(logits * W))/d(params) against torch autograd, every tensor (the position table, the DeepStack
    mergers, q/k norms, the tied embedding included); an image, and an image + per-frame video."""
    import jax
    from qwen2vl_jax import hf as qhf
    cfg, hf, ours = loaded[shape]
    inputs = hf_models.cases_3(cfg)[case]
    batch, _ = batch_from_hf(cfg, **inputs)
    weight = np.random.default_rng(0).standard_normal((1, batch["input_ids"].shape[1], cfg.text.vocab_size))
    weight = weight.astype(np.float32)

    def loss(params):
        return (ours.module.apply({"params": params}, batch) * weight).sum()
    grads = qhf._flatten(jax.grad(loss)(ours.params))
    hf.zero_grad()
    (hf(**hf_models.to_torch(inputs)).logits * torch.from_numpy(weight)).sum().backward()
    ref = {qhf._canonical(n): p.grad for n, p in hf.named_parameters()}
    checked = 0
    for path, (name, n, fn, shape_) in qhf.param_map(cfg).items():
        g = np.asarray(grads[path])
        for i in range(n or 1):
            r = ref[name.format(i=i) if n else name].numpy()
            got = fn.inverse(g[i] if n else g, shape_)
            scale = max(1.0, float(np.abs(r).max()))
            err = float(np.abs(got - r).max()) / scale
            assert err <= 1e-5, f"{shape}: {name.format(i=i)}: gradient diff {err:.2e} (scale {scale:.2e})"
            checked += 1
    assert checked == sum(n or 1 for _, n, _, _ in qhf.param_map(cfg).values())


def test_bf16_forward_close_to_f32(hf_checkpoints_3):
    """bf16 params and compute (the TPU setting) through the position table, DeepStack and q/k norms stay near
    f32: within a few bf16 steps of the logits' scale, the greedy choice agreeing almost everywhere."""
    cfg, _, path = hf_checkpoints_3["p16_two_levels"]
    inputs = hf_models.cases_3(cfg)["video_and_image"]
    f32 = np.asarray(qv.load_pretrained(path, dtype="float32")(**inputs))
    bf16 = np.asarray(qv.load_pretrained(path, dtype="bfloat16")(**inputs)).astype(np.float32)
    assert np.isfinite(bf16).all()
    err = np.abs(bf16 - f32).max() / np.abs(f32).max()
    assert err < 3e-2, f"bf16 vs f32 relative max diff {err:.2e}"
    assert (bf16.argmax(-1) == f32.argmax(-1)).mean() >= 0.9
