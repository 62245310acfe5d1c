"""Block-sparse packed attention kernels (splash for TPU, pallas_gpu for GPU), run by the Pallas interpreter on
CPU in f32: block ranges, values and gradients against the dense path, a skip proof that a dense kernel
fails, the grid-width guard, and lowering for the real accelerators."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qwen2vl_jax.model import segment_blocks as sb
from qwen2vl_jax.model.attention import dense_attention, make_mask
from qwen2vl_jax.model.pallas_gpu import pallas_gpu_attention
from qwen2vl_jax.model.splash import grid_widths, splash_attention, splash_rows

# Small blocks so that short rows still span several blocks: splash's blocks are multiples of 128 lanes,
# the Triton kernel's forward and backward blocks differ on purpose.
GPU_BLOCKS = (32, 32, 16, 16, 16, 16)
KERNELS = {
    "splash": functools.partial(splash_attention, interpret=True, block=128),
    "pallas_gpu": functools.partial(pallas_gpu_attention, interpret=True, blocks=GPU_BLOCKS),
}
UNIT = {"splash": 128, "pallas_gpu": 32}   # layouts below are written in these units: 1.0 = one block


def _segments(length, rows):
    """rows: per row a list of segment sizes (ids 1, 2, ... in order), the rest of the row padding."""
    seg = np.zeros((len(rows), length), np.int32)
    for r, sizes in enumerate(rows):
        ends = np.cumsum(sizes)
        for i, (a, b) in enumerate(zip(ends - sizes, ends)):
            seg[r, a:b] = i + 1
    return seg


def _random_sizes(rng, length, longest):
    sizes = []
    while sum(sizes) + longest <= length:
        sizes.append(int(rng.integers(1, longest + 1)))
    return sizes


def _scaled(kernel, rows):   # layouts given in blocks of the kernel's forward block
    return [[int(round(x * UNIT[kernel])) for x in row] for row in rows]


def _qkv(b, l, h, hkv, d, seed):
    ks = jax.random.split(jax.random.key(seed), 4)
    return (jax.random.normal(ks[0], (b, l, h, d)), jax.random.normal(ks[1], (b, l, hkv, d)),
            jax.random.normal(ks[2], (b, l, hkv, d)), jax.random.normal(ks[3], (b, l, h, d)))


def _dense(seg, causal, scale):
    valid = jnp.asarray(seg != 0)[..., None, None]
    return lambda q, k, v: jnp.where(valid, dense_attention(q, k, v, seg, seg, causal=causal, scale=scale), 0)


def _out_and_grads(fn, q, k, v, cot):
    out, vjp = jax.vjp(fn, q, k, v)
    return (out, *vjp(cot))


def _assert_matches_dense(kernel, seg, causal, h, hkv, d=32, seed=0, tol=2e-5):
    b, l = seg.shape
    q, k, v, cot = _qkv(b, l, h, hkv, d, seed)
    seg = jnp.asarray(seg)
    scale = d ** -0.5
    got = _out_and_grads(lambda q, k, v: KERNELS[kernel](q, k, v, seg, seg, causal=causal, scale=scale),
                         q, k, v, cot)
    want = _out_and_grads(_dense(seg, causal, scale), q, k, v, cot)
    for name, a, r in zip(("out", "dq", "dk", "dv"), got, want):
        np.testing.assert_allclose(np.asarray(a), np.asarray(r), atol=tol, rtol=0, err_msg=name)


# ---- block ranges (plain jnp, no kernel) ----

def _brute_ranges(seg, causal, bq, bk):
    """From the dense mask: per query block the first and one-past-last key block holding a real pair."""
    mask = np.asarray(make_mask(jnp.asarray(seg), jnp.asarray(seg), causal))[:, 0, 0]
    b, l = seg.shape
    blocks = mask.reshape(b, l // bq, bq, l // bk, bk).any((2, 4))
    lo = np.where(blocks.any(-1), blocks.argmax(-1), -1)
    hi = np.where(blocks.any(-1), blocks.shape[-1] - blocks[..., ::-1].argmax(-1), -1)
    return lo, hi, blocks


@pytest.mark.parametrize("causal", [False, True])
def test_block_ranges_are_exact(causal):
    """Each block's range starts and ends at blocks holding real pairs and covers every such block, at the
    forward's and at the backward's block sizes; padding adds nothing."""
    rng = np.random.default_rng(1)
    rows = [list(rng.integers(1, 40, 9)), [5, 1, 1, 90], [256], []]
    seg = _segments(256, rows)
    (qf, ql), (kf, kl) = sb.reach(jnp.asarray(seg), jnp.asarray(seg), causal)
    for bq, bk in ((32, 32), (16, 64), (64, 16)):
        lo, hi = map(np.asarray, sb.block_ranges(qf, ql, bq, bk))
        blo, bhi, blocks = _brute_ranges(seg, causal, bq, bk)
        real = blocks.any(-1)
        np.testing.assert_array_equal(lo[real], blo[real])
        np.testing.assert_array_equal(hi[real], bhi[real])
        assert (hi[~real] == lo[~real]).all()                  # padding-only query blocks visit nothing
        assert (lo >= 0).all() and (lo < 256 // bk).all()       # ... and still name a block that exists
        klo, khi = map(np.asarray, sb.block_ranges(kf, kl, bk, bq))
        tb = blocks.transpose(0, 2, 1)                          # key-major: the dK/dV pass
        kreal = tb.any(-1)
        np.testing.assert_array_equal(klo[kreal], tb.argmax(-1)[kreal])
        np.testing.assert_array_equal(khi[kreal], (tb.shape[-1] - tb[..., ::-1].argmax(-1))[kreal])
        assert (khi[~kreal] == klo[~kreal]).all()
        assert (klo >= 0).all() and (klo < 256 // bq).all()
    assert np.asarray(sb.layout_ok(jnp.asarray(seg), jnp.asarray(seg))).all()


def test_broken_layouts_reach_the_whole_row():
    """An id in two runs, or query ids that differ from key ids: the runs say nothing, so every block reaches
    every block (the causal triangle), never a subset that would drop pairs."""
    seg = jnp.asarray([[1, 1, 2, 2, 1, 1, 0, 0], [1, 1, 2, 2, 3, 3, 0, 0]])
    other = jnp.asarray([[1, 1, 2, 2, 1, 1, 0, 0], [1, 1, 1, 2, 3, 3, 0, 0]])
    np.testing.assert_array_equal(sb.layout_ok(seg, seg), [False, True])
    np.testing.assert_array_equal(sb.layout_ok(seg, other), [False, False])
    (qf, ql), (kf, kl) = sb.reach(seg, other, causal=True)
    np.testing.assert_array_equal(qf, 0)
    np.testing.assert_array_equal(ql, np.broadcast_to(np.arange(8), (2, 8)))
    np.testing.assert_array_equal(kf, np.broadcast_to(np.arange(8), (2, 8)))
    np.testing.assert_array_equal(kl, 7)


@pytest.mark.parametrize("causal", [False, True])
def test_range_bound_holds(causal):
    """The static grid width derived from the longest segment covers every range, forward and dK/dV."""
    rng = np.random.default_rng(2)
    for longest in (10, 100, 300):
        rows = [_random_sizes(rng, 1024, longest) for _ in range(8)]
        rows[0][3] = longest                                   # at least one segment at the bound
        seg = jnp.asarray(_segments(1024, rows))
        (qf, ql), (kf, kl) = sb.reach(seg, seg, causal)
        for bq, bk in ((32, 32), (128, 64), (16, 128)):
            lo, hi = sb.block_ranges(qf, ql, bq, bk)
            assert int((hi - lo).max()) <= sb.range_bound(longest, bq, bk, 1024 // bk, causal)
            klo, khi = sb.block_ranges(kf, kl, bk, bq)
            assert int((khi - klo).max()) <= sb.range_bound(longest, bk, bq, 1024 // bq, causal)


# ---- the kernels against the dense path ----

# The default run covers each kernel once here and once in the skip proof, between them causal and not, GQA
# and not; the slow run takes the whole product.
@pytest.mark.parametrize("kernel,causal,h,hkv", [
    ("splash", True, 4, 2), ("pallas_gpu", False, 2, 2),
    pytest.param("splash", False, 2, 2, marks=pytest.mark.slow),
    pytest.param("pallas_gpu", True, 4, 2, marks=pytest.mark.slow)])
def test_kernel_matches_dense(kernel, causal, h, hkv):
    """Values and gradients over a row of many segments (one of a single token, segments across block edges)
    ending in padding, and a row of one segment ending in padding."""
    rows = _scaled(kernel, [[0.55, 1.0, 0.04, 0.01, 1.2, 0.45], [2.3]])
    _assert_matches_dense(kernel, _segments(4 * UNIT[kernel], rows), causal, h, hkv)


@pytest.mark.parametrize("kernel,causal", [("splash", False), ("pallas_gpu", True)])
def test_kernel_skips_blocks_of_other_segments(kernel, causal):
    """Skip proof: one segment, exactly one forward block (two backward blocks of pallas_gpu), gets NaN keys
    and values. A kernel that visits its blocks from any other block multiplies NaN by zero probabilities and
    poisons those rows; so does the dense path. The block-sparse kernels never visit them: every other
    segment's outputs and gradients stay finite and equal the dense result on finite inputs."""
    u = UNIT[kernel]
    seg = jnp.asarray(_segments(4 * u, [[u // 2, u // 2, u, u - 20, 12]]))
    nan_rows = np.asarray(seg == 3)[0]
    assert nan_rows[u:2 * u].all() and nan_rows.sum() == u
    q, k, v, cot = _qkv(1, 4 * u, 2, 1, 16, seed=3)
    poison = lambda x: jnp.where(jnp.asarray(nan_rows)[None, :, None, None], jnp.nan, x)
    scale = 0.25
    fn = lambda q, k, v: KERNELS[kernel](q, k, v, seg, seg, causal=causal, scale=scale)
    got = _out_and_grads(fn, q, poison(k), poison(v), cot)
    want = _out_and_grads(_dense(seg, causal, scale), q, k, v, cot)
    others = ~nan_rows & np.asarray(seg != 0)[0]
    for name, a, r in zip(("out", "dq", "dk", "dv"), got, want):
        a = np.asarray(a)[0, others]
        assert np.isfinite(a).all(), name
        np.testing.assert_allclose(a, np.asarray(r)[0, others], atol=2e-5, rtol=0, err_msg=name)
    dense_out = _dense(seg, causal, scale)(q, poison(k), poison(v))
    assert np.isnan(np.asarray(dense_out)[0, others]).all()     # the proof is one a dense kernel fails


def test_splash_grid_width_guard():
    """A grid narrower than a row's ranges silently drops blocks; `max_segment_len` narrows the grid only
    while every row fits, and a row with a longer segment takes the full-width grid and stays right."""
    scale, causal = 0.25, False
    seg = jnp.asarray(_segments(512, [[300, 100, 50], [60, 64, 64, 50, 100, 90]]))
    q, k, v, cot = _qkv(2, 512, 2, 2, 16, seed=4)
    want = _out_and_grads(_dense(seg, causal, scale), q, k, v, cot)
    width = sb.range_bound(64, 128, 128, 4, causal)
    assert width == 3                                          # narrower than the 4 blocks of a row

    # Row 0 needs 4 blocks for its second query block; a 3-wide grid alone gives a wrong answer there.
    (qf, ql), (kf, kl) = sb.reach(seg, seg, causal)
    lo, hi = sb.block_ranges(qf, ql, 128, 128)
    klo, khi = sb.block_ranges(kf, kl, 128, 128)
    assert int((hi - lo)[0].max()) == 4 and int((hi - lo)[1].max()) <= 3
    rows = lambda w: splash_rows((q * scale).transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3),
                                 v.transpose(0, 2, 1, 3), seg, seg, lo, hi, klo, khi, width=w,
                                 causal=causal, block=128, interpret=True).transpose(0, 2, 1, 3)
    narrow = np.where(np.asarray(seg != 0)[..., None, None], np.asarray(rows(3)), 0)
    assert np.abs(narrow[0] - np.asarray(want[0])[0]).max() > 1e-2
    np.testing.assert_allclose(narrow[1], np.asarray(want[0])[1], atol=2e-5, rtol=0)   # row 1 fits

    fn = lambda q, k, v: splash_attention(q, k, v, seg, seg, causal=causal, scale=scale, interpret=True,
                                          block=128, max_segment_len=64)
    for name, a, r in zip(("out", "dq", "dk", "dv"), _out_and_grads(fn, q, k, v, cot), want):
        np.testing.assert_allclose(np.asarray(a), np.asarray(r), atol=2e-5, rtol=0, err_msg=name)


@pytest.mark.slow
def test_splash_in_the_tpu_interpreter():
    """The TPU interpreter (pltpu.InterpretParams) checks every block index the kernel fetches, so a range
    naming a block past the end (as empty ranges once did) fails here where the plain interpreter clamps:
    two rows with padding, causal, GQA, on the narrow grid of a segment bound."""
    from jax.experimental.pallas import tpu as pltpu

    seg = jnp.asarray(_segments(512, [[100, 230, 70], [200]]))
    q, k, v, cot = _qkv(2, 512, 4, 2, 32, seed=6)
    fn = lambda q, k, v: splash_attention(q, k, v, seg, seg, causal=True, scale=0.2, block=128,
                                          interpret=pltpu.InterpretParams(), max_segment_len=230)
    got = _out_and_grads(fn, q, k, v, cot)
    want = _out_and_grads(_dense(seg, True, 0.2), q, k, v, cot)
    for name, a, r in zip(("out", "dq", "dk", "dv"), got, want):
        np.testing.assert_allclose(np.asarray(a), np.asarray(r), atol=2e-5, rtol=0, err_msg=name)


def test_grid_widths():
    assert grid_widths(4) == [4]
    assert grid_widths(32) == [2, 8, 32]
    assert grid_widths(32, bound=6) == [2, 6, 8, 32]
    assert grid_widths(16, bound=16) == [4, 16]


@pytest.mark.slow
def test_splash_narrow_default_grid():
    """Without a segment bound, a batch of short segments runs on a grid a quarter of the full width."""
    seg = _segments(1024, [[100, 28, 60, 68, 90, 166, 128, 100, 1, 99]])
    (qf, ql), (kf, kl) = sb.reach(jnp.asarray(seg), jnp.asarray(seg), False)
    lo, hi = sb.block_ranges(qf, ql, 128, 128)
    klo, khi = sb.block_ranges(kf, kl, 128, 128)
    assert max(int((hi - lo).max()), int((khi - klo).max())) <= 2 == grid_widths(8)[0]
    _assert_matches_dense("splash", seg, False, 2, 1)


# ---- lowering for the real accelerators, at the model's sizes ----

@pytest.mark.parametrize("kernel,platform,marker", [("splash", "tpu", "tpu_custom_call"),
                                                    ("pallas_gpu", "cuda", "__gpu$xla.gpu.triton")])
def test_kernels_lower_for_their_accelerator(kernel, platform, marker):
    """Forward and backward lower through Mosaic (TPU) / Triton (GPU) at the ViT's 16384-patch row, and no
    array of L x L or (blocks, block, block) elements appears in the program."""
    l, h, d = 16384, 16, 80
    seg = jnp.zeros((2, l), jnp.int32)                      # two rows: per-row block ranges under vmap
    q = jax.ShapeDtypeStruct((2, l, h, d), jnp.bfloat16)
    impl = {"splash": splash_attention, "pallas_gpu": pallas_gpu_attention}[kernel]
    loss = lambda q, k, v, seg: impl(q, k, v, seg, seg, causal=False, scale=0.1).astype(jnp.float32).sum()
    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    text = grad.trace(q, q, q, jax.ShapeDtypeStruct(seg.shape, seg.dtype)).lower(
        lowering_platforms=(platform,)).as_text()
    assert text.count(marker) >= 2                              # forward and backward kernels
    for bad in (f"{l}x{l}", "32x512x512", "128x128x128", "256x64x64"):
        assert bad not in text, bad


_SHARDED = """
import numpy as np, jax, jax.numpy as jnp, flax.linen as nn
from qwen2vl_jax import sharding
from qwen2vl_jax.model.attention import attention
assert jax.device_count() == 8
mesh = sharding.Mesh(np.asarray(jax.devices()).reshape(2, 2, 2), sharding.MESH_AXES)
seg = np.zeros((4, 256), np.int32)
for r, sizes in enumerate([[100, 56], [256], [30, 30, 30], [200]]):
    seg[r, :sum(sizes)] = np.repeat(np.arange(1, len(sizes) + 1), sizes)
seg = jnp.asarray(seg)
ks = jax.random.split(jax.random.key(0), 4)
q, cot = jax.random.normal(ks[0], (4, 256, 4, 16)), jax.random.normal(ks[3], (4, 256, 4, 16))
k, v = jax.random.normal(ks[1], (4, 256, 2, 16)), jax.random.normal(ks[2], (4, 256, 2, 16))
cot = cot * (seg != 0)[..., None, None]

def run(impl):
    def loss(q, k, v):
        out = attention(q, k, v, seg, seg, causal=True, scale=0.25, impl=impl)
        return (jnp.where((seg != 0)[..., None, None], out, 0) * cot).sum()
    f = jax.jit(jax.grad(loss, (0, 1, 2)))
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.RULES):
        return f(q, k, v), str(jax.make_jaxpr(f)(q, k, v))

want, _ = run("xla")
for impl in ("pallas_gpu_interpret", "splash_interpret"):
    got, jaxpr = run(impl)
    assert "shard_map" in jaxpr, impl
    for a, b in zip(got, want):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5, rtol=0, err_msg=impl)
print("OK")
"""


@pytest.mark.slow
def test_kernels_run_per_batch_shard():
    """On a mesh (8 CPU devices, data x fsdp x tensor = 2 x 2 x 2), the kernels run inside shard_map over the
    batch rows (a Pallas custom call would otherwise be gathered whole to every device) and still match the
    dense path's gradients."""
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r = subprocess.run([sys.executable, "-c", _SHARDED], env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0 and "OK" in r.stdout, r.stderr[-3000:]


# ---- wider sweep ----

@pytest.mark.slow
@pytest.mark.parametrize("kernel", ["splash", "pallas_gpu"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kernel_matches_dense_random_layouts(kernel, causal, seed):
    """Random packed rows (many short segments, long ones across several blocks, one segment filling the row,
    a row of padding only, ids used twice), with GQA."""
    rng = np.random.default_rng(seed)
    u = UNIT[kernel]
    l = 6 * u
    rows = [_random_sizes(rng, l, longest) for longest in (u // 4, 2 * u)]
    seg = _segments(l, rows + [[l], []])
    seg = np.concatenate([seg, np.where(seg[:1] > 0, seg[:1] % 3 + 1, 0)])   # ids in several runs
    _assert_matches_dense(kernel, seg, causal, h=6, hkv=2, d=24, seed=seed)


def test_run_segment_bound_reaches_the_splash_grid():
    """The run's `max_segment_len` (attention.segment_bound, set by StepFn while tracing) narrows the causal
    splash grid: a second, narrower width compiled behind a switch; non-causal (ViT) calls keep theirs."""
    from qwen2vl_jax.model.attention import attention, segment_bound
    q = jax.ShapeDtypeStruct((1, 2048, 2, 128), jnp.float32)
    seg = jax.ShapeDtypeStruct((1, 2048), jnp.int32)

    def branches(causal, bound):
        f = lambda q, s: attention(q, q, q, s, s, causal=causal, scale=0.1, impl="splash_interpret")
        with segment_bound(bound):
            jaxpr = str(jax.make_jaxpr(f)(q, seg))
        return jaxpr.count("pallas_call")
    assert branches(True, 0) == 1 and branches(True, 300) == 2
    assert branches(False, 300) == branches(False, 0)
