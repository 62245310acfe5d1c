"""Hugging Face safetensors <-> our params (docs/design.md, "Checkpoints").

Reads both on-disk layouts (`visual.*` / `model.*` and `model.visual.*` / `model.language_model.*`), single
files and sharded `model.safetensors.index.json`, the tied 2B head, in f32 or bf16. Tensors are read lazily,
one at a time, and can be placed straight onto a mesh: each device reads only the rows of the stored tensor
that its slice needs, so a 72B never needs the whole model in one host's memory twice. A checkpoint may be a
local directory (memory-mapped) or a URL such as gs://bucket/model: the headers and then each slice are
fetched with ranged reads, never a full local copy. Exports write to either, one tensor in memory at a time.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Callable, Iterator

import jax
import ml_dtypes
import numpy as np

from qwen2vl_jax import storage
from qwen2vl_jax.config import Qwen2VLConfig
from qwen2vl_jax.families import tables


class CheckpointError(ValueError):
    """A checkpoint that does not match the model config (missing or mis-shaped tensors, bad files)."""


_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
           "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
_CODES = {np.dtype(v): k for k, v in _DTYPES.items()}


# -- safetensors files ------------------------------------------------------------------------------

class SafetensorsReader:
    """All tensors of a checkpoint directory (or one file), local or at a URL, keyed by name."""

    def __init__(self, path: str):
        self.path = path
        files = _checkpoint_files(path)
        self._where: dict[str, tuple[str, dict]] = {}
        self._maps: dict[str, np.memmap] = {}
        for f in files:
            header, offset = _read_header(f)
            for name, info in header.items():
                if name != "__metadata__":
                    self._where[name] = (f, {**info, "offset": offset})

    def keys(self):
        return self._where.keys()

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._where[name][1]["shape"])

    def get(self, name: str, rows: slice | None = None) -> np.ndarray:
        """Tensor `name`, or only `rows` of its first axis (a contiguous byte range, so that is all that is
        read: memory-mapped locally, one ranged request from a URL)."""
        f, info = self._where[name]
        dtype = _DTYPES.get(info["dtype"])
        if dtype is None:
            raise CheckpointError(f"{f}: tensor {name} has unsupported dtype {info['dtype']}")
        start, end = info["data_offsets"]
        shape = list(info["shape"])
        if rows is not None and shape and shape[0]:
            r0, r1, step = rows.indices(shape[0])
            if step == 1:
                row_bytes = (end - start) // shape[0]
                start, end, shape[0] = start + r0 * row_bytes, start + max(r0, r1) * row_bytes, max(0, r1 - r0)
                rows = None
        start, end = info["offset"] + start, info["offset"] + end
        if storage.is_url(f):
            raw = np.frombuffer(storage.read_range(f, start, end), np.uint8)
        else:
            if f not in self._maps:
                self._maps[f] = np.memmap(storage.abspath(f), dtype=np.uint8, mode="r")
            raw = self._maps[f][start:end]
        out = raw.view(dtype).reshape(shape)
        return out if rows is None else out[rows]


def _checkpoint_files(path: str) -> list[str]:
    if storage.isfile(path):
        return [path]
    index = storage.join(path, "model.safetensors.index.json")
    if storage.exists(index):
        weight_map = json.loads(storage.read_text(index)).get("weight_map", {})
        files = sorted({storage.join(path, v) for v in weight_map.values()})
        missing = [f for f in files if not storage.exists(f)]
        if missing:
            raise CheckpointError(f"{index} lists shard files that do not exist: {missing}")
        return files
    if not storage.isdir(path):
        raise CheckpointError(f"{path}: no such checkpoint directory or safetensors file")
    files = sorted(storage.join(path, f) for f in storage.listdir(path) if f.endswith(".safetensors"))
    if not files:
        raise CheckpointError(f"{path}: no *.safetensors files (and no model.safetensors.index.json)")
    return files


def _read_header(file: str) -> tuple[dict, int]:
    head = storage.read_range(file, 0, 8)
    if len(head) < 8:
        raise CheckpointError(f"{file}: too short to be a safetensors file")
    (n,) = struct.unpack("<Q", head)
    if n > 100 * 2 ** 20:
        raise CheckpointError(f"{file}: corrupt safetensors header (claims {n} bytes)")
    try:
        return json.loads(storage.read_range(file, 8, 8 + n)), 8 + n
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"{file}: corrupt safetensors header") from None


def _header(specs: list[tuple[str, tuple, np.dtype]]) -> bytes:
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape, dtype in specs:
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        header[name] = {"dtype": _CODES[np.dtype(dtype)], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    return struct.pack("<Q", len(blob)) + blob


def _write_file(file: str, specs: list[tuple[str, tuple, np.dtype]], arrays: Iterator[np.ndarray]) -> None:
    """One safetensors file whose header is known up front, its tensors streamed in one at a time. Local
    files are written beside and renamed into place; an upload appears only once complete."""
    target = file if storage.is_url(file) else f"{file}.tmp{os.getpid()}"
    with storage.open(target, "wb") as f:
        f.write(_header(specs))
        for (name, shape, dtype), a in zip(specs, arrays):
            a = np.ascontiguousarray(a)
            if a.shape != tuple(shape) or a.dtype != dtype:
                raise ValueError(f"{name}: got {a.shape} {a.dtype}, the header says {tuple(shape)} {dtype}")
            f.write(memoryview(a.reshape(-1).view(np.uint8)))
    if target != file:
        os.replace(target, file)


def write_safetensors(file: str, tensors: dict[str, np.ndarray]) -> None:
    arrays = {name: np.ascontiguousarray(a) for name, a in tensors.items()}
    _write_file(file, [(n, a.shape, a.dtype) for n, a in arrays.items()], iter(arrays.values()))


# -- the name map -----------------------------------------------------------------------------------

_linear, _same = tables.LINEAR, tables.SAME


# our path (within params) -> (hf name, per-layer count or None, to_ours, expected hf shape). The family's
# tables say it (qwen2vl_jax.families); `to_ours.inverse` is the export's map back.
def param_map(config: Qwen2VLConfig) -> dict[tuple[str, ...], tuple[str, int | None, Callable, tuple]]:
    fam = config.family
    rows = [*fam.vision_table(config.vision), *fam.text_table(config)]
    return {ours: (hf, n, fn, tuple(shape)) for ours, hf, n, fn, shape in rows}


def _canonical(name: str) -> str:
    """Map the in-memory layout (`model.visual.`, `model.language_model.`) to the on-disk one."""
    if name.startswith("model.visual."):
        return name[len("model."):]
    if name.startswith("model.language_model."):
        return "model." + name[len("model.language_model."):]
    return name


# -- loading ----------------------------------------------------------------------------------------

def load_params(path: str, config: Qwen2VLConfig, dtype=np.float32, shardings=None):
    """Params pytree from an HF checkpoint. `shardings`: optional pytree of jax Shardings matching the params;
    each array is then built with `jax.make_array_from_callback`, reading only each device's slice."""
    reader = SafetensorsReader(path)
    names = {_canonical(k): k for k in reader.keys()}
    pmap = param_map(config)
    problems = []
    for ours, (hf, n, _, shape) in pmap.items():
        for name in ([hf.format(i=i) for i in range(n)] if n else [hf]):
            if name not in names:
                problems.append(f"missing tensor {name}")
            elif reader.shape(names[name]) != tuple(shape):
                problems.append(f"{name} has shape {reader.shape(names[name])}, the config needs {tuple(shape)}")
    if problems:
        more = f" (and {len(problems) - 10} more)" if len(problems) > 10 else ""
        raise CheckpointError(f"{path} does not match the config: " + "; ".join(problems[:10]) + more +
                              ". Check that config.json belongs to these weights.")

    def source(ours):
        hf, n, fn, _ = pmap[ours]
        if n is None:
            return lambda idx=(): _slice(reader, names[hf], fn, tuple(idx)).astype(dtype)

        def read(idx=()):
            layers = range(n)[idx[0]] if idx else range(n)
            return np.stack([_slice(reader, names[hf.format(i=i)], fn, tuple(idx[1:])).astype(dtype)
                             for i in layers])
        return read

    tree: dict = {}
    flat_shardings = _flatten(shardings) if shardings is not None else {}
    for ours in pmap:
        read = source(ours)
        if ours in flat_shardings:
            shape = _our_shape(pmap[ours])
            arr = jax.make_array_from_callback(shape, flat_shardings[ours], _once_per_slice(read))
        else:
            arr = jax.numpy.asarray(read())
        _set(tree, ours, arr)
    return tree


