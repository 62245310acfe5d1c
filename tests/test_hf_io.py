"""Checkpoint I/O: round trip through transformers, both on-disk layouts, sharded index, clear errors."""

import copy
import json
import os

import numpy as np
import pytest
import torch

import hf_models
import qwen2vl_jax as qv
from qwen2vl_jax import hf


def _state(model):
    return {k: v.detach().numpy() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("shape", ["tiny", "tied"])
def test_round_trip_loads_in_transformers_identically(hf_checkpoints, tmp_path, shape):
    from transformers import Qwen2VLForConditionalGeneration
    cfg, ref, path = hf_checkpoints[shape]
    ours = qv.load_pretrained(path)
    ours.save_pretrained(str(tmp_path))
    if cfg.tie_word_embeddings:   # the tied head is not written
        assert "lm_head.weight" not in hf.SafetensorsReader(str(tmp_path)).keys()
    back = Qwen2VLForConditionalGeneration.from_pretrained(str(tmp_path), attn_implementation="eager").eval()
    a, b = _state(ref), _state(back)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_new_layout_and_sharded_index_load_the_same(hf_checkpoints, tmp_path):
    """A file with `model.visual.*` / `model.language_model.*` names, split over two shards with an index."""
    cfg, ref, path = hf_checkpoints["tiny"]
    state = _state(ref)   # in-memory names of 4.57 = the new layout
    assert any(k.startswith("model.language_model.") for k in state)
    names = sorted(state)
    half = len(names) // 2
    weight_map = {}
    for i, chunk in enumerate((names[:half], names[half:])):
        fname = f"model-{i + 1:05d}-of-00002.safetensors"
        hf.write_safetensors(str(tmp_path / fname), {k: state[k] for k in chunk})
        weight_map.update({k: fname for k in chunk})
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    cfg.save_pretrained(str(tmp_path))
    a, b = qv.load_pretrained(path).params, qv.load_pretrained(str(tmp_path)).params
    for x, y in zip(*(map(np.asarray, __import__("jax").tree.leaves(t)) for t in (a, b))):
        np.testing.assert_array_equal(x, y)


def test_our_sharded_export_round_trips(hf_checkpoints, tmp_path):
    cfg, _, path = hf_checkpoints["tiny"]
    ours = qv.load_pretrained(path)
    ours.save_pretrained(str(tmp_path), max_shard_bytes=200_000)
    assert os.path.exists(tmp_path / "model.safetensors.index.json")
    assert len([f for f in os.listdir(tmp_path) if f.endswith(".safetensors")]) > 1
    back = qv.load_pretrained(str(tmp_path))
    for x, y in zip(*(map(np.asarray, __import__("jax").tree.leaves(t)) for t in (ours.params, back.params))):
        np.testing.assert_array_equal(x, y)


def test_bf16_checkpoint_loads(hf_checkpoints, tmp_path):
    cfg, ref, _ = hf_checkpoints["tiny"]
    copy.deepcopy(ref).to(torch.bfloat16).save_pretrained(str(tmp_path))   # the shared fixture stays f32
    m = qv.load_pretrained(str(tmp_path), dtype="bfloat16")
    emb = np.asarray(m.params["model"]["embed_tokens"]["embedding"].astype(np.float32))
    want = ref.model.language_model.embed_tokens.weight.detach().to(torch.bfloat16).float().numpy()
    np.testing.assert_array_equal(emb, want)


def _copy_ckpt(path, dst, drop=None, reshape=None):
    r = hf.SafetensorsReader(path)
    tensors = {k: np.array(r.get(k)) for k in r.keys() if k != drop}
    if reshape:
        tensors[reshape] = tensors[reshape][:-1]
    hf.write_safetensors(os.path.join(dst, "model.safetensors"), tensors)
    with open(os.path.join(path, "config.json")) as f:
        d = json.load(f)
    return d


def _write_config(dst, d):
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(d, f)


def test_missing_tensor_is_named(hf_checkpoints, tmp_path):
    _, _, path = hf_checkpoints["tiny"]
    _write_config(tmp_path, _copy_ckpt(path, tmp_path, drop="model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(qv.CheckpointError, match=r"missing tensor model\.layers\.1\.mlp\.up_proj\.weight"):
        qv.load_pretrained(str(tmp_path))


def test_misshaped_tensor_is_named(hf_checkpoints, tmp_path):
    _, _, path = hf_checkpoints["tiny"]
    _write_config(tmp_path, _copy_ckpt(path, tmp_path, reshape="visual.blocks.0.attn.qkv.weight"))
    with pytest.raises(qv.CheckpointError, match=r"visual\.blocks\.0\.attn\.qkv\.weight has shape \(95, 32\), "
                                                 r"the config needs \(96, 32\)"):
        qv.load_pretrained(str(tmp_path))


def test_unknown_model_type(hf_checkpoints, tmp_path):
    _, _, path = hf_checkpoints["tiny"]
    d = _copy_ckpt(path, tmp_path)
    d["model_type"] = "qwen3_vl_moe"
    _write_config(tmp_path, d)
    with pytest.raises(qv.ConfigError, match=r"model_type 'qwen3_vl_moe' is not supported; supported: "
                                             r"'qwen2_5_vl' \(Qwen2.5-VL\), 'qwen2_vl' \(Qwen2-VL\), "
                                             r"'qwen3_vl' \(Qwen3-VL\)"):
        qv.load_pretrained(str(tmp_path))


def test_family_fields_checked(hf_checkpoints, tmp_path):
    """A Qwen2-VL vision_config under model_type qwen2_5_vl is read with Qwen2.5-VL field meanings and refused."""
    _, _, path = hf_checkpoints["tiny"]
    d = _copy_ckpt(path, tmp_path)
    d["model_type"] = "qwen2_5_vl"
    _write_config(tmp_path, d)
    with pytest.raises(qv.ConfigError, match=r"invalid Qwen2.5-VL config: vision hidden_size \(merger output\) "
                                             r"3584 != text hidden_size 64"):
        qv.load_pretrained(str(tmp_path))


def test_token_feature_mismatch(hf_checkpoints):
    cfg, _, path = hf_checkpoints["tiny"]
    m = qv.load_pretrained(path)
    inputs = hf_models.cases(cfg)["single_image"]
    ids = inputs["input_ids"].copy()
    ids[0, ids[0].tolist().index(cfg.image_token_id)] = 7   # one pad token fewer than the 8 features
    with pytest.raises(qv.InputError, match="Image features and image tokens do not match, tokens: 7, features: 8"):
        m(ids, pixel_values=inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"])


def test_pixel_rows_must_match_grid(hf_checkpoints):
    cfg, _, path = hf_checkpoints["tiny"]
    m = qv.load_pretrained(path)
    inputs = hf_models.cases(cfg)["single_image"]
    with pytest.raises(qv.InputError, match="image pixel values have 31 rows but image_grid_thw"):
        m(inputs["input_ids"], pixel_values=inputs["pixel_values"][:-1], image_grid_thw=inputs["image_grid_thw"])
