"""Hugging Face safetensors <-> our params (docs/design.md, "Checkpoints").

Reads both on-disk layouts (`visual.*` / `model.*` and `model.visual.*` / `model.language_model.*`), single
files and sharded `model.safetensors.index.json`, the tied 2B head, in f32 or bf16. Tensors are read lazily
from memory-mapped files, one at a time, and can be placed straight onto a mesh: each device reads only its
own slice, so a 72B never needs the whole model in one host's memory twice.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Callable, Iterator

import jax
import ml_dtypes
import numpy as np

from qwen2vl_jax.config import Qwen2VLConfig


class CheckpointError(ValueError):
    """A checkpoint that does not match the model config (missing or mis-shaped tensors, bad files)."""


_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
           "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
_CODES = {np.dtype(v): k for k, v in _DTYPES.items()}


# -- safetensors files ------------------------------------------------------------------------------

class SafetensorsReader:
    """All tensors of a checkpoint directory (or one file), memory-mapped, keyed by name."""

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

    def get(self, name: str) -> np.ndarray:
        f, info = self._where[name]
        if f not in self._maps:
            self._maps[f] = np.memmap(f, dtype=np.uint8, mode="r")
        start, end = info["data_offsets"]
        dtype = _DTYPES.get(info["dtype"])
        if dtype is None:
            raise CheckpointError(f"{f}: tensor {name} has unsupported dtype {info['dtype']}")
        raw = self._maps[f][info["offset"] + start: info["offset"] + end]
        return raw.view(dtype).reshape(info["shape"])


def _checkpoint_files(path: str) -> list[str]:
    if os.path.isfile(path):
        return [path]
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            weight_map = json.load(f).get("weight_map", {})
        files = sorted({os.path.join(path, v) for v in weight_map.values()})
        missing = [f for f in files if not os.path.exists(f)]
        if missing:
            raise CheckpointError(f"{index} lists shard files that do not exist: {missing}")
        return files
    files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".safetensors"))
    if not files:
        raise CheckpointError(f"{path}: no *.safetensors files (and no model.safetensors.index.json)")
    return files


def _read_header(file: str) -> tuple[dict, int]:
    with open(file, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{file}: too short to be a safetensors file")
        (n,) = struct.unpack("<Q", head)
        try:
            return json.loads(f.read(n)), 8 + n
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise CheckpointError(f"{file}: corrupt safetensors header") from None


def write_safetensors(file: str, tensors: dict[str, np.ndarray]) -> None:
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    arrays = {}
    for name, a in tensors.items():
        a = np.ascontiguousarray(a)
        arrays[name] = a
        header[name] = {"dtype": _CODES[a.dtype], "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(file, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for a in arrays.values():
            f.write(a.tobytes())


# -- the name map -----------------------------------------------------------------------------------

def _linear(t):           # torch (out, in) -> flax (in, out)
    return t.T


def _same(t):
    return t


# our path (within params) -> (hf name, per-layer count or None, to_ours, expected hf shape)
def param_map(config: Qwen2VLConfig) -> dict[tuple[str, ...], tuple[str, int | None, Callable, tuple]]:
    v, t = config.vision, config.text
    E, D, kv = v.embed_dim, t.hidden_size, t.num_key_value_heads * t.head_dim
    nq = t.num_attention_heads * t.head_dim
    m: dict = {
        ("visual", "patch_embed", "kernel"): (
            "visual.patch_embed.proj.weight", None, lambda w: w.reshape(w.shape[0], -1).T,
            (E, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size)),
        ("visual", "merger", "ln_q", "scale"): ("visual.merger.ln_q.weight", None, _same, (E,)),
        ("visual", "merger", "ln_q", "bias"): ("visual.merger.ln_q.bias", None, _same, (E,)),
        ("visual", "merger", "mlp_0", "kernel"): ("visual.merger.mlp.0.weight", None, _linear, (4 * E, 4 * E)),
        ("visual", "merger", "mlp_0", "bias"): ("visual.merger.mlp.0.bias", None, _same, (4 * E,)),
        ("visual", "merger", "mlp_2", "kernel"): ("visual.merger.mlp.2.weight", None, _linear, (D, 4 * E)),
        ("visual", "merger", "mlp_2", "bias"): ("visual.merger.mlp.2.bias", None, _same, (D,)),
        ("model", "embed_tokens", "embedding"): ("model.embed_tokens.weight", None, _same, (t.vocab_size, D)),
        ("model", "norm", "scale"): ("model.norm.weight", None, _same, (D,)),
    }
    for ours, hf, shape in (
        ("norm1/scale", "norm1.weight", (E,)), ("norm1/bias", "norm1.bias", (E,)),
        ("norm2/scale", "norm2.weight", (E,)), ("norm2/bias", "norm2.bias", (E,)),
        ("qkv/kernel", "attn.qkv.weight", (3 * E, E)), ("qkv/bias", "attn.qkv.bias", (3 * E,)),
        ("proj/kernel", "attn.proj.weight", (E, E)), ("proj/bias", "attn.proj.bias", (E,)),
        ("fc1/kernel", "mlp.fc1.weight", (v.mlp_dim, E)), ("fc1/bias", "mlp.fc1.bias", (v.mlp_dim,)),
        ("fc2/kernel", "mlp.fc2.weight", (E, v.mlp_dim)), ("fc2/bias", "mlp.fc2.bias", (E,)),
    ):
        fn = _linear if ours.endswith("kernel") else _same
        m[("visual", "blocks", *ours.split("/"))] = (f"visual.blocks.{{i}}.{hf}", v.depth, fn, shape)
    for ours, hf, shape in (
        ("input_layernorm/scale", "input_layernorm.weight", (D,)),
        ("post_attention_layernorm/scale", "post_attention_layernorm.weight", (D,)),
        ("q_proj/kernel", "self_attn.q_proj.weight", (nq, D)), ("q_proj/bias", "self_attn.q_proj.bias", (nq,)),
        ("k_proj/kernel", "self_attn.k_proj.weight", (kv, D)), ("k_proj/bias", "self_attn.k_proj.bias", (kv,)),
        ("v_proj/kernel", "self_attn.v_proj.weight", (kv, D)), ("v_proj/bias", "self_attn.v_proj.bias", (kv,)),
        ("o_proj/kernel", "self_attn.o_proj.weight", (D, nq)),
        ("gate_proj/kernel", "mlp.gate_proj.weight", (t.intermediate_size, D)),
        ("up_proj/kernel", "mlp.up_proj.weight", (t.intermediate_size, D)),
        ("down_proj/kernel", "mlp.down_proj.weight", (D, t.intermediate_size)),
    ):
        fn = _linear if ours.endswith("kernel") else _same
        m[("model", "layers", *ours.split("/"))] = (f"model.layers.{{i}}.{hf}", t.num_hidden_layers, fn, shape)
    if not config.tie_word_embeddings:
        m[("lm_head", "kernel")] = ("lm_head.weight", None, _linear, (t.vocab_size, D))
    return m


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
            return lambda idx=(): np.asarray(fn(reader.get(names[hf])))[idx].astype(dtype)

        def read(idx=()):
            layers = range(n)[idx[0]] if idx else range(n)
            return np.stack([np.asarray(fn(reader.get(names[hf.format(i=i)])))[tuple(idx[1:])].astype(dtype)
                             for i in layers])
        return read

    tree: dict = {}
    flat_shardings = _flatten(shardings) if shardings is not None else {}
    for ours in pmap:
        read = source(ours)
        if ours in flat_shardings:
            shape = _our_shape(pmap[ours])
            arr = jax.make_array_from_callback(shape, flat_shardings[ours], lambda idx, r=read: r(_norm_idx(idx)))
        else:
            arr = jax.numpy.asarray(read())
        _set(tree, ours, arr)
    return tree


def _our_shape(entry) -> tuple[int, ...]:
    _, n, fn, shape = entry
    one = fn(np.empty(shape, np.uint8)).shape
    return (n, *one) if n else tuple(one)


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
    for ours, (hf, n, _, shape) in param_map(config).items():
        arr = np.asarray(jax.device_get(flat[ours]))
        for i in range(n or 1):
            a = arr[i] if n else arr
            a = a.T.reshape(shape) if ours[-1] == "kernel" else a
            yield (hf.format(i=i) if n else hf), np.ascontiguousarray(a)


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
    """Write config.json and safetensors (sharded with an index past `max_shard_bytes`) in the HF layout;
    `save_processing` writes the rest of a checkpoint."""
    os.makedirs(path, exist_ok=True)
    # Shards are written as soon as they fill up, so only one shard is ever held in host memory.
    written: list[tuple[str, list[str]]] = []
    current: dict[str, np.ndarray] = {}
    size, total, dtype = 0, 0, None

    def flush():
        tmp = os.path.join(path, f".shard-{len(written):05d}.tmp")
        write_safetensors(tmp, current)
        written.append((tmp, list(current)))

    for name, a in hf_tensors(params, config):
        dtype = dtype or a.dtype
        if current and size + a.nbytes > max_shard_bytes:
            flush()
            current, size = {}, 0
        current[name] = a
        size += a.nbytes
        total += a.nbytes
    flush()
    if len(written) == 1:
        os.replace(written[0][0], os.path.join(path, "model.safetensors"))
    else:
        weight_map = {}
        for i, (tmp, names) in enumerate(written):
            fname = f"model-{i + 1:05d}-of-{len(written):05d}.safetensors"
            os.replace(tmp, os.path.join(path, fname))
            weight_map.update({n: fname for n in names})
        with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    d = config.to_hf_dict()
    d["torch_dtype"] = {"bfloat16": "bfloat16", "float16": "float16"}.get(str(dtype), "float32")
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(d, f, indent=2, sort_keys=True)
