"""The whole model: vision tower -> merged tokens gathered into the text embeddings -> LLM -> logits.

`Qwen2VLModule` is the pure Linen module over the packed batch format (docs/design.md). Vision outputs reach the
text through `vision_index` (host-built), so no Python loop over images runs inside jit.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from qwen2vl_jax.config import Qwen2VLConfig
from qwen2vl_jax.model.layers import dense
from qwen2vl_jax.model.text import TextModel
from qwen2vl_jax.model.vision import VisionTower


class Qwen2VLModule(nn.Module):
    config: Qwen2VLConfig
    dtype: Any = jnp.float32          # activation / compute dtype
    param_dtype: Any = jnp.float32    # storage dtype of the params (f32 master weights when training in bf16)
    remat: str | None = None          # rematerialisation policy of the scanned blocks (layers.remat_policy)
    attn_impl: str = "auto"

    def setup(self):
        c, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype, remat=self.remat,
                                  attn_impl=self.attn_impl)
        self.visual = VisionTower(c.vision, **kw)
        self.model = TextModel(c.text, deepstack=len(c.vision.deepstack_visual_indexes), **kw)
        if not c.tie_word_embeddings:
            self.lm_head = dense(c.text.vocab_size, ("embed", "vocab"), use_bias=False, name="lm_head",
                                 dtype=self.dtype, param_dtype=self.param_dtype)

    def encode_vision(self, patches, patch_segment_ids, patch_positions, patch_window_ids=None):
        """(B, P, patch_dim) -> merged vision tokens (B, P/merge_unit, D)."""
        out = self.visual(patches, patch_segment_ids, patch_positions, patch_window_ids)
        return out[0] if self.config.vision.deepstack_visual_indexes else out

    def encode_vision_deepstack(self, patches, patch_segment_ids, patch_positions, patch_window_ids=None):
        """Merged vision tokens (B, P/merge_unit, D) and the DeepStack features (levels, B, P/merge_unit, D),
        None for a family without DeepStack."""
        out = self.visual(patches, patch_segment_ids, patch_positions, patch_window_ids)
        return out if self.config.vision.deepstack_visual_indexes else (out, None)

    def embed(self, input_ids, vision_tokens=None, vision_index=None):
        """Token embeddings with merged vision tokens written where `vision_index >= 0` (the reference's order)."""
        x = self.model.embed(input_ids)
        if vision_tokens is None:
            return x
        gathered = jnp.take_along_axis(vision_tokens.astype(x.dtype),
                                       jnp.maximum(vision_index, 0)[..., None], axis=1)
        return jnp.where((vision_index >= 0)[..., None], gathered, x)

    def logits(self, h):
        if self.config.tie_word_embeddings:
            return self.model.attend(h)
        return self.lm_head(h)

    def hidden(self, batch, cache=None, kv_segment_ids=None, cache_index=None):
        """Final hidden states (B, L, D) of a packed batch (and the updated cache when one is given)."""
        vision = deepstack = None
        if batch.get("patches") is not None:
            vision, deepstack = self.encode_vision_deepstack(
                batch["patches"], batch["patch_segment_ids"], batch["patch_positions"], batch.get("patch_window_ids"))
        x = self.embed(batch["input_ids"], vision, batch.get("vision_index"))
        # Padding slots (segment 0) enter as zeros whatever their ids: an id outside the vocabulary embeds to
        # NaN, and masked attention weighs a padded key by an exact 0, which 0 * NaN would still poison.
        x = jnp.where((batch["segment_ids"] != 0)[..., None], x, 0)
        if deepstack is not None:   # each level at the text positions of its merged tokens, zero elsewhere
            at = batch["vision_index"]
            gathered = jnp.take_along_axis(deepstack.astype(x.dtype), jnp.maximum(at, 0)[None, ..., None], axis=2)
            keep = ((at >= 0) & (batch["segment_ids"] != 0))[None, ..., None]
            deepstack = jnp.where(keep, gathered, 0)
        return self.model(x, batch["positions"], batch["segment_ids"], cache, kv_segment_ids, cache_index,
                          deepstack)

    def __call__(self, batch, cache=None, kv_segment_ids=None, cache_index=None):
        """Logits (B, L, vocab) of a packed batch; with a cache also returns the updated cache."""
        h, new_cache = self.hidden(batch, cache, kv_segment_ids, cache_index)
        logits = self.logits(h)
        return logits if cache is None else (logits, new_cache)
