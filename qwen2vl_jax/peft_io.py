"""peft LoRA adapters on disk <-> adapters in our params tree (`qwen2vl_jax.lora`).

A peft adapter directory holds `adapter_config.json` and `adapter_model.safetensors` whose keys are
`base_model.model.<module>.lora_A.weight` (r, in) and `...lora_B.weight` (out, r), `<module>` the
transformers module name in either layout: `model.language_model.layers.0.self_attn.q_proj` /
`model.visual.blocks.0.attn.qkv` (transformers >= 4.52) or `model.layers.0.self_attn.q_proj` /
`visual.blocks.0.attn.qkv` (older). Both are read; the newer is written, with `target_modules` a regex that
matches either, so `PeftModel.from_pretrained` loads it on both.
"""

from __future__ import annotations

import dataclasses
import json
import re

import jax
import numpy as np

from qwen2vl_jax import hf, storage
from qwen2vl_jax.config import Qwen2VLConfig
from qwen2vl_jax.lora import ADAPTABLE, Adapter, AdapterError, _at, _replace, dense_modules, kernel_shape

CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
# How the base the adapters were trained over was stored, when quantised (peft's adapter_config.json has no
# such field and peft ignores other files): {"quant": "nf4", "quant_group": 64, "base_dtype": "bfloat16"} (the
# storage of its unquantised matrices: embeddings, head). `load_pretrained(base, adapter=DIR)` stores the base
# the same way, so the adapters run over the base they were trained with.
BASE_FILE = "base_quant.json"
PREFIX = "base_model.model."


def module_map(config: Qwen2VLConfig) -> dict[tuple[str, ...], tuple[str, int | None]]:
    """Our Dense module path -> (its transformers module name on disk, `{i}` for the layer; layers or None)."""
    out = {}
    for path, (name, n, _, _) in hf.param_map(config).items():
        if path[-1] == "kernel" and ADAPTABLE.match("/".join(path[:-1])):
            out[path[:-1]] = (name[:-len(".weight")], n)
    return out


def _in_memory(name: str) -> str:
    """On-disk module name -> the in-memory one of transformers 4.57 (`model.visual.`, `model.language_model.`)."""
    if name.startswith("visual."):
        return "model." + name
    if name.startswith("model."):
        return "model.language_model." + name[len("model."):]
    return name


def _target_regex(names: list[str]) -> str:
    """One regex (peft full-matches it against module names) for the modules `names` (on-disk, `{i}`), either
    layout."""
    alts = []
    for name in sorted(set(names)):
        body = re.escape(name).replace(r"\{i\}", r"\d+")
        if name.startswith("visual."):
            body = r"(model\.)?" + body
        elif name.startswith("model."):
            body = r"model\.(language_model\.)?" + body[len(r"model\."):]
        alts.append(body)
    return "^(" + "|".join(alts) + ")$"


def save_adapter(params: dict, config: Qwen2VLConfig, adapter: Adapter, path: str,
                 base_model_name_or_path: str = "") -> None:
    """Write the adapters of `params` as a peft LoRA adapter directory (float32 tensors)."""
    modules = module_map(config)
    tensors, names = {}, []
    for mod in dense_modules(params):
        layer = _at(params, mod)
        if "lora_a" not in layer:
            continue
        if mod not in modules:
            raise AdapterError(f"{'/'.join(mod)} has an adapter but no transformers Linear to carry it")
        name, n = modules[mod]
        names.append(name)
        a = np.asarray(jax.device_get(layer["lora_a"]), np.float32)
        b = np.asarray(jax.device_get(layer["lora_b"]), np.float32)
        for i in range(n or 1):
            key = PREFIX + _in_memory(name.format(i=i) if n else name)
            ai, bi = (a[i], b[i]) if n else (a, b)
            tensors[key + ".lora_A.weight"] = np.ascontiguousarray(ai.T)
            tensors[key + ".lora_B.weight"] = np.ascontiguousarray(bi.T)
    if not tensors:
        raise AdapterError("save_adapter: the params hold no adapters")
    cfg = {
        "peft_type": "LORA", "task_type": None, "base_model_name_or_path": base_model_name_or_path or None,
        "r": adapter.r, "lora_alpha": adapter.alpha, "use_rslora": adapter.rslora, "lora_dropout": adapter.dropout,
        "target_modules": _target_regex(names), "bias": "none", "fan_in_fan_out": False,
        "init_lora_weights": True, "modules_to_save": None, "use_dora": False, "rank_pattern": {},
        "alpha_pattern": {}, "inference_mode": True, "revision": None,
    }
    storage.makedirs(path)
    storage.write_text(storage.join(path, CONFIG_FILE), json.dumps(cfg, indent=2) + "\n")
    if adapter.quant != "none":
        storage.write_text(storage.join(path, BASE_FILE),
                           json.dumps({"quant": adapter.quant, "quant_group": adapter.quant_group,
                                       "base_dtype": adapter.base_dtype}) + "\n")
    elif storage.exists(storage.join(path, BASE_FILE)):
        storage.remove(storage.join(path, BASE_FILE))
    hf.write_safetensors(storage.join(path, WEIGHTS_FILE), tensors)


