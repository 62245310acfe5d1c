"""One attention entry point: segment ids + a causal flag -> softmax(QK^T * scale) V.

Every attention in the model goes through `attention`:
- the ViT: non-causal, one segment per image and per temporal slice (block-diagonal, as the reference);
- the LLM: causal within packed examples, padding = segment 0;
- cached decoding: queries at cache slots `q_index` against all cache slots, causal by slot index.

Backends (`impl`):
- "xla": masked dense reference path; the softmax runs in f32 as in the reference's eager path.
- "blockwise": segment-aware flash-style path (blockwise.py), cost ~ sum(n_i^2) over packed examples.
- "splash": Pallas splash attention with segment ids (TPU; `splash_interpret` runs it on CPU for tests).
- "cudnn": cuDNN flash attention (NVIDIA GPUs, bf16/f16) with the dense segment mask.
- "cudnn_packed" (experimental): cuDNN in its packed layout, each row's segments passed as (offset, length)
  runs so the kernel skips what cannot meet. Measured on an H200 (benchmarks/attention.py --full): the forward
  is 6.5x faster than "cudnn" on a packed ViT row of 16384 patches, but forward + backward was no faster and
  the 2B train step ran out of memory (201 GB asked) where "cudnn" fits. The cause, found afterwards with
  `print_saved_residuals`: cuDNN keeps softmax statistics of (runs bound, heads, L) per layer, 1 GB per ViT
  layer at the bound then used (L // 16 = 1024 runs). The bound is now 64; not re-measured on a GPU, so
  not used by "auto".
- "auto": splash on TPU; on GPUs cuDNN for bf16/f16 and xla for f32; elsewhere blockwise for long sequences
  and xla for short ones; xla for decoding everywhere.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from qwen2vl_jax.model.blockwise import blockwise_attention

_MASKED = -0.7 * float(jnp.finfo(jnp.float32).max)   # finite, so fully masked (padding) rows stay NaN-free
AUTO_BLOCKWISE_MIN_LEN = 1024   # measured: blockwise already wins on 1792-token packed rows


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

    q_index / kv_index: (B, Lq) / (B, Lk) slot numbers for the causal test (cached decoding); default 0..L-1.
    """
    cached = q_index is not None or kv_index is not None
    if impl == "auto":
        platform = jax.default_backend()
        if cached:
            impl = "xla"
        elif platform == "tpu":
            impl = "splash"
        elif platform == "gpu":   # measured on H200 (benchmarks/attention.py): blockwise loses to dense there
            impl = "cudnn" if q.dtype in (jnp.bfloat16, jnp.float16) else "xla"
        else:
            impl = "blockwise" if max(q.shape[1], k.shape[1]) >= AUTO_BLOCKWISE_MIN_LEN else "xla"
    if impl != "xla" and cached:
        raise ValueError(f"attention impl {impl!r} does not take cache slot indices; use 'xla' for decoding")
    if impl == "xla":
        return dense_attention(q, k, v, q_segment_ids, kv_segment_ids, causal=causal, scale=scale,
                               q_index=q_index, kv_index=kv_index)
    if impl == "blockwise":
        return blockwise_attention(q, k, v, q_segment_ids, kv_segment_ids, causal=causal, scale=scale)
    if impl in ("splash", "splash_interpret"):
        return splash_attention(q, k, v, q_segment_ids, kv_segment_ids, causal=causal, scale=scale,
                                interpret=impl == "splash_interpret")
    if impl == "cudnn":
        return cudnn_masked_attention(q, k, v, q_segment_ids, kv_segment_ids, causal=causal, scale=scale)
    if impl == "cudnn_packed":
        return cudnn_packed_attention(q, k, v, q_segment_ids, kv_segment_ids, causal=causal, scale=scale)
    raise ValueError(f"unknown attention impl {impl!r}; choose xla, blockwise, splash, cudnn, cudnn_packed or auto")


def dense_attention(q, k, v, q_segment_ids, kv_segment_ids, *, causal, scale, q_index=None, kv_index=None):
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


def segment_runs(segment_ids, max_runs: int):
    """(B, L) segment ids, each non-zero id one contiguous run -> cuDNN's packed layout: lengths (B, max_runs)
    and offsets (B, max_runs + 1), int32, -1 past a row's last run; and the largest run count of any row."""
    prev = jnp.pad(segment_ids[:, :-1], ((0, 0), (1, 0)))
    nxt = jnp.pad(segment_ids[:, 1:], ((0, 0), (0, 1)))
    starts = (segment_ids != 0) & (segment_ids != prev)
    ends = (segment_ids != 0) & (segment_ids != nxt)

    def row(s, e):
        first = jnp.nonzero(s, size=max_runs, fill_value=-1)[0].astype(jnp.int32)
        last = jnp.nonzero(e, size=max_runs, fill_value=-1)[0].astype(jnp.int32)
        return jnp.where(first >= 0, last - first + 1, -1), jnp.pad(first, (0, 1), constant_values=-1)

    lengths, offsets = jax.vmap(row)(starts, ends)
    return lengths, offsets, starts.sum(-1).max()


