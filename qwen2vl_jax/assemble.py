"""Stage-1 initialisation: a Qwen2-VL params tree from a CLIP ViT and a Qwen2 LLM.

The paper starts the vision encoder from the DFN CLIP ViT-H/14 and the LLM from Qwen2. This module builds
that starting point from two checkpoints:

* vision: a CLIP ViT in the Hugging Face layout (`CLIPVisionModel` / `CLIPModel`, `*.patch_embedding`,
  `encoder.layers.N.self_attn.{q,k,v}_proj`, ...) or the open_clip layout (`visual.conv1`,
  `visual.transformer.resblocks.N.attn.in_proj_weight`, `mlp.c_fc`, ...), safetensors;
* language: a Hugging Face `Qwen2ForCausalLM` (its names are the Qwen2-VL text names).

What maps: the patch embedding (the 2D conv kernel inflated over the temporal depth, below), the fused q/k/v
and output projections, the MLP and both block LayerNorms, and every LLM tensor. What does not: the class
token, the absolute position embedding (the ViT's 2D RoPE replaces it), CLIP's pre-/post-LayerNorm and
projection head, the CLIP text tower; the merger is freshly initialised with the model's own initialisers.
`LoadReport` lists every tensor that was loaded, skipped or initialised, and why. Pixels need no change:
CLIP (OpenAI, DFN) and Qwen2-VL normalise with the same OpenAI CLIP mean/std.

Checkpoint pairings that cannot work (ViT width/depth/heads/MLP/patch size against the config, LLM hidden
size against the merger output, any mis-shaped tensor) raise `CheckpointError` before anything is built;
differences that only change numerics (activation, norm eps, rope theta) are reported as warnings.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from qwen2vl_jax import hf, storage
from qwen2vl_jax.config import Qwen2VLConfig
from qwen2vl_jax.hf import CheckpointError, SafetensorsReader
from qwen2vl_jax.load_report import LoadReport

Read = Callable[[tuple], np.ndarray]   # index tuple (slices) -> that slice of the tensor in our layout


@dataclasses.dataclass
class _Target:
    path: tuple[str, ...]      # where it goes in our params
    shape: tuple[int, ...]     # in our layout, layer axis first when stacked
    read: Read
    sources: list[str]         # checkpoint names, `{i}` standing for the layer index
    how: str
    layers: int | None = None  # stacked over this many layers on axis 0


# -- vision layouts --------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _Layout:
    name: str
    patch: str                 # patch conv weight, relative to the tower prefix
    blocks: str                # block list, relative to the tower prefix; `N.` follows
    block: dict                # our block param -> source names inside a block (several = fused in order)
    dropped: tuple             # (regex on the name relative to the prefix, why it is not used)


_CLS = "class token: Qwen2-VL has none"
_POS = "absolute position embedding: replaced by the ViT's 2D RoPE"
_PRE = "CLIP pre-LayerNorm: Qwen2-VL has none before the first block"
_POST = "CLIP post-LayerNorm: Qwen2-VL has no final norm; the fresh merger's ln_q follows the last block"
_HEAD = "CLIP projection head: not part of Qwen2-VL"
_TEXT = "outside the vision tower (CLIP text tower or contrastive head)"

HF_CLIP = _Layout(
    "hf_clip", "embeddings.patch_embedding.weight", "encoder.layers.",
    {"norm1/scale": ("layer_norm1.weight",), "norm1/bias": ("layer_norm1.bias",),
     "qkv/kernel": ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
     "qkv/bias": ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"),
     "proj/kernel": ("self_attn.out_proj.weight",), "proj/bias": ("self_attn.out_proj.bias",),
     "norm2/scale": ("layer_norm2.weight",), "norm2/bias": ("layer_norm2.bias",),
     "fc1/kernel": ("mlp.fc1.weight",), "fc1/bias": ("mlp.fc1.bias",),
     "fc2/kernel": ("mlp.fc2.weight",), "fc2/bias": ("mlp.fc2.bias",)},
    ((r"embeddings\.class_embedding$", _CLS), (r"embeddings\.position_embedding\.weight$", _POS),
     (r"embeddings\.position_ids$", _POS), (r"pre_layrnorm\.", _PRE), (r"post_layernorm\.", _POST)))

# open_clip's nn.MultiheadAttention keeps q/k/v fused as in_proj rows [q; k; v], heads contiguous in each:
# the same order as Qwen2-VL's fused qkv ([q | k | v] rows), so it maps without reordering.
OPEN_CLIP = _Layout(
    "open_clip", "conv1.weight", "transformer.resblocks.",
    {"norm1/scale": ("ln_1.weight",), "norm1/bias": ("ln_1.bias",),
     "qkv/kernel": ("attn.in_proj_weight",), "qkv/bias": ("attn.in_proj_bias",),
     "proj/kernel": ("attn.out_proj.weight",), "proj/bias": ("attn.out_proj.bias",),
     "norm2/scale": ("ln_2.weight",), "norm2/bias": ("ln_2.bias",),
     "fc1/kernel": ("mlp.c_fc.weight",), "fc1/bias": ("mlp.c_fc.bias",),
     "fc2/kernel": ("mlp.c_proj.weight",), "fc2/bias": ("mlp.c_proj.bias",)},
    ((r"class_embedding$", _CLS), (r"positional_embedding$", _POS), (r"ln_pre\.", _PRE),
     (r"ln_post\.", _POST), (r"proj$", _HEAD)))

_OUTSIDE = ((r"^visual_projection\.", _HEAD), (r"", _TEXT))


def _detect(reader: SafetensorsReader, path: str) -> tuple[_Layout, str]:
    """(layout, name prefix of the vision tower), from the patch conv's name."""
    names = list(reader.keys())
    for layout in (HF_CLIP, OPEN_CLIP):
        prefixes = sorted({n[: -len(layout.patch)] for n in names if n.endswith(layout.patch)
                           and (n == layout.patch or n[: -len(layout.patch)].endswith("."))})
        prefixes = [p for p in prefixes if any(n.startswith(p + layout.blocks) for n in names)]
        if len(prefixes) > 1:
            raise CheckpointError(f"{path}: {len(prefixes)} vision towers ({prefixes}); pass a checkpoint with one")
        if prefixes:
            return layout, prefixes[0]
    raise CheckpointError(
        f"{path}: not a CLIP ViT checkpoint in a known layout: expected '*embeddings.patch_embedding.weight' "
        "with '*encoder.layers.N.*' (Hugging Face CLIPVisionModel/CLIPModel) or '*conv1.weight' with "
        "'*transformer.resblocks.N.*' (open_clip ViT; ResNet towers cannot map to a ViT)")


