"""Segment-aware blockwise attention: flash-style online softmax that skips block pairs whose segments
cannot meet, so a packed row of n_i-token examples costs about sum(n_i^2), not L^2.

The skip test compares the [min, max] range of non-zero segment ids of a query block with that of a key
block (plus the causal corner). Disjoint ranges cannot share an id, so the skip is exact for any layout.
Packed rows have increasing segment ids, so the kept pairs form a band around the diagonal; the loops visit
the band between a query block's first and last kept key block, and every pair inside it (the mask is
applied element-wise, so a pair that cannot meet inside the band only costs its arithmetic).

Gradients come from a hand-written backward pass (flash-attention style) that recomputes each visited
pair's probabilities once from the saved log-sum-exp and gives dq, dk and dv from them; nothing of size
L^2 is ever stored.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from qwen2vl_jax import target


def _pad(x, n, axis=1):
    extra = -x.shape[axis] % n
    if not extra:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths)


def _seg_ranges(seg, block):   # seg (B, L) -> min, max non-zero id per block (B, L/block); empty: (big, -1)
    s = seg.reshape(seg.shape[0], -1, block)
    nz = s != 0
    return jnp.where(nz, s, jnp.iinfo(jnp.int32).max).min(-1), jnp.where(nz, s, -1).max(-1)


def _block_pairs(q_seg, kv_seg, bq, bk, causal):   # (B, nq, nk) bool: may this block pair interact?
    qmn, qmx = _seg_ranges(q_seg, bq)
    kmn, kmx = _seg_ranges(kv_seg, bk)
    keep = (qmn[:, :, None] <= kmx[:, None, :]) & (kmn[:, None, :] <= qmx[:, :, None])
    if causal:
        q_last = jnp.arange(qmn.shape[1]) * bq + bq - 1
        k_first = jnp.arange(kmn.shape[1]) * bk
        keep &= k_first[None, None, :] <= q_last[None, :, None]
    return keep


def _band(keep):
    """First and one-past-last kept block of a (n,) bool row: the loops below visit only that band (packed
    rows keep a band around the diagonal), so skipped blocks outside it cost no loop iteration at all."""
    n = keep.shape[0]
    first = jnp.argmax(keep)
    stop = n - jnp.argmax(keep[::-1])
    return jnp.where(keep.any(), first, 0), jnp.where(keep.any(), stop, 0)


def _scores(qb, kb, qs, ks, qi, ki, scale, causal):
    """qb (bq, Hkv, G, D), kb (bk, Hkv, D) -> f32 scores (Hkv, G, bq, bk), -inf where the mask drops them."""
    s = jnp.einsum("qkgd,skd->kgqs", qb, kb, preferred_element_type=jnp.float32) * scale
    mask = (qs[:, None] == ks[None, :]) & (qs[:, None] != 0)
    if causal:
        mask &= ki[None, :] <= qi[:, None]
    return jnp.where(mask, s, -jnp.inf)


def _row_forward(q, k, v, qs, ks, pairs, scale, causal, bq, bk):
    """One batch row. q (Lq, Hkv, G, D), k/v (Lk, Hkv, D). Returns o like q, lse (Hkv, G, Lq)."""
    nq = q.shape[0] // bq
    hkv, g, d = q.shape[1:]

    def q_block(i):
        qb = jax.lax.dynamic_slice_in_dim(q, i * bq, bq)
        qsb = jax.lax.dynamic_slice_in_dim(qs, i * bq, bq)
        qi = i * bq + jnp.arange(bq)

        def visit(j, carry):
            m, l, acc = carry
            kb = jax.lax.dynamic_slice_in_dim(k, j * bk, bk)
            vb = jax.lax.dynamic_slice_in_dim(v, j * bk, bk)
            ksb = jax.lax.dynamic_slice_in_dim(ks, j * bk, bk)
            s = _scores(qb, kb, qsb, ksb, qi, j * bk + jnp.arange(bk), scale, causal)
            m_new = jnp.maximum(m, s.max(-1))
            shift = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
            p = jnp.exp(s - shift[..., None])
            corr = jnp.exp(m - shift)
            l = l * corr + p.sum(-1)
            acc = acc * corr[..., None] + jnp.einsum("kgqs,skd->kgqd", p.astype(v.dtype), vb,
                                                     preferred_element_type=jnp.float32)
            return m_new, l, acc

        init = (jnp.full((hkv, g, bq), -jnp.inf, jnp.float32), jnp.zeros((hkv, g, bq), jnp.float32),
                jnp.zeros((hkv, g, bq, d), jnp.float32))
        m, l, acc = jax.lax.fori_loop(*_band(pairs[i]), visit, init)
        o = acc / jnp.where(l == 0, 1.0, l)[..., None]
        lse = jnp.where(l == 0, -jnp.inf, m + jnp.log(jnp.where(l == 0, 1.0, l)))
        return o.transpose(2, 0, 1, 3).astype(q.dtype), lse

    o, lse = jax.lax.map(q_block, jnp.arange(nq))            # (nq, bq, Hkv, G, D), (nq, Hkv, G, bq)
    return o.reshape(nq * bq, hkv, g, d), lse.transpose(1, 2, 0, 3).reshape(hkv, g, nq * bq)


def _row_backward(q, k, v, qs, ks, pairs, o, lse, do, scale, causal, bq, bk):
    """One pass over the kept block pairs: each pair's probabilities are recomputed once and give its share
    of dq (summed over the query block's band) and of dk, dv (added into the whole-row buffers, which the
    loop updates in place)."""
    nq = q.shape[0] // bq
    lse_safe = jnp.where(jnp.isfinite(lse), lse, jnp.inf)                  # fully masked rows -> p = 0
    delta = jnp.einsum("qkgd,qkgd->kgq", do.astype(jnp.float32), o.astype(jnp.float32))

    def q_block(i, carry):
        dq, dk, dv = carry
        qb = jax.lax.dynamic_slice_in_dim(q, i * bq, bq)
        dob = jax.lax.dynamic_slice_in_dim(do, i * bq, bq)
        qsb = jax.lax.dynamic_slice_in_dim(qs, i * bq, bq)
        lse_b = jax.lax.dynamic_slice_in_dim(lse_safe, i * bq, bq, axis=2)
        delta_b = jax.lax.dynamic_slice_in_dim(delta, i * bq, bq, axis=2)

        def visit(j, inner):
            dq_b, dk, dv = inner
            kb = jax.lax.dynamic_slice_in_dim(k, j * bk, bk)
            vb = jax.lax.dynamic_slice_in_dim(v, j * bk, bk)
            s = _scores(qb, kb, qsb, jax.lax.dynamic_slice_in_dim(ks, j * bk, bk), i * bq + jnp.arange(bq),
                           j * bk + jnp.arange(bk), scale, causal)
            p = jnp.exp(s - lse_b[..., None])
            dp = jnp.einsum("qkgd,skd->kgqs", dob, vb, preferred_element_type=jnp.float32)
            ds = p * (dp - delta_b[..., None])
            dq_b = dq_b + jnp.einsum("kgqs,skd->qkgd", ds, kb.astype(jnp.float32)) * scale
            dv_j = jax.lax.dynamic_slice_in_dim(dv, j * bk, bk) + jnp.einsum("kgqs,qkgd->skd", p,
                                                                              dob.astype(jnp.float32))
            dk_j = jax.lax.dynamic_slice_in_dim(dk, j * bk, bk) + jnp.einsum("kgqs,qkgd->skd", ds,
                                                                              qb.astype(jnp.float32)) * scale
            return (dq_b, jax.lax.dynamic_update_slice_in_dim(dk, dk_j, j * bk, 0),
                    jax.lax.dynamic_update_slice_in_dim(dv, dv_j, j * bk, 0))

        dq_b, dk, dv = jax.lax.fori_loop(*_band(pairs[i]), visit,
                                         (jnp.zeros((bq,) + q.shape[1:], jnp.float32), dk, dv))
        return jax.lax.dynamic_update_slice_in_dim(dq, dq_b, i * bq, 0), dk, dv

    zeros = lambda x: jnp.zeros(x.shape, jnp.float32)
    dq, dk, dv = jax.lax.fori_loop(0, nq, q_block, (zeros(q), zeros(k), zeros(v)))
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8))
def _attend(q, k, v, q_seg, kv_seg, scale, causal, bq, bk):
    return _forward(q, k, v, q_seg, kv_seg, scale, causal, bq, bk)[0]


def _forward(q, k, v, q_seg, kv_seg, scale, causal, bq, bk):
    pairs = _block_pairs(q_seg, kv_seg, bq, bk, causal)
    fwd = functools.partial(_row_forward, scale=scale, causal=causal, bq=bq, bk=bk)
    o, lse = jax.lax.map(lambda a: fwd(*a), (q, k, v, q_seg, kv_seg, pairs))
    return o, (q, k, v, q_seg, kv_seg, pairs, o, lse)


def _fwd_rule(q, k, v, q_seg, kv_seg, scale, causal, bq, bk):
    # Inside the model's scanned layers, JAX's partial evaluation of the outer scan otherwise keeps the inner
    # loops' per-block masks and scores as stacked outputs, (B, nq, nk, heads, bq, bk) per layer (268 MB per
    # LLM layer at L = 1792), which the backward never reads. Under `checkpoint` the forward runs as one unit.
    fwd = jax.checkpoint(lambda *a: _forward(*a, scale, causal, bq, bk), prevent_cse=False)
    return fwd(q, k, v, q_seg, kv_seg)


def _bwd_rule(scale, causal, bq, bk, res, do):
    q, k, v, q_seg, kv_seg, pairs, o, lse = res
    bwd = functools.partial(_row_backward, scale=scale, causal=causal, bq=bq, bk=bk)
    dq, dk, dv = jax.lax.map(lambda a: bwd(*a), (q, k, v, q_seg, kv_seg, pairs, o, lse, do))
    return dq, dk, dv, None, None


_attend.defvjp(_fwd_rule, _bwd_rule)


def default_block(heads: int, head_dim: int) -> int:
    """Block size of both axes. Accelerators: 512, the large blocks their matrix units want. CPU: by the work
    of a block pair's dots, heads x head_dim: 32 up to 256, 64 below 512, else 128.

    A kept block pair is computed in full, so blocks much larger than the packed examples mostly compute
    pairs that the mask then drops; smaller blocks waste less but pay a fixed cost per loop iteration, which
    only enough work per pair hides. Measured on the CPU (2 cores, AVX-512), forward + backward of one
    layer on the realistic mix's rows of ~100-400-token examples: 1792 tokens, 4 heads x 64, causal: 43-45 ms
    at 32, 47-48 at 64, 72 at 128 (108 at 128 before the one-pass backward); 1408 patches, 4 heads x 32:
    28-30 ms at 32, 32-34 at 64, 50 at 128. Rows of one 1024-patch image, 16 heads x 80: 610 ms at 128,
    742 at 64.
    """
    if target.platform() != "cpu":
        return 512
    width = heads * head_dim
    return 32 if width <= 256 else 64 if width < 512 else 128


def blockwise_attention(q, k, v, q_segment_ids, kv_segment_ids, *, causal: bool, scale: float,
                        block_q: int | None = None, block_k: int | None = None):
    """q (B, Lq, H, D); k, v (B, Lk, Hkv, D). Positions are 0..L-1 (no cache). Returns (B, Lq, H, D).

    Query rows of segment 0 (padding) attend to nothing and return zeros. Blocks default to `default_block(H, D)`.
    """
    b, lq, h, d = q.shape
    lk, hkv = k.shape[1], k.shape[2]
    block_q, block_k = block_q or default_block(h, d), block_k or default_block(h, d)
    bq, bk = min(block_q, _round_up(lq, 8)), min(block_k, _round_up(lk, 8))
    qg = _pad(q.reshape(b, lq, hkv, h // hkv, d), bq)
    out = _attend(qg, _pad(k, bk), _pad(v, bk), _pad(q_segment_ids.astype(jnp.int32), bq),
                  _pad(kv_segment_ids.astype(jnp.int32), bk), scale, causal, bq, bk)
    return out[:, :lq].reshape(b, lq, h, d)


def _round_up(n, m):
    return -(-n // m) * m