def _slice(reader: SafetensorsReader, name: str, fn: Callable, idx: tuple) -> np.ndarray:
    """fn(stored tensor)[idx], reading only the stored rows that `idx` needs (2-D kernels are stored
    transposed, so their second index selects the stored rows)."""
    if fn is _same and idx and isinstance(idx[0], slice):
        return np.asarray(reader.get(name, idx[0]))[(slice(None),) + idx[1:]]
    if fn is _linear and len(idx) == 2 and isinstance(idx[1], slice):
        return np.asarray(fn(reader.get(name, idx[1])))[idx[0], :]
    return np.asarray(fn(reader.get(name)))[idx]


def _our_shape(entry) -> tuple[int, ...]:
    _, n, fn, shape = entry
    one = fn(np.empty(shape, np.uint8)).shape
    return (n, *one) if n else tuple(one)


def _once_per_slice(read: Callable) -> Callable:
    """A device callback for `read` under which devices holding the same slice (replicas) share one read."""
    done: dict = {}

    def callback(idx):
        idx = _norm_idx(idx)
        key = tuple((s.start, s.stop, s.step) if isinstance(s, slice) else s for s in idx)   # slices: unhashable
        if key not in done:
            done[key] = read(idx)
        return done[key]
    return callback


def _norm_idx(idx):
    return tuple(slice(s.start, s.stop, s.step) if isinstance(s, slice) else s for s in idx)