def _json(file: str) -> dict | None:
    if not storage.exists(file):
        return None
    try:
        return json.loads(storage.read_text(file))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{file}: not valid JSON ({e})") from None


def _vision_meta(path: str, layout: _Layout) -> tuple[dict, str | None]:
    """Hyper-parameters the tensors do not show (heads, activation, norm eps), from the config file beside
    the weights, normalised to {heads, act, eps, model_type}; and the file they came from."""
    folder = path if storage.isdir(path) else storage.dirname(path)
    if layout is HF_CLIP:
        file = storage.join(folder, "config.json")
        d = _json(file)
        if d is None:
            return {}, None
        v = d.get("vision_config") or d
        return {"heads": v.get("num_attention_heads"), "act": v.get("hidden_act", "quick_gelu"),
                "eps": v.get("layer_norm_eps", 1e-5), "model_type": d.get("model_type")}, file
    for name in ("open_clip_config.json", "config.json"):
        file = storage.join(folder, name)
        d = _json(file)
        if d is None:
            continue
        cfg = d.get("model_cfg", d)
        v = cfg.get("vision_cfg")
        if v is None:
            continue
        width = v.get("width")
        head_width = v.get("head_width", 64)   # open_clip's default
        # open_clip builds its towers with nn.GELU unless the model config sets quick_gelu.
        return {"heads": width // head_width if width else None,
                "act": "quick_gelu" if cfg.get("quick_gelu") else "gelu", "eps": 1e-5}, file
    return {"eps": 1e-5}, None


def _linear(ws):          # torch (out, in) pieces -> one flax (in, out) kernel
    return np.concatenate(ws, 0).T


