"""Qwen2.5-VL: RMSNorm ViT blocks with a SwiGLU MLP (biases), window attention except in
`fullatt_block_indexes`, an RMSNorm merger, and M-RoPE with absolute time for videos.

HF field meanings (`vision_config`): `hidden_size` is the ViT width (our `embed_dim`), `out_hidden_size` the
merger's output (our `hidden_size`, the LLM width), `intermediate_size` the SwiGLU width, `window_size` the
window side in pixels, `tokens_per_second` the temporal M-RoPE step per second of video.
"""

from __future__ import annotations

from qwen2vl_jax.families import Family, register
from qwen2vl_jax.families.tables import block_entries, merger_entries, patch_embed_entry, qwen2_text_entries

_SAME = ("depth", "num_heads", "in_channels", "patch_size", "temporal_patch_size", "spatial_merge_size",
         "hidden_act", "intermediate_size", "window_size", "tokens_per_second")


def vision_from_hf(vd: dict) -> dict:
    vd = dict(vd)
    if "in_chans" in vd and "in_channels" not in vd:
        vd["in_channels"] = vd["in_chans"]
    kw = {k: vd[k] for k in _SAME if k in vd}
    if "hidden_size" in vd:
        kw["embed_dim"] = vd["hidden_size"]
    if "out_hidden_size" in vd:
        kw["hidden_size"] = vd["out_hidden_size"]
    if "fullatt_block_indexes" in vd:
        kw["fullatt_block_indexes"] = tuple(int(i) for i in vd["fullatt_block_indexes"])
    # The HF class defaults, for files that leave a field out.
    kw.setdefault("tokens_per_second", 4)
    kw.setdefault("window_size", 112)
    kw.setdefault("fullatt_block_indexes", (7, 15, 23, 31))
    kw.setdefault("intermediate_size", 3420)
    kw.setdefault("hidden_act", "silu")
    return {**kw, "norm": "rmsnorm", "mlp": "swiglu"}


def vision_to_hf(v) -> dict:
    return {**{k: getattr(v, k) for k in _SAME}, "hidden_size": v.embed_dim, "out_hidden_size": v.hidden_size,
            "fullatt_block_indexes": list(v.fullatt_block_indexes), "model_type": "qwen2_5_vl"}


def vision_table(v) -> list:
    E, F = v.embed_dim, v.mlp_dim
    blocks = [
        ("norm1/scale", "norm1.weight", (E,)), ("norm2/scale", "norm2.weight", (E,)),
        ("qkv/kernel", "attn.qkv.weight", (3 * E, E)), ("qkv/bias", "attn.qkv.bias", (3 * E,)),
        ("proj/kernel", "attn.proj.weight", (E, E)), ("proj/bias", "attn.proj.bias", (E,)),
        ("gate_proj/kernel", "mlp.gate_proj.weight", (F, E)), ("gate_proj/bias", "mlp.gate_proj.bias", (F,)),
        ("up_proj/kernel", "mlp.up_proj.weight", (F, E)), ("up_proj/bias", "mlp.up_proj.bias", (F,)),
        ("down_proj/kernel", "mlp.down_proj.weight", (E, F)), ("down_proj/bias", "mlp.down_proj.bias", (E,)),
    ]
    return [patch_embed_entry(v), *block_entries(v, blocks), *merger_entries(v, layernorm=False)]


FAMILY = register(Family(
    model_type="qwen2_5_vl", architecture="Qwen2_5_VLForConditionalGeneration", name="Qwen2.5-VL",
    vision_act="silu", vision_from_hf=vision_from_hf, vision_to_hf=vision_to_hf, vision_table=vision_table,
    text_table=qwen2_text_entries,
    grounding="absolute: pixel coordinates of the resized image (the processor's smart_resize output)"))
