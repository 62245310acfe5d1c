"""What the up-front record check (`qwen2vl_jax.data.check`) costs, against what the pipeline spends to encode
the same records (decode, resize, patchify, tokenise, prepare), on the realistic mix of benchmarks/packing.py
(images 28x28 to 1500x1000, 10% text-only, 10% multi-image, 5% videos).

    python benchmarks/data_check.py [--examples 1000] [--encode 200] [--threads 0]

Ends with one JSON line: records per second of the check (all records, threads as `data.check` uses them),
of the check on the records without videos (the mix's videos are frame lists, each frame checked by its
header), and of full encoding (one thread, `--encode` records), and their ratio. The data set is cached under
--data-dir.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time


def cpu_flags() -> dict:
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        flags = ""
    return {"avx512": "avx512f" in flags, "avx2": "avx2" in flags, "cpus": os.cpu_count(),
            "loadavg": [round(x, 2) for x in os.getloadavg()]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=1000)
    parser.add_argument("--encode", type=int, default=200, help="records encoded in full for the comparison")
    parser.add_argument("--threads", type=int, default=0, help="0: the check's default")
    parser.add_argument("--data-dir", default=os.path.join(tempfile.gettempdir(), "qwen2vl_data_check"))
    args = parser.parse_args()

    from qwen2vl_jax.config import preset
    from qwen2vl_jax.data import Processor, synthetic
    from qwen2vl_jax.data.check import check_records
    from qwen2vl_jax.data.packing import prepare_example
    from qwen2vl_jax.data.pipeline import read_records

    data_dir = os.path.join(args.data_dir, str(args.examples))
    synthetic.generate(data_dir, size=args.examples, config=synthetic.SyntheticConfig.realistic())
    records = read_records(synthetic.train_path(data_dir))
    proc, config = Processor.default(), preset("2b")
    threads = args.threads or None

    check_records(records[:64], proc, threads=threads)   # warm the file cache and the template
    t = time.perf_counter()
    report = check_records(records, proc, threads=threads)
    check_s = time.perf_counter() - t
    stills = [r for r in records if not r.videos]
    t = time.perf_counter()
    check_records(stills, proc, threads=threads)
    stills_s = time.perf_counter() - t
    subset = stills[:args.encode]
    t = time.perf_counter()
    sizes = [prepare_example(proc.encode_record(r), config) for r in subset]
    encode_s = time.perf_counter() - t
    same = report.sizes[[i for i, r in enumerate(records) if not r.videos][:len(subset)]].tolist()
    assert same == [[e.n_text, e.n_patches] for e in sizes], "the check's sizes differ from the encoded ones"

    out = {"records": len(records), "videos": len(records) - len(stills), "problems": len(report.problems),
           "check_records_per_s": round(len(records) / check_s, 1),
           "check_no_video_records_per_s": round(len(stills) / stills_s, 1),
           "encode_records_per_s_one_thread": round(len(subset) / encode_s, 1),
           "check_vs_encode_speed_no_video": round((len(stills) / stills_s) / (len(subset) / encode_s), 1),
           "threads": args.threads or min(32, (os.cpu_count() or 1) + 4), **cpu_flags()}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
