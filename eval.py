#!/usr/bin/env python
"""Score a Qwen2-VL checkpoint on a JSONL set: batched generation, then answer metrics.

    python eval.py                                  # the demo: latest checkpoint of `python train.py`,
                                                    # scored on the generated held-out set
    python eval.py --checkpoint DIR [--data FILE.jsonl] [--adapter ADAPTER] [--config configs/eval.yaml]
                   [key=value ...]

DIR is a Hugging Face checkpoint (config.json + *.safetensors) or an orbax training checkpoint (a workdir, its
checkpoints/ directory or one step directory); the checkpoint of a `lora:` run is evaluated with its adapters,
unmerged, over its base rebuilt as the run built it. ADAPTER is a peft LoRA adapter dir (ours or peft's), applied
unmerged on top of DIR (its base quantised as the adapter's base_quant.json says). Records use the training format
(docs/design.md, "Data format"); the last assistant turn of each is the reference answer. Writes
<out>/predictions.jsonl and <out>/metrics.json and prints the metrics. Every key of configs/eval.yaml can be
overridden as key=value (e.g. prompt_style=lmms batch_size=16 max_new_tokens=16 adapter=DIR).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

from qwen2vl_jax import storage

DEMO_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "demo.yaml")
METRICS = ["exact_match", "vqa_accuracy", "anls", "relaxed_accuracy"]


@dataclasses.dataclass
class Mesh:
    data: int = 1
    fsdp: int = -1
    tensor: int = 1


@dataclasses.dataclass
class EvalConfig:
    checkpoint: str = ""            # HF dir or orbax workdir / step dir; empty = the demo run's latest checkpoint
    data: str = ""                  # JSONL; empty = the demo's held-out set
    adapter: str = ""               # peft LoRA adapter dir applied unmerged on top of the checkpoint; empty = none
    out: str = ""                   # output dir; empty = <workdir>/eval/<step>/<data name> (orbax),
    #                                 <checkpoint>/eval/<data name> (HF) or <adapter>/eval/<data name>
    prompt_style: str = "plain"     # plain | lmms (appends "Answer the question using a single word or phrase.")
    metrics: list[str] = dataclasses.field(default_factory=lambda: list(METRICS))
    batch_size: int = 8             # prompts per generate call (the last batch is padded to it)
    limit: int = 0                  # score only the first N records (0 = all)
    baseline_data: str = ""         # JSONL to fit the majority baseline on; empty = the run's training set when
    #                                 it trained on the generated set, else the evaluation set itself
    skip_budget: int = 0            # bad records that may be skipped (counted in metrics.json) before stopping
    dtype: str = "float32"          # compute and param dtype: float32 | bfloat16
    processor: str = ""             # HF dir with tokenizer.json; empty = the checkpoint's, else by vocabulary
    max_new_tokens: int = 32
    do_sample: bool = False         # greedy by default, as lmms-eval scores
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int = 0
    progress: bool = True
    mesh: Mesh = dataclasses.field(default_factory=Mesh)


# -- configuration ---------------------------------------------------------------------------------------

def load_config(path: str | None, overrides: list[str]) -> EvalConfig:
    from qwen2vl_jax.train.config import (RunConfigError, _build, _set_dotted, _yaml_value, check_override,
                                          read_yaml)
    raw = read_yaml(path)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise RunConfigError(f"override {item!r} is not key=value (e.g. batch_size=16 or prompt_style=lmms)")
        value = _yaml_value(value, item)
        check_override(EvalConfig, key.strip(), value, item)
        _set_dotted(raw, key.strip(), value)
    cfg = _build(EvalConfig, raw, path or "defaults", "")
    if cfg.prompt_style not in ("plain", "lmms"):
        raise RunConfigError(f"prompt_style must be plain or lmms, got {cfg.prompt_style!r}")
    if cfg.batch_size < 1:
        raise RunConfigError(f"batch_size must be >= 1, got {cfg.batch_size}")
    return cfg


def demo_workdir() -> str:
    """The workdir of the demo run that a bare `python train.py` makes (configs/demo.yaml)."""
    from qwen2vl_jax.train import config as run_config
    return run_config.load(DEMO_CONFIG if os.path.exists(DEMO_CONFIG) else None, []).workdir


def training_run(step_dir: str):
    """The RunConfig an orbax checkpoint was trained with (its `run` item), or None when unreadable."""
    import orbax.checkpoint as ocp
    from etils import epath
    from qwen2vl_jax.train.config import RunConfig, RunConfigError, _build
    try:
        raw = ocp.JsonCheckpointHandler().restore(epath.Path(step_dir) / "run")
        raw = {k: v for k, v in dict(raw).items() if k != "trainable_parts"}
        return _build(RunConfig, raw, storage.join(step_dir, "run"), "")
    except (FileNotFoundError, RunConfigError, TypeError, ValueError):
        return None


def synthetic_dir(run, step_dir: str) -> str | None:
    """The generated set a run trained on (None when it trained on files)."""
    if run is None or run.data.train != "synthetic":
        return None
    workdir = storage.dirname(storage.dirname(step_dir))   # where the checkpoint is, wherever eval runs from
    return run.data.synthetic_dir or storage.join(workdir, "synthetic")


def default_data(run, step_dir: str) -> str:
    """The held-out split of the generated set a run trained on; only synthetic-data runs have one."""
    data_dir = synthetic_dir(run, step_dir)
    if data_dir is None:
        raise ValueError("no --data given and the checkpoint was not trained on the generated demo set; "
                         "give --data FILE.jsonl")
    from qwen2vl_jax.data import synthetic
    path = synthetic.heldout_path(data_dir)
    if not storage.isfile(path):
        raise FileNotFoundError(f"{path}: the run's held-out set is missing; run `python train.py` again "
                                "(it regenerates the set) or give --data FILE.jsonl")
    return path


# -- model and processor ---------------------------------------------------------------------------------

def is_hf_dir(path: str) -> bool:
    return storage.isfile(storage.join(path, "config.json")) and any(
        f.endswith(".safetensors") or f.endswith(".safetensors.index.json") for f in storage.listdir(path))


def find_checkpoint(cfg: EvalConfig):
    """(the HF dir or orbax step dir, where outputs go by default, the training RunConfig or None), from the
    checkpoint's files alone: nothing is loaded yet."""
    path = cfg.checkpoint
    if not storage.isdir(path):
        raise FileNotFoundError(f"checkpoint {path}: no such directory; give an HF checkpoint dir or a training "
                                "workdir (for the demo, run `python train.py` first)")
    if is_hf_dir(path):
        return path, storage.join(path, "eval"), None
    from qwen2vl_jax.train import checkpoint
    step_dir = checkpoint.step_dir(path)
    out = storage.join(storage.dirname(storage.dirname(step_dir)), "eval", storage.basename(step_dir))
    return step_dir, out, training_run(step_dir)


