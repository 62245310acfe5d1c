"""Step time and MFU of the project's train step for a 2B-shaped model at a realistic packed bucket.

`--full`: the real 2B (`preset("2b")`: LLM 1536 wide, 28 layers, 12 heads / 2 KV heads, SwiGLU 8960, vocab
151936, tied head; ViT 1280 wide, 32 blocks) in bfloat16 compute (float32 master weights and AdamW state) at
one row of L=8192 text tokens and P=16384 patches, the large bucket of the packing benchmark. Meant for one
accelerator (H200 / TPU); the peak is the device kind's dense bf16 peak (`metrics.peak_flops`).

Default (CPU): the same shape scaled down in float32: LLM 384 wide (head dim 128 kept: 3 heads, 1 KV head,
M-RoPE [16, 24, 24]), SwiGLU 2240, 2 layers, vocab 16384 (untied); ViT 320 wide (head dim 80 kept: 4 heads),
2 blocks; one row of L=1024, P=2048 (the full bucket's 2 patches per text token). The peak is the FLOP/s that
a 2048^3 float32 matmul reaches on this machine, measured here (or `--peak-tflops`), so the MFU says how
close the step comes to the best the CPU does on one large matmul.

The row is packed by the project's packer (`pack_examples`) from examples of random content whose sizes
follow the realistic mix's shape: images of log-uniform area (4 to P/4 patches, even sides in patches), 10%
text-only, a question of 16-64 tokens, an answer (the target tokens) of 20-250 tokens for 30% (descriptions)
and 1-3 tokens otherwise, added while they fit.
FLOPs are `metrics.step_flops` (real tokens and patches only, vision tower included, remat not counted); the
step time is the median of `--steps` steps after two warm-up steps (compilation and the first run).

    python benchmarks/mfu.py [--steps 3] [--remat none] [--peak-tflops X]
    python benchmarks/mfu.py --full [--remat none|dots|full] [--loss-chunk 2048]

Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import numpy as np


def reduced_config():
    from qwen2vl_jax.config import TextConfig, VisionConfig, tiny
    # tiny() places the special tokens at the top of the (reduced) vocabulary.
    return tiny(16384).replace(
        vision=VisionConfig(depth=2, embed_dim=320, num_heads=4, hidden_size=384),
        text=TextConfig(vocab_size=16384, hidden_size=384, intermediate_size=2240, num_hidden_layers=2,
                        num_attention_heads=3, num_key_value_heads=1, mrope_section=(16, 24, 24),
                        max_position_embeddings=32768))


def packed_rows(config, rows: int, text_len: int, patch_len: int, seed: int = 0) -> tuple[dict, int]:
    """`rows` rows of (text_len, patch_len) packed from random examples of realistic sizes; the number of
    examples."""
    from qwen2vl_jax.data.packing import pack_examples
    rng = np.random.default_rng(seed)
    mu = config.vision.merge_unit
    room = [[text_len, patch_len] for _ in range(rows)]
    chosen, misses = [], 0
    while misses < 200:   # draw until 200 draws in a row fit nowhere: the rows are full
        n_patches = 0
        if rng.random() >= 0.10:
            area = math.exp(rng.uniform(math.log(4), math.log(max(4, patch_len // 4))))
            aspect = math.exp(rng.uniform(-math.log(3), math.log(3)))
            h = max(2, 2 * round(math.sqrt(area * aspect) / 2))
            w = max(2, 2 * round(area / h / 2))
            n_patches = h * w
        q = int(rng.integers(16, 65))
        a = int(rng.integers(20, 251)) if rng.random() < 0.3 else int(rng.integers(1, 4))
        n_text = q + a + (n_patches // mu + 2 if n_patches else 0)
        b = next((i for i, (t, p) in enumerate(room) if n_text <= t and n_patches <= p), None)
        if b is None:
            misses += 1
            continue
        misses = 0
        room[b][0] -= n_text
        room[b][1] -= n_patches
        chosen.append(example(config, rng, q, a, (h, w) if n_patches else None))
    return pack_examples(chosen, text_len, patch_len, config=config, batch_size=rows), len(chosen)


def example(config, rng, q: int, a: int, grid) -> dict:
    """An HF-style encoded example: question (with the image's placeholder span), answer as the target."""
    vocab = config.vision_start_token_id   # ordinary token ids lie below the special tokens
    ids = list(rng.integers(2, vocab, q))
    out = {"pixel_values": np.zeros((0, config.vision.patch_dim), np.float32),
           "image_grid_thw": np.zeros((0, 3), np.int64)}
    if grid is not None:
        h, w = grid
        ids += [config.vision_start_token_id] + [config.image_token_id] * (h * w // config.vision.merge_unit) \
            + [config.vision_end_token_id]
        out["pixel_values"] = rng.standard_normal((h * w, config.vision.patch_dim), np.float32)
        out["image_grid_thw"] = np.array([[1, h, w]], np.int64)
    answer = list(rng.integers(2, vocab, a))
    out["input_ids"] = np.array(ids + answer, np.int32)
    out["labels"] = np.array([-100] * len(ids) + answer, np.int32)
    return out


def matmul_flops(n: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of an n^3 float32 matmul on the default device (median of `repeats`, after a warm-up)."""
    import jax
    import jax.numpy as jnp
    x = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    f = jax.jit(lambda a, b: a @ b)
    f(x, x).block_until_ready()
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        f(x, x).block_until_ready()
        ts.append(time.perf_counter() - t)
    return 2 * n ** 3 / float(np.median(ts))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--full", action="store_true", help="the real 2B in bfloat16 at (8192, 16384): accelerators")
    ap.add_argument("--steps", type=int, default=3, help="timed steps (after two warm-up steps)")
    ap.add_argument("--rows", type=int, default=1)
    ap.add_argument("--text-len", type=int, default=0, help="bucket text length (default 8192 full, 1024 reduced)")
    ap.add_argument("--patch-len", type=int, default=0, help="bucket patches (default 2 per text token)")
    ap.add_argument("--remat", default="none", choices=["none", "full", "dots", "dots_no_batch"])
    ap.add_argument("--loss-chunk", type=int, default=0, help="text positions per logits chunk (0 = all at once)")
    ap.add_argument("--attn-impl", default="auto")
    ap.add_argument("--profile", default="", help="write a trace of two more steps here (perfetto JSON included)")
    ap.add_argument("--peak-tflops", type=float, default=0.0,
                    help="peak per device; default: the device kind's bf16 peak, or a measured f32 matmul on CPU")
    args = ap.parse_args()

    import jax
    import jax.numpy as jnp

    from qwen2vl_jax import sharding
    from qwen2vl_jax.config import preset
    from qwen2vl_jax.model.qwen2vl import Qwen2VLModule
    from qwen2vl_jax.train import batches, metrics, optim
    from qwen2vl_jax.train.config import OptimConfig
    from qwen2vl_jax.train.state import init_state, state_shardings
    from qwen2vl_jax.train.step import StepFn

    config = preset("2b") if args.full else reduced_config()
    dtype = jnp.bfloat16 if args.full else jnp.float32
    L = args.text_len or (8192 if args.full else 1024)
    P = args.patch_len or 2 * L
    device = jax.devices()[0]

    # -- the peak the MFU is measured against
    if args.peak_tflops:
        peak, peak_source = args.peak_tflops * 1e12, "--peak-tflops"
    elif device.platform == "cpu":
        peak, peak_source = matmul_flops(), "measured 2048^3 float32 matmul"
    else:
        peak, peak_source = metrics.peak_flops(device.device_kind), f"bf16 peak of {device.device_kind}"
        if peak is None:
            raise SystemExit(f"no known peak FLOP/s for device kind {device.device_kind!r}; pass --peak-tflops")

    # -- batch, model, state, step
    rows, n_examples = packed_rows(config, args.rows, L, P)
    host = batches.stack_micro_batches([rows])
    parts = ("vit", "merger", "llm")
    flops = metrics.step_flops(config, host, parts)
    text_fill = float((host["segment_ids"] > 0).mean())
    patch_fill = float((host["patch_segment_ids"] > 0).mean())

    mesh = sharding.make_mesh(devices=[device])
    module = Qwen2VLModule(config, dtype=dtype, param_dtype=jnp.float32, remat=args.remat, attn_impl=args.attn_impl)
    ocfg = OptimConfig()
    tx = optim.make_optimizer(ocfg, parts)
    shardings = state_shardings(module, tx, parts, mesh)
    state = init_state(module, tx, parts, shardings, seed=0)
    n_params = sum(x.size for x in jax.tree.leaves(state.params))
    step = StepFn(mesh, shardings, module=module, tx=tx, parts=parts, schedules=optim.schedules(ocfg, parts),
                  loss_chunk=args.loss_chunk)
    batch = batches.to_device(host, step.batch_shardings(host))
    print(f"{'2B' if args.full else 'reduced 2B-shaped'} model, {n_params:,} params, {jnp.dtype(dtype).name} "
          f"compute, remat {args.remat}; bucket ({L}, {P}) x {args.rows} row(s) holding {n_examples} examples "
          f"(text fill {text_fill:.3f}, patch fill {patch_fill:.3f}); {flops / 1e12:.3f} TFLOP per step; peak "
          f"{peak / 1e12:.2f} TFLOP/s ({peak_source}) on {device.device_kind}", flush=True)

    t0 = time.perf_counter()
    for _ in range(2):
        state, m = step(state, batch)
        jax.block_until_ready(m["loss"])
    warm_s = time.perf_counter() - t0
    times = []
    for _ in range(args.steps):
        t = time.perf_counter()
        state, m = step(state, batch)
        jax.block_until_ready((state.params, m["loss"]))
        times.append(time.perf_counter() - t)
    step_s = float(np.median(times))
    if args.profile:
        with jax.profiler.trace(args.profile, create_perfetto_trace=True):
            for _ in range(2):
                state, m = step(state, batch)
            jax.block_until_ready((state.params, m["loss"]))
    mfu = flops / step_s / peak
    from machine import machine
    print(f"step {step_s:.3f} s (median of {args.steps}: {', '.join(f'{t:.3f}' for t in times)}), "
          f"{flops / step_s / 1e12:.3f} TFLOP/s, MFU {mfu:.3f}; loss {float(m['loss']):.3f}; warm-up {warm_s:.1f} s",
          flush=True)
    print(json.dumps({
        "mfu": round(mfu, 4), "step_s": round(step_s, 4), "tflops_per_s": round(flops / step_s / 1e12, 4),
        "step_tflop": round(flops / 1e12, 4), "peak_tflops": round(peak / 1e12, 3), "peak_source": peak_source,
        "tokens_per_s": round(float((host["segment_ids"] > 0).sum()) / step_s, 1),
        "text_fill": round(text_fill, 4), "patch_fill": round(patch_fill, 4), "examples": n_examples,
        "bucket": [L, P], "rows": args.rows, "model": "2b" if args.full else "reduced-2b-shape",
        "params": n_params, "dtype": jnp.dtype(dtype).name, "remat": args.remat, "loss_chunk": args.loss_chunk,
        "device": device.device_kind, "warmup_s": round(warm_s, 1), "steps": args.steps, **machine()}))


if __name__ == "__main__":
    main()
