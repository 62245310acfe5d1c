"""The Qwen2.5-VL vision tower, ours vs transformers 4.57.6 (eager and sdpa), forward on the CPU.

The same random weights on both sides (ours loaded from the reference's through the family's HF key table);
one image of 448x448 (1024 patches) and one of 1344x1344 (9216 patches), each in windows of 112 px with full
attention in `fullatt_block_indexes`. Ours is the jitted packed tower (window segments built on the host, as
the data pipeline does); the reference is `Qwen2_5_VisionTransformerPretrainedModel` under `torch.no_grad()`.
Figures: median forward seconds, the reference's time over ours (ratios first), and the largest absolute
difference of the merged tokens.

    python benchmarks/vit_2_5.py                    # the released ViT: 32 blocks of width 1280
    python benchmarks/vit_2_5.py --depth 4          # fewer blocks (same per-block shapes) on a slow machine
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from machine import machine


def median_time(fn, repeats):
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--depth", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--sizes", type=int, nargs="*", default=[448, 1344])
    ap.add_argument("--eager-max-patches", type=int, default=4096,
                    help="skip the eager reference above this many patches (its full-attention blocks hold "
                         "heads x patches^2 f32 scores: 5.4 GB at 1344x1344)")
    args = ap.parse_args()

    import jax
    import torch
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

    from qwen2vl_jax import config as C, hf
    from qwen2vl_jax.inputs import batch_from_hf
    from qwen2vl_jax.model.qwen2vl import Qwen2VLModule

    fullatt = tuple(i for i in (7, 15, 23, 31) if i < args.depth) or (args.depth - 1,)
    cfg = C.preset("qwen2_5_vl-7b")
    cfg = cfg.replace(vision=C.qwen2_5_vision(cfg.text.hidden_size, depth=args.depth, fullatt=fullatt))
    torch.manual_seed(0)
    hfc = cfg.family.vision_to_hf(cfg.vision)
    from transformers import Qwen2_5_VLConfig
    ref = {}
    for attn in ("eager", "sdpa"):
        vc = Qwen2_5_VLConfig(vision_config=hfc).vision_config
        vc._attn_implementation = attn
        ref[attn] = Qwen2_5_VisionTransformerPretrainedModel(vc).eval()
    ref["sdpa"].load_state_dict(ref["eager"].state_dict())
    state = {f"visual.{k}": v.detach().numpy() for k, v in ref["eager"].state_dict().items()}
    params = {}
    for ours, (name, n, to_ours, _) in hf.param_map(cfg).items():
        if ours[0] != "visual":
            continue
        value = np.stack([to_ours(state[name.format(i=i)]) for i in range(n)]) if n else to_ours(state[name])
        hf._set(params, ours, jax.numpy.asarray(value))
    module = Qwen2VLModule(cfg)
    tower = jax.jit(lambda p, b: module.apply({"params": {"visual": p}}, b["patches"], b["patch_segment_ids"],
                                              b["patch_positions"], b["patch_window_ids"], method="encode_vision"))
    figures, info = {}, {"depth": args.depth, "width": cfg.vision.embed_dim, "fullatt_block_indexes": list(fullatt),
                         **machine()}
    rng = np.random.default_rng(0)
    for size in args.sizes:
        g = size // 14
        grid = np.asarray([[1, g, g]])
        pixels = rng.standard_normal((g * g, cfg.vision.patch_dim)).astype(np.float32)
        ids = [cfg.vision_start_token_id] + [cfg.image_token_id] * (g * g // 4) + [cfg.vision_end_token_id]
        batch, _ = batch_from_hf(cfg, np.asarray([ids]), pixel_values=pixels, image_grid_thw=grid)
        b = {k: jax.numpy.asarray(batch[k]) for k in ("patches", "patch_segment_ids", "patch_positions",
                                                       "patch_window_ids")}
        ours_s = median_time(lambda: jax.block_until_ready(tower(params["visual"], b)), args.repeats)
        merged = np.asarray(tower(params["visual"], b))[0][batch["vision_index"][0][batch["vision_index"][0] >= 0]]
        for attn, model in ref.items():
            if attn == "eager" and g * g > args.eager_max_patches:
                info[f"hf_eager_skipped_{size}"] = f"{g * g} patches > --eager-max-patches"
                continue
            with torch.no_grad():
                run = lambda: model(torch.from_numpy(pixels), grid_thw=torch.from_numpy(grid))
                t = median_time(run, args.repeats)
                out = run().numpy()
            figures[f"hf_{attn}_over_ours_{size}"] = round(t / ours_s, 3)
            info[f"hf_{attn}_s_{size}"] = round(t, 4)
            info[f"max_abs_diff_{attn}_{size}"] = float(np.abs(out - merged).max())
        info[f"ours_s_{size}"] = round(ours_s, 4)
        info[f"patches_{size}"] = int(g * g)
    print(json.dumps({**figures, **info}))


if __name__ == "__main__":
    main()
