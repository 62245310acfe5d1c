"""Attention backends agree with the masked-dense reference path, values and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qwen2vl_jax.model.attention import attention, make_mask, segment_runs
from qwen2vl_jax.model.blockwise import _block_pairs, blockwise_attention


def _packed_segments(b, l, sizes_per_row):
    seg = np.zeros((b, l), np.int32)
    for r, sizes in enumerate(sizes_per_row):
        pos = 0
        for i, n in enumerate(sizes):
            seg[r, pos:pos + n] = i + 1
            pos += n
    return jnp.asarray(seg)


def _qkv(b, l, h, hkv, d, seed=0, dtype=jnp.float32):
    ks = jax.random.split(jax.random.key(seed), 3)
    return (jax.random.normal(ks[0], (b, l, h, d), dtype), jax.random.normal(ks[1], (b, l, hkv, d), dtype),
            jax.random.normal(ks[2], (b, l, hkv, d), dtype))


@pytest.mark.parametrize("causal,h,hkv", [(False, 4, 4), (True, 6, 2)])
def test_blockwise_matches_dense(causal, h, hkv):
    b, l, d = 2, 200, 16
    seg = _packed_segments(b, l, [[37, 80, 16, 50], [120, 64]])   # both rows end in padding
    q, k, v = _qkv(b, l, h, hkv, d)
    ref = attention(q, k, v, seg, seg, causal=causal, scale=d ** -0.5)
    out = blockwise_attention(q, k, v, seg, seg, causal=causal, scale=d ** -0.5, block_q=32, block_k=48)
    valid = np.asarray(seg != 0)
    np.testing.assert_allclose(np.asarray(out)[valid], np.asarray(ref)[valid], atol=2e-6, rtol=0)
    assert not np.asarray(out)[~valid].any()   # padding queries attend to nothing

    cot = jax.random.normal(jax.random.key(9), q.shape) * valid[..., None, None]
    f_ref = lambda q, k, v: (attention(q, k, v, seg, seg, causal=causal, scale=d ** -0.5) * cot).sum()
    f_blk = lambda q, k, v: (blockwise_attention(q, k, v, seg, seg, causal=causal, scale=d ** -0.5,
                                                 block_q=32, block_k=48) * cot).sum()
    g_ref = jax.grad(f_ref, argnums=(0, 1, 2))(q, k, v)
    g_blk = jax.jit(jax.grad(f_blk, argnums=(0, 1, 2)))(q, k, v)
    for name, a, r in zip("qkv", g_blk, g_ref):
        np.testing.assert_allclose(np.asarray(a), np.asarray(r), atol=1e-5, rtol=0, err_msg=f"d{name}")


@pytest.mark.parametrize("causal", [False, True])
def test_blockwise_any_layout(causal):
    """Segments that are not contiguous runs (interleaved, repeated ids, padding in the middle): the band of
    a query block then holds key blocks it cannot meet, which the loops visit anyway; values and gradients
    must still equal the dense path's."""
    b, l, h, d = 1, 96, 2, 8
    rng = np.random.default_rng(3)
    seg = jnp.asarray(rng.choice([0, 1, 2, 3], size=(b, l), p=[0.1, 0.3, 0.3, 0.3]).astype(np.int32))
    seg = seg.at[0, 40:56].set(1).at[0, 56:72].set(3)   # block 2 (of 16) holds id 1 only
    q, k, v = _qkv(b, l, h, h, d, seed=4)
    valid = np.asarray(seg != 0)
    cot = jax.random.normal(jax.random.key(5), q.shape) * valid[..., None, None]
    f_ref = lambda q, k, v: (attention(q, k, v, seg, seg, causal=causal, scale=d ** -0.5) * cot).sum()
    f_blk = lambda q, k, v: (blockwise_attention(q, k, v, seg, seg, causal=causal, scale=d ** -0.5,
                                                 block_q=16, block_k=16) * cot).sum()
    np.testing.assert_allclose(f_blk(q, k, v), f_ref(q, k, v), rtol=1e-5)
    for name, a, r in zip("qkv", jax.jit(jax.grad(f_blk, argnums=(0, 1, 2)))(q, k, v),
                          jax.grad(f_ref, argnums=(0, 1, 2))(q, k, v)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(r), atol=1e-5, rtol=0, err_msg=f"d{name}")


def test_block_pairs_skip_what_cannot_meet():
    seg = _packed_segments(1, 64, [[16, 16, 32]])
    pairs = np.asarray(_block_pairs(seg, seg, 16, 16, causal=False))[0]
    # blocks 0 and 1 each hold one example; blocks 2-3 hold the third
    np.testing.assert_array_equal(pairs, [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1]])
    causal = np.asarray(_block_pairs(seg, seg, 16, 16, causal=True))[0]
    np.testing.assert_array_equal(causal, np.tril(pairs))


def test_blockwise_bf16_close_to_f32():
    b, l, h, d = 1, 128, 4, 32
    seg = _packed_segments(b, l, [[60, 68]])
    q, k, v = _qkv(b, l, h, h, d, seed=3)
    ref = blockwise_attention(q, k, v, seg, seg, causal=True, scale=d ** -0.5, block_q=32, block_k=32)
    low = blockwise_attention(*(x.astype(jnp.bfloat16) for x in (q, k, v)), seg, seg, causal=True,
                              scale=d ** -0.5, block_q=32, block_k=32)
    assert low.dtype == jnp.bfloat16
    assert np.abs(np.asarray(low, np.float32) - np.asarray(ref)).max() < 3e-2


