"""One attention entry point: segment ids + a causal flag -> softmax(QK^T * scale) V.

Every attention in the model goes through `attention`:
- the ViT: non-causal, one segment per image and per temporal slice (block-diagonal, REFERENCE 2.5);
- the LLM: causal within packed examples, padding = segment 0;
- cached decoding: queries at cache slots `q_index` against all cache slots, causal by slot index.

The reference path materialises the (Lq, Lk) mask; the softmax runs in f32 as in the reference's eager path.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_MASKED = -0.7 * float(jnp.finfo(jnp.float32).max)   # finite, so fully masked (padding) rows stay NaN-free


def make_mask(q_segment_ids, kv_segment_ids, causal: bool, q_index=None, kv_index=None):
    """(B, 1, 1, Lq, Lk) bool: same non-zero segment, and key slot <= query slot when causal."""
    mask = (q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]) & (q_segment_ids[:, :, None] != 0)
    if causal:
        lq, lk = q_segment_ids.shape[1], kv_segment_ids.shape[1]
        qi = jnp.arange(lq)[None] if q_index is None else q_index
        ki = jnp.arange(lk)[None] if kv_index is None else kv_index
        mask &= ki[:, None, :] <= qi[:, :, None]
    return mask[:, None, None]


def attention(q, k, v, q_segment_ids, kv_segment_ids, *, causal: bool, scale: float,
              q_index=None, kv_index=None, impl: str = "xla"):
    """q (B, Lq, H, Dh); k, v (B, Lk, Hkv, Dh) with H a multiple of Hkv (GQA). Returns (B, Lq, H, Dh).

    q_index / kv_index: (B, Lq) / (B, Lk) slot numbers for the causal test; default 0..L-1.
    """
    if impl != "xla":
        raise ValueError(f"unknown attention impl {impl!r}")
    b, lq, h, dh = q.shape
    hkv = k.shape[2]
    # Query head j*g + i uses kv head j (repeat_interleave in the reference).
    qg = q.reshape(b, lq, hkv, h // hkv, dh)
    logits = jnp.einsum("bqkgd,bskd->bkgqs", qg, k, preferred_element_type=jnp.float32) * scale
    mask = make_mask(q_segment_ids, kv_segment_ids, causal, q_index, kv_index)
    logits = jnp.where(mask, logits, _MASKED)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgqs,bskd->bqkgd", probs, v)
    return out.reshape(b, lq, h, dh)
