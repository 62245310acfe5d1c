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

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from qwen2vl_jax import target
from qwen2vl_jax.config import VisionConfig
from qwen2vl_jax.model import rope
from qwen2vl_jax.model.attention import attention
from qwen2vl_jax.model.layers import LayerNorm, RMSNorm, dense, linear, quick_gelu, remat_policy


def vision_norm(c: VisionConfig, name: str, **kw):
    if c.norm == "rmsnorm":
        return RMSNorm(1e-6, name=name, axis_name="vit_norm", **kw)
    return LayerNorm(name=name, axis_name="vit_norm", **kw)


class FusedQKV(nn.Dense):
    """The ViT's fused attention input projection, stored as the reference stores it: one (E, 3E) kernel and
    (3E,) bias whose output is [q | k | v], heads contiguous inside each (so HF checkpoints, LoRA and the
    param rules see one Dense layer). Computed so that each of q, k and v splits over heads on the tensor
    axis (`vit_heads`) as the LLM's q/k/v do: a contiguous split of the fused 3E output
    would give a chip a mix of q, k and v heads, and the split into q/k/v would then all-gather the whole
    qkv over `tensor` per layer. Here the kernel is read as (E, 3, E) with the last axis over `tensor`, one
    dot gives (..., 3, E) and only the weight (E x 3E / tensor per chip) moves, once per layer. On the CPU
    it is one (E, 3E) dot through `layers.linear` (the weight gradient XLA:CPU computes fastest), returned
    fused, (B, P, 3E). Elsewhere returns (q, k, v), each (B, P, E)."""

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features), self.param_dtype)
        bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype) if self.use_bias else None
        x, kernel, bias = self.promote_dtype(x, kernel, bias, dtype=self.dtype)
        e, n = x.shape[-1], self.features // 3
        if target.platform() == "cpu":   # one (E, 3E) dot through `linear`'s CPU weight gradient: [q | k | v]
            y = linear(x, kernel, (((x.ndim - 1,), (0,)), ((), ())), precision=self.precision)
            return y if bias is None else y + bias
        # (E, 3E) -> (E, 3, E): q, k, v side by side, each one's heads over `tensor`
        w = nn.with_logical_constraint(kernel.reshape(e, 3, n), ("vit_embed", None, "vit_heads"))
        y = jax.lax.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())), precision=self.precision)
        if bias is not None:
            y = y + nn.with_logical_constraint(bias.reshape(3, n), (None, "vit_heads"))
        y = nn.with_logical_constraint(y, ("batch", "patches", None, "vit_heads"))
        return y[..., 0, :], y[..., 1, :], y[..., 2, :]


def fused_qkv(features: int, *, name: str, dtype, param_dtype, init_std: float = 0.02) -> FusedQKV:
    """The ViT's qkv layer with the params `dense` would give it: logical axes (vit_embed, vit_qkv)."""
    axes = ("vit_embed", "vit_qkv")
    return FusedQKV(features, use_bias=True, dtype=dtype, param_dtype=param_dtype, name=name, dot_general=linear,
                    kernel_init=nn.with_logical_partitioning(nn.initializers.normal(init_std), axes),
                    bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), axes[-1:]))


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
        qkv = fused_qkv(3 * e, name="qkv", **kw)(h)
        if isinstance(qkv, tuple):   # q, k, v (B, P, E) each, heads split over the tensor axis
            q, k, v = (y.reshape(b, p, c.num_heads, c.head_dim) for y in qkv)
        else:   # the fused output (on the CPU, or an adapted / quantised qkv, which lora.py computes as one Dense)
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
            act = quick_gelu if c.hidden_act == "quick_gelu" else functools.partial(nn.gelu, approximate=True)
            h = act(dense(c.mlp_dim, ("vit_embed", "vit_mlp"), use_bias=True, name="fc1", **kw)(h))
            x = x + dense(e, ("vit_mlp", "vit_embed"), use_bias=True, name="fc2", **kw)(h)
        return nn.with_logical_constraint(x, ("batch", "patches", "vit_act")), None


