"""Qwen3-VL: LayerNorm ViT blocks with a GELU (tanh) fc1/fc2 MLP and 16 px patches (with a bias), a learned
position table bilinearly resized to each image's grid, DeepStack mergers whose outputs are added to the first
LLM layers, the Qwen3 decoder (per-head q/k RMSNorm, no q/k/v biases, a given `head_dim`) and interleaved
M-RoPE. Videos carry their time as text: each temporal step is its own vision span after a `<t seconds>` stamp.

HF field meanings: `vision_config.hidden_size` is the ViT width (our `embed_dim`), `out_hidden_size` the merger
output (the LLM width), `num_position_embeddings` the learned table (side x side), `deepstack_visual_indexes`
the blocks feeding the DeepStack mergers. The text model is only in the nested `text_config` (with
`rope_scaling.mrope_section` and `mrope_interleaved`); checkpoints store `model.visual.*` and
`model.language_model.*` and transformers loads no other layout.
"""

from __future__ import annotations

from qwen2vl_jax.families import Family, register
from qwen2vl_jax.families.tables import LINEAR, SAME, block_entries, kernel_or_not, patch_embed_entry

_SAME = ("depth", "num_heads", "in_channels", "patch_size", "temporal_patch_size", "spatial_merge_size",
         "hidden_act", "intermediate_size", "num_position_embeddings")


def vision_from_hf(vd: dict) -> dict:
    kw = {k: vd[k] for k in _SAME if k in vd}
    if "hidden_size" in vd:
        kw["embed_dim"] = vd["hidden_size"]
    if "out_hidden_size" in vd:
        kw["hidden_size"] = vd["out_hidden_size"]
    # The HF class defaults, for files that leave a field out.
    kw["deepstack_visual_indexes"] = tuple(int(i) for i in vd.get("deepstack_visual_indexes", (8, 16, 24)))
    for k, default in (("depth", 27), ("embed_dim", 1152), ("intermediate_size", 4304), ("patch_size", 16),
                       ("num_position_embeddings", 2304), ("hidden_act", "gelu_pytorch_tanh"),
                       ("hidden_size", 3584)):
        kw.setdefault(k, default)
    return {**kw, "norm": "layernorm", "mlp": "fc", "patch_bias": True}


def vision_to_hf(v) -> dict:
    return {**{k: getattr(v, k) for k in _SAME}, "hidden_size": v.embed_dim, "out_hidden_size": v.hidden_size,
            "deepstack_visual_indexes": list(v.deepstack_visual_indexes), "model_type": "qwen3_vl"}


def _merger_rows(prefix_ours, prefix_hf, v, postshuffle: bool):
    E, D, M = v.embed_dim, v.hidden_size, v.merge_unit * v.embed_dim
    N = M if postshuffle else E
    rows = [("ln_q/scale", "norm.weight", (N,)), ("ln_q/bias", "norm.bias", (N,)),
            ("mlp_0/kernel", "linear_fc1.weight", (M, M)), ("mlp_0/bias", "linear_fc1.bias", (M,)),
            ("mlp_2/kernel", "linear_fc2.weight", (D, M)), ("mlp_2/bias", "linear_fc2.bias", (D,))]
    return [((*prefix_ours, *ours.split("/")), f"{prefix_hf}.{hf}", None, kernel_or_not(ours), shape)
            for ours, hf, shape in rows]


def vision_table(v) -> list:
    E, F = v.embed_dim, v.mlp_dim
    blocks = [
        ("norm1/scale", "norm1.weight", (E,)), ("norm1/bias", "norm1.bias", (E,)),
        ("norm2/scale", "norm2.weight", (E,)), ("norm2/bias", "norm2.bias", (E,)),
        ("qkv/kernel", "attn.qkv.weight", (3 * E, E)), ("qkv/bias", "attn.qkv.bias", (3 * E,)),
        ("proj/kernel", "attn.proj.weight", (E, E)), ("proj/bias", "attn.proj.bias", (E,)),
        ("fc1/kernel", "mlp.linear_fc1.weight", (F, E)), ("fc1/bias", "mlp.linear_fc1.bias", (F,)),
        ("fc2/kernel", "mlp.linear_fc2.weight", (E, F)), ("fc2/bias", "mlp.linear_fc2.bias", (E,)),
    ]
    out = [patch_embed_entry(v), (("visual", "patch_embed", "bias"), "visual.patch_embed.proj.bias", None, SAME, (E,)),
           (("visual", "pos_embed"), "visual.pos_embed.weight", None, SAME,
            (v.num_position_embeddings, E)),
           *block_entries(v, blocks), *_merger_rows(("visual", "merger"), "visual.merger", v, False)]
    for j in range(len(v.deepstack_visual_indexes)):
        out += _merger_rows(("visual", "deepstack", str(j)), f"visual.deepstack_merger_list.{j}", v, True)
    return out


