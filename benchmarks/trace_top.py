"""Where the time of a profiled run goes: the top operations of a `jax.profiler` trace by total duration.

Reads the `*.trace.json.gz` that `jax.profiler.trace` writes (e.g. `benchmarks/mfu.py --profile DIR`), keeps
the device's events (the `/device:GPU:0` or `/device:TPU:0` process; the host's XLA threads on CPU), groups
them by name (op names are shortened to their HLO kind, so the 28 layers' copies of one op add up) and prints
one JSON line: total device-busy seconds per step and the top groups with their share.

    python benchmarks/trace_top.py DIR [--steps 2] [--top 25]
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re


def load(path: str) -> list[dict]:
    files = sorted(glob.glob(os.path.join(path, "**", "*.trace.json.gz"), recursive=True))
    files = [f for f in files if "perfetto" not in os.path.basename(f)] or files
    if not files:
        raise SystemExit(f"{path}: no *.trace.json.gz under it (write one with jax.profiler.trace)")
    with gzip.open(files[-1]) as f:
        data = json.load(f)
    return data["traceEvents"] if isinstance(data, dict) else data


def group(name: str) -> str:
    """'fusion.123' -> 'fusion', 'loop_multiply_fusion_4' -> 'loop_multiply_fusion'; kernels keep their
    name up to the first '(' or '<'."""
    name = re.split(r"[(<]", name)[0]
    return re.sub(r"[._]\d+$", "", name.strip())


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("path")
    ap.add_argument("--steps", type=int, default=2, help="steps the trace holds (to report per-step seconds)")
    ap.add_argument("--top", type=int, default=25)
    args = ap.parse_args()
    events = load(args.path)
    procs = {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
    device = [p for p, n in procs.items() if "/device:" in n]
    keep = set(device) if device else set(procs)
    threads = {(e["pid"], e.get("tid")): e["args"]["name"] for e in events
               if e.get("ph") == "M" and e.get("name") == "thread_name" and e["pid"] in keep}
    # Device: the "XLA Ops" line when there is one (each op once), else the streams. CPU: the XLA threads.
    wanted = ("XLA Ops",) if any("XLA Ops" in t for t in threads.values()) else ("Stream",) if device else ("XLA",)
    lines = {key for key, name in threads.items() if any(w in name for w in wanted)}
    totals, count = collections.Counter(), collections.Counter()
    for e in events:
        if e.get("ph") != "X" or (e["pid"], e.get("tid")) not in lines:
            continue
        totals[group(e["name"])] += e.get("dur", 0) / 1e6
        count[group(e["name"])] += 1
    busy = sum(totals.values())
    top = [{"op": k, "s_per_step": round(v / args.steps, 4), "share": round(v / busy, 4), "calls": count[k]}
           for k, v in totals.most_common(args.top)]
    print(json.dumps({"device_busy_s_per_step": round(busy / args.steps, 4), "processes": sorted(procs.values()),
                      "top": top}))


if __name__ == "__main__":
    main()
