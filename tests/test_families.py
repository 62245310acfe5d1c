"""The family descriptions: presets with the released parameter counts, HF tables that cover every param
with the right shapes, config.json round trips through our reader and transformers' classes, and the
trainable-part prefixes."""

import flax.linen as nn
import numpy as np
import pytest

from qwen2vl_jax import api, config as C, families, hf
from qwen2vl_jax.model.qwen2vl import Qwen2VLModule
from qwen2vl_jax.train import optim

# Total parameters of the released Qwen2.5-VL checkpoints (their safetensors totals, as the hub lists them).
RELEASED = {"qwen2_5_vl-3b": 3_754_622_976, "qwen2_5_vl-7b": 8_292_166_656, "qwen2_5_vl-32b": 33_452_718_336,
            "qwen2_5_vl-72b": 73_410_777_344}


def _shapes(cfg):
    return hf._flatten(nn.meta.unbox(api.abstract_params(Qwen2VLModule(cfg))))


@pytest.mark.parametrize("name", sorted(RELEASED))
def test_qwen2_5_vl_presets_have_the_released_sizes(name):
    cfg = C.preset(name)
    assert cfg.model_type == "qwen2_5_vl" and cfg.vision.window_size == 112
    assert sum(int(np.prod(s.shape)) for s in _shapes(cfg).values()) == RELEASED[name]


def test_qwen3_vl_8b_preset_has_the_released_size():
    """Qwen3-VL-8B-Instruct holds 8,767,123,696 parameters (27-block ViT of width 1152 with 3 DeepStack
    mergers, 36-layer Qwen3 LLM of width 4096, untied head)."""
    shapes = _shapes(C.preset("qwen3_vl-8b"))
    assert sum(int(np.prod(v.shape)) for v in shapes.values()) == 8_767_123_696


@pytest.mark.parametrize("name", sorted(C.PRESETS))
def test_hf_table_covers_every_param(name):
    cfg = C.preset(name)
    shapes = _shapes(cfg)
    table = hf.param_map(cfg)
    assert set(table) == set(shapes)
    for path, entry in table.items():
        assert hf._our_shape(entry) == shapes[path].shape, path
        _, _, to_ours, hf_shape = entry   # the export inverse restores the stored layout
        if np.prod(hf_shape) <= 2 ** 22:
            x = np.arange(int(np.prod(hf_shape)), dtype=np.float32).reshape(hf_shape)
            np.testing.assert_array_equal(to_ours.inverse(to_ours(x), hf_shape), x)


@pytest.mark.parametrize("name", ["tiny", "7b", "qwen2_5_vl-tiny", "qwen2_5_vl-7b", "qwen2_5_vl-3b",
                                  "qwen3_vl-tiny", "qwen3_vl-4b", "qwen3_vl-8b"])
def test_config_round_trips_through_transformers(name):
    import transformers
    cfg = C.preset(name)
    d = cfg.to_hf_dict()
    assert C.Qwen2VLConfig.from_hf_dict(d) == cfg
    hfc = getattr(transformers, cfg.family.architecture.replace("ForConditionalGeneration", "Config"))(**d)
    assert C.Qwen2VLConfig.from_hf_dict(hfc.to_dict()) == cfg
    if cfg.model_type == "qwen2_5_vl":   # the field meanings: ViT width vs merger output
        assert (hfc.vision_config.hidden_size, hfc.vision_config.out_hidden_size) == (cfg.vision.embed_dim,
                                                                                      cfg.text.hidden_size)


@pytest.mark.parametrize("name", ["tiny", "qwen2_5_vl-tiny", "qwen3_vl-tiny"])
def test_part_prefixes_agree_with_the_optimizer(name):
    cfg = C.preset(name)
    fam = families.get(cfg.model_type)
    rules = optim.Groups(("vit", "merger", "llm"))
    for path in _shapes(cfg):
        assert fam.part_of(path) == optim.part_of(path) == rules.label(path), path
    assert {fam.part_of(p) for p in _shapes(cfg)} == {"vit", "merger", "llm"}


def test_released_qwen2_5_vl_config_json_reads():
    """The 7B's config.json as published (flat text keys, `in_chans`, `rope_scaling` of type mrope)."""
    d = {"architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl", "hidden_size": 3584,
         "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
         "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "max_position_embeddings": 128000, "vocab_size": 152064,
         "tie_word_embeddings": False, "bos_token_id": 151643, "eos_token_id": 151645, "image_token_id": 151655,
         "video_token_id": 151656, "vision_start_token_id": 151652, "vision_end_token_id": 151653,
         "vision_token_id": 151654, "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
         "vision_config": {"depth": 32, "hidden_act": "silu", "hidden_size": 1280, "intermediate_size": 3420,
                           "num_heads": 16, "in_chans": 3, "out_hidden_size": 3584, "patch_size": 14,
                           "spatial_merge_size": 2, "spatial_patch_size": 14, "window_size": 112,
                           "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2,
                           "temporal_patch_size": 2}}
    assert C.Qwen2VLConfig.from_hf_dict(d) == C.preset("qwen2_5_vl-7b").replace(pad_token_id=151643)
