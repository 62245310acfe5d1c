"""The Qwen2 decoder with M-RoPE (docs/design.md, "Language model"): GQA with biased q/k/v, RMSNorm, SwiGLU.

Layers run under `nn.scan`, so compile time does not grow with depth. A KV cache, when given, is a pair of
arrays (layers, B, S, Hkv, Dh) scanned alongside the layers; keys are stored after rotation.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from qwen2vl_jax.config import TextConfig
from qwen2vl_jax.model import rope
from qwen2vl_jax.model.attention import attention
from qwen2vl_jax.model.layers import RMSNorm, dense, remat_policy

CACHE_AXES = ("layers", "batch", "cache_length", "kv_heads", "head_dim")


class DecoderLayer(nn.Module):
    config: TextConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    attn_impl: str = "auto"

    @nn.compact
    def __call__(self, x, cache, cos, sin, segment_ids, kv_segment_ids, q_index, cache_index):
        """x (B, L, D). With a cache (k, v each (B, S, Hkv, Dh)), the new keys/values are written at slot
        `cache_index` and queries attend over the whole cache; returns (x, updated cache or None)."""
        c = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        b, l, d = x.shape
        hd, nh, nkv = c.head_dim, c.num_attention_heads, c.num_key_value_heads
        h = RMSNorm(c.rms_norm_eps, name="input_layernorm", **kw)(x)
        bias = c.attention_bias
        q = dense(nh * hd, ("embed", "heads"), use_bias=bias, name="q_proj", **kw)(h).reshape(b, l, nh, hd)
        k = dense(nkv * hd, ("embed", "kv_heads"), use_bias=bias, name="k_proj", **kw)(h).reshape(b, l, nkv, hd)
        v = dense(nkv * hd, ("embed", "kv_heads"), use_bias=bias, name="v_proj", **kw)(h).reshape(b, l, nkv, hd)
        if c.qk_norm:   # Qwen3: RMSNorm over each head's width, before the rotation
            q = RMSNorm(c.rms_norm_eps, name="q_norm", axis_name="head_dim", **kw)(q)
            k = RMSNorm(c.rms_norm_eps, name="k_norm", axis_name="head_dim", **kw)(k)
        q = rope.apply_rotary(q, cos, sin)
        k = rope.apply_rotary(k, cos, sin)
        if cache is None:
            o = attention(q, k, v, segment_ids, segment_ids, causal=True, scale=hd ** -0.5, impl=self.attn_impl)
            new_cache = None
        else:
            ck, cv = cache
            ck = jax.lax.dynamic_update_slice(ck, k.astype(ck.dtype), (0, cache_index, 0, 0))
            cv = jax.lax.dynamic_update_slice(cv, v.astype(cv.dtype), (0, cache_index, 0, 0))
            o = attention(q, ck.astype(q.dtype), cv.astype(q.dtype), segment_ids, kv_segment_ids, causal=True,
                          scale=hd ** -0.5, q_index=q_index, impl=self.attn_impl)
            new_cache = (ck, cv)
        o = dense(d, ("heads", "embed"), use_bias=False, name="o_proj", **kw)(o.reshape(b, l, nh * hd))
        x = x + nn.with_logical_constraint(o, ("batch", "length", "act_embed"))
        h = RMSNorm(c.rms_norm_eps, name="post_attention_layernorm", **kw)(x)
        gate = dense(c.intermediate_size, ("embed", "mlp"), use_bias=False, name="gate_proj", **kw)(h)
        up = dense(c.intermediate_size, ("embed", "mlp"), use_bias=False, name="up_proj", **kw)(h)
        x = x + dense(d, ("mlp", "embed"), use_bias=False, name="down_proj", **kw)(nn.silu(gate) * up)
        return nn.with_logical_constraint(x, ("batch", "length", "act_embed")), new_cache


class DeepStackLayer(nn.Module):
    """A decoder layer followed by the DeepStack addition: after layer i < levels, the i-th level of vision
    features is added at the vision positions (`deepstack` (levels, B, L, D), zero elsewhere). All layers stay
    one scan over one stacked set of params: the layer's index is scanned alongside, and layers past the
    levels add nothing. The layer's params live in this module's scope (the same paths as a plain stack)."""
    config: TextConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    attn_impl: str = "auto"
    remat: str | None = None

    @nn.compact
    def __call__(self, x, cache, layer_index, cos, sin, segment_ids, kv_segment_ids, q_index, cache_index,
                 deepstack):
        layer = DecoderLayer
        if self.remat not in (None, "none"):
            layer = nn.remat(layer, policy=remat_policy(self.remat), prevent_cse=False)
        inner = layer(self.config, self.dtype, self.param_dtype, self.attn_impl)
        nn.share_scope(self, inner)
        x, new_cache = inner(x, cache, cos, sin, segment_ids, kv_segment_ids, q_index, cache_index)
        if deepstack is not None:
            levels = deepstack.shape[0]
            add = jax.lax.dynamic_index_in_dim(deepstack, jnp.minimum(layer_index, levels - 1), 0, keepdims=False)
            x = jnp.where(layer_index < levels, x + add.astype(x.dtype), x)
        return x, new_cache


class TextModel(nn.Module):
    """Embedding + decoder stack + final norm (the reference's `model.language_model`)."""
    config: TextConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    remat: str | None = None
    attn_impl: str = "auto"
    deepstack: int = 0                 # DeepStack levels added after the first layers (Qwen3-VL)

    def setup(self):
        c = self.config
        self.embed_tokens = nn.Embed(
            c.vocab_size, c.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype,
            embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), ("vocab", "embed")))
        if self.deepstack:
            self.layers = nn.scan(
                DeepStackLayer, variable_axes={"params": 0}, split_rngs={"params": True},
                in_axes=(0, 0) + (nn.broadcast,) * 7, length=c.num_hidden_layers,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )(c, self.dtype, self.param_dtype, self.attn_impl, self.remat)
            self.norm = RMSNorm(c.rms_norm_eps, dtype=self.dtype, param_dtype=self.param_dtype)
            return
        layer = DecoderLayer
        if self.remat not in (None, "none"):
            layer = nn.remat(layer, policy=remat_policy(self.remat), prevent_cse=False)
        self.layers = nn.scan(
            layer, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
            in_axes=(0,) + (nn.broadcast,) * 6, length=c.num_hidden_layers,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )(c, self.dtype, self.param_dtype, self.attn_impl)
        self.norm = RMSNorm(c.rms_norm_eps, dtype=self.dtype, param_dtype=self.param_dtype)

    def embed(self, input_ids):
        return self.embed_tokens(input_ids)

    def attend(self, h):   # tied head: logits = h @ E^T
        return self.embed_tokens.attend(h)

    def __call__(self, x, positions, segment_ids, cache=None, kv_segment_ids=None, cache_index=None,
                 deepstack=None):
        """x (B, L, D) input embeddings; positions (3, B, L); `deepstack` (levels, B, L, D) vision features
        added after the first layers (zero away from vision positions). Returns (final hidden (B, L, D), new
        cache)."""
        c = self.config
        cos, sin = rope.mrope_cos_sin(positions, c.head_dim, c.rope_theta, c.mrope_section, self.dtype,
                                      c.mrope_interleaved)
        q_index = None
        if cache is not None:
            q_index = cache_index + jnp.arange(x.shape[1], dtype=jnp.int32)[None]
        x = nn.with_logical_constraint(x, ("batch", "length", "act_embed"))
        if self.deepstack:
            layer_index = jnp.arange(c.num_hidden_layers, dtype=jnp.int32)
            x, new_cache = self.layers(x, cache, layer_index, cos, sin, segment_ids, kv_segment_ids, q_index,
                                       cache_index, deepstack)
        else:
            x, new_cache = self.layers(x, cache, cos, sin, segment_ids, kv_segment_ids, q_index, cache_index)
        return self.norm(x), new_cache