def _vector(ws):
    return np.concatenate(ws, 0)


def _inflate(w, tp: int):
    """CLIP conv (E, C, p, p) -> our patch Dense kernel (C*tp*p*p, E), columns ordered (c, t, py, px).

    Every temporal slice is W/tp, so a patch whose tp frames are the same image (how the processor feeds
    images) gives exactly the 2D conv's response; dividing by tp = 2 is exact in binary."""
    w = np.asarray(w, np.float32) / np.float32(tp)
    e, c, p, _ = w.shape
    return np.broadcast_to(w[:, :, None], (e, c, tp, p, p)).reshape(e, -1).T


def _stacked(n: int, one: Callable[[int], np.ndarray]) -> Read:
    def read(idx=()):
        layers = range(n)[idx[0]] if idx else range(n)
        return np.stack([one(i)[tuple(idx[1:])] for i in layers])
    return read


def _single(one: Callable[[], np.ndarray]) -> Read:
    return lambda idx=(): one()[tuple(idx)]


def _vision(path: str, config: Qwen2VLConfig, report: LoadReport, problems: list[str]) -> list[_Target]:
    try:
        reader = SafetensorsReader(path)
    except (CheckpointError, FileNotFoundError) as e:
        raise CheckpointError(f"vision checkpoint: {e}. A PyTorch .bin/.pt state dict must be converted first: "
                              "safetensors.torch.save_file(torch.load(f, weights_only=True), 'model.safetensors')"
                              ) from None
    layout, prefix = _detect(reader, path)
    depth = _check_vision(reader, path, layout, prefix, config, report, problems)
    _classify_vision(reader, layout, prefix, report, problems)
    return [] if problems else _vision_targets(reader, path, layout, prefix, depth, config, report, problems)


def _check_vision(reader, path, layout, prefix, config, report, problems) -> int:
    """Geometry against the config (errors) and numerics that differ (warnings); returns the depth."""
    meta, meta_file = _vision_meta(path, layout)
    v, blocks = config.vision, prefix + layout.blocks
    patch = reader.shape(prefix + layout.patch)
    idx = sorted({int(m.group(1)) for n in reader.keys() if (m := re.match(re.escape(blocks) + r"(\d+)\.", n))})
    fc1 = blocks + "0." + layout.block["fc1/kernel"][0]
    mlp = reader.shape(fc1)[0] if fc1 in reader.keys() else None
    report.vision = {"path": path, "layout": layout.name, "prefix": prefix, "config_file": meta_file,
                     "width": patch[0], "depth": len(idx), "heads": meta.get("heads"), "mlp": mlp,
                     "patch_size": list(patch[2:]), "in_channels": patch[1], "act": meta.get("act"),
                     "layer_norm_eps": meta.get("eps")}

    def check(what, got, want, fix):
        if got == want:
            report.checks.append(f"vision {what} {got} == config {want}")
        else:
            problems.append(f"vision {what} is {got} in {path} but the config needs {want}; {fix}")
    if meta.get("model_type") not in (None, "clip", "clip_vision_model"):
        problems.append(f"{meta_file} says model_type {meta['model_type']!r}; expected a CLIP vision tower")
    fix = "use a config whose vision tower has this shape (DFN ViT-H/14: width 1280, depth 32, 16 heads, MLP 5120)"
    check("width", patch[0], v.embed_dim, fix)
    check("depth", len(idx), v.depth, fix)
    if idx != list(range(len(idx))):
        problems.append(f"vision blocks in {path} are numbered {idx}, not 0..{len(idx) - 1}")
    if meta.get("heads") is None:
        report.warnings.append(f"vision head count not checked: no CLIP config beside {path}; "
                               f"assumed config's {v.num_heads}")
    else:
        check("heads", meta["heads"], v.num_heads, fix)
    check("MLP width", mlp, v.mlp_dim, fix)
    check("patch kernel", tuple(patch[1:]), (v.in_channels, v.patch_size, v.patch_size),
          "Qwen2-VL patches are 3 x 14 x 14")
    act = meta.get("act")
    if act is None:
        report.warnings.append("vision activation unknown (no config file): Qwen2-VL's ViT uses quick_gelu, "
                               "so a GELU-trained source computes a different function until trained")
    elif act != v.hidden_act:
        report.warnings.append(f"vision activation mismatch: the source ViT was trained with {act} (per "
                               f"{meta_file}), Qwen2-VL's ViT uses {v.hidden_act}; the loaded blocks compute a "
                               "different function until trained")
    else:
        report.checks.append(f"vision activation {act} == config {v.hidden_act}")
    eps = meta.get("eps")
    if eps is not None and eps != 1e-6:
        report.warnings.append(f"vision LayerNorm eps: the source uses {eps:g}, Qwen2-VL hard-codes 1e-6 "
                               "in every vision LayerNorm; a small numeric difference")
    return len(idx)


