"""Train Qwen2-VL: `python train.py [--config configs/X.yaml] [key=value ...]`.

With no arguments it runs configs/demo.yaml: a tiny model on a generated visual question answering set, on
the CPU, in a few minutes. Overrides use dotted keys: `workdir=runs/x steps=1000 mesh.fsdp=8 optim.lr=3e-4`
(`--init_from DIR` and `--key=value` are read the same way). A run resumes from the latest checkpoint in its
workdir; SIGTERM saves a checkpoint and stops cleanly. Keys: configs/demo.yaml, qwen2vl_jax/train/config.py.

`compile_for=v5p-128` (or v5p:4x4x8, v6e-256, several comma-separated) trains nothing: it compiles the run's
step for that TPU slice on this machine (CPU is enough, with the `tpu` extra), once per bucket, and prints one
JSON line per slice with the compiler's per-chip memory and whether it fits; exit 2 with one line when it
does not (qwen2vl_jax/train/aot.py).
"""

from __future__ import annotations

import json
import os
import sys

DEMO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "demo.yaml")


def parse_args(argv: list[str]) -> tuple[str, list[str]]:
    """(config file, overrides) from `--config FILE`, `key=value`, `--key value` and `--key=value`."""
    config, overrides, i = DEMO, [], 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--"):
            key, eq, value = arg[2:].partition("=")
            if not eq:
                if i + 1 >= len(argv):
                    raise ValueError(f"{arg} needs a value ({arg} VALUE or {arg}=VALUE)")
                value, i = argv[i + 1], i + 1
            if key == "config":
                config = value
            else:
                overrides.append(f"{key}={value}")
        else:
            overrides.append(arg)
        i += 1
    return config, overrides


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return 0
    from qwen2vl_jax.train.config import RunConfigError, load
    try:
        path, overrides = parse_args(argv)
        targets = [o.partition("=")[2] for o in overrides if o.startswith("compile_for=")]
        cfg = load(path, [o for o in overrides if not o.startswith("compile_for=")])
    except (RunConfigError, ValueError) as e:
        print(f"train.py: {e}", file=sys.stderr)
        return 2
    if targets:
        return compile_only(cfg, [t for spec in targets for t in spec.split(",") if t.strip()])
    from qwen2vl_jax.data import DataError
    from qwen2vl_jax.storage import StorageError
    from qwen2vl_jax.train.loop import TrainingStopped, run
    try:
        summary = run(cfg)
    except (DataError, RunConfigError, StorageError) as e:
        # bad records (found by the check before the model is built), or a missing bucket / object /
        # credential / client: the message says what to do
        print(f"train.py: {e}", file=sys.stderr)
        return 2
    except TrainingStopped as e:
        print(f"\ntrain.py: stopped: {e}", file=sys.stderr)
        return 1
    print(json.dumps(summary))
    return 0


def compile_only(cfg, slices: list[str]) -> int:
    """`compile_for=`: compile the run for each TPU slice; one JSON line each, exit 2 if one does not fit."""
    os.environ.setdefault("JAX_PLATFORMS", "cpu")   # this machine's own devices only trace; libtpu compiles
    from qwen2vl_jax.train import aot
    from qwen2vl_jax.train.config import RunConfigError
    misfits = []
    for name in slices:
        try:
            result = aot.compile_for(cfg, name, log=lambda s: print(s, file=sys.stderr, flush=True))
        except RunConfigError as e:
            print(f"train.py: {e}", file=sys.stderr)
            return 2
        print(json.dumps(result), flush=True)
        if not result["fits"]:
            misfits.append(aot.advice(result))
    if misfits:
        print(f"train.py: does not fit: {' | '.join(misfits)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
