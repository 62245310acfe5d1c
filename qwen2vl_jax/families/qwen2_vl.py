"""Qwen2-VL: LayerNorm ViT blocks with a quick_gelu fc1/fc2 MLP, full attention per image, LayerNorm merger.

HF field meanings (`vision_config`): `embed_dim` is the ViT width, `hidden_size` the merger's output (the LLM
width), `mlp_ratio` the MLP's widening.
"""

from __future__ import annotations

from qwen2vl_jax.families import Family, register
from qwen2vl_jax.families.tables import block_entries, merger_entries, patch_embed_entry, qwen2_text_entries

_VISION_KEYS = ("depth", "embed_dim", "num_heads", "mlp_ratio", "hidden_size", "in_channels", "patch_size",
                "temporal_patch_size", "spatial_merge_size", "hidden_act")


def vision_from_hf(vd: dict) -> dict:
    vd = dict(vd)
    if "in_chans" in vd and "in_channels" not in vd:
        vd["in_channels"] = vd["in_chans"]
    return {k: vd[k] for k in _VISION_KEYS if k in vd}


def vision_to_hf(v) -> dict:
    return {**{k: getattr(v, k) for k in _VISION_KEYS}, "model_type": "qwen2_vl"}


def vision_table(v) -> list:
    E, F = v.embed_dim, v.mlp_dim
    blocks = [
        ("norm1/scale", "norm1.weight", (E,)), ("norm1/bias", "norm1.bias", (E,)),
        ("norm2/scale", "norm2.weight", (E,)), ("norm2/bias", "norm2.bias", (E,)),
        ("qkv/kernel", "attn.qkv.weight", (3 * E, E)), ("qkv/bias", "attn.qkv.bias", (3 * E,)),
        ("proj/kernel", "attn.proj.weight", (E, E)), ("proj/bias", "attn.proj.bias", (E,)),
        ("fc1/kernel", "mlp.fc1.weight", (F, E)), ("fc1/bias", "mlp.fc1.bias", (F,)),
        ("fc2/kernel", "mlp.fc2.weight", (E, F)), ("fc2/bias", "mlp.fc2.bias", (E,)),
    ]
    return [patch_embed_entry(v), *block_entries(v, blocks), *merger_entries(v, layernorm=True)]


FAMILY = register(Family(
    model_type="qwen2_vl", architecture="Qwen2VLForConditionalGeneration", name="Qwen2-VL",
    vision_act="quick_gelu", vision_from_hf=vision_from_hf, vision_to_hf=vision_to_hf, vision_table=vision_table,
    text_table=qwen2_text_entries,
    grounding="relative: integers in [0, 1000) of the image's width and height"))