def _classify_vision(reader, layout, prefix, report, problems) -> None:
    """Every tensor is used (patch conv, a block tensor) or skipped with why. Unknown block tensors would
    change the block's function (LayerScale, cross-attention), so they stop the load."""
    blocks = prefix + layout.blocks
    block_names = {s for names in layout.block.values() for s in names}
    for name in reader.keys():
        if name == prefix + layout.patch:
            continue
        if name.startswith(blocks):
            if name[len(blocks):].split(".", 1)[-1] not in block_names:
                problems.append(f"{name}: a block tensor with no Qwen2-VL counterpart (LayerScale or other "
                                "extra weights are not supported)")
            continue
        if name == prefix + layout.patch[: -len("weight")] + "bias":
            problems.append(f"{name}: the patch conv has a bias, but Qwen2-VL's patch embedding has none "
                            "(a bias-free Conv3d); this is not a CLIP ViT")
            continue
        rel, rules = (name[len(prefix):], layout.dropped) if name.startswith(prefix) else (name, _OUTSIDE)
        why = next((w for rx, w in rules if re.search(rx, rel)), "not recognised; not used by Qwen2-VL")
        report.skipped.append({"tensor": name, "source": "vision", "reason": why})


def _vision_targets(reader, path, layout, prefix, depth, config, report, problems) -> list[_Target]:
    v, blocks = config.vision, prefix + layout.blocks
    tp = v.temporal_patch_size
    expected = hf.param_map(config)
    targets = [_Target(("visual", "patch_embed", "kernel"), (v.patch_dim, v.embed_dim),
                       _single(lambda: _inflate(reader.get(prefix + layout.patch), tp)),
                       [prefix + layout.patch],
                       f"conv (E, C, p, p) repeated over the {tp} frames as W/{tp}, flattened to columns "
                       "(c, t, py, px), transposed")]
    for ours, names in layout.block.items():
        kernel = ours.endswith("kernel")
        full = [f"{blocks}{{i}}.{n}" for n in names]
        missing = [n.format(i=i) for n in full for i in range(depth) if n.format(i=i) not in reader.keys()]
        problems += [f"missing tensor {m} in {path}" for m in missing]
        if missing:
            continue
        dims = [reader.shape(n.format(i=0)) for n in full]
        shape = (depth, dims[0][1], sum(d[0] for d in dims)) if kernel else (depth, sum(d[0] for d in dims))
        want = hf._our_shape(expected[("visual", "blocks", *ours.split("/"))])
        if shape != want:
            problems.append(f"{' + '.join(full)} give {ours} of shape {shape} but the config needs {want}")
        uneven = [n.format(i=i) for n, d in zip(full, dims) for i in range(depth) if reader.shape(n.format(i=i)) != d]
        if uneven:
            problems.append(f"{uneven[0]} has shape {reader.shape(uneven[0])}, unlike block 0 of the same tower")
        fn = _linear if kernel else _vector
        how = ("fused [q|k|v] along the output axis, " if len(names) > 1 else "") + \
            ("transposed" if kernel else "as is")
        one = (lambda fn, full: lambda i: fn([reader.get(n.format(i=i)) for n in full]))(fn, full)
        targets.append(_Target(("visual", "blocks", *ours.split("/")), shape, _stacked(depth, one), full, how,
                               depth))
    if not problems:
        report.checks.append("vision: every block tensor has the config's shape")
    return targets


# -- the language model -----------------------------------------------------------------------------

