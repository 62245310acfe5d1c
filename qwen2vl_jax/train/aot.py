"""Compile a run for a TPU slice on a machine without one: `python train.py --config X.yaml compile_for=v5p-128`.

The TPU compiler (libtpu, the `tpu` extra) runs on a CPU. `jax.experimental.topologies` describes the slice's
chips as compile-only devices; the run's mesh is laid over them, and the very step `train.py` would run
(`loop.build`: the config's model, remat, attention, dtypes, optimizer and shardings) is lowered on abstract
state and batches and compiled, once per bucket shape. The compiler's buffer assignment
(`compiled.memory_analysis()`) is the per-chip memory the run will need: arguments (params, optimizer
state, the batch), outputs, the donated part of both (aliases), and temporaries. Nothing is allocated.

A slice is named as Cloud TPU names it (`v5p-128`: 128 TensorCores = 64 chips; `v5e-16`, `v6e-256`: chips)
or by its chip grid (`v5p:4x4x4`, `v6e:16x16`). Several slices: `compile_for=v5p-64,v5p-128`.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import time

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from qwen2vl_jax import sharding, target
from qwen2vl_jax.train.config import RunConfig, RunConfigError

GiB = 2 ** 30

# chip generation -> (topology prefix, TensorCores per chip in the slice name, HBM bytes per chip, 3D torus)
CHIPS = {
    "v4": ("v4", 2, 32 * GiB, True),
    "v5p": ("v5p", 2, 95 * GiB, True),
    "v5e": ("v5e", 1, 16 * GiB, False),
    "v5litepod": ("v5e", 1, 16 * GiB, False),
    "v6e": ("v6e", 1, 32 * GiB, False),
}


@dataclasses.dataclass(frozen=True)
class Slice:
    name: str            # as given
    topology: str        # for get_topology_desc, e.g. "v5p:4x4x4"
    chips: int
    hbm_bytes: int


def _grid(chips: int, three_d: bool) -> list[int]:
    """The chip grid Cloud TPU gives a slice of `chips` (a power of two): v5p 4 -> 2x2x1, 64 -> 4x4x4,
    128 -> 4x4x8; v5e / v6e 16 -> 4x4, 256 -> 16x16. Each doubling doubles the last of the smallest sides."""
    dims = [2, 2, 1] if three_d else [1, 1]
    if chips & (chips - 1) or chips < math.prod(dims):
        raise RunConfigError(f"compile_for: a slice of {chips} chips is not one Cloud TPU makes; give its chip "
                             "grid instead (e.g. v5p:4x4x8)")
    while math.prod(dims) < chips:
        i = max(j for j, d in enumerate(dims) if d == min(dims))
        dims[i] *= 2
    return dims


def parse_slice(name: str) -> Slice:
    """`v5p-128` / `v5p:4x4x8` / `v6e-256` / `v5e-16` -> a Slice."""
    text = name.strip().lower()
    m = re.fullmatch(r"(v4|v5p|v5e|v5litepod|v6e)([-:])([0-9x]+)", text)
    if not m:
        raise RunConfigError(f"compile_for={name!r}: name a TPU slice as v5p-128, v5p:4x4x8, v6e-256 or v5e-16 "
                             f"(generations: {', '.join(sorted(CHIPS))})")
    gen, sep, size = m.groups()
    prefix, cores, hbm, three_d = CHIPS[gen]
    if sep == ":":
        dims = [int(d) for d in size.split("x") if d]
        if len(dims) != (3 if three_d else 2) or min(dims) < 1:
            raise RunConfigError(f"compile_for={name!r}: a {gen} chip grid has {3 if three_d else 2} sides, "
                                 f"e.g. {'v5p:4x4x8' if three_d else 'v6e:16x16'}")
    else:
        if not size.isdigit() or int(size) % cores:
            raise RunConfigError(f"compile_for={name!r}: {gen}-N counts {cores} TensorCore(s) per chip")
        dims = _grid(int(size) // cores, three_d)
    return Slice(name, f"{prefix}:{'x'.join(map(str, dims))}", math.prod(dims), hbm)


def tpu_devices(sl: Slice) -> list:
    """The slice's chips as compile-only devices (needs libtpu: `pip install -e ".[tpu]"`)."""
    # libtpu looks for a TPU at start-up; on a CPU machine these keep it from waiting for metadata servers.
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", f"{sl.topology.split(':')[0]}-{sl.chips}")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    # compile-only devices hold no chip: several processes may compile at once (libtpu locks by default)
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies
    try:
        return list(topologies.get_topology_desc(topology_name=sl.topology, platform="tpu").devices)
    except RuntimeError as e:
        if "TPU support not installed" in str(e):
            raise RunConfigError("compile_for needs the TPU compiler: pip install -e \".[tpu]\" (libtpu runs on a "
                                 "CPU machine too)") from None
        raise RunConfigError(f"compile_for={sl.name}: libtpu has no topology {sl.topology} ({e})") from None


def for_tpu(cfg: RunConfig) -> RunConfig:
    """`auto` settings as a TPU run resolves them (this process's own backend is the CPU)."""
    return dataclasses.replace(cfg, dtype="bfloat16" if cfg.dtype == "auto" else cfg.dtype,
                               attn_impl="splash" if cfg.attn_impl == "auto" else cfg.attn_impl)


