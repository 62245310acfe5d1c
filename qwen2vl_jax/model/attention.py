"""One attention entry point: segment ids + a causal flag -> softmax(QK^T * scale) V.

Every attention in the model goes through `attention`:
- the ViT: non-causal, one segment per image and per temporal slice (block-diagonal, as the reference);
- the LLM: causal within packed examples, padding = segment 0;
- cached decoding: queries at cache slots `q_index` against all cache slots, causal by slot index.

Backends (`impl`):
- "xla": masked dense reference path; the softmax runs in f32 as in the reference's eager path.
- "blockwise": segment-aware flash-style path (blockwise.py), cost ~ sum(n_i^2) over packed examples.
- "splash": jax's Pallas splash kernel (TPU) driven by block sparsity computed on the device from the
  segment ids (splash.py): forward, dQ and dK/dV visit only the blocks whose segments can meet, so a packed
  row costs about sum(n_i^2) (in blocks). `splash_interpret` runs it on CPU for tests.
- "pallas_gpu": a Pallas Triton flash kernel (pallas_gpu.py) with the same per-block ranges in the forward
  and in both backward scans. `pallas_gpu_interpret` runs it on CPU for tests.
- "cudnn": cuDNN flash attention (NVIDIA GPUs, bf16/f16) with the dense segment mask.
- "cudnn_packed" (experimental): cuDNN in its packed layout, each row's segments passed as (offset, length)
  runs so the kernel skips what cannot meet. Measured on an H200 (benchmarks/attention.py --full): the forward
  is 6.5x faster than "cudnn" on a packed ViT row of 16384 patches, but forward + backward was no faster and
  the 2B train step ran out of memory (201 GB asked) where "cudnn" fits. The cause, found afterwards with
  `print_saved_residuals`: cuDNN keeps softmax statistics of (runs bound, heads, L) per layer, 1 GB per ViT
  layer at the bound then used (L // 16 = 1024 runs). The bound is now 64; not re-measured on a GPU, so
  not used by "auto".
- "auto": splash on TPU (the only TPU kernel); on GPUs cuDNN for bf16/f16 (measured 2.35x / 3.75x faster
  than xla on an H200, docs/gpu.md) and xla for f32; elsewhere blockwise for long sequences and xla for short
  ones (measured on CPU); xla for decoding everywhere. At the H200 shapes `pallas_gpu` computes 4.4% (ViT)
  and 13% (LLM, of the causal triangle) of the block pairs where cuDNN computes all of them, but it has not
  run on a GPU yet, so `auto` does not pick it until it is measured there.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from qwen2vl_jax import target
from qwen2vl_jax.model.blockwise import blockwise_attention

_MASKED = -0.7 * float(jnp.finfo(jnp.float32).max)   # finite, so fully masked (padding) rows stay NaN-free
# CPU, forward + backward of one layer (2 cores, AVX-512): on packed rows blockwise wins from 384 tokens up
# (2 x 512, causal, 4/2 heads x 64: 13 vs 17 ms; 2 x 768: 19 vs 56 ms); on one short example per row dense
# does (2 x 322, 14/2 heads x 64: 42 vs 48 ms). Rows of 512 and more are mostly packed training rows.
AUTO_BLOCKWISE_MIN_LEN = 512


_SEGMENT_BOUND = contextvars.ContextVar("segment_bound", default=None)


@contextlib.contextmanager
def segment_bound(causal: int | None):
    """While tracing: the longest segment of causal (LLM) attention that the data guarantees, for calls that
    give no `max_segment_len` of their own (the run's `max_segment_len`, checked against its records)."""
    token = _SEGMENT_BOUND.set(causal or None)
    try:
        yield
    finally:
        _SEGMENT_BOUND.reset(token)


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
              q_index=None, kv_index=None, impl: str = "xla", max_segment_len: int | None = None):
    """q (B, Lq, H, Dh); k, v (B, Lk, Hkv, Dh) with H a multiple of Hkv (GQA). Returns (B, Lq, H, Dh).

    q_index / kv_index: (B, Lq) / (B, Lk) slot numbers for the causal test (cached decoding); default 0..L-1.
    max_segment_len: what the data guarantees about the longest segment; narrows the splash grid (a batch
    that breaks it still gets the right answer, from the full-width grid).
    """
    cached = q_index is not None or kv_index is not None
    if max_segment_len is None and causal:
        max_segment_len = _SEGMENT_BOUND.get()
    if impl == "auto":
        platform = target.platform()
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
        from qwen2vl_jax.model.splash import splash_attention
        kernel = functools.partial(splash_attention, causal=causal, scale=scale,
                                   interpret=impl == "splash_interpret", max_segment_len=max_segment_len)
        return per_batch_shard(kernel, q, k, v, q_segment_ids, kv_segment_ids)
    if impl in ("pallas_gpu", "pallas_gpu_interpret"):
        from qwen2vl_jax.model.pallas_gpu import pallas_gpu_attention
        kernel = functools.partial(pallas_gpu_attention, causal=causal, scale=scale,
                                   interpret=impl == "pallas_gpu_interpret")
        return per_batch_shard(kernel, q, k, v, q_segment_ids, kv_segment_ids)
    if impl == "cudnn":
        return cudnn_masked_attention(q, k, v, q_segment_ids, kv_segment_ids, causal=causal, scale=scale)
    if impl == "cudnn_packed":
        return cudnn_packed_attention(q, k, v, q_segment_ids, kv_segment_ids, causal=causal, scale=scale)
    raise ValueError(f"unknown attention impl {impl!r}; choose xla, blockwise, splash, pallas_gpu, cudnn, "
                     "cudnn_packed or auto (splash_interpret / pallas_gpu_interpret run the kernels on CPU)")


