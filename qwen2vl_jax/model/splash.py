"""TPU attention over packed rows: jax's splash kernel, visiting only the blocks whose segments can meet.

The production splash kernel takes its block sparsity as `MaskInfo` arrays that live in scalar memory:
`data_next` (which key block grid step j loads), `block_mask` (0 = skip the step). Built from a static mask
they make splash visit every block of a packed row; here they are built on the device from the segment ids
(segment_blocks.py): query block i visits key blocks lo_i .. lo_i + W - 1, steps past hi_i are skipped and
repeat the last block index, so they neither compute nor fetch anything. The dK/dV pass takes the transposed
layout (W, key blocks) of query-block ranges. Segment ids still mask inside blocks, and the causal mask comes
from the kernel's mask function, so block ranges only decide what is skipped, never what is computed.

The grid width W is static, and a W smaller than some block's range silently drops blocks. So the kernel is
compiled for a few widths: the number of key blocks (always enough), quarters of it, and, when the caller
knows the longest segment (`max_segment_len`: from the bucket, `image_max_pixels`, ...), the width that
bound implies. At run time the batch's widest range picks the narrowest width that holds it (`lax.switch`;
only the branch taken runs, and the branches share their residual buffers). A batch breaking the expected
bound (a longer segment, ids that are not one run each) takes a wider grid: slower, never wrong. Skipped
grid steps fetch and compute nothing but still cost a step each, which is why W matters on a TPU.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask_info as mi

from qwen2vl_jax.model.segment_blocks import block_ranges, range_bound, reach

LANES = 128   # splash blocks are multiples of the TPU lane width


def _causal(q_ids, kv_ids):
    return q_ids >= kv_ids


def _mask_info(lo, hi, width, q_sequence, transposed):
    """Per row MaskInfo (leading axis B, then 1 head) for ranges lo, hi (B, n): step t visits lo + t."""
    t = jnp.arange(width, dtype=jnp.int32)
    idx = lo[:, :, None] + t                                        # (B, n, W)
    data_next = jnp.minimum(idx, jnp.maximum(hi, lo + 1)[:, :, None] - 1)
    block_mask = idx < hi[:, :, None]
    if transposed:
        data_next, block_mask = data_next.transpose(0, 2, 1), block_mask.transpose(0, 2, 1)
    return mi.MaskInfo(data_next=data_next[:, None].astype(jnp.int16), mask_next=None,
                       block_mask=block_mask[:, None].astype(jnp.int8), partial_mask_blocks=None,
                       q_sequence=q_sequence)


def _own_block_if_empty(lo, hi, block, other_block):
    """Query blocks of padding only still visit one block (their diagonal one), so the kernel's softmax
    denominator is never 0 (splash divides by it unguarded); their rows are zeroed afterwards. Linear cost."""
    own = (jnp.arange(lo.shape[1], dtype=jnp.int32) * block // other_block)[None]
    empty = hi <= lo
    return jnp.where(empty, own, lo), jnp.where(empty, own + 1, hi)


def splash_attention(q, k, v, q_segment_ids, kv_segment_ids, *, causal, scale, interpret=False, block=512,
                     max_segment_len=None):
    """q (B, L, H, D); k, v (B, L, Hkv, D), H a multiple of Hkv; one packed row per batch entry. Padding
    (segment 0) rows give zeros. `max_segment_len`: a static bound on segment length that sets the grid width
    (see the module docstring). `interpret`: run through the Pallas interpreter (CPU tests)."""
    b, lq, h, d = q.shape
    lk = k.shape[1]
    if lq != lk:
        raise ValueError(f"splash attention takes one packed row per batch entry (query length {lq} == key "
                         f"length {lk}); use impl='xla' for decoding")
    bs = min(block, _round_up(lq, LANES))
    n = _round_up(lq, bs)
    nb = n // bs
    qs, ks = (_pad(x.astype(jnp.int32), n) for x in (q_segment_ids, kv_segment_ids))
    (q_first, q_last), (k_first, k_last) = reach(qs, ks, causal)
    lo, hi = _own_block_if_empty(*block_ranges(q_first, q_last, bs, bs), bs, bs)
    klo, khi = block_ranges(k_first, k_last, bs, bs)

    qh = (_pad(q * jnp.asarray(scale, q.dtype), n)).transpose(0, 2, 1, 3)   # (B, H, L, D)
    kh, vh = (_pad(x, n).transpose(0, 2, 1, 3) for x in (k, v))                # (B, Hkv, L, D)
    run = functools.partial(splash_rows, qh, kh, vh, qs, ks, causal=causal, block=bs, interpret=interpret)
    widths = grid_widths(nb, None if max_segment_len is None else range_bound(max_segment_len, bs, bs, nb, causal))
    if len(widths) == 1:
        out = run(lo, hi, klo, khi, width=nb)
    else:
        need = jnp.maximum((hi - lo).max(), (khi - klo).max())
        pick = (need > jnp.asarray(widths[:-1])).sum()   # the narrowest width >= need; the last is nb
        out = jax.lax.switch(pick, [functools.partial(run, width=w) for w in widths], lo, hi, klo, khi)
    out = out.transpose(0, 2, 1, 3)[:, :lq]
    return jnp.where((q_segment_ids != 0)[..., None, None], out, 0)


def grid_widths(n_blocks: int, bound: int | None = None) -> list[int]:
    """The static grid widths compiled, ascending: every 4x step down from the full width (to 2), and `bound`."""
    widths, w = {n_blocks}, n_blocks // 4
    while w >= 2:
        widths.add(w)
        w //= 4
    if bound is not None:
        widths.add(bound)
    return sorted(widths)


def splash_rows(qh, kh, vh, qs, ks, lo, hi, klo, khi, *, width, causal, block, interpret):
    """The kernel over a batch of rows: qh (B, H, L, D), kh, vh (B, Hkv, L, D), segment ids (B, L), query-block
    ranges lo, hi (B, L // block) and key-block ranges klo, khi, all visited in `width` grid steps (callers
    make sure that is enough). Returns (B, H, L, D)."""
    q_sequence = jnp.arange(qs.shape[1], dtype=jnp.int32) if causal else None
    fwd = _mask_info(lo, hi, width, q_sequence, transposed=False)
    dkv = _mask_info(klo, khi, width, q_sequence, transposed=True)
    sizes = sk.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                          block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)

    def row(fwd, dkv, q, k, v, qs, ks):
        kernel = sk.SplashAttentionKernel(
            fwd, fwd, dkv, block_sizes=sizes, is_mqa=False, save_residuals=False,
            mask_value=sk.DEFAULT_MASK_VALUE, attn_logits_soft_cap=None, residual_checkpoint_name=None,
            mask_function=_causal if causal else None, interpret=interpret)
        return kernel(q, k, v, sk.SegmentIds(q=qs, kv=ks))

    # MaskInfo is per row: vmap maps the kernel over the batch (a sequential loop of whole-row kernels)
    info_axes = mi.MaskInfo(0, None, 0, None, None)
    return jax.vmap(row, in_axes=(info_axes, info_axes, 0, 0, 0, 0, 0))(fwd, dkv, qh, kh, vh, qs, ks)


def _pad(x, n):
    extra = n - x.shape[1]
    return x if not extra else jnp.pad(x, [(0, 0), (0, extra)] + [(0, 0)] * (x.ndim - 2))


def _round_up(n, m):
    return -(-n // m) * m