def _flatten(tree, prefix=()) -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flatten(v, prefix + (k,)))
        else:
            out[prefix + (k,)] = v
    return out


def _set(tree, path, value):
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


# -- saving -----------------------------------------------------------------------------------------

def hf_tensors(params, config: Qwen2VLConfig) -> Iterator[tuple[str, np.ndarray]]:
    """(hf name, torch-layout numpy array) pairs, one tensor at a time (on-disk legacy names)."""
    flat = _flatten(params)
    disk = config.family.disk_name
    for ours, (hf, n, fn, shape) in param_map(config).items():
        arr = np.asarray(jax.device_get(flat[ours]))
        for i in range(n or 1):
            a = fn.inverse(arr[i] if n else arr, shape)
            yield disk(hf.format(i=i) if n else hf), np.ascontiguousarray(a)


def save_processing(config: Qwen2VLConfig, path: str, processor=None, generation=None) -> None:
    """The files an HF checkpoint holds beside its weights: the processor's (tokenizer, chat template, image
    settings; `Processor.for_model(config)` by default) and generation_config.json (greedy with the config's
    EOS and pad ids by default, which is what `Qwen2VL.generate` does)."""
    from qwen2vl_jax.data.processor import Processor
    from qwen2vl_jax.infer.config import GenerationConfig
    processor = processor if processor is not None else Processor.for_model(config)
    wrong = [f"{a} {getattr(processor, a)} != {getattr(config, a)}" for a in ("eos_token_id", "pad_token_id",
             "image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
             if getattr(processor, a) != getattr(config, a)]
    if wrong:
        raise ValueError("the processor's tokenizer does not belong to this model (special token ids: "
                         + "; ".join(wrong) + ")")
    generation = generation or GenerationConfig.create(eos_token_id=config.eos_token_id,
                                                       pad_token_id=config.pad_token_id)
    processor.save_pretrained(path)
    generation.save_pretrained(path, bos_token_id=config.bos_token_id)


def save_params(params, config: Qwen2VLConfig, path: str, max_shard_bytes: int = 5 * 2 ** 30) -> None:
    """Write config.json and safetensors (sharded with an index past `max_shard_bytes`) in the HF layout, to a
    local directory or a URL (`save_processing` writes the rest of a checkpoint). Shards are planned from the
    shapes first, so each file is written in one pass under its final name with one tensor in host memory at
    a time."""
    storage.makedirs(path)
    flat = _flatten(params)
    specs = []
    for ours, (hf, n, _, shape) in param_map(config).items():
        dtype = np.dtype(flat[ours].dtype)
        specs += [(config.family.disk_name(hf.format(i=i) if n else hf), tuple(shape), dtype) for i in range(n or 1)]
    shards: list[list] = [[]]
    size = total = 0
    for spec in specs:
        nbytes = int(np.prod(spec[1], dtype=np.int64)) * spec[2].itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += nbytes
        total += nbytes
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    tensors = (a for _, a in hf_tensors(params, config))
    for fname, shard in zip(names, shards):
        _write_file(storage.join(path, fname), shard, tensors)
    if len(shards) > 1:
        weight_map = {spec[0]: fname for fname, shard in zip(names, shards) for spec in shard}
        storage.write_text(storage.join(path, "model.safetensors.index.json"),
                           json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    d = config.to_hf_dict()
    dtype = specs[0][2] if specs else np.dtype(np.float32)
    d["torch_dtype"] = {"bfloat16": "bfloat16", "float16": "float16"}.get(str(dtype), "float32")
    storage.write_text(storage.join(path, "config.json"), json.dumps(d, indent=2, sort_keys=True))
