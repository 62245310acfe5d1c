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
    error, targets = None, [a for a in argv if "compile_for=" in a]
    try:
        path, overrides = parse_args(argv)
        targets = [o.partition("=")[2] for o in overrides if o.startswith("compile_for=")]
        cfg = load(path, [o for o in overrides if not o.startswith("compile_for=")])
    except (RunConfigError, ValueError) as e:
        error = e if isinstance(e, RunConfigError) else RunConfigError(str(e))
    if targets:   # one machine compiles for a whole slice: no other hosts to agree with
        if error is not None:
            print(f"train.py: {error}", file=sys.stderr)
            return 2
        return compile_only(cfg, [t for spec in targets for t in spec.split(",") if t.strip()])
    from qwen2vl_jax import sharding
    from qwen2vl_jax.train.loop import START_ERRORS, TrainingStopped, exit_code, run
    try:
        if sharding.initialize_distributed():   # before anything touches a device
            sharding.watch(code=exit_code)      # a lost host ends the others with one line
            # a host whose config did not load ends every host; then every host must have the same config
            sharding.agree("config", error, START_ERRORS)
            sharding.agree_values("run config", fingerprint(cfg), config_difference, START_ERRORS)
        elif error is not None:
            raise error
        summary = run(cfg)
    except tuple(START_ERRORS[k] for k in START_ERRORS if exit_code(k) == 2) as e:
        # bad records (found by the check before the model is built), a bad config, a missing or unreadable
        # file, bucket, credential or checkpoint, on this host or (multi-host) on the one the line names
        print(f"train.py: {e}", file=sys.stderr)
        return agreed(e, 2)
    except TrainingStopped as e:
        print(f"\ntrain.py: {'' if getattr(e, 'agreed', False) else 'stopped: '}{e}", file=sys.stderr)
        return agreed(e, 1)
    except sharding.HostFailed as e:   # an unexpected exception at start-up on some host
        if e.__cause__ is not None:    # this host's: its traceback, then the line every host prints
            import traceback
            traceback.print_exception(e.__cause__, file=sys.stderr)
        print(f"train.py: {e}", file=sys.stderr)
        return agreed(e, 1)
    print(json.dumps(summary))
    return 0


def agreed(e: BaseException, code: int) -> int:
    """`code`; a verdict the hosts agreed on ends this process here (sharding.exit_on_verdict)."""
    if getattr(e, "agreed", False):
        from qwen2vl_jax import sharding
        sharding.exit_on_verdict(code)
    return code


# config keys that may differ from host to host (they change nothing the hosts compute together)
HOST_LOCAL_KEYS = ("compile_cache", "progress", "data.workers")


def fingerprint(cfg) -> str:
    """The run config as the hosts compare it: dotted keys, the host-local ones left out."""
    flat = {}

    def walk(prefix, value):
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}{k}.", v)
        else:
            flat[prefix[:-1]] = value
    walk("", cfg.to_dict())
    return json.dumps({k: v for k, v in flat.items() if k not in HOST_LOCAL_KEYS}, sort_keys=True, default=str)


def config_difference(host: int, mine: str, first: str) -> str:
    a, b = json.loads(mine), json.loads(first)
    keys = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    shown = ", ".join(f"{k}={json.dumps(a.get(k))} (host 0: {json.dumps(b.get(k))})" for k in keys[:3])
    more = f" and {len(keys) - 3} more" if len(keys) > 3 else ""
    return (f"its run config differs from host 0's: {shown}{more}; start every host with the same config file "
            "and overrides")


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
