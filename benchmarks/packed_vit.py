"""ViT forward over one packed bucket of P patches holding many images: masked-dense vs segment-aware.

Reduced width (E=256, 4 heads, depth 2) so P=16384 fits a CPU run; the attention cost ratio is what
matters and does not depend on the width. Image sizes are drawn from 56x56 to 448x448 (smart-resized
grids), packed until the bucket is full. Prints one JSON line, ratios first.

    python benchmarks/packed_vit.py [--sizes 4096 16384] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from qwen2vl_jax.config import VisionConfig
from qwen2vl_jax.model.vision import VisionTower
from qwen2vl_jax.positions import vision_patch_positions, vision_patch_segments


def packed_bucket(p: int, rng) -> tuple[np.ndarray, np.ndarray, list[int]]:
    grids, used = [], 0
    while True:
        h, w = (int(x) * 2 for x in rng.integers(2, 17, 2))      # 4..32 patches a side = 56..448 px
        if used + h * w > p:
            break
        grids.append((1, h, w))
        used += h * w
    seg = np.zeros(p, np.int32)
    pos = np.zeros((p, 2), np.int32)
    seg[:used], pos[:used] = vision_patch_segments(grids), vision_patch_positions(grids)
    return seg[None], pos[None], [h * w for _, h, w in grids]


def time_fn(fn, *args, repeats):
    jax.block_until_ready(fn(*args))            # compile
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[4096, 16384])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    cfg = VisionConfig(depth=2, embed_dim=256, num_heads=4, hidden_size=256)
    rng = np.random.default_rng(0)
    fig = {}
    for p in args.sizes:
        seg, pos, sizes = packed_bucket(p, rng)
        x = jax.random.normal(jax.random.key(0), (1, p, cfg.patch_dim), jnp.float32)
        res = {}
        for impl in ("xla", "blockwise"):
            tower = VisionTower(cfg, attn_impl=impl)
            params = jax.jit(tower.init)(jax.random.key(1), x, seg, pos)
            fn = jax.jit(tower.apply)
            res[impl] = time_fn(fn, params, x, seg, pos, repeats=args.repeats)
            res[impl + "_out"] = np.asarray(fn(params, x, seg, pos))
        valid = np.repeat(seg[0].reshape(-1, 4)[:, 0] != 0, 1)
        fig[f"speedup_{p}"] = round(res["xla"] / res["blockwise"], 2)
        fig[f"dense_s_{p}"] = round(res["xla"], 3)
        fig[f"blockwise_s_{p}"] = round(res["blockwise"], 3)
        fig[f"images_{p}"] = len(sizes)
        fig[f"pair_fraction_{p}"] = round(sum(n * n for n in sizes) / p ** 2, 4)   # sum n_i^2 / P^2
        fig[f"max_abs_diff_{p}"] = float(np.abs(res["xla_out"][0][valid] - res["blockwise_out"][0][valid]).max())
    order = sorted(fig, key=lambda k: (not k.startswith("speedup"), k))
    print(json.dumps({k: fig[k] for k in order}))


if __name__ == "__main__":
    main()
