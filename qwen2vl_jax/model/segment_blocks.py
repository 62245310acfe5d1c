"""Which blocks of a packed row can meet, computed on the device from the segment ids, in O(L).

A packed row holds examples as contiguous runs of increasing non-zero segment ids (0 = padding). A query at
position p then meets exactly the keys of its own run (up to p when causal), so every query block meets one
contiguous range [lo, hi) of key blocks, and every key block one range of query blocks. The block-sparse
kernels (splash.py on TPU, pallas_gpu.py on GPU) visit only those ranges.

`reach` gives, per position, the first and last position on the other side that it can meet; a kernel
reduces them over its own block (min of the first, max of the last), so forward and backward kernels with
different block sizes each get exact ranges. Padding positions reach nothing and add nothing to a range.

The run structure is checked on the device (`layout_ok`): where a row breaks it (an id in two runs, or
query and key ids that differ), `reach` reports the full row (the causal triangle), which is correct for any
mask and costs what a dense kernel costs.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def layout_ok(q_seg, kv_seg):
    """(B,) bool: query and key ids are the same row, and its non-zero runs carry strictly increasing ids (so
    each id is one contiguous run)."""
    if q_seg.shape != kv_seg.shape:
        return jnp.zeros(q_seg.shape[:1], bool)
    prev = jnp.pad(kv_seg[:, :-1], ((0, 0), (1, 0)))
    seen = jax.lax.cummax(prev, axis=1)   # largest id before each position
    starts = (kv_seg != 0) & (kv_seg != prev)
    return jnp.all(q_seg == kv_seg, axis=1) & jnp.all(~starts | (kv_seg > seen), axis=1)


def _run_bounds(seg):
    """(B, L) -> first and last position of the run holding each position."""
    b, n = seg.shape
    pos = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (b, n))
    change = seg[:, 1:] != seg[:, :-1]
    is_start = jnp.pad(change, ((0, 0), (1, 0)), constant_values=True)
    is_end = jnp.pad(change, ((0, 0), (0, 1)), constant_values=True)
    start = jax.lax.cummax(jnp.where(is_start, pos, 0), axis=1)
    end = jax.lax.cummin(jnp.where(is_end, pos, n - 1), axis=1, reverse=True)
    return pos, start, end


def reach(q_seg, kv_seg, causal: bool):
    """Per position, the inclusive [first, last] positions of the other side it can meet; int32 (B, L) each.

    Returns (q_first, q_last): keys a query meets; (k_first, k_last): queries a key is met by. Padding gives
    first = L, last = -1 (empty). Rows failing `layout_ok` reach the whole row (causal: the triangle)."""
    b, n = kv_seg.shape
    pos, start, end = _run_bounds(kv_seg)
    real = kv_seg != 0
    q_first = jnp.where(real, start, n)
    q_last = jnp.where(real, pos if causal else end, -1)
    k_first = jnp.where(real, pos if causal else start, n)
    k_last = jnp.where(real, end, -1)
    ok = layout_ok(q_seg, kv_seg)[:, None]
    full_last = pos if causal else jnp.full_like(pos, n - 1)
    q_first, q_last = jnp.where(ok, q_first, 0), jnp.where(ok, q_last, full_last)
    k_first, k_last = jnp.where(ok, k_first, pos if causal else 0), jnp.where(ok, k_last, n - 1)
    return (q_first, q_last), (k_first, k_last)


def block_ranges(first, last, block: int, other_block: int):
    """Per block of `block` positions, the [lo, hi) range of `other_block`-sized blocks on the other side;
    (B, L // block) int32 each. A block that meets nothing gets lo == hi, a valid block index all the same
    (kernels may still name it as the block not to fetch)."""
    b, n = first.shape
    lo = jnp.minimum(first.reshape(b, n // block, block).min(-1) // other_block, n // other_block - 1)
    hi = last.reshape(b, n // block, block).max(-1) // other_block + 1
    return lo, jnp.maximum(hi, lo)


def range_bound(max_segment_len: int, block: int, other_block: int, n_other: int, causal: bool) -> int:
    """Static bound on the range length of any block when no segment is longer than `max_segment_len`: the
    block's positions reach at most max_segment_len - 1 beyond each edge (only forward when causal, since a
    query reaches back and a key forward)."""
    span = block + (max_segment_len - 1) * (1 if causal else 2)
    return max(1, min(n_other, math.ceil(span / other_block) + 1))


def computed_fraction(seg, block: int, other_block: int, causal: bool, keys: bool = False,
                      min_one: bool = False) -> float:
    """Fraction of the block pairs a dense flash kernel visits (all of them; causal: those on or below the
    diagonal) that the block-sparse one visits. seg (B, L), L a multiple of both block sizes; `block` is the
    size of the blocks that own the loop (query blocks, or key blocks with `keys`); `min_one`: a block with
    an empty range still visits one (splash)."""
    (qf, ql), (kf, kl) = reach(seg, seg, causal)
    lo, hi = block_ranges(kf, kl, block, other_block) if keys else block_ranges(qf, ql, block, other_block)
    visited = jnp.maximum(hi - lo, 1 if min_one else 0).sum()
    n, n_other = lo.shape[1], seg.shape[1] // other_block
    edge = (jnp.arange(n) * block if keys else (jnp.arange(n) + 1) * block - 1) // other_block
    per_block = (n_other - edge if keys else edge + 1) if causal else jnp.full(n, n_other)
    return float(visited / (seg.shape[0] * per_block.sum()))
