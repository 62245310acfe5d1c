"""GPU attention over packed rows: a Pallas (Triton) flash kernel whose loops run only over the blocks whose
segments can meet, in the forward and in both backward scans.

The structure follows jax's own `jax.experimental.pallas.ops.gpu.attention.mha`: one program per (query
block, batch row, head) looping over key blocks with an online softmax in base 2; a fused backward with one
program per key block that scans query blocks for dK/dV, then (same program id, as a query block) scans key
blocks for dQ. Where `mha` loops over all blocks (or up to the diagonal), each loop here runs over [lo, hi),
which the program computes from per-position reach arrays (segment_blocks.reach: min of the first, max of
the last reachable position over its own block), so every kernel gets exact ranges at its own block sizes
and nothing of size L^2 or (blocks, bq, bk) is ever built. Segment ids and the causal test still mask inside
blocks; the ranges only decide what is skipped.

GQA: key/value heads are read through the index map (query head j * G + i reads key head j); dK/dV come out
per query head in f32 and are summed over each group.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from qwen2vl_jax.model.segment_blocks import reach

MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)
LOG2E = math.log2(math.e)


def _range(first_ref, last_ref, sl, other_block):
    """[lo, hi) of other-side blocks met by the positions in slice `sl` (empty: hi == lo)."""
    lo = lax.div(jnp.min(first_ref[sl]), other_block)
    hi = lax.div(jnp.max(last_ref[sl]), other_block) + 1
    return lo, jnp.maximum(lo, hi)


def _masked_scores(q, k, qs, ks, q_pos, k_pos, scale, causal):
    qk = plgpu.dot(q, k.T) * (scale * LOG2E)   # base-2 logits, as in mha
    mask = qs[:, None] == ks[None, :]
    if causal:
        mask = mask & (q_pos[:, None] >= k_pos[None, :])
    return jnp.where(mask, qk, MASK_VALUE)


def _fwd_kernel(q_ref, k_ref, v_ref, qseg_ref, kseg_ref, first_ref, last_ref, o_ref, lse_ref, *,
                scale, causal, block_q, block_k, head_dim):
    i = pl.program_id(0)
    head_dim_padded = q_ref.shape[-1]
    head_mask = (jnp.arange(head_dim_padded) < head_dim)[None, :]
    q_sl = pl.ds(i * block_q, block_q)
    q = plgpu.load(q_ref, mask=head_mask, other=0.0)
    qs = qseg_ref[q_sl]
    q_pos = i * block_q + jnp.arange(block_q)
    lo, hi = _range(first_ref, last_ref, q_sl, block_k)

    def body(j, carry):
        o, m, l = carry
        k_sl = pl.ds(j * block_k, block_k)
        k = plgpu.load(k_ref.at[k_sl, :], mask=head_mask, other=0.0)
        qk = _masked_scores(q, k, qs, kseg_ref[k_sl], q_pos, j * block_k + jnp.arange(block_k), scale, causal)
        m_next = jnp.maximum(m, jnp.max(qk, axis=-1))
        corr = jnp.exp2(m - m_next)
        s = jnp.exp2(qk - m_next[:, None])
        v = plgpu.load(v_ref.at[k_sl, :], mask=head_mask, other=0.0)
        return corr[:, None] * o + plgpu.dot(s.astype(v.dtype), v), m_next, corr * l + s.sum(axis=-1)

    o = jnp.zeros((block_q, head_dim_padded), jnp.float32)
    m = jnp.full((block_q,), -jnp.inf, jnp.float32)
    l = jnp.zeros((block_q,), jnp.float32)
    o, m, l = lax.fori_loop(lo, hi, body, (o, m, l))
    # A block of padding visits nothing: write zeros and a finite lse (its rows get no gradient).
    empty = l == 0
    l = jnp.where(empty, 1.0, l)
    lse_ref[...] = jnp.where(empty, 0.0, m + jnp.log2(l))
    plgpu.store(o_ref.at[:, :o.shape[-1]], (o / l[:, None]).astype(o_ref.dtype), mask=head_mask)


def _bwd_kernel(q_ref, k_ref, v_ref, qseg_ref, kseg_ref, q_first_ref, q_last_ref, k_first_ref, k_last_ref,
                do_ref, lse_ref, delta_ref, dq_ref, dk_ref, dv_ref, *,
                scale, causal, block_q_dkv, block_kv_dkv, block_q_dq, block_kv_dq, head_dim):
    head_dim_padded = q_ref.shape[-1]
    head_mask = (jnp.arange(head_dim_padded) < head_dim)[None, :]
    # Scan 1: this program's key block against the query blocks that reach it -> dK, dV.
    j = pl.program_id(2)
    k_sl = pl.ds(j * block_kv_dkv, block_kv_dkv)
    k = plgpu.load(k_ref.at[k_sl, :], mask=head_mask, other=0.0)
    v = plgpu.load(v_ref.at[k_sl, :], mask=head_mask, other=0.0)
    ks = kseg_ref[k_sl]
    k_pos = j * block_kv_dkv + jnp.arange(block_kv_dkv)
    lo, hi = _range(k_first_ref, k_last_ref, k_sl, block_q_dkv)

    def dkv_body(t, carry):
        dv, dk = carry
        q_sl = pl.ds(t * block_q_dkv, block_q_dkv)
        q = plgpu.load(q_ref.at[q_sl, :], mask=head_mask, other=0.0)
        qk = _masked_scores(q, k, qseg_ref[q_sl], ks, t * block_q_dkv + jnp.arange(block_q_dkv), k_pos,
                            scale, causal)
        p = jnp.exp2(qk - lse_ref[q_sl][:, None])
        do = plgpu.load(do_ref.at[q_sl, :], mask=head_mask, other=0.0)
        dv = dv + plgpu.dot(p.astype(do.dtype).T, do)
        ds = p * (plgpu.dot(do, v.T) - delta_ref[q_sl][:, None]) * scale
        return dv, dk + plgpu.dot(ds.astype(q.dtype).T, q)

    zeros = jnp.zeros((block_kv_dkv, head_dim_padded), jnp.float32)
    dv, dk = lax.fori_loop(lo, hi, dkv_body, (zeros, zeros))
    plgpu.store(dv_ref.at[:, :dv.shape[-1]], dv.astype(dv_ref.dtype), mask=head_mask)
    plgpu.store(dk_ref.at[:, :dk.shape[-1]], dk.astype(dk_ref.dtype), mask=head_mask)

    # Scan 2: the same program id as a query block against the key blocks it reaches -> dQ.
    i = pl.program_id(2)
    q_sl = pl.ds(i * block_q_dq, block_q_dq)
    q = plgpu.load(q_ref.at[q_sl, :], mask=head_mask, other=0.0)
    qs = qseg_ref[q_sl]
    q_pos = i * block_q_dq + jnp.arange(block_q_dq)
    lse, delta = lse_ref[q_sl], delta_ref[q_sl]
    do = plgpu.load(do_ref.at[q_sl, :], mask=head_mask, other=0.0)
    lo, hi = _range(q_first_ref, q_last_ref, q_sl, block_kv_dq)

    def dq_body(t, dq):
        k_sl = pl.ds(t * block_kv_dq, block_kv_dq)
        k = plgpu.load(k_ref.at[k_sl, :], mask=head_mask, other=0.0)
        v = plgpu.load(v_ref.at[k_sl, :], mask=head_mask, other=0.0)
        qk = _masked_scores(q, k, qs, kseg_ref[k_sl], q_pos, t * block_kv_dq + jnp.arange(block_kv_dq),
                            scale, causal)
        p = jnp.exp2(qk - lse[:, None])
        ds = p * (plgpu.dot(do, v.T) - delta[:, None]) * scale
        return dq + plgpu.dot(ds.astype(k.dtype), k)

    dq = lax.fori_loop(lo, hi, dq_body, jnp.zeros((block_q_dq, head_dim_padded), jnp.float32))
    plgpu.store(dq_ref.at[:, :dq.shape[-1]], dq.astype(dq_ref.dtype), mask=head_mask)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9, 10))
def _flash(q, k, v, qs, ks, q_reach, k_reach, scale, causal, blocks, interpret):
    return _forward(q, k, v, qs, ks, q_reach, scale, causal, blocks, interpret)[0]


def _forward(q, k, v, qs, ks, q_reach, scale, causal, blocks, interpret):
    b, n, h, d = q.shape
    dp = pl.next_power_of_2(d)   # Triton tiles are powers of two: loads and stores mask the extra columns
    g = h // k.shape[2]
    bq, bk = blocks[:2]
    seq = lambda: pl.BlockSpec((None, n), lambda i, r, hh: (r, 0))
    o, lse = pl.pallas_call(
        functools.partial(_fwd_kernel, scale=scale, causal=causal, block_q=bq, block_k=bk,
                          head_dim=d),
        grid=(n // bq, b, h),
        in_specs=[pl.BlockSpec((None, bq, None, dp), lambda i, r, hh: (r, i, hh, 0)),
                  pl.BlockSpec((None, n, None, dp), lambda i, r, hh: (r, 0, hh // g, 0)),
                  pl.BlockSpec((None, n, None, dp), lambda i, r, hh: (r, 0, hh // g, 0)),
                  seq(), seq(), seq(), seq()],
        out_specs=[pl.BlockSpec((None, bq, None, dp), lambda i, r, hh: (r, i, hh, 0)),
                   pl.BlockSpec((None, None, bq), lambda i, r, hh: (r, hh, i))],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, h, n), jnp.float32)],
        compiler_params=plgpu.CompilerParams(num_warps=4 if dp <= 64 else 8, num_stages=2),
        interpret=interpret, name="packed_flash_forward",
    )(q, k, v, qs, ks, *q_reach)
    return o, lse


def _flash_fwd(q, k, v, qs, ks, q_reach, k_reach, scale, causal, blocks, interpret):
    o, lse = _forward(q, k, v, qs, ks, q_reach, scale, causal, blocks, interpret)
    return o, (q, k, v, qs, ks, q_reach, k_reach, o, lse)


def _flash_bwd(scale, causal, blocks, interpret, res, do):
    q, k, v, qs, ks, q_reach, k_reach, o, lse = res
    b, n, h, d = q.shape
    dp = pl.next_power_of_2(d)
    hkv = k.shape[2]
    g = h // hkv
    _, _, bq_dkv, bk_dkv, bq_dq, bk_dq = blocks
    delta = jnp.einsum("bqhd,bqhd->bhq", o.astype(jnp.float32), do.astype(jnp.float32))
    seq = lambda: pl.BlockSpec((None, n), lambda r, hh, j: (r, 0))
    full = lambda group: pl.BlockSpec((None, n, None, dp), lambda r, hh, j: (r, 0, hh // group, 0))
    per_head = lambda: pl.BlockSpec((None, None, n), lambda r, hh, j: (r, hh, 0))
    dq, dk, dv = pl.pallas_call(
        functools.partial(_bwd_kernel, scale=scale, causal=causal, block_q_dkv=bq_dkv, block_kv_dkv=bk_dkv,
                          block_q_dq=bq_dq, block_kv_dq=bk_dq, head_dim=d),
        grid=(b, h, n // bk_dkv),
        in_specs=[full(1), full(g), full(g), seq(), seq(), seq(), seq(), seq(), seq(), full(1), per_head(),
                  per_head()],
        out_specs=[pl.BlockSpec((None, bq_dq, None, dp), lambda r, hh, j: (r, j, hh, 0)),
                   pl.BlockSpec((None, bk_dkv, None, dp), lambda r, hh, j: (r, j, hh, 0)),
                   pl.BlockSpec((None, bk_dkv, None, dp), lambda r, hh, j: (r, j, hh, 0))],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct(q.shape, jnp.float32),
                   jax.ShapeDtypeStruct(q.shape, jnp.float32)],
        compiler_params=plgpu.CompilerParams(num_warps=4 if bq_dkv * bk_dkv < 128 * 128 else 8, num_stages=2),
        interpret=interpret, name="packed_flash_backward",
    )(q, k, v, qs, ks, *q_reach, *k_reach, do, lse, delta)
    group_sum = lambda x: x.reshape(b, n, hkv, g, d).sum(3).astype(k.dtype)
    return dq, group_sum(dk), group_sum(dv), None, None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def pallas_gpu_attention(q, k, v, q_segment_ids, kv_segment_ids, *, causal, scale, interpret=False,
                         blocks=(128, 128, 64, 64, 64, 64)):
    """q (B, L, H, D); k, v (B, L, Hkv, D), H a multiple of Hkv; one packed row per batch entry. Padding
    (segment 0) rows give zeros. `blocks`: forward (query, key), dK/dV (query, key) and dQ (query, key) block
    sizes, powers of two; the fused backward needs as many dQ query blocks as dK/dV key blocks.
    `interpret`: run through the Pallas interpreter (CPU tests)."""
    b, lq, h, d = q.shape
    lk = k.shape[1]
    if lq != lk:
        raise ValueError(f"pallas_gpu attention takes one packed row per batch entry (query length {lq} == key "
                         f"length {lk}); use impl='xla' for decoding")
    if blocks[4] != blocks[3]:
        raise ValueError(f"blocks {blocks}: the dQ query block must equal the dK/dV key block")
    n = _round_up(lq, max(blocks))
    pad = lambda x: jnp.pad(x, [(0, 0), (0, n - x.shape[1])] + [(0, 0)] * (x.ndim - 2))
    qs, ks = (pad(x.astype(jnp.int32)) for x in (q_segment_ids, kv_segment_ids))
    q_reach, k_reach = reach(qs, ks, causal)   # the padded tail is segment 0: it reaches nothing
    out = _flash(pad(q), pad(k), pad(v), qs, ks, q_reach, k_reach, scale, causal, tuple(blocks), interpret)
    out = out[:, :lq]
    return jnp.where((q_segment_ids != 0)[..., None, None], out, 0)


def _round_up(n, m):
    return -(-n // m) * m