def cudnn_masked_attention(q, k, v, q_segment_ids, kv_segment_ids, *, causal, scale):
    """cuDNN flash attention with the dense (B, 1, Lq, Lk) segment mask; padding rows give zeros."""
    mask = make_mask(q_segment_ids, kv_segment_ids, causal)[:, :, 0]
    out = jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, implementation="cudnn")
    return jnp.where((q_segment_ids != 0)[..., None, None], out, 0)


def cudnn_packed_attention(q, k, v, q_segment_ids, kv_segment_ids, *, causal, scale, max_runs=64):
    """cuDNN flash attention over packed rows (NVIDIA GPUs; q, k, v in bf16 or f16). Rows hold up to
    `max_runs` segments in cuDNN's packed layout (Hopper and later); a row with
    more runs takes the blockwise path instead (both keep O(L) residuals, so the branch not taken costs no
    memory), and GPUs before Hopper get cuDNN with the dense segment mask. Padding (segment 0) rows give
    zeros, and no gradient flows through them."""
    from jax._src.cudnn import fused_attention_stablehlo as fa

    if not fa.check_compute_capability("9.0"):   # cuDNN's packed layout needs Hopper or later
        return cudnn_masked_attention(q, k, v, q_segment_ids, kv_segment_ids, causal=causal, scale=scale)
    # cuDNN saves softmax statistics of (B * max_runs, heads, Lq) for the backward pass: keep the bound small.
    q_valid, kv_valid = (q_segment_ids != 0)[..., None, None], (kv_segment_ids != 0)[..., None, None]
    q, k, v = jnp.where(q_valid, q, 0), jnp.where(kv_valid, k, 0), jnp.where(kv_valid, v, 0)
    q_len, q_off, q_runs = segment_runs(q_segment_ids, max_runs)
    kv_len, kv_off, kv_runs = segment_runs(kv_segment_ids, max_runs)
    mask_type = fa.MaskType.PADDING_CAUSAL if causal else fa.MaskType.PADDING

    def packed(q, k, v):
        return fa.dot_product_attention(q, k, v, q_seqlen=q_len, kv_seqlen=kv_len, q_offsets=q_off,
                                        kv_offsets=kv_off, scale=scale, mask_type=mask_type)

    def many_runs(q, k, v):
        return blockwise_attention(q, k, v, q_segment_ids, kv_segment_ids, causal=causal, scale=scale)

    out = jax.lax.cond(jnp.maximum(q_runs, kv_runs) > max_runs, many_runs, packed, q, k, v)
    return jnp.where(q_valid, out, 0)


def splash_attention(q, k, v, q_segment_ids, kv_segment_ids, *, causal, scale, interpret=False, block=512):
    """Pallas splash attention, one MQA kernel per kv head (GQA groups share their key/value head).

    Sequence lengths are padded to the block size with segment 0; padded keys never meet real queries.
    """
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    b, lq, h, d = q.shape
    lk, hkv = k.shape[1], k.shape[2]
    g = h // hkv
    bs = min(block, _round_up(max(lq, lk), 128))
    lq_p, lk_p = _round_up(lq, bs), _round_up(lk, bs)
    mask = sm.CausalMask((lq_p, lk_p)) if causal else sm.FullMask((lq_p, lk_p))
    kernel = sk.make_splash_mqa_single_device(
        sm.MultiHeadMask([mask] * g), block_sizes=sk.BlockSizes(block_q=bs, block_kv=bs, block_kv_compute=bs,
                                                                 block_q_dkv=bs, block_kv_dkv=bs,
                                                                 block_kv_dkv_compute=bs, block_q_dq=bs,
                                                                 block_kv_dq=bs),
        interpret=interpret)
    pad = functools.partial(_pad_len, axis=1)
    qg = pad(q * jnp.asarray(scale, q.dtype), lq_p).reshape(b, lq_p, hkv, g, d).transpose(0, 2, 3, 1, 4)
    kk = pad(k, lk_p).transpose(0, 2, 1, 3)                                          # (B, Hkv, Lk, D)
    vv = pad(v, lk_p).transpose(0, 2, 1, 3)
    qs, ks = pad(q_segment_ids, lq_p).astype(jnp.int32), pad(kv_segment_ids, lk_p).astype(jnp.int32)

    def one(qh, kh, vh, qsr, ksr):   # (G, L, D), (L, D), (L, D)
        return kernel(qh, kh, vh, segment_ids=sk.SegmentIds(q=qsr, kv=ksr))

    per_head = jax.vmap(one, in_axes=(0, 0, 0, None, None))                         # over kv heads
    out = jax.vmap(per_head)(qg, kk, vv, qs, ks)                                     # (B, Hkv, G, Lq, D)
    return out.transpose(0, 3, 1, 2, 4).reshape(b, lq_p, h, d)[:, :lq]


def _pad_len(x, n, axis):
    extra = n - x.shape[axis]
    if not extra:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths)


def _round_up(n, m):
    return -(-n // m) * m
