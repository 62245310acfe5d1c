"""Data loading at scale: time to the first batch and peak host memory for 1k, 100k and 1M records of JSONL,
ArrayRecord and Parquet, in-process and with worker processes, against the former loader that parsed every
line into a list before the first step ("list", the reference); and loader examples/s with the images
embedded in shards against JSONL + image files (the same pictures).

Each measurement runs in a fresh process (after its imports): `first_batch_s` is make_loader + the first
batch (`first_batch_cpu_s`: the CPU time of the training process for it, which the machine's load changes
less); `extra_mb` is the peak PSS of that process and its workers together (proportional set size: pages
shared between processes, such as the memory-mapped index, count once) minus the PSS before make_loader.

    python benchmarks/data_scale.py [--sizes 1000 100000 1000000] [--workers 0 8] [--dir /tmp/qv_data_scale]
    python benchmarks/data_scale.py --throughput [--examples 300]

Text-only records (as in the measurement that motivated it), the demo model's tokenizer. Ends with one JSON
line: ratios first (1M against 1k per format; embedded against files), then the raw figures; medians over
alternated rounds for examples/s.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FORMATS = ("list", "jsonl", "array_record", "parquet")


def machine() -> dict:
    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    return {"cpus": os.cpu_count(), "avx512": "avx512f" in flags, "loadavg": [round(x, 2) for x in os.getloadavg()]}


# -- data ---------------------------------------------------------------------------------------------------

def make_jsonl(path: str, n: int) -> None:
    """n text-only records of ~60 tokens, written once and reused."""
    if os.path.exists(path):
        return
    words = "the quick brown fox jumps over a lazy dog while seven small birds sing".split()
    with open(path + ".tmp", "w") as f:
        for i in range(n):
            q = " ".join(words[(i + k) % len(words)] for k in range(12))
            f.write(json.dumps({"messages": [{"role": "user", "content": f"Question {i}: {q}?"},
                                             {"role": "assistant", "content": f"Answer {i}: {q[::-1]}."}]}) + "\n")
    os.replace(path + ".tmp", path)


def prepare(root: str, n: int) -> dict:
    from qwen2vl_jax.data.convert import convert
    os.makedirs(root, exist_ok=True)
    jsonl = os.path.join(root, f"text_{n}.jsonl")
    make_jsonl(jsonl, n)
    specs = {"list": jsonl, "jsonl": jsonl}
    for fmt in ("array_record", "parquet"):
        out = os.path.join(root, f"text_{n}_{fmt}")
        if not os.path.exists(os.path.join(out, "done")):
            t = time.perf_counter()
            convert(jsonl, out, fmt, shard_size=100_000, progress=False)
            open(os.path.join(out, "done"), "w").write(f"{time.perf_counter() - t:.1f}")
        specs[fmt] = os.path.join(out, f"train-*.{fmt}")
    return specs


# -- one measurement, in its own process ----------------------------------------------------------------------

def pss_mb(pids) -> float:
    total = 0
    for pid in pids:
        try:
            for line in open(f"/proc/{pid}/smaps_rollup"):
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total / 1024


def tree(pid: int) -> list[int]:
    """pid and all its descendants (the loader's worker processes)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                todo += [int(c) for c in open(f"/proc/{p}/task/{task}/children").read().split()]
        except OSError:
            pass
    return out


def list_loader(path, proc, config, pipeline):
    """The former loader: every record parsed into one list, which worker processes receive a copy of."""
    import grain
    from qwen2vl_jax.data import pipeline as pl
    from qwen2vl_jax.data.records import read_jsonl
    records = list(read_jsonl(path, on_error=lambda e: None))
    ds = grain.MapDataset.source(records).shuffle(seed=pipeline.seed).repeat(None)
    ds = ds.map(pl.Encode(proc, config, pl.parse_buckets(pipeline.buckets)))
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
    if pipeline.workers > 0:
        pl._mark_flags_parsed()
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=pipeline.workers,
                                                         per_worker_buffer_size=pipeline.worker_buffer))
    it = pl.PackIterDataset(it, pl.parse_buckets(pipeline.buckets), pipeline.batch_size, pipeline.window)
    return pl.Loader(it, pipeline)