@pytest.mark.parametrize("impl,causal", [("splash_interpret", False), ("pallas_gpu_interpret", True)])
def test_pallas_kernels_match_dense(impl, causal):
    """The TPU and GPU kernels, run through the Pallas interpreter on CPU, with GQA and packed segments
    (values and gradients at more layouts in test_attention_kernels.py)."""
    b, l, h, hkv, d = 1, 200, 4, 2, 16
    seg = _packed_segments(b, l, [[37, 80, 50]])
    q, k, v = _qkv(b, l, h, hkv, d, seed=1)
    ref = attention(q, k, v, seg, seg, causal=causal, scale=d ** -0.5)
    out = attention(q, k, v, seg, seg, causal=causal, scale=d ** -0.5, impl=impl)
    valid = np.asarray(seg != 0)
    np.testing.assert_allclose(np.asarray(out)[valid], np.asarray(ref)[valid], atol=2e-6, rtol=0)
    assert not np.asarray(out)[~valid].any()


def test_auto_uses_dense_for_decoding_and_refuses_slots_elsewhere():
    q, k, v = _qkv(1, 4, 2, 2, 8)
    seg = jnp.ones((1, 4), jnp.int32)
    idx = jnp.arange(4)[None]
    out = attention(q, k, v, seg, seg, causal=True, scale=0.3, q_index=idx, impl="auto")
    np.testing.assert_allclose(out, attention(q, k, v, seg, seg, causal=True, scale=0.3), atol=1e-6)
    with pytest.raises(ValueError, match="does not take cache slot indices"):
        attention(q, k, v, seg, seg, causal=True, scale=0.3, q_index=idx, impl="blockwise")


def test_segment_runs_describe_the_segment_mask():
    """cuDNN's packed layout (run offsets and lengths) holds exactly the mask of the segment ids."""
    seg = _packed_segments(3, 64, [[5, 20, 1, 30], [64], []])   # padded end, a full row, an empty row
    lengths, offsets, runs = segment_runs(seg, max_runs=6)
    assert lengths.shape == (3, 6) and offsets.shape == (3, 7) and int(runs) == 4
    np.testing.assert_array_equal(lengths[0], [5, 20, 1, 30, -1, -1])
    np.testing.assert_array_equal(offsets[0], [0, 5, 25, 26, -1, -1, -1])
    np.testing.assert_array_equal(lengths[2], [-1] * 6)
    rebuilt = np.zeros((3, 64, 64), bool)
    for r in range(3):
        for n, o in zip(np.asarray(lengths[r]), np.asarray(offsets[r])):
            if n > 0:
                rebuilt[r, o:o + n, o:o + n] = True
    np.testing.assert_array_equal(rebuilt, np.asarray(make_mask(seg, seg, causal=False))[:, 0, 0])
    assert int(segment_runs(seg, max_runs=3)[2]) == 4   # more runs than the bound: reported, so callers fall back


_GPU = jax.default_backend() == "gpu"


@pytest.mark.skipif(not _GPU, reason="cuDNN and Triton attention need an NVIDIA GPU")
@pytest.mark.parametrize("impl,causal,h,hkv,d,sizes", [
    ("cudnn", False, 16, 16, 80, [[37, 80, 16, 150], [200, 64]]),
    ("cudnn", True, 12, 2, 128, [[37, 80, 16, 150], [200, 64]]),
    ("cudnn_packed", False, 16, 16, 80, [[37, 80, 16, 150], [200, 64]]),
    ("cudnn_packed", True, 12, 2, 128, [[37, 80, 16, 150], [200, 64]]),
    ("cudnn_packed", True, 12, 2, 128, [[3] * 100, [200, 64]]),    # 100 runs > the bound of 64: blockwise
    ("pallas_gpu", False, 16, 16, 80, [[37, 80, 16, 150], [200, 64]]),
    ("pallas_gpu", True, 12, 2, 128, [[3] * 100, [200, 64]]),
])
def test_cudnn_matches_dense(impl, causal, h, hkv, d, sizes):
    """cuDNN flash attention and the Triton kernel over packed segments, bf16, values and gradients, against
    the dense path on the same bf16 inputs computed in f32."""
    b, l = 2, 384
    seg = _packed_segments(b, l, sizes)
    q, k, v = _qkv(b, l, h, hkv, d, seed=5, dtype=jnp.bfloat16)
    valid = np.asarray(seg != 0)
    cot = jax.random.normal(jax.random.key(9), q.shape, jnp.float32) * valid[..., None, None]

    def loss(impl, q, k, v):
        if impl == "xla":
            q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
        out = attention(q, k, v, seg, seg, causal=causal, scale=d ** -0.5, impl=impl)
        return (out.astype(jnp.float32) * cot).sum(), out

    (_, ref), g_ref = jax.jit(jax.value_and_grad(lambda *a: loss("xla", *a), argnums=(0, 1, 2), has_aux=True))(q, k, v)
    (_, out), g_out = jax.jit(jax.value_and_grad(lambda *a: loss(impl, *a), argnums=(0, 1, 2), has_aux=True))(q, k, v)
    # bf16 output rounding (2^-8 relative) and bf16 probabilities inside the kernel
    np.testing.assert_allclose(np.asarray(out, np.float32)[valid], np.asarray(ref)[valid], atol=2e-2, rtol=0)
    for name, a, r in zip("qkv", g_out, g_ref):
        a, r = np.asarray(a, np.float32), np.asarray(r, np.float32)
        assert np.abs(a - r).max() <= 2e-2 * np.abs(r).max(), f"d{name}"