def output_dir(base: str, data: str) -> str:
    """`base/<name of the data file>`, so that each evaluation set of a checkpoint keeps its own results; a
    different file of the same name gets a suffix from its path."""
    import hashlib
    name = os.path.splitext(storage.basename(data))[0] or "data"
    out = storage.join(base, name)
    try:
        earlier = json.loads(storage.read_text(storage.join(out, "metrics.json"))).get("data")
    except (OSError, ValueError, AttributeError):
        return out
    if earlier in (None, storage.abspath(data)):
        return out
    return f"{out}-{hashlib.sha1(storage.abspath(data).encode()).hexdigest()[:8]}"


def load_model(cfg: EvalConfig, ckpt_dir: str, run=None):
    """The Qwen2VL of an HF dir or orbax step dir (`run`: its training RunConfig, when readable), with
    `cfg.adapter` on top, placed on a mesh when more than one device is visible. The checkpoint of a LoRA run
    holds its adapters only: its base is rebuilt as the run built it (`init_from`, quantised as `lora.quant`
    says), and the model runs with the adapters unmerged."""
    import jax
    import qwen2vl_jax as qv
    from qwen2vl_jax import api, lora, sharding
    from qwen2vl_jax.api import Qwen2VL
    mesh = None
    if jax.device_count() > 1:
        mesh = sharding.make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
    if is_hf_dir(ckpt_dir):
        return qv.load_pretrained(ckpt_dir, dtype=cfg.dtype, mesh=mesh, adapter=cfg.adapter or None)
    from qwen2vl_jax.train import checkpoint
    config = checkpoint.read_model_config(ckpt_dir)
    shapes = checkpoint.param_shapes(ckpt_dir)
    shardings = None if mesh is None else api.adapted_shardings(config, shapes, mesh)
    config, params = checkpoint.restore_params(ckpt_dir, shardings=shardings)
    spec = None
    if lora.has_adapters(params):
        if cfg.adapter:
            raise ValueError(f"{ckpt_dir} is the checkpoint of a LoRA run (it holds adapters); evaluate it without "
                             f"adapter=, or give adapter={cfg.adapter} with the base checkpoint")
        spec, params = lora_run_params(ckpt_dir, run, config, params, mesh)
    params = cast_params(params, cfg.dtype)
    if cfg.adapter:
        spec, params = api.attach_adapter(config, params, cfg.adapter, cfg.dtype, mesh)
    return Qwen2VL(config, params, dtype=cfg.dtype, adapter=spec)