def child(fmt: str, spec: str, workers: int) -> dict:
    import qwen2vl_jax as qv
    from qwen2vl_jax.data import Processor
    from qwen2vl_jax.data.pipeline import PipelineConfig, make_loader
    config = qv.preset("tiny")
    proc = Processor.from_config(config)
    pipeline = PipelineConfig(buckets=((256, 64),), batch_size=8, window=64, workers=workers, shard_index=0,
                              shard_count=1, prefetch=0)
    base = pss_mb([os.getpid()])
    peak, done = [base], threading.Event()

    def sample():
        while not done.is_set():
            peak.append(pss_mb(tree(os.getpid())))
            done.wait(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0, c0 = time.perf_counter(), time.process_time()
    loader = (list_loader if fmt == "list" else make_loader)(spec, proc, config, pipeline)
    next(loader)
    first, cpu = time.perf_counter() - t0, time.process_time() - c0
    for _ in range(3):     # a few more batches: workers are running and hold what they hold
        next(loader)
    peak.append(pss_mb(tree(os.getpid())))
    done.set()
    sampler.join()
    loader.close()
    return {"first_batch_s": round(first, 2), "first_batch_cpu_s": round(cpu, 2), "extra_mb": round(max(peak) - base, 1), "base_mb": round(base, 1)}


def measure(fmt: str, spec: str, workers: int) -> dict:
    t = time.perf_counter()
    out = subprocess.run([sys.executable, __file__, "--child", fmt, spec, str(workers)], capture_output=True,
                         text=True, env={**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"})
    if out.returncode:
        raise RuntimeError(f"{fmt} {spec} workers={workers} failed:\n{out.stderr[-3000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["process_s"] = round(time.perf_counter() - t, 2)
    return result


# -- examples/s: embedded images against image files ---------------------------------------------------------

def throughput(root: str, examples: int, batches: int, rounds: int) -> dict:
    import qwen2vl_jax as qv
    from qwen2vl_jax.data import Processor, synthetic
    from qwen2vl_jax.data.convert import convert
    from qwen2vl_jax.data.pipeline import PipelineConfig, make_loader
    data = os.path.join(root, f"images_{examples}")
    train, _ = synthetic.generate(data, size=examples, heldout_size=0, seed=0)
    specs = {"jsonl+files": train}
    for fmt in ("array_record", "parquet"):
        out = os.path.join(data, fmt)
        if not os.path.exists(os.path.join(out, "done")):
            convert(train, out, fmt, shard_size=max(1, examples // 4), progress=False)
            open(os.path.join(out, "done"), "w").write("")
        specs[fmt] = os.path.join(out, f"train-*.{fmt}")
    config = qv.preset("tiny")
    proc = Processor.from_config(config)
    pipeline = PipelineConfig(buckets=((256, 64), (512, 128)), batch_size=4, window=32, shard_index=0,
                              shard_count=1, prefetch=0)
    rates, cpu_rates, names = {k: [] for k in specs}, {k: [] for k in specs}, list(specs)
    for r in range(rounds):     # alternated and rotated, so load changes and warm-up hit every format alike
        for name in names[r % len(names):] + names[:r % len(names)]:
            with make_loader(specs[name], proc, config, pipeline) as loader:
                next(loader)
                n0, t0, c0 = loader.examples, time.perf_counter(), time.process_time()
                for _ in range(batches):
                    next(loader)
                rates[name].append((loader.examples - n0) / (time.perf_counter() - t0))
                cpu_rates[name].append((loader.examples - n0) / (time.process_time() - c0))
    # The reading alone, without decoding: each record and the bytes of its images and video frames (from
    # their files for JSONL, from the record for shards), in shuffled order.
    from qwen2vl_jax import storage
    from qwen2vl_jax.data.sources import open_source
    order = np.random.default_rng(0).permutation(examples)
    read_us = {k: [] for k in specs}
    for _ in range(rounds):
        for name, spec in specs.items():
            source = open_source(spec)
            t0 = time.perf_counter()
            for i in order:
                record = source[int(i)]
                for item in record.images + record.videos:
                    media = item.get("image", item.get("video"))
                    for m in (media if isinstance(media, list) else [media]):
                        if isinstance(m, str):
                            storage.read_bytes(m)
            read_us[name].append((time.perf_counter() - t0) / examples * 1e6)
    med = {k: float(np.median(v)) for k, v in rates.items()}
    cpu = {k: float(np.median(v)) for k, v in cpu_rates.items()}
    read = {k: float(np.median(v)) for k, v in read_us.items()}
    return {"examples_per_cpu_s_ratio_vs_files": {k: round(v / cpu["jsonl+files"], 3) for k, v in cpu.items()},
            "examples_per_s_ratio_vs_files": {k: round(v / med["jsonl+files"], 3) for k, v in med.items()},
            "read_us_per_record_ratio_vs_files": {k: round(v / read["jsonl+files"], 3) for k, v in read.items()},
            "examples_per_s": {k: round(v, 1) for k, v in med.items()},
            "examples_per_cpu_s": {k: round(v, 1) for k, v in cpu.items()},
            "read_us_per_record": {k: round(v, 1) for k, v in read.items()},
            "examples": examples, "batches": batches, "rounds": rounds}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 100_000, 1_000_000])
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 8])
    ap.add_argument("--formats", nargs="+", default=list(FORMATS), choices=FORMATS)
    ap.add_argument("--dir", default="/tmp/qv_data_scale", help="where the generated data is kept")
    ap.add_argument("--throughput", action="store_true", help="measure examples/s, embedded vs files")
    ap.add_argument("--examples", type=int, default=300)
    ap.add_argument("--batches", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        fmt, spec, workers = args.child
        print(json.dumps(child(fmt, spec, int(workers))))
        return
    sys.path.insert(0, ROOT)
    start = machine()
    if args.throughput:
        result = throughput(args.dir, args.examples, args.batches, args.rounds)
        print(json.dumps({**result, "machine": start, "loadavg_end": machine()["loadavg"]}))
        return
    rows = {}
    for n in args.sizes:
        t = time.perf_counter()
        specs = prepare(args.dir, n)
        print(f"{n} records ready ({time.perf_counter() - t:.0f} s)", flush=True)
        for workers in args.workers:
            for fmt in args.formats:
                r = measure(fmt, specs[fmt], workers)
                rows[f"{fmt}/{n}/w{workers}"] = r
                print(f"{fmt:>12} {n:>8} records, {workers} workers: first batch {r['first_batch_s']:.2f} s, "
                      f"+{r['extra_mb']:.0f} MB (load {os.getloadavg()[0]:.1f})", flush=True)
    lo, hi = min(args.sizes), max(args.sizes)
    ratios = {}
    for fmt in args.formats:
        for workers in args.workers:
            a, b = rows.get(f"{fmt}/{lo}/w{workers}"), rows.get(f"{fmt}/{hi}/w{workers}")
            if a and b:
                ratios[f"{fmt}/w{workers}"] = {"first_batch_x": round(b["first_batch_s"] / a["first_batch_s"], 2),
                                               "extra_mb": round(b["extra_mb"] - a["extra_mb"], 1)}
    print(json.dumps({f"{hi}_vs_{lo}": ratios, "raw": rows, "machine": start, "loadavg_end": machine()["loadavg"]}))


if __name__ == "__main__":
    main()