def read_config(path: str) -> Adapter:
    """The Adapter of a peft adapter directory's adapter_config.json (unsupported features are errors)."""
    file = storage.join(path, CONFIG_FILE)
    if not storage.exists(file):
        raise AdapterError(f"{path}: no {CONFIG_FILE}; expected a peft LoRA adapter directory")
    c = json.loads(storage.read_text(file))
    problems = []
    if c.get("peft_type", "LORA") != "LORA":
        problems.append(f"peft_type {c.get('peft_type')!r} (only LORA)")
    if c.get("use_dora"):
        problems.append("use_dora (DoRA)")
    if c.get("bias", "none") != "none":
        problems.append(f"bias {c.get('bias')!r} (only none)")
    if c.get("modules_to_save"):
        problems.append(f"modules_to_save {c['modules_to_save']}")
    if c.get("rank_pattern") or c.get("alpha_pattern"):
        problems.append("rank_pattern / alpha_pattern (one rank and alpha for every layer)")
    if c.get("fan_in_fan_out"):
        problems.append("fan_in_fan_out")
    if problems:
        raise AdapterError(f"{file}: unsupported adapter features: {'; '.join(problems)}")
    base = {}
    base_file = storage.join(path, BASE_FILE)
    if storage.exists(base_file):
        try:
            b = json.loads(storage.read_text(base_file))
            base = {"quant": str(b["quant"]), "quant_group": int(b.get("quant_group", 64))}
            if "base_dtype" in b:
                base["base_dtype"] = str(b["base_dtype"])
        except (ValueError, KeyError, TypeError) as e:
            raise AdapterError(f"{base_file}: expected {{\"quant\": \"nf4\", \"quant_group\": 64}} ({e}); fix or "
                               "delete it (then the base loads unquantised)") from None
    return Adapter(r=int(c["r"]), alpha=float(c.get("lora_alpha", 8)), rslora=bool(c.get("use_rslora", False)),
                   dropout=float(c.get("lora_dropout", 0.0)), **base)


def base_storage(path: str) -> bool:
    """Whether the adapter dir `path` says how its base was stored (`BASE_FILE`)."""
    return storage.exists(storage.join(path, BASE_FILE))


def load_adapter(path: str, config: Qwen2VLConfig, params: dict, dtype=np.float32) -> tuple[Adapter, dict]:
    """(the Adapter, `params` with the adapters of the peft directory `path`); both key layouts are read."""
    adapter = read_config(path)
    file = storage.join(path, WEIGHTS_FILE)
    if not storage.exists(file):
        raise AdapterError(f"{path}: no {WEIGHTS_FILE} (adapter_model.bin is not read: save with safetensors)")
    reader = hf.SafetensorsReader(file)
    patterns = []
    for mod, (name, n) in module_map(config).items():
        rx = re.escape(name).replace(r"\{i\}", r"(\d+)")
        patterns.append((re.compile("^" + rx + "$"), mod, n))
    found: dict[tuple, dict] = {}
    for key in reader.keys():
        m = re.match(r"^(?:base_model\.model\.)?(.*)\.lora_([AB])(?:\.[A-Za-z0-9_]+)?\.weight$", key)
        if not m:
            raise AdapterError(f"{file}: tensor {key} is not a LoRA A/B weight")
        module, which = hf._canonical(m.group(1)), m.group(2)
        for rx, mod, n in patterns:
            hit = rx.match(module)
            if hit:
                i = int(hit.group(1)) if n else None
                found.setdefault(mod, {})[(which, i)] = key
                break
        else:
            raise AdapterError(f"{file}: {key} adapts {module}, which is not a Linear layer of this model")
    if not found:
        raise AdapterError(f"{file}: no LoRA weights")
    out = params
    for mod, keys in found.items():
        n = module_map(config)[mod][1]
        layer = _at(params, mod)
        lead, (n_in, n_out) = kernel_shape(layer)

        def get(which, i):
            if (which, i) not in keys:
                raise AdapterError(f"{file}: {'/'.join(mod)} lacks lora_{which} of layer {i}")
            t = np.asarray(reader.get(keys[(which, i)]), np.float32).T
            want = (n_in, adapter.r) if which == "A" else (adapter.r, n_out)
            if t.shape != want:
                raise AdapterError(f"{file}: {keys[(which, i)]} has shape {t.shape[::-1]}, expected {want[::-1]} "
                                   f"(r={adapter.r})")
            return t
        if n:
            a = np.stack([get("A", i) for i in range(n)])
            b = np.stack([get("B", i) for i in range(n)])
        else:
            a, b = get("A", None), get("B", None)
        out = _replace(out, mod, lambda l, a=a, b=b: {**l, "lora_a": a.astype(dtype), "lora_b": b.astype(dtype)})
    targets = "^(" + "|".join(re.escape("/".join(m)) for m in sorted(found)) + ")$"
    adapter = dataclasses.replace(adapter, targets=targets)
    return adapter, out