def cast_params(params: dict, dtype: str) -> dict:
    """The float params in `dtype`; quantised codes, their scales and LoRA factors (float32) as they are."""
    import jax
    import jax.numpy as jnp
    dt = jnp.bfloat16 if dtype == "bfloat16" else jnp.float32
    keep = ("lora_a", "lora_b", "kernel_scale")
    return jax.tree_util.tree_map_with_path(
        lambda p, x: x.astype(dt) if jnp.issubdtype(x.dtype, jnp.floating) and p[-1].key not in keep else x, params)


def lora_run_params(ckpt_dir: str, run, config, adapters: dict, mesh):
    """(the run's lora.Adapter, its whole params tree): the base as the LoRA run built it (`init_from` or its
    seed's random init, quantised / cast as `lora:` says) with the checkpoint's trained adapters."""
    import jax
    from qwen2vl_jax import lora, sharding
    from qwen2vl_jax.model.qwen2vl import Qwen2VLModule
    from qwen2vl_jax.train import loop, optim
    from qwen2vl_jax.train.config import adapter as run_adapter, param_groups
    from qwen2vl_jax.train.state import param_shardings
    if run is None or run.lora.r <= 0:
        raise ValueError(f"{ckpt_dir}: the checkpoint holds LoRA adapters but not the run config they were trained "
                         "with (its `run` item is missing or unreadable), so its base cannot be rebuilt; export the "
                         "adapter with save_adapter and evaluate --checkpoint BASE --adapter DIR")
    spec = run_adapter(run)
    module = lora.adapted(Qwen2VLModule(config), spec)
    mesh = mesh or sharding.make_mesh(1, 1, 1, devices=jax.local_devices()[:1])

    class Placed:   # what loop.adapted_params reads of a TrainState of shardings
        params = param_shardings(module, mesh)
    try:
        params = loop.adapted_params(run, config, Qwen2VLModule(config), spec, Placed, mesh, lambda s: None)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{ckpt_dir}: the LoRA run's base init_from={run.init_from} cannot be read ({e}); "
                                "the checkpoint holds the adapters only, so evaluate from where the run could read "
                                "its base") from None
    frozen = optim.split(params, param_groups(run))[1]
    return spec, optim.merge(jax.device_put(adapters, optim.split(Placed.params, param_groups(run))[0]), frozen)


def check_examples(examples, on_error) -> list:
    """The examples whose images and videos open (data/check.py: headers only, in parallel); each one that
    does not goes to `on_error`, as unreadable records do, before any model is loaded."""
    from qwen2vl_jax.data import DataError, Record
    from qwen2vl_jax.data.check import check_records
    report = check_records([Record(ex.prompt, ex.source) for ex in examples], require_assistant=False)
    bad = dict(report.problems)
    for source, reason in report.problems:
        on_error(DataError(f"{source}: {reason}"))
    return [ex for ex in examples if ex.source not in bad]


def make_processor(cfg: EvalConfig, config, checkpoint_dir: str, run=None):
    """`processor=` if given, else the checkpoint's own tokenizer, else the training run's processor (same
    tokenizer and image settings), else one that fits the vocabulary: the real Qwen2 vocabulary for a
    full-size model, a byte tokenizer for small test models."""
    from qwen2vl_jax.data import Processor
    for path in (cfg.processor, checkpoint_dir):
        if path and storage.isfile(storage.join(path, "tokenizer.json")):
            return Processor.from_pretrained(path)
    if cfg.processor:
        raise FileNotFoundError(f"processor={cfg.processor}: no tokenizer.json there")
    if run is not None:
        from qwen2vl_jax.train.data import processor
        return processor(run, config)
    return Processor.for_model(config)


# -- main ------------------------------------------------------------------------------------------------

