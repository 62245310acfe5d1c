"""Configs: presets against the published parameter counts, HF config.json in both forms, validation."""

import jax
import numpy as np
import pytest

import qwen2vl_jax as qv
from qwen2vl_jax.api import abstract_params
from qwen2vl_jax.model.qwen2vl import Qwen2VLModule


def _count(tree):
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


# Exact totals (docs/design.md, "Model sizes"), vision tower incl. merger, counted by the reference on the meta device.
@pytest.mark.parametrize("name,total,vision", [
    ("2b", 2_208_985_600, 665_271_296),
    ("7b", 8_291_375_616, 675_759_104),
    ("72b", 73_405_560_320, 699_356_672),
])
def test_preset_parameter_counts(name, total, vision):
    params = abstract_params(Qwen2VLModule(qv.preset(name)))
    params = jax.tree.map(lambda x: x, params, is_leaf=lambda x: hasattr(x, "unbox"))
    from flax.linen import meta
    params = meta.unbox(params)
    assert _count(params) == total
    assert _count(params["visual"]) == vision


def test_reads_flat_legacy_config():
    d = {"model_type": "qwen2_vl", "hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28,
         "num_attention_heads": 12, "num_key_value_heads": 2, "vocab_size": 151936, "rms_norm_eps": 1e-6,
         "rope_theta": 1e6, "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
         "tie_word_embeddings": True,
         "vision_config": {"hidden_size": 1536, "in_chans": 3, "model_type": "qwen2_vl", "spatial_patch_size": 14}}
    assert qv.Qwen2VLConfig.from_hf_dict(d) == qv.preset("2b")


def test_reads_nested_v5_config():
    d = {"model_type": "qwen2_vl", "tie_word_embeddings": False, "image_token_id": 151655,
         "text_config": {"hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
                         "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064,
                         "rms_norm_eps": 1e-6,
                         "rope_parameters": {"rope_type": "default", "mrope_section": [16, 24, 24],
                                             "rope_theta": 1e6}},
         "vision_config": {"depth": 32, "embed_dim": 1280, "num_heads": 16, "hidden_size": 3584,
                           "model_type": "qwen2_vl_vision"}}
    assert qv.Qwen2VLConfig.from_hf_dict(d) == qv.preset("7b")


@pytest.mark.parametrize("name", ["tiny", "2b", "7b", "72b"])
def test_hf_dict_round_trip(name):
    c = qv.preset(name)
    assert qv.Qwen2VLConfig.from_hf_dict(c.to_hf_dict()) == c


def test_hf_reads_our_config(tmp_path):
    import transformers
    c = qv.preset("7b")
    c.save_pretrained(str(tmp_path))
    hfc = transformers.AutoConfig.from_pretrained(str(tmp_path))
    assert hfc.model_type == "qwen2_vl"
    assert hfc.text_config.rope_scaling["mrope_section"] == [16, 24, 24]
    assert hfc.vision_config.hidden_size == 3584 and hfc.text_config.num_key_value_heads == 4


def test_mrope_section_must_sum_to_half_head_dim():
    with pytest.raises(qv.ConfigError, match=r"mrope_section \[16, 24, 24\] sums to 64, but must sum to "
                                             r"head_dim/2 = 8"):
        qv.Qwen2VLConfig(vision=qv.VisionConfig(embed_dim=32, num_heads=4, hidden_size=64),
                         text=qv.TextConfig(vocab_size=1000, hidden_size=64, num_attention_heads=4,
                                            num_key_value_heads=2))


def test_vision_output_must_match_llm_width():
    with pytest.raises(qv.ConfigError, match=r"vision hidden_size \(merger output\) 3584 != text hidden_size 1536"):
        qv.Qwen2VLConfig(text=qv.TextConfig(hidden_size=1536, num_attention_heads=12, num_key_value_heads=2))


def test_unknown_preset():
    with pytest.raises(qv.ConfigError, match="unknown preset 'huge'"):
        qv.preset("huge")
