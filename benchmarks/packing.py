"""Packing fill and loader throughput on a realistic mix, against pad-to-longest batching of the same data.

The mix (`SyntheticConfig.realistic()`, real Qwen2 vocabulary, the processor's hub pixel settings): images
from 28x28 to 1500x1000 with aspect ratios up to 3:1 (log-uniform area, no downscaling), 10% text-only,
10% with 2-4 images, 5% videos of 4-16 frames, 30% of the single-image questions asking for a description
(answers of up to ~250 tokens, one word otherwise), at most 16384 patches per example. The run:

1. generates the set (cached under --data-dir) and a held-out sample of it;
2. picks 3 buckets from the held-out sample (`suggest_buckets`: the data's patches per text token at text
   lengths 4096 and 8192, the latter twice at that ratio -10% and +10%);
3. runs the grain loader with `--workers` processes, repeating the data as training does, until it has
   delivered one epoch's worth of examples, and measures the real batches: text fill = real tokens / (B * L),
   patch fill = real patches / (B * P), summed over all batches (the one-off drain at the very end of a
   finite stream is not part of training and not measured);
4. batches the same examples, in file order, `--pad-batch` at a time padded to the longest text and the most
   patches in each batch, and measures the same fills.

    python benchmarks/packing.py [--examples 2000] [--workers 2] [--batch-size 4] [--window 512]

Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import numpy as np


def example_sizes(batch: dict) -> list[tuple[int, int]]:
    """(text tokens, patches) of each example of a packed batch, by `example_index`."""
    idx = batch["example_index"]
    n = int(idx.max()) + 1
    text = np.bincount(idx[idx >= 0], minlength=n)
    pads = np.bincount(idx[batch["vision_index"] >= 0], minlength=n)
    return [(int(t), int(4 * p)) for t, p in zip(text, pads)]


def pad_to_longest(sizes: list[tuple[int, int]], batch: int) -> tuple[float, float, int]:
    s = np.asarray(sizes)
    real, padded, shapes = np.zeros(2), np.zeros(2), set()
    for i in range(0, len(s), batch):
        chunk = s[i:i + batch]
        longest = chunk.max(0)
        real += chunk.sum(0)
        padded += batch * longest
        shapes.add(tuple(longest))
    return real[0] / padded[0], real[1] / max(padded[1], 1), len(shapes)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--examples", type=int, default=2000)
    ap.add_argument("--calibration", type=int, default=300, help="held-out examples the buckets are fitted to")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=4, help="rows per packed batch")
    ap.add_argument("--window", type=int, default=512, help="look-ahead of the packer, in examples")
    ap.add_argument("--text-lens", type=int, nargs="+", default=[4096, 8192])
    ap.add_argument("--pad-batch", type=int, default=8, help="examples per pad-to-longest batch")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data-dir", default=None)
    args = ap.parse_args()

    import qwen2vl_jax as qv
    from qwen2vl_jax.data import Processor, read_jsonl, synthetic
    from qwen2vl_jax.data.packing import suggest_buckets
    from qwen2vl_jax.data.pipeline import PipelineConfig, make_loader

    # -- data
    mix = synthetic.SyntheticConfig.realistic()
    data_dir = args.data_dir or os.path.join(tempfile.gettempdir(), f"qwen2vl_packing_bench_{args.seed}")
    t0 = time.perf_counter()
    train, heldout = synthetic.generate(data_dir, size=args.examples, heldout_size=args.calibration,
                                        seed=args.seed, config=mix, workers=max(1, args.workers))
    print(f"data: {args.examples} examples + {args.calibration} held out in {data_dir} "
          f"({time.perf_counter() - t0:.0f} s)", flush=True)
    config = qv.Qwen2VLConfig()
    proc = Processor.default()
    describe_mix(train, data_dir, proc)

    # -- buckets from the held-out sample
    sizes, t0 = [], time.perf_counter()
    for record in read_jsonl(heldout):
        ex = proc.encode_record(record)
        sizes.append((len(ex["input_ids"]), len(ex["pixel_values"]) + len(ex["pixel_values_videos"])))
    encode_ms = (time.perf_counter() - t0) / len(sizes) * 1e3
    buckets = suggest_buckets(sizes, args.text_lens)
    print(f"buckets (text_len, patch_len) fitted to the held-out sample: {list(buckets)}; decoding and "
          f"preprocessing take {encode_ms:.1f} ms per example on one core", flush=True)

    # -- our loader, repeating the data, until one epoch's worth of examples is out
    pipeline = PipelineConfig(buckets=buckets, batch_size=args.batch_size, window=args.window, seed=args.seed,
                              workers=args.workers, skip_budget=args.examples // 100, shard_index=0,
                              shard_count=1)
    real, budget, shapes, per_example = np.zeros(2), np.zeros(2), set(), {}
    t_start = time.perf_counter()
    with make_loader(train, proc, config, pipeline) as loader:
        batch = next(loader)
        t_first, n_first = time.perf_counter(), loader.examples
        while True:
            B, L = batch["input_ids"].shape
            P = batch["patches"].shape[1]
            shapes.add((L, P))
            real += [(batch["segment_ids"] > 0).sum(), (batch["patch_segment_ids"] > 0).sum()]
            budget += [B * L, B * P]
            per_example.update(zip(loader.sources, example_sizes(batch)))
            if loader.examples >= args.examples:
                break
            batch = next(loader)
        t_end = time.perf_counter()
        examples, batches, skipped, pack_s = loader.examples, loader.batches, loader.skipped, loader.pack_seconds
    steady = (examples - n_first) / (t_end - t_first)
    pack_ms = pack_s / examples * 1e3
    text_fill, patch_fill = real / budget
    print(f"packed:         text fill {text_fill:.4f}  patch fill {patch_fill:.4f}  {len(shapes)} shapes "
          f"{sorted(shapes)}  {batches} batches of {args.batch_size} rows, {examples} examples, "
          f"{len(skipped)} skipped", flush=True)

    # -- pad-to-longest over the same examples, in file order
    order = [r.source for r in read_jsonl(train)]
    sizes = [per_example[s] for s in order if s in per_example]
    p_text, p_patch, p_shapes = pad_to_longest(sizes, args.pad_batch)
    print(f"pad-to-longest: text fill {p_text:.4f}  patch fill {p_patch:.4f}  {p_shapes} shapes "
          f"(batches of {args.pad_batch} examples)", flush=True)
    print(f"loader: {steady:.1f} examples/s with {args.workers} workers after a {t_first - t_start:.1f} s start "
          f"({examples / (t_end - t_start):.1f} examples/s including it); packing costs {pack_ms:.1f} ms per "
          f"example in the training process, decoding {encode_ms:.1f} ms per example per worker core",
          flush=True)
    print(json.dumps({
        "text_fill": round(float(text_fill), 4), "patch_fill": round(float(patch_fill), 4), "shapes": len(shapes),
        "pad_to_longest_text_fill": round(float(p_text), 4), "pad_to_longest_patch_fill": round(float(p_patch), 4),
        "pad_to_longest_shapes": p_shapes, "examples_per_s": round(steady, 1), "workers": args.workers,
        "encode_ms_per_example": round(encode_ms, 1), "pack_ms_per_example": round(pack_ms, 2),
        "examples": examples, "skipped": len(skipped), "batches": batches, "batch_size": args.batch_size,
        "window": args.window, "buckets": [list(b) for b in buckets], "pad_batch": args.pad_batch}))


def describe_mix(train: str, root: str, proc) -> None:
    from PIL import Image
    kinds, sides, text = {"text-only": 0, "one image": 0, "2-4 images": 0, "video": 0}, [], []
    with open(train) as f:
        records = [json.loads(line) for line in f]
    for r in records:
        images = r.get("images", [])
        kinds["video" if r.get("videos") else "2-4 images" if len(images) > 1 else
              "one image" if images else "text-only"] += 1
        for p in images:
            with Image.open(os.path.join(root, p)) as im:
                sides.append(im.size)
        text.append([len(proc.tokenizer.encode(m["content"].replace("<image>", "").replace("<video>", "")).ids)
                     for m in r["messages"]])
    sides, text = np.asarray(sides), np.asarray(text)
    area = sides.prod(1)
    n = len(records)
    print(f"mix: {', '.join(f'{k} {v / n:.0%}' for k, v in kinds.items())}; images from "
          f"{sides[area.argmin()].tolist()} to {sides[area.argmax()].tolist()} px (w, h), median area "
          f"{int(np.median(area))} px; questions of {text[:, 0].min()}-{text[:, 0].max()} tokens, answers of "
          f"{text[:, 1].min()}-{text[:, 1].max()} tokens (median {int(np.median(text[:, 1]))})", flush=True)


if __name__ == "__main__":
    main()
