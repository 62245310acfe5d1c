"""The vision tower: patch embedding, 2D-RoPE ViT blocks, and the 2x2 PatchMerger (docs/design.md, "Vision tower").

Input is one packed row per batch entry: `patches` (B, P, patch_dim) with `patch_segment_ids` (B, P) (one
segment per image and temporal slice, 0 = padding), `patch_positions` (B, P, 2) and, for a family with window
attention, `patch_window_ids` (B, P) (one segment per window). Output is (B, P/merge_unit, D) merged tokens in
patch order.

The config picks the block's parts: LayerNorm + fc1/fc2 quick_gelu MLP (Qwen2-VL) or RMSNorm + SwiGLU with
biases (Qwen2.5-VL). Window attention is attention under the window segment ids: the host has put each window's
patches next to each other (`positions.vision_window_index`), so a window block is the same block-diagonal
attention as a full one, with smaller blocks, on every attention backend.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from qwen2vl_jax.config import VisionConfig
from qwen2vl_jax.model import rope
from qwen2vl_jax.model.attention import attention
from qwen2vl_jax.model.layers import LayerNorm, RMSNorm, dense, quick_gelu, remat_policy


def vision_norm(c: VisionConfig, name: str, **kw):
    if c.norm == "rmsnorm":
        return RMSNorm(1e-6, name=name, axis_name="vit_norm", **kw)
    return LayerNorm(name=name, axis_name="vit_norm", **kw)


class VisionBlock(nn.Module):
    config: VisionConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    attn_impl: str = "auto"

    @nn.compact
    def __call__(self, x, cos, sin, segment_ids, window_ids, full):   # x (B, P, E); full: () bool, this block's
        c = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        b, p, e = x.shape
        if window_ids is not None:   # a windowed family: this block attends in windows unless it is a full one
            segment_ids = jnp.where(full, segment_ids, window_ids)
        h = vision_norm(c, "norm1", **kw)(x)
        qkv = dense(3 * e, ("vit_embed", "vit_qkv"), use_bias=True, name="qkv", **kw)(h)
        # The fused output splits as [q | k | v], heads contiguous inside each.
        q, k, v = jnp.split(qkv.reshape(b, p, 3, c.num_heads, c.head_dim), 3, axis=2)
        q, k, v = q[:, :, 0], k[:, :, 0], v[:, :, 0]
        q = rope.apply_vision_rotary(q, cos, sin)
        k = rope.apply_vision_rotary(k, cos, sin)
        o = attention(q, k, v, segment_ids, segment_ids, causal=False, scale=c.head_dim ** -0.5,
                      impl=self.attn_impl)
        attn_out = dense(e, ("vit_heads", "vit_embed"), use_bias=True, name="proj", **kw)(o.reshape(b, p, e))
        x = x + nn.with_logical_constraint(attn_out, ("batch", "patches", "vit_act"))
        h = vision_norm(c, "norm2", **kw)(x)
        if c.mlp == "swiglu":
            g = dense(c.mlp_dim, ("vit_embed", "vit_mlp"), use_bias=True, name="gate_proj", **kw)(h)
            u = dense(c.mlp_dim, ("vit_embed", "vit_mlp"), use_bias=True, name="up_proj", **kw)(h)
            x = x + dense(e, ("vit_mlp", "vit_embed"), use_bias=True, name="down_proj", **kw)(nn.silu(g) * u)
        else:
            h = quick_gelu(dense(c.mlp_dim, ("vit_embed", "vit_mlp"), use_bias=True, name="fc1", **kw)(h))
            x = x + dense(e, ("vit_mlp", "vit_embed"), use_bias=True, name="fc2", **kw)(h)
        return nn.with_logical_constraint(x, ("batch", "patches", "vit_act")), None


class PatchMerger(nn.Module):
    """Norm per patch (the blocks' kind), 4 consecutive rows -> 4E, then Linear-GELU(erf)-Linear to the LLM width."""
    config: VisionConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):   # (B, P, E) -> (B, P/4, D)
        c = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        b, p, e = x.shape
        x = vision_norm(c, "ln_q", **kw)(x)
        x = x.reshape(b, p // c.merge_unit, c.merge_unit * e)
        x = dense(c.merge_unit * e, ("vit_merge", "vit_merge_mlp"), use_bias=True, name="mlp_0", **kw)(x)
        x = nn.gelu(x, approximate=False)
        return dense(c.hidden_size, ("vit_merge_mlp", "embed"), use_bias=True, name="mlp_2", **kw)(x)


class VisionTower(nn.Module):
    config: VisionConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    remat: str | None = None
    attn_impl: str = "auto"

    @nn.compact
    def __call__(self, patches, segment_ids, patch_positions, window_ids=None):
        c = self.config
        if c.window_size and window_ids is None:
            raise ValueError("this vision tower attends in windows: the batch needs patch_window_ids "
                             "(the packer and batch_from_hf write them)")
        if patches.shape[1] % c.merge_unit:
            raise ValueError(f"patch budget P={patches.shape[1]} must be a multiple of {c.merge_unit}")
        # As the reference: pixels are cast to the compute dtype before the patch embedding.
        x = dense(c.embed_dim, ("vit_patch", "vit_embed"), use_bias=False, name="patch_embed",
                  dtype=self.dtype, param_dtype=self.param_dtype)(patches.astype(self.dtype))
        x = nn.with_logical_constraint(x, ("batch", "patches", "vit_act"))
        cos, sin = rope.vision_cos_sin(patch_positions, c.head_dim, c.rope_theta)
        block = VisionBlock
        policy = remat_policy(self.remat)
        if self.remat not in (None, "none"):
            block = nn.remat(block, policy=policy, prevent_cse=False)
        blocks = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                         in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast, 0), length=c.depth,
                         metadata_params={nn.PARTITION_NAME: "layers"})
        full = jnp.asarray(c.full_attention_blocks())
        x, _ = blocks(c, self.dtype, self.param_dtype, self.attn_impl, name="blocks")(
            x, cos, sin, segment_ids, window_ids if c.window_size else None, full)
        return PatchMerger(c, self.dtype, self.param_dtype, name="merger")(x)
