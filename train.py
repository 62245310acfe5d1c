"""Train Qwen2-VL: `python train.py [--config configs/X.yaml] [key=value ...]`.

With no arguments it runs configs/demo.yaml: a tiny model on a generated visual question answering set, on
the CPU, in a few minutes. Overrides use dotted keys: `workdir=runs/x steps=1000 mesh.fsdp=8 optim.lr=3e-4`.
A run resumes from the latest checkpoint in its workdir; SIGTERM saves a checkpoint and stops cleanly.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

DEMO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "demo.yaml")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Keys: see configs/demo.yaml and qwen2vl_jax/train/config.py.")
    parser.add_argument("--config", default=None, help="YAML run config (default: configs/demo.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. steps=100 mesh.fsdp=8")
    args = parser.parse_args(argv)

    from qwen2vl_jax.train.config import RunConfigError, load
    try:
        cfg = load(args.config or DEMO, args.overrides)
    except RunConfigError as e:
        print(f"train.py: {e}", file=sys.stderr)
        return 2
    from qwen2vl_jax.train.loop import TrainingStopped, run
    try:
        summary = run(cfg)
    except TrainingStopped as e:
        print(f"\ntrain.py: stopped: {e}", file=sys.stderr)
        return 1
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