def _llm(path: str, config: Qwen2VLConfig, report: LoadReport, problems: list[str]) -> list[_Target]:
    try:
        reader = SafetensorsReader(path)
    except (CheckpointError, FileNotFoundError) as e:
        raise CheckpointError(f"language checkpoint: {e}") from None
    t = config.text
    folder = path if storage.isdir(path) else storage.dirname(path)
    meta = _json(storage.join(folder, "config.json")) or {}
    names = set(reader.keys())
    embed = "model.embed_tokens.weight"
    if embed not in names:
        raise CheckpointError(f"{path}: no {embed}; expected a Hugging Face Qwen2ForCausalLM checkpoint")
    vocab, hidden = reader.shape(embed)
    report.llm = {"path": path, "model_type": meta.get("model_type"), "hidden_size": hidden, "vocab_size": vocab,
                  "layers": len({n.split(".")[2] for n in names if n.startswith("model.layers.")}),
                  "tie_word_embeddings": meta.get("tie_word_embeddings", "lm_head.weight" not in names)}
    if meta.get("model_type") not in (None, "qwen2"):
        problems.append(f"{path}: model_type {meta['model_type']!r}; expected a Qwen2ForCausalLM ('qwen2')")
    if hidden != config.vision.hidden_size:
        raise CheckpointError(
            f"LLM hidden size {hidden} ({path}) does not match the merger output config.vision.hidden_size "
            f"{config.vision.hidden_size}: use the config of this LLM's size (presets '2b' <-> Qwen2-1.5B, "
            "'7b' <-> Qwen2-7B, '72b' <-> Qwen2-72B)")
    report.checks.append(f"LLM hidden size {hidden} == merger output {config.vision.hidden_size}")
    for key, want in (("num_attention_heads", t.num_attention_heads), ("num_key_value_heads", t.num_key_value_heads)):
        if key in meta and meta[key] != want:
            problems.append(f"LLM {key} is {meta[key]} in {path}/config.json but the config needs {want}")
    for key, want in (("rope_theta", t.rope_theta), ("rms_norm_eps", t.rms_norm_eps)):
        if key in meta and meta[key] != want:
            report.warnings.append(f"LLM {key}: the source uses {meta[key]:g}, the config {want:g}; "
                                   "the assembled model follows the config")
    if meta.get("use_sliding_window"):
        report.warnings.append("the source LLM uses sliding-window attention; Qwen2-VL attends to the full length")

    pmap = {k: e for k, e in hf.param_map(config).items() if k[0] in ("model", "lm_head")}
    src_tied = bool(report.llm["tie_word_embeddings"])
    if config.tie_word_embeddings and not src_tied:
        problems.append(f"{path} has its own lm_head (tie_word_embeddings false) but the config ties the head "
                        "to the embedding; use an untied config for this LLM")
    targets = []
    for ours, (name, n, fn, shape) in pmap.items():
        if ours == ("lm_head", "kernel") and src_tied:
            # Qwen2-1.5B ties its head; an untied Qwen2-VL head then starts as the embedding matrix.
            name = embed
        todo = [name.format(i=i) for i in range(n)] if n else [name]
        bad = [m for m in todo if m not in names or reader.shape(m) != tuple(shape)]
        for m in bad[:3]:
            problems.append(f"missing tensor {m} in {path}" if m not in names else
                            f"{m} has shape {reader.shape(m)} in {path}, the config needs {tuple(shape)}")
        if bad:
            continue
        how = "transposed" if ours[-1] == "kernel" else "as is"
        if name == embed and ours[0] == "lm_head":
            how = "the source ties its head: a copy of the embedding, transposed"
        if n:
            read = _stacked(n, (lambda name, fn: lambda i: fn(reader.get(name.format(i=i))))(name, fn))
        else:
            read = _single((lambda name, fn: lambda: fn(reader.get(name)))(name, fn))
        targets.append(_Target(ours, hf._our_shape(pmap[ours]), read, [name], how, n))
    if len(targets) == len(pmap):
        report.checks.append(f"LLM {t.num_hidden_layers} layers, vocab {t.vocab_size}, MLP {t.intermediate_size}, "
                             f"{t.num_key_value_heads * t.head_dim}-wide k/v: every tensor has the config's shape")
    used = {name.format(i=i) for _, (name, n, _, _) in pmap.items() for i in range(n or 1)}
    for name in sorted(names - used):
        if name == "lm_head.weight" and config.tie_word_embeddings:
            why = "tied head: the config uses the embedding matrix"
        elif name == "lm_head.weight":
            why = "the source ties its head (tie_word_embeddings): lm_head starts from model.embed_tokens.weight"
        elif name.endswith("rotary_emb.inv_freq"):
            why = "rotary frequency buffer: recomputed"
        else:
            why = "not recognised; not used by Qwen2-VL"
        report.skipped.append({"tensor": name, "source": "llm", "reason": why})
    return targets