class PatchMerger(nn.Module):
    """Norm per patch (the blocks' kind), 4 consecutive rows -> 4E, then Linear-GELU(erf)-Linear to the LLM width.
    `postshuffle` (the DeepStack mergers): the norm runs over the 4E concatenation instead."""
    config: VisionConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    postshuffle: bool = False

    @nn.compact
    def __call__(self, x):   # (B, P, E) -> (B, P/4, D)
        c = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        b, p, e = x.shape
        if self.postshuffle:
            x = vision_norm(c, "ln_q", **kw)(x.reshape(b, p // c.merge_unit, c.merge_unit * e))
        else:
            x = vision_norm(c, "ln_q", **kw)(x)
        x = x.reshape(b, p // c.merge_unit, c.merge_unit * e)
        x = dense(c.merge_unit * e, ("vit_merge", "vit_merge_mlp"), use_bias=True, name="mlp_0", **kw)(x)
        x = nn.gelu(x, approximate=False)
        return dense(c.hidden_size, ("vit_merge_mlp", "embed"), use_bias=True, name="mlp_2", **kw)(x)


class DeepStackBlock(nn.Module):
    """A ViT block that also keeps its output when it feeds a DeepStack merger: the carry holds the block
    output and the (levels, B, P, E) features kept so far; `slot` is this block's level or -1. The block's
    params live in this module's scope (the same paths as a plain stack); a remat policy applies to the block
    alone, so the kept features are never saved per block."""
    config: VisionConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    attn_impl: str = "auto"
    remat: str | None = None

    @nn.compact
    def __call__(self, carry, cos, sin, segment_ids, window_ids, full, slot):
        x, kept = carry
        block = VisionBlock
        if self.remat not in (None, "none"):
            block = nn.remat(block, policy=remat_policy(self.remat), prevent_cse=False)
        inner = block(self.config, self.dtype, self.param_dtype, self.attn_impl)
        nn.share_scope(self, inner)
        x, _ = inner(x, cos, sin, segment_ids, window_ids, full)
        hit = (jnp.arange(kept.shape[0]) == slot)[:, None, None, None]
        return (x, jnp.where(hit, x[None].astype(kept.dtype), kept)), None


def interpolated_positions(table, patch_positions, segment_ids):
    """The learned (side*side, E) position table resized bilinearly to each image's grid, per patch row, as the
    reference's `fast_pos_embed_interpolate`: grid row r of an h-row image samples the table at
    linspace(0, side - 1, h)[r], and likewise for columns. Each image's (h, w) is read off its patch segment
    (the largest position in it + 1), so the packed batch needs no extra fields."""
    n = table.shape[0]
    side = int(round(n ** 0.5))
    pos = patch_positions.astype(jnp.int32)                                    # (B, P, 2)

    def extent(p, seg):   # (P, 2), (P,) -> (P, 2) grid sides of each patch's image
        top = jax.ops.segment_max(p, seg, num_segments=p.shape[0] + 1)
        return top[seg] + 1
    hw = jax.vmap(extent)(pos, segment_ids.astype(jnp.int32))
    i, size = pos.astype(jnp.float32), hw.astype(jnp.float32)
    # torch.linspace in f32: start + step * i in the first half, end - step * (steps - 1 - i) in the second.
    end = jnp.float32(side - 1)
    step = end / jnp.maximum(size - 1, 1)
    first = i < jnp.floor(size / 2)
    val = jnp.where(first, i * step, end - step * (size - 1 - i))
    val = jnp.where(size > 1, val, 0.0)
    lo = val.astype(jnp.int32)
    hi = jnp.minimum(lo + 1, side - 1)
    d = val - lo.astype(jnp.float32)
    dh, dw = d[..., 0:1], d[..., 1:2]
    idx = [lo[..., 0] * side + lo[..., 1], lo[..., 0] * side + hi[..., 1],
           hi[..., 0] * side + lo[..., 1], hi[..., 0] * side + hi[..., 1]]
    wts = [(1 - dh) * (1 - dw), (1 - dh) * dw, dh * (1 - dw), dh * dw]
    out = None
    for ix, wt in zip(idx, wts):
        term = jnp.take(table, ix, axis=0) * wt.astype(table.dtype)
        out = term if out is None else out + term
    return out


class VisionTower(nn.Module):
    config: VisionConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    remat: str | None = None
    attn_impl: str = "auto"

    @nn.compact
    def __call__(self, patches, segment_ids, patch_positions, window_ids=None):
        """Merged tokens (B, P/4, D); with DeepStack levels, also their features (levels, B, P/4, D)."""
        c = self.config
        if c.window_size and window_ids is None:
            raise ValueError("this vision tower attends in windows: the batch needs patch_window_ids "
                             "(the packer and batch_from_hf write them)")
        if patches.shape[1] % c.merge_unit:
            raise ValueError(f"patch budget P={patches.shape[1]} must be a multiple of {c.merge_unit}")
        # As the reference: pixels are cast to the compute dtype before the patch embedding.
        x = dense(c.embed_dim, ("vit_patch", "vit_embed"), use_bias=c.patch_bias, name="patch_embed",
                  dtype=self.dtype, param_dtype=self.param_dtype)(patches.astype(self.dtype))
        if c.num_position_embeddings:
            table = self.param("pos_embed", nn.with_logical_partitioning(
                nn.initializers.normal(0.02), (None, "vit_embed")), (c.num_position_embeddings, c.embed_dim),
                self.param_dtype)
            x = x + interpolated_positions(table.astype(self.dtype), patch_positions, segment_ids)
        x = nn.with_logical_constraint(x, ("batch", "patches", "vit_act"))
        cos, sin = rope.vision_cos_sin(patch_positions, c.head_dim, c.rope_theta)
        if c.deepstack_visual_indexes:
            return self._deepstack(x, cos, sin, segment_ids)
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

    def _deepstack(self, x, cos, sin, segment_ids):
        """The blocks as one scan that keeps the outputs of `deepstack_visual_indexes`; returns the merged
        tokens (B, P/4, D) and the DeepStack features (levels, B, P/4, D)."""
        c = self.config
        levels = c.deepstack_visual_indexes
        blocks = nn.scan(DeepStackBlock, variable_axes={"params": 0}, split_rngs={"params": True},
                         in_axes=(nn.broadcast,) * 5 + (0,), length=c.depth,
                         metadata_params={nn.PARTITION_NAME: "layers"})
        slot = jnp.asarray([levels.index(i) if i in levels else -1 for i in range(c.depth)], jnp.int32)
        full = jnp.ones((), bool)
        kept = jnp.zeros((len(levels), *x.shape), x.dtype)
        (x, kept), _ = blocks(c, self.dtype, self.param_dtype, self.attn_impl, self.remat, name="blocks")(
            (x, kept), cos, sin, segment_ids, None, full, slot)
        merged = PatchMerger(c, self.dtype, self.param_dtype, name="merger")(x)
        return merged, DeepStackMergers(c, self.dtype, self.param_dtype, name="deepstack")(kept)


class DeepStackMergers(nn.Module):
    """One post-shuffle-norm PatchMerger per DeepStack level: (levels, B, P, E) -> (levels, B, P/4, D)."""
    config: VisionConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, kept):
        return jnp.stack([PatchMerger(self.config, self.dtype, self.param_dtype, postshuffle=True, name=str(j))(k)
                          for j, k in enumerate(kept)])