def abstract_batch(config, rows: int, grad_accum: int, text_len: int, patch_len: int, step_fn) -> dict:
    """ShapeDtypeStructs of the step's stacked batch (batches.stack_micro_batches), in its shardings."""
    k, B, L, P = grad_accum, rows, text_len, patch_len
    shapes = {"input_ids": ((k, B, L), jnp.int32), "positions": ((k, 3, B, L), jnp.int32),
              "segment_ids": ((k, B, L), jnp.int32), "labels": ((k, B, L), jnp.int32),
              "loss_mask": ((k, B, L), jnp.float32)}
    if P:
        shapes.update(patches=((k, B, P, config.vision.patch_dim), jnp.float32),
                      patch_segment_ids=((k, B, P), jnp.int32), patch_positions=((k, B, P, 2), jnp.int32),
                      vision_index=((k, B, L), jnp.int32))
    sh = step_fn.batch_shardings(shapes)
    return {key: jax.ShapeDtypeStruct(s, d, sharding=sh[key]) for key, (s, d) in shapes.items()}


def memory(compiled) -> dict:
    """The compiler's per-chip bytes of a compiled program."""
    m = compiled.memory_analysis()
    out = {"arguments": m.argument_size_in_bytes, "outputs": m.output_size_in_bytes,
           "aliases": m.alias_size_in_bytes, "temporaries": m.temp_size_in_bytes,
           "code": m.generated_code_size_in_bytes}
    # donated inputs are written in place: an aliased output takes no second buffer
    out["total"] = out["arguments"] + out["outputs"] - out["aliases"] + out["temporaries"] + out["code"]
    return out


def compiled_steps(cfg: RunConfig, mesh, config=None, each=None) -> list:
    """The run's own train step (loop.build) for the TPU devices of `mesh`, compiled once per bucket of
    `cfg.data.buckets`: [((text_len, patch_len), compiled, seconds)]. `auto` settings resolve as on a TPU
    host, and the step is traced with the TPU code paths (target.py), not this CPU host's. `config`: the
    model config (default: the run's); `each(bucket, compiled, seconds)` is called as each one is done."""
    from qwen2vl_jax.train import loop
    from qwen2vl_jax.train.state import abstract_state
    cfg = for_tpu(cfg)
    out = []
    with target.tracing_for("tpu"):
        config = config or loop.model_config(cfg)
        built = loop.build(cfg, config, mesh)
        state = abstract_state(built.module, built.tx, built.parts, built.shardings)
        for text_len, patch_len in cfg.data.buckets:
            batch = abstract_batch(config, cfg.data.batch_size, cfg.grad_accum, text_len, patch_len, built.step_fn)
            t0 = time.perf_counter()
            out.append(((text_len, patch_len), built.step_fn.lower(state, batch).compile(), time.perf_counter() - t0))
            if each:
                each(*out[-1])
    return out


def compile_for(cfg: RunConfig, slice_name: str, log=print) -> dict:
    """Compile `cfg`'s train step for `slice_name` once per bucket; returns the JSON-able verdict."""
    sl = parse_slice(slice_name)
    if cfg.data.buckets == "auto":
        raise RunConfigError("compile_for needs the row shapes: give data.buckets (a run with buckets: auto prints "
                             "the ones it sized from the data, to pin)")
    devices = tpu_devices(sl)
    try:
        mesh = sharding.make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor, devices=devices)
    except ValueError as e:
        raise RunConfigError(f"compile_for={sl.name} ({sl.chips} chips): {e}; set mesh.* for this slice") from None
    from qwen2vl_jax.train import batches
    try:
        batches.check_rows(cfg.data.batch_size, mesh)
    except ValueError as e:
        raise RunConfigError(str(e)) from None
    programs = []

    def each(bucket, compiled, seconds):
        mem = memory(compiled)
        programs.append({"program": "train_step", "bucket": list(bucket), "compile_s": round(seconds, 1),
                         **{f"{k}_gib": round(v / GiB, 3) for k, v in mem.items()}})
        log(f"compiled train_step for {sl.topology}, bucket {list(bucket)}: "
            f"{mem['total'] / GiB:.2f} GiB per chip in {programs[-1]['compile_s']} s")
    compiled_steps(cfg, mesh, each=each)
    cfg = for_tpu(cfg)
    worst = max(programs, key=lambda p: p["total_gib"])
    hbm = sl.hbm_bytes / GiB
    return {"compile_for": sl.name, "topology": sl.topology, "chips": sl.chips, "device_kind": devices[0].device_kind,
            "mesh": dict(mesh.shape), "attention": cfg.attn_impl, "remat": cfg.remat, "dtype": cfg.dtype,
            "loss_chunk": cfg.loss_chunk, "grad_accum": cfg.grad_accum, "rows": cfg.data.batch_size,
            "programs": programs, "total_gib": worst["total_gib"], "hbm_gib": round(hbm, 1),
            "fits": worst["total_gib"] <= hbm, "compile_s": round(sum(p["compile_s"] for p in programs), 1)}


def advice(result: dict) -> str:
    """One line: what does not fit and the knobs that shrink it."""
    worst = max(result["programs"], key=lambda p: p["total_gib"])
    knobs = []
    if worst["temporaries_gib"] >= worst["arguments_gib"]:
        if result["remat"] != "full":
            knobs.append("remat=full")
        if not result["loss_chunk"] or result["loss_chunk"] > 512:
            knobs.append("loss_chunk=512")
        knobs.append("smaller data.buckets or data.batch_size (with a larger grad_accum)")
    else:
        knobs.append("more mesh.fsdp (a larger slice)")
        knobs.append("optim.moments_dtype=bfloat16")
    knobs.append("mesh.tensor" if result["mesh"]["tensor"] == 1 else "another mesh split")
    return (f"{result['compile_for']}: train_step bucket {worst['bucket']} needs {worst['total_gib']:.1f} GiB per "
            f"chip ({worst['arguments_gib']:.1f} arguments, {worst['temporaries_gib']:.1f} temporaries) of "
            f"{result['hbm_gib']:.0f} GiB HBM; try {', '.join(knobs)}")
