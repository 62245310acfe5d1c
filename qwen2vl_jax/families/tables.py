"""Pieces of the HF key tables that families share, and the transforms between the two layouts.

An entry is `(our path, hf name, per-layer count or None, to_ours, hf shape)`; `to_ours` maps the stored torch
tensor to our layout and `to_ours.inverse(ours, hf_shape)` maps back (the exporter uses it).
"""

from __future__ import annotations

import numpy as np


class Transform:
    """A stored-tensor -> our-layout map with its inverse."""

    def __init__(self, name, fwd, inv):
        self.name, self._fwd, self._inv = name, fwd, inv

    def __call__(self, t):
        return self._fwd(t)

    def inverse(self, a, hf_shape):
        return self._inv(a, hf_shape)

    def __repr__(self):
        return f"Transform({self.name})"


SAME = Transform("same", lambda t: t, lambda a, shape: a)
LINEAR = Transform("linear", lambda t: t.T, lambda a, shape: a.T)                  # torch (out, in) <-> (in, out)
# Conv3d (E, C, T, p, p) -> a Dense kernel over the flattened (C, T, p, p) patch rows.
PATCH = Transform("patch", lambda w: w.reshape(w.shape[0], -1).T, lambda a, shape: np.asarray(a).T.reshape(shape))


def kernel_or_not(ours: str) -> Transform:
    return LINEAR if ours.endswith("kernel") else SAME


def patch_embed_entry(v):
    return (("visual", "patch_embed", "kernel"), "visual.patch_embed.proj.weight", None, PATCH,
            (v.embed_dim, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size))


def block_entries(v, blocks):
    """ViT block entries, stacked over `v.depth` layers: (`norm1/scale`, `norm1.weight`, shape) rows."""
    return [(("visual", "blocks", *ours.split("/")), f"visual.blocks.{{i}}.{hf}", v.depth, kernel_or_not(ours), shape)
            for ours, hf, shape in blocks]


def merger_entries(v, layernorm: bool):
    E, D, M = v.embed_dim, v.hidden_size, v.merge_unit * v.embed_dim
    rows = [("ln_q/scale", "ln_q.weight", (E,))]
    if layernorm:
        rows.append(("ln_q/bias", "ln_q.bias", (E,)))
    rows += [("mlp_0/kernel", "mlp.0.weight", (M, M)), ("mlp_0/bias", "mlp.0.bias", (M,)),
             ("mlp_2/kernel", "mlp.2.weight", (D, M)), ("mlp_2/bias", "mlp.2.bias", (D,))]
    return [(("visual", "merger", *ours.split("/")), f"visual.merger.{hf}", None, kernel_or_not(ours), shape)
            for ours, hf, shape in rows]


def qwen2_text_entries(config):
    """The Qwen2 / Qwen2.5 decoder (q/k/v biases, SwiGLU without biases) and the (untied) LM head."""
    t = config.text
    D, kv, nq, F = t.hidden_size, t.num_key_value_heads * t.head_dim, t.num_attention_heads * t.head_dim, \
        t.intermediate_size
    out = [(("model", "embed_tokens", "embedding"), "model.embed_tokens.weight", None, SAME, (t.vocab_size, D)),
           (("model", "norm", "scale"), "model.norm.weight", None, SAME, (D,))]
    for ours, hf, shape in (
        ("input_layernorm/scale", "input_layernorm.weight", (D,)),
        ("post_attention_layernorm/scale", "post_attention_layernorm.weight", (D,)),
        ("q_proj/kernel", "self_attn.q_proj.weight", (nq, D)), ("q_proj/bias", "self_attn.q_proj.bias", (nq,)),
        ("k_proj/kernel", "self_attn.k_proj.weight", (kv, D)), ("k_proj/bias", "self_attn.k_proj.bias", (kv,)),
        ("v_proj/kernel", "self_attn.v_proj.weight", (kv, D)), ("v_proj/bias", "self_attn.v_proj.bias", (kv,)),
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