def _mesh_axes(mesh, logical: str) -> tuple:
    """The mesh axes (of size > 1) that a logical axis maps to under the active `nn.logical_axis_rules`."""
    axes = nn.logical_to_mesh_axes((logical,))[0]
    axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    return tuple(a for a in axes if a in mesh.shape and mesh.shape[a] > 1)


def per_batch_shard(kernel, q, k, v, q_segment_ids, kv_segment_ids):
    """Run a Pallas kernel on each device's own rows and heads. A Pallas kernel is a custom call the SPMD
    partitioner cannot split, so under a mesh it would gather every row and head to every device; shard_map
    over the mesh axes of the logical "batch" axis (the active `nn.logical_axis_rules`) hands each device its
    rows, and over those of "heads" / "kv_heads" (the tensor axis) its heads, as the projections produced
    them. Heads split in contiguous blocks keep GQA's grouping (query head j*g + i uses kv head j) when both
    head counts divide by the axis; otherwise heads come whole. Segment ids are per row. No mesh, or rows
    that do not split evenly: a plain call."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return kernel(q, k, v, q_segment_ids, kv_segment_ids)
    rows = _mesh_axes(mesh, "batch")
    if rows and q.shape[0] % math.prod(mesh.shape[a] for a in rows):   # rows that do not split: as before
        rows = ()
    heads = _mesh_axes(mesh, "heads")
    if heads != _mesh_axes(mesh, "kv_heads") or any(x.shape[2] % math.prod(mesh.shape[a] for a in heads)
                                                    for x in (q, k)):
        heads = ()
    if not rows and not heads:
        return kernel(q, k, v, q_segment_ids, kv_segment_ids)
    r, hd = rows or None, heads or None
    qkv, seg = PartitionSpec(r, None, hd, None), PartitionSpec(r, None)
    return jax.shard_map(kernel, mesh=mesh, in_specs=(qkv, qkv, qkv, seg, seg), out_specs=qkv, check_vma=False)(
        q, k, v, q_segment_ids, kv_segment_ids)


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