def text_table(config) -> list:
    """The Qwen3 decoder: no q/k/v biases, RMSNorm over each head of q and k, the (untied) LM head."""
    t = config.text
    D, kv, nq, F, hd = (t.hidden_size, t.num_key_value_heads * t.head_dim, t.num_attention_heads * t.head_dim,
                        t.intermediate_size, t.head_dim)
    out = [(("model", "embed_tokens", "embedding"), "model.embed_tokens.weight", None, SAME, (t.vocab_size, D)),
           (("model", "norm", "scale"), "model.norm.weight", None, SAME, (D,))]
    for ours, hf, shape in (
        ("input_layernorm/scale", "input_layernorm.weight", (D,)),
        ("post_attention_layernorm/scale", "post_attention_layernorm.weight", (D,)),
        ("q_proj/kernel", "self_attn.q_proj.weight", (nq, D)),
        ("k_proj/kernel", "self_attn.k_proj.weight", (kv, D)),
        ("v_proj/kernel", "self_attn.v_proj.weight", (kv, D)),
        ("q_norm/scale", "self_attn.q_norm.weight", (hd,)), ("k_norm/scale", "self_attn.k_norm.weight", (hd,)),
        ("o_proj/kernel", "self_attn.o_proj.weight", (D, nq)),
        ("gate_proj/kernel", "mlp.gate_proj.weight", (F, D)),
        ("up_proj/kernel", "mlp.up_proj.weight", (F, D)),
        ("down_proj/kernel", "mlp.down_proj.weight", (D, F)),
    ):
        out.append((("model", "layers", *ours.split("/")), f"model.layers.{{i}}.{hf}", t.num_hidden_layers,
                    kernel_or_not(ours), shape))
    if not config.tie_word_embeddings:
        out.append((("lm_head", "kernel"), "lm_head.weight", None, LINEAR, (t.vocab_size, D)))
    return out


def text_from_hf(src: dict, rope: dict) -> dict:
    kw = {"explicit_head_dim": int(src.get("head_dim") or 128), "attention_bias": bool(src.get("attention_bias", False)),
          "qk_norm": True, "mrope_interleaved": bool(rope.get("mrope_interleaved", True))}
    return kw


_TEXT_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "rms_norm_eps", "rope_theta", "max_position_embeddings", "hidden_act")
_TOKEN_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")


def to_hf(c, flat: dict) -> dict:
    """The nested form of the released checkpoints: the text model in `text_config`."""
    t = c.text
    text = {**{k: getattr(t, k) for k in _TEXT_KEYS}, "head_dim": t.head_dim, "attention_bias": t.attention_bias,
            "rope_scaling": {"rope_type": "default", "mrope_section": list(t.mrope_section),
                             "mrope_interleaved": t.mrope_interleaved},
            "tie_word_embeddings": c.tie_word_embeddings, "attention_dropout": 0.0, "initializer_range": 0.02,
            "use_cache": True, "model_type": "qwen3_vl_text", **{k: getattr(c, k) for k in _TOKEN_KEYS}}
    keep = ("architectures", "model_type", "tie_word_embeddings", "torch_dtype", "vision_config",
            "bos_token_id", "eos_token_id", "pad_token_id", "vision_start_token_id", "vision_end_token_id",
            "vision_token_id", "image_token_id", "video_token_id")
    return {**{k: flat[k] for k in keep if k in flat}, "text_config": text}


def disk_name(name: str) -> str:
    if name.startswith("visual."):
        return "model." + name
    if name.startswith("model."):
        return "model.language_model." + name[len("model."):]
    return name


FAMILY = register(Family(
    model_type="qwen3_vl", architecture="Qwen3VLForConditionalGeneration", name="Qwen3-VL",
    vision_act="gelu_pytorch_tanh", vision_from_hf=vision_from_hf, vision_to_hf=vision_to_hf,
    vision_table=vision_table, text_table=text_table,
    grounding="relative: integers in [0, 1000] of the image's width and height",
    parts=(("vit", (("visual",),)), ("merger", (("visual", "merger"), ("visual", "deepstack"))),
           ("llm", (("model",), ("lm_head",)))),
    text_from_hf=text_from_hf, to_hf=to_hf, disk_name=disk_name, video_frame_spans=True))
