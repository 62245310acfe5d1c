"""The vision tower: patch embedding, 2D-RoPE ViT blocks, and the 2x2 PatchMerger (docs/design.md, "Vision tower").

Input is one packed row per batch entry: `patches` (B, P, 1176) with `patch_segment_ids` (B, P) (one segment
per image and temporal slice, 0 = padding) and `patch_positions` (B, P, 2). Output is (B, P/4, D) merged
tokens in patch order.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from qwen2vl_jax.config import VisionConfig
from qwen2vl_jax.model import rope
from qwen2vl_jax.model.attention import attention
from qwen2vl_jax.model.layers import LayerNorm, dense, quick_gelu, remat_policy


class VisionBlock(nn.Module):
    config: VisionConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    attn_impl: str = "auto"

    @nn.compact
    def __call__(self, x, cos, sin, segment_ids):   # x (B, P, E)
        c = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        b, p, e = x.shape
        h = LayerNorm(name="norm1", axis_name="vit_norm", **kw)(x)
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
        h = LayerNorm(name="norm2", axis_name="vit_norm", **kw)(x)
        h = quick_gelu(dense(c.mlp_dim, ("vit_embed", "vit_mlp"), use_bias=True, name="fc1", **kw)(h))
        x = x + dense(e, ("vit_mlp", "vit_embed"), use_bias=True, name="fc2", **kw)(h)
        return nn.with_logical_constraint(x, ("batch", "patches", "vit_act")), None


class PatchMerger(nn.Module):
    """LayerNorm per patch, 4 consecutive rows -> 4E, then Linear-GELU(erf)-Linear to the LLM width."""
    config: VisionConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):   # (B, P, E) -> (B, P/4, D)
        c = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        b, p, e = x.shape
        x = LayerNorm(name="ln_q", axis_name="vit_norm", **kw)(x)
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
    def __call__(self, patches, segment_ids, patch_positions):
        c = self.config
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
                         in_axes=(nn.broadcast, nn.broadcast, nn.broadcast), length=c.depth,
                         metadata_params={nn.PARTITION_NAME: "layers"})
        x, _ = blocks(c, self.dtype, self.param_dtype, self.attn_impl, name="blocks")(x, cos, sin, segment_ids)
        return PatchMerger(c, self.dtype, self.param_dtype, name="merger")(x)
