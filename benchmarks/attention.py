"""Attention backends at the model's packed shapes: forward + backward time and agreement with masked-dense.

Two cases, each one packed row:
- `vit`: non-causal, P patches holding many images of 56x56 to 448x448 (16 heads, head dim 80: the 675M ViT);
- `llm`: causal, L tokens holding examples of 64 to 2048 tokens (12 query / 2 key-value heads, head dim 128:
  the 2B LLM).
Every backend that runs on the platform (xla, blockwise; cudnn, cudnn_packed and pallas_gpu on NVIDIA GPUs;
splash on TPU) is timed on value_and_grad of sum(out * cotangent) with respect to q, k and v, and compared
with the xla path: the largest absolute difference of the output and of each gradient, over the non-padding
rows, relative to the largest absolute value of the xla result.

A third case, `vit_window`, is the same ViT row as a Qwen2.5-VL window layer sees it: each image cut into
windows of 8x8 patches (112 px; the edge windows partial), one segment per window
(`positions.vision_window_index`); its block fractions stand next to the full-attention layer's (`vit`).

For each case it also reports, next to the fraction of real (query, key) pairs, the fraction of (query block,
key block) pairs each block-sparse kernel computes, of those a dense flash kernel computes (all; causal: on or
below the diagonal): splash at its block size, pallas_gpu in its forward, dK/dV and dQ loops; and the grid
width splash picks for the row, as a fraction of the full width, from its default widths and with the bound
that the longest segment the case admits gives (`max_segment_len`).

    python benchmarks/attention.py                 # CPU: reduced lengths (P=4096, L=2048), float32
    python benchmarks/attention.py --full          # accelerator: P=16384, L=8192, bfloat16
    python benchmarks/attention.py --full --impls  # block fractions at the full shapes only, no timing

Prints one JSON line, speedups over xla first.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from qwen2vl_jax.model import segment_blocks as sb
from qwen2vl_jax.model.attention import attention
from qwen2vl_jax.model.splash import grid_widths
from qwen2vl_jax.positions import vision_window_index

SPLASH_BLOCK = 512                     # splash.splash_attention's default
GPU_BLOCKS = (128, 128, 64, 64, 64, 64)   # pallas_gpu.pallas_gpu_attention's default
LONGEST = {"vit": 32 * 32, "llm": 2048, "vit_window": 8 * 8}   # the largest segment each case admits


def packed_segments(length: int, sizes_fn, rng) -> tuple[np.ndarray, list[int]]:
    seg, sizes, used = np.zeros((1, length), np.int32), [], 0
    while True:
        n = sizes_fn(rng)
        if used + n > length:
            break
        sizes.append(n)
        seg[0, used:used + n] = len(sizes)
        used += n
    return seg, sizes


def image_grid(rng) -> tuple[int, int]:
    h, w = (int(x) * 2 for x in rng.integers(2, 17, 2))   # 4..32 patches a side
    return h, w


def image_patches(rng) -> int:
    h, w = image_grid(rng)
    return h * w


def window_segments(length: int, seed: int) -> tuple[np.ndarray, list[int]]:
    """The `vit` row of `seed` (the same images, drawn again) with one segment per 8x8-patch window."""
    rng = np.random.default_rng(seed)
    seg, sizes, used = np.zeros((1, length), np.int32), [], 0
    while True:
        h, w = image_grid(rng)
        if used + min(length // 2, h * w) > length:
            break
        _, windows = vision_window_index([[1, h, w]], 2, 4)
        for n in windows:
            sizes.append(int(n))
            seg[0, used:used + n] = len(sizes)
            used += int(n)
    return seg, sizes


def text_tokens(rng) -> int:
    return int(np.exp(rng.uniform(np.log(64), np.log(2048))))


def capped(sizes_fn, cap):
    return lambda rng: min(cap, sizes_fn(rng))


def case(name, length, heads, kv_heads, head_dim, dtype, rng):
    sizes_fn, causal = (image_patches, False) if name == "vit" else (text_tokens, True)
    seg, sizes = packed_segments(length, capped(sizes_fn, length // 2), rng)
    ks = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(ks[0], (1, length, heads, head_dim), dtype)
    k = jax.random.normal(ks[1], (1, length, kv_heads, head_dim), dtype)
    v = jax.random.normal(ks[2], (1, length, kv_heads, head_dim), dtype)
    cot = jax.random.normal(ks[3], q.shape, dtype) * jnp.asarray(seg != 0, dtype)[..., None, None]
    pairs = sum(n * (n + 1) / 2 if causal else n * n for n in sizes)
    return dict(seg=jnp.asarray(seg), q=q, k=k, v=v, cot=cot, causal=causal, scale=head_dim ** -0.5,
                sizes=sizes, pair_fraction=pairs / (length * (length + 1) / 2 if causal else length ** 2))


def block_fractions(name, seg, causal):
    """Fractions of block pairs computed by the block-sparse kernels (see the module docstring)."""
    length, out = seg.shape[1], {}
    pad = lambda x, m: jnp.pad(x, ((0, 0), (0, -x.shape[1] % m)))
    for block in (SPLASH_BLOCK // 4, SPLASH_BLOCK // 2, SPLASH_BLOCK):   # the default and two to tune towards
        s = pad(seg, block)
        nb = s.shape[1] // block
        bound = sb.range_bound(min(LONGEST[name], length // 2), block, block, nb, causal)
        (qf, ql), (kf, kl) = sb.reach(s, s, causal)
        need = max(int(jnp.subtract(*sb.block_ranges(qf, ql, block, block)[::-1]).max()),
                   int(jnp.subtract(*sb.block_ranges(kf, kl, block, block)[::-1]).max()))
        out[f"{name}_splash{block}_block_fraction"] = sb.computed_fraction(s, block, block, causal, min_one=True)
        for tag, widths in (("", grid_widths(nb)), ("_with_bound", grid_widths(nb, bound))):
            out[f"{name}_splash{block}_grid_width_fraction{tag}"] = min(w for w in widths if w >= need) / nb
    g = pad(seg, max(GPU_BLOCKS))
    bq, bk, bq_dkv, bk_dkv, bq_dq, bk_dq = GPU_BLOCKS
    out[f"{name}_pallas_gpu_fwd_block_fraction"] = sb.computed_fraction(g, bq, bk, causal)
    out[f"{name}_pallas_gpu_dkv_block_fraction"] = sb.computed_fraction(g, bk_dkv, bq_dkv, causal, keys=True)
    out[f"{name}_pallas_gpu_dq_block_fraction"] = sb.computed_fraction(g, bq_dq, bk_dq, causal)
    return {k: round(v, 4) for k, v in out.items()}


def timed(fn, args, repeats):
    out = jax.block_until_ready(fn(*args))   # compile + first run
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return float(np.median(times)), out


def run_case(c, impl, repeats):
    def loss(q, k, v, seg, cot):   # segments and cotangent are arguments: no constant folding of L^2 masks
        out = attention(q, k, v, seg, seg, causal=c["causal"], scale=c["scale"], impl=impl)
        return (out.astype(jnp.float32) * cot.astype(jnp.float32)).sum(), out

    fwd = jax.jit(lambda *a: loss(*a)[1])
    grad = jax.jit(jax.grad(lambda *a: loss(*a)[0], argnums=(0, 1, 2)))
    args = (c["q"], c["k"], c["v"], c["seg"], c["cot"])
    fwd_s, out = timed(fwd, args, repeats)
    step_s, grads = timed(grad, args, repeats)
    return fwd_s, step_s, (out, *grads)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--full", action="store_true", help="P=16384, L=8192 in bfloat16 (accelerators)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--impls", nargs="*", default=None,
                    help="default: every backend of the platform; none: block fractions only")
    ap.add_argument("--lengths", type=int, nargs=2, default=None, metavar=("P", "L"), help="override both lengths")
    args = ap.parse_args()
    platform = jax.default_backend()
    dtype = jnp.bfloat16 if args.full else jnp.float32
    impls = args.impls if args.impls is not None else (
        ["xla", "blockwise"] + {"gpu": ["cudnn", "cudnn_packed", "pallas_gpu"], "tpu": ["splash"]}.get(platform, []))
    lengths = dict(zip(("vit", "llm"), args.lengths or ((16384, 8192) if args.full else (4096, 2048))))
    shapes = {"vit": (16, 16, 80), "llm": (12, 2, 128)}
    rng = np.random.default_rng(0)
    fig, info = {}, {"platform": platform, "device": jax.devices()[0].device_kind, "dtype": jnp.dtype(dtype).name,
                     "cpu_avx512": "avx512f" in open("/proc/cpuinfo").read(), "loadavg": os.getloadavg()}
    for name in ("vit", "llm"):
        if name == "llm":   # the ViT row again, as a window layer sees it (block fractions only)
            wseg, wsizes = window_segments(lengths["vit"], 0)
            info["vit_window_segments"] = len(wsizes)
            info["vit_window_pair_fraction"] = round(sum(n * n for n in wsizes) / lengths["vit"] ** 2, 4)
            info.update(block_fractions("vit_window", jnp.asarray(wseg), False))
        c = case(name, lengths[name], *shapes[name], dtype, rng)
        info[f"{name}_length"], info[f"{name}_examples"] = lengths[name], len(c["sizes"])
        info[f"{name}_pair_fraction"] = round(c["pair_fraction"], 4)
        info.update(block_fractions(name, c["seg"], c["causal"]))
        valid = np.asarray(c["seg"][0] != 0)
        ref = None
        for impl in impls:
            try:
                fwd_s, step_s, res = run_case(c, impl, args.repeats)
            except Exception as e:   # a backend the platform lacks (cuDNN version, head dim ...)
                info[f"{name}_{impl}_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
                continue
            fig[f"{name}_{impl}_fwd_ms"] = round(1e3 * fwd_s, 2)
            fig[f"{name}_{impl}_fwd_bwd_ms"] = round(1e3 * step_s, 2)
            res = [np.asarray(x[0], np.float32)[valid] for x in res]
            if impl == "xla":
                ref = res
            elif ref is not None:
                fig[f"{name}_{impl}_rel_diff"] = max(float(np.abs(a - r).max() / np.abs(r).max())
                                                     for a, r in zip(res, ref))
                fig[f"{name}_{impl}_fwd_bwd_speedup"] = round(
                    fig[f"{name}_xla_fwd_bwd_ms"] / fig[f"{name}_{impl}_fwd_bwd_ms"], 2)
    order = sorted(fig, key=lambda k: (not k.endswith("speedup"), k))
    print(json.dumps({**{k: fig[k] for k in order}, **info}))


if __name__ == "__main__":
    main()
