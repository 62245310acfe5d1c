"""Loader throughput with the data in a bucket against the same files on local disk, and whether many small
object reads overlap.

The data is the generated demo set (small PNGs beside a JSONL with relative paths), written to a local
directory and uploaded unchanged to a bucket: the GCS emulator (fake-gcs-server from the `test` extra,
started here on a free port) unless `--bucket gs://...` names a real one. The run measures

1. raw reads of `--reads` image objects: one after another (`storage.read_bytes` in a loop) against all at
   once (`storage.read_many`, which the processor uses for the images of a record);
2. the grain loader (processor + packing, `--workers` processes) over the local JSONL and the bucket's, in
   examples/s after a warm-up (each worker process connects once, ~1 s), for each worker count.

    python benchmarks/cloud_loader.py [--examples 600] [--workers 0 2] [--batches 150] [--bucket gs://b/x]

The emulator answers from memory on this machine, so it shows the client's cost, not a real network's
latency; against a real bucket the overlap matters more. Ends with one JSON line, ratios first.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cpu_flags() -> str:
    try:
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return "unknown"
    return "avx512" if "avx512f" in flags else ("avx2" if "avx2" in flags else "no-avx2")


def upload_dir(local: str, remote: str) -> int:
    from qwen2vl_jax import storage
    files = {}
    for folder, _, names in os.walk(local):
        for n in names:
            path = os.path.join(folder, n)
            with open(path, "rb") as f:
                files[storage.join(remote, os.path.relpath(path, local).replace(os.sep, "/"))] = f.read()
    storage.filesystem(remote).pipe(files)   # one concurrent batch of uploads
    return len(files)


def loader_rate(path: str, workers: int, batches: int, cfg, warmup: int = 10) -> float:
    from qwen2vl_jax.data import Processor
    from qwen2vl_jax.data.pipeline import PipelineConfig, make_loader
    pipe = PipelineConfig(buckets=((768, 384),), batch_size=4, window=16, workers=workers, shard_index=0,
                          shard_count=1)
    with make_loader(path, Processor.from_config(cfg), cfg, pipe) as loader:
        for _ in range(warmup):   # every worker started and connected
            next(loader)
        t0, n0 = time.perf_counter(), loader.examples
        for _ in range(batches):
            next(loader)
        return (loader.examples - n0) / (time.perf_counter() - t0)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--examples", type=int, default=600)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    ap.add_argument("--batches", type=int, default=150, help="batches timed after 10 of warm-up (the data repeats)")
    ap.add_argument("--repeats", type=int, default=2, help="alternating runs of each; the best counts")
    ap.add_argument("--reads", type=int, default=200, help="image objects in the raw read test")
    ap.add_argument("--bucket", default="", help="a real bucket prefix (gs://b/x); default: the emulator")
    args = ap.parse_args()

    server = None
    if not args.bucket:
        sys.path.insert(0, os.path.join(ROOT, "tests"))
        import gcs
        server = gcs.FakeGCS(os.path.join(tempfile.mkdtemp(), "fake-gcs-server.log"))
        os.environ.update(server.env)
        args.bucket = server.create_bucket("bench") + "/data"

    import qwen2vl_jax as qv
    from qwen2vl_jax import storage
    from qwen2vl_jax.data import synthetic
    try:
        local = os.path.join(tempfile.gettempdir(), f"qwen2vl_cloud_bench_{args.examples}")
        train, _ = synthetic.generate(local, size=args.examples, heldout_size=10,
                                      config=synthetic.SyntheticConfig.demo())
        t0 = time.perf_counter()
        n_files = upload_dir(local, args.bucket)
        upload_s = time.perf_counter() - t0
        remote_train = storage.join(args.bucket, os.path.basename(train))
        print(f"data: {args.examples} examples, {n_files} objects uploaded to {args.bucket} in {upload_s:.1f} s",
              flush=True)

        images = storage.glob(storage.join(args.bucket, "train", "*.png"))[:args.reads]
        sequential_s = concurrent_s = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            one_by_one = sum(len(storage.read_bytes(p)) for p in images)
            sequential_s = min(sequential_s, time.perf_counter() - t0)
            t0 = time.perf_counter()
            together = sum(len(b) for b in storage.read_many(images).values())
            concurrent_s = min(concurrent_s, time.perf_counter() - t0)
        assert one_by_one == together
        print(f"raw reads of {len(images)} objects ({one_by_one / 1e3:.0f} kB): one at a time {sequential_s:.2f} s, "
              f"concurrently {concurrent_s:.2f} s", flush=True)

        cfg = qv.config.tiny()
        rates = {}
        for w in args.workers:   # alternating, best of `--repeats` each: the machine's load drifts
            rates[w] = {"local": 0.0, "bucket": 0.0}
            for _ in range(args.repeats):
                for where, path in (("local", train), ("bucket", remote_train)):
                    rates[w][where] = max(rates[w][where], loader_rate(path, w, args.batches, cfg))
            print(f"loader, {w} workers: local {rates[w]['local']:.1f} examples/s, bucket "
                  f"{rates[w]['bucket']:.1f} examples/s", flush=True)
    finally:
        if server is not None:
            server.stop()

    result = {
        **{f"bucket_vs_local_examples_per_s_{w}w": round(r["bucket"] / r["local"], 3) for w, r in rates.items()},
        "concurrent_read_speedup": round(sequential_s / concurrent_s, 2),
        **{f"examples_per_s_{w}w": {k: round(v, 1) for k, v in r.items()} for w, r in rates.items()},
        "reads": len(images), "read_kb": round(one_by_one / 1e3), "sequential_s": round(sequential_s, 3),
        "concurrent_s": round(concurrent_s, 3), "examples": args.examples, "batches": args.batches,
        "store": "fake-gcs-server (local emulator)" if server else args.bucket,
        "cpu": cpu_flags(), "cores": os.cpu_count(), "loadavg": [round(x, 2) for x in os.getloadavg()],
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