def run(argv: list[str] | None = None) -> dict:
    """The whole evaluation; returns the metrics (as written to metrics.json)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--checkpoint", help="HF checkpoint dir, or an orbax training workdir / step dir")
    parser.add_argument("--data", help="JSONL evaluation set (training format; last assistant turn = reference)")
    parser.add_argument("--adapter", help="peft LoRA adapter dir applied unmerged on top of the checkpoint")
    parser.add_argument("--config", default=None, help="YAML config (default: configs/eval.yaml when present)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the config")
    args = parser.parse_args(argv)
    default_yaml = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "eval.yaml")
    cfg = load_config(args.config or (default_yaml if os.path.exists(default_yaml) else None),
                      args.overrides + [f"checkpoint={args.checkpoint}"] * bool(args.checkpoint)
                      + [f"data={args.data}"] * bool(args.data) + [f"adapter={args.adapter}"] * bool(args.adapter))
    cfg.checkpoint = cfg.checkpoint or demo_workdir()

    from qwen2vl_jax.data import DataError
    from qwen2vl_jax.infer import GenerationConfig
    from qwen2vl_jax.infer import evaluate as ev

    ckpt_dir, out_base, run = find_checkpoint(cfg)
    if cfg.adapter:
        from qwen2vl_jax import peft_io
        peft_io.read_config(cfg.adapter)   # a bad adapter dir fails before anything is read or loaded
        out_base = storage.join(cfg.adapter, "eval")
    cfg.data = cfg.data or default_data(run, ckpt_dir)
    skipped = []

    def on_error(e: DataError):   # the same rule for every bad record, found early or late
        skipped.append(str(e))
        if len(skipped) > cfg.skip_budget:
            raise DataError(f"{e} ({len(skipped)} bad record(s), more than skip_budget={cfg.skip_budget}; fix or "
                            "drop them, or let up to N bad records be skipped with skip_budget=N)")
        print(f"skipping: {e}", file=sys.stderr)

    examples = check_examples(ev.read_examples(cfg.data, cfg.prompt_style, cfg.limit or None, on_error), on_error)
    if not examples:
        raise DataError(f"{cfg.data}: no evaluation record is usable")
    model = load_model(cfg, ckpt_dir, run)
    processor = make_processor(cfg, model.config, ckpt_dir, run)
    baseline = cfg.baseline_data
    if not baseline and synthetic_dir(run, ckpt_dir):
        from qwen2vl_jax.data import synthetic
        baseline = synthetic.train_path(synthetic_dir(run, ckpt_dir))
        baseline = baseline if storage.isfile(baseline) else ""
    prior = ev.read_examples(baseline, cfg.prompt_style, on_error=lambda e: None) if baseline else None
    eos = tuple(dict.fromkeys([processor.eos_token_id, processor.pad_token_id, model.config.eos_token_id]))
    gen = GenerationConfig(max_new_tokens=cfg.max_new_tokens, do_sample=cfg.do_sample, temperature=cfg.temperature,
                           top_k=cfg.top_k, top_p=cfg.top_p, repetition_penalty=cfg.repetition_penalty,
                           eos_token_id=eos, pad_token_id=processor.pad_token_id)
    report = ev.evaluate(model, processor, examples, gen, cfg.batch_size, cfg.metrics, cfg.seed, cfg.progress,
                         prior, on_error)
    out = cfg.out or output_dir(out_base, cfg.data)
    extra = {"checkpoint": storage.abspath(ckpt_dir), "adapter": storage.abspath(cfg.adapter) if cfg.adapter else None,
             "data": storage.abspath(cfg.data),
             "prompt_style": cfg.prompt_style, "skipped": len(skipped),
             "baseline_fitted_on": storage.abspath(baseline) if baseline else storage.abspath(cfg.data),
             "generation": dataclasses.asdict(gen)}
    pred_path, metrics_path = ev.write_report(report, out, extra)

    m = report.metrics
    base = m["majority_baseline"]
    print(f"{m['count']} examples from {cfg.data}, checkpoint {ckpt_dir}"
          + (f", adapter {cfg.adapter}" if cfg.adapter else ""))
    for name in cfg.metrics:
        print(f"  {name:<17} {100 * m[name]:6.2f}   (majority baseline {100 * base[name]:6.2f})")
    if m.get("by_task"):
        print(f"  by task ({cfg.metrics[0]}):")
    for task, t in m.get("by_task", {}).items():
        print(f"    {task:<15} {100 * t[cfg.metrics[0]]:6.2f}   (majority baseline "
              f"{100 * t['majority_baseline'][cfg.metrics[0]]:6.2f}, {t['count']} examples)")
    print(f"predictions: {pred_path}\nmetrics:     {metrics_path}")
    print(json.dumps({k: m[k] for k in cfg.metrics} | {"count": m["count"]}))
    return {**m, **extra}


def main(argv: list[str] | None = None) -> int:
    from qwen2vl_jax.data import DataError
    from qwen2vl_jax.train.config import RunConfigError
    try:
        run(argv)
    except (RunConfigError, DataError, FileNotFoundError, ValueError, storage.StorageError) as e:
        print(f"eval.py: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