# -- assembly ---------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=8)
def _merger_init(config: Qwen2VLConfig, dtype: np.dtype):
    """seed key -> the merger exactly as `Qwen2VL.init(config, seed)` creates it. Only the merger is an
    output of the jitted init, so XLA drops the rest of the model's initialisers and never allocates them."""
    from qwen2vl_jax.api import dummy_batch
    from qwen2vl_jax.model.qwen2vl import Qwen2VLModule
    module = Qwen2VLModule(config, param_dtype=dtype)
    return jax.jit(lambda k: nn.meta.unbox(module.init(k, dummy_batch(config))["params"]["visual"]["merger"]))


_INIT_HOW = {"kernel": "normal(0, 0.02)", "bias": "zeros", "scale": "ones"}


def assemble_params(config: Qwen2VLConfig, vision: str, llm: str, seed: int = 0, dtype="float32",
                    shardings=None):
    """Qwen2-VL params from a CLIP ViT checkpoint (`vision`) and a Qwen2ForCausalLM checkpoint (`llm`).

    Both are directories (or single files) of safetensors. Returns `(params, LoadReport)`. `dtype` is the
    param storage dtype. `shardings`: optional pytree of jax Shardings matching the params (as for
    `hf.load_params`); each device then reads only its own slice of every tensor."""
    from qwen2vl_jax.api import _dtype
    dt = np.dtype(_dtype(dtype))
    report = LoadReport(seed=seed, dtype=str(dt))
    problems: list[str] = []
    targets = _vision(vision, config, report, problems) + _llm(llm, config, report, problems)
    if problems:
        more = f" (and {len(problems) - 12} more)" if len(problems) > 12 else ""
        raise CheckpointError("cannot assemble Qwen2-VL from these checkpoints: " + "; ".join(problems[:12]) +
                              more)

    flat_shardings = hf._flatten(shardings) if shardings is not None else {}
    params: dict = {}
    for tg in targets:
        read = (lambda r: lambda idx=(): np.asarray(r(idx), dt))(tg.read)
        sh = flat_shardings.get(tg.path)
        if sh is None:
            arr = jnp.asarray(read())
        else:
            arr = jax.make_array_from_callback(tg.shape, sh, lambda idx, r=read: r(hf._norm_idx(idx)))
        hf._set(params, tg.path, arr)
        report.loaded.append({"param": "/".join(tg.path), "shape": list(arr.shape), "from": tg.sources,
                              "layers": tg.layers, "how": tg.how})
    merger = _merger_init(config, dt)(jax.random.key(seed))
    for path, arr in hf._flatten(merger).items():
        full = ("visual", "merger", *path)
        if full in flat_shardings:
            arr = jax.device_put(arr, flat_shardings[full])
        hf._set(params, full, arr)
        report.initialised.append({"param": "/".join(full), "shape": list(arr.shape),
                                   "how": f"{_INIT_HOW.get(path[-1], 'model init')} (model init, seed {seed})"})
    return params, report


def assemble(config: Qwen2VLConfig, vision: str, llm: str, seed: int = 0, dtype="float32", **kw):
    """`(Qwen2VL, LoadReport)`: the assembled model object, ready for training or `save_pretrained`."""
    from qwen2vl_jax.api import Qwen2VL
    params, report = assemble_params(config, vision, llm, seed=seed, dtype=dtype)
    return Qwen2VL(config, params, dtype=dtype, **kw), report


__all__ = ["assemble_params", "assemble", "LoadReport"]
