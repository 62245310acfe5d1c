"""The run configuration of `train.py`: dataclasses, YAML files and `key=value` overrides.

One YAML file per run (configs/*.yaml) fills these dataclasses; unknown keys are errors that name the key
and the file, because a misspelt key silently ignored costs a TPU-day. Overrides on the command line use
dotted paths (`mesh.fsdp=8`, `optim.lr=3e-4`) and are parsed as YAML, then coerced to the field's type.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import types
import typing
from typing import Any

import yaml


class RunConfigError(ValueError):
    """A run config that cannot be used: unknown keys, wrong types, inconsistent settings."""


@dataclasses.dataclass
class MeshConfig:
    data: int = 1      # replicas: params replicated, batch split
    fsdp: int = -1     # params, grads and optimizer state sharded over it, batch split too; -1 = the rest
    tensor: int = 1    # heads / MLP / vocab split; keep within the fast interconnect of a slice


@dataclasses.dataclass
class GroupConfig:
    match: str = ""                        # regex searched in a param's path, e.g. ^visual/merger/ or /lora_[ab]$
    name: str = ""                         # the group's name in logs (lr/NAME); default group<i>
    train: bool = True                     # false: frozen (no gradient, no optimizer state)
    lr_mult: float = 1.0                   # peak lr = optim.lr * lr_mult
    decay: bool | None = None              # weight decay; default: kernels, embeddings and LoRA factors only


@dataclasses.dataclass
class OptimConfig:
    lr: float = 1e-4                       # peak learning rate (times each group's lr_mult)
    groups: list[GroupConfig] = dataclasses.field(default_factory=list)   # ordered rules over param paths,
                                           # first match wins, unmatched params are frozen; empty: the parts
                                           # of `trainable` / `stage` (one group each, part_lr as their peak)
    part_lr: dict[str, float] = dataclasses.field(default_factory=dict)   # peak lr per part: vit, merger, llm
    warmup_steps: int = 100                # linear warmup from 0 to the peak
    decay_steps: int = 10_000              # cosine after warmup; the schedule never depends on `steps`
    end_lr_ratio: float = 0.1              # the cosine ends at this fraction of the peak, then stays there
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1              # decoupled (AdamW), on kernels and embeddings only
    clip_norm: float = 1.0                 # global gradient norm clip over all trainable parts; 0 = off
    moments_dtype: str = "float32"         # float32 | bfloat16: storage of AdamW's m and v (maths stay float32);
                                           # bfloat16 halves them (4 -> 2 bytes per trainable param each) and
                                           # needs b1, b2 <= 0.99: a smaller EMA step is lost to bf16 rounding


@dataclasses.dataclass
class DataConfig:
    train: Any = "synthetic"               # data files (JSONL, ArrayRecord, Parquet; comma-separated, globs),
                                           # "synthetic", or a mixture: [{path: FILES, weight: W}, ...]
    batch_size: int = 8                    # rows per micro-batch, all hosts together
    buckets: list[list[int]] | str = "auto"   # [[text_len, patch_len], ...] per row, one compiled shape each;
                                           # auto: sized from the checked records (printed, to pin them)
    window: int = 64                       # look-ahead of the packer (examples)
    workers: int = 0                       # grain worker processes (0 = in the training process)
    skip_budget: int = 0                   # bad records a host may skip before the run stops
    check: int = 50_000                    # records of this host's shard checked before anything is built (all
                                           # when it holds no more, else a random sample of this many); 0 = off
    truncate: bool = False                 # cut over-long examples in their text tail instead of skipping
    tokenizer: str = ""                    # an HF dir with tokenizer.json; default: the model's, see data.py
    image_min_pixels: int = 3136
    image_max_pixels: int = 12845056
    video_min_pixels: int = 100352         # per video frame (qwen-vl-utils 0.0.14: 128*28*28)
    video_max_pixels: int = 602112         # per video frame (768*28*28)
    video_total_pixels: int = 90316800     # per video, shared by its frames (128000*28*28*0.9); 0 = no cap
    video_sample_fps: float = 2.0          # frames sampled per second of a video file (an item's fps)
    synthetic_size: int = 2000             # examples of the generated demo set
    synthetic_dir: str = ""                # where the generated set lives; default <workdir>/synthetic


@dataclasses.dataclass
class InitConfig:
    vision: str = ""                       # a CLIP ViT checkpoint dir, assembled with `llm` (stage 1)
    llm: str = ""                          # a Qwen2 LLM checkpoint dir


@dataclasses.dataclass
class LoraConfig:
    r: int = 0                             # adapter rank; 0 = no adapters (a full fine-tune)
    alpha: float = 16.0                    # scale = alpha / r (alpha / sqrt(r) with rslora)
    rslora: bool = False
    dropout: float = 0.0                   # on the adapter's input, as peft's lora_dropout
    targets: str = "all-linear"            # regex over Dense paths (model/layers/q_proj, visual/blocks/qkv, ...)
                                           # or all-linear | llm | vit | merger
    quant: str = "none"                    # frozen base storage: none | int8 | nf4 | int4 (QLoRA)
    quant_group: int = 64                  # input rows per 4-bit scale
    base_dtype: str = "bfloat16"           # frozen base matrices when not quantised: bfloat16 | float32
    init_adapter: str = ""                 # a peft adapter dir to continue training from
    export_merged: bool = False            # also write <workdir>/hf: the base with the adapter folded in


@dataclasses.dataclass
class RunConfig:
    model: str = "tiny"                    # a preset (tiny, small, 2b, 7b, 72b) or an HF dir / config.json
    workdir: str = "runs/demo"             # checkpoints, metrics.jsonl, TensorBoard events, export
    steps: int = 300                       # stop after this optimizer step
    seed: int = 0                          # params init, data order, step RNG
    stage: int = 2                         # the paper's stages: 1 ViT + merger (LLM frozen), 2 all, 3 LLM only
    trainable: list[str] | None = None     # parts to train (vit, merger, llm); default: the stage's
    dtype: str = "auto"                    # compute dtype: float32 | bfloat16 | auto (bfloat16 on TPU and GPU,
                                           # float32 on CPU); params and optimizer state stay float32
    remat: str = "none"                    # none | full | dots | dots_no_batch
    attn_impl: str = "auto"                # xla | blockwise | splash | pallas_gpu | cudnn | cudnn_packed | auto
    max_segment_len: int = 0               # text tokens of the longest example (0 = unknown): narrows splash's
                                           # grid to the blocks such an example spans; checked against the data
    grad_accum: int = 1                    # micro-batches per optimizer step
    z_loss: float = 0.0                    # weight of logsumexp(logits)^2 per target token
    loss_chunk: int = 0                    # text positions per logits chunk (0 = whole rows at once)
    on_nan: str = "stop"                   # stop | skip: what a non-finite loss or gradient does
    max_nan_skips: int = 10                # with on_nan=skip: consecutive bad steps before stopping anyway
    checkpoint_every: int = 100
    keep_checkpoints: int = 3
    log_every: int = 1                     # steps per metrics.jsonl / TensorBoard record
    init_from: str = ""                    # an HF checkpoint dir or an orbax workdir / step dir
    init: InitConfig = dataclasses.field(default_factory=InitConfig)
    export_hf: bool = True                 # write <workdir>/hf (safetensors) at the end
    export_dtype: str = "float32"          # float32 | bfloat16 (the published checkpoints' dtype)
    peak_tflops: float = 0.0               # per device, for MFU where the device kind is not known
    progress: bool = True                  # the tqdm bar
    compile_cache: str = ""                # a dir for jax's persistent compilation cache (reruns skip compiling)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    lora: LoraConfig = dataclasses.field(default_factory=LoraConfig)   # LoRA / QLoRA adapters (r > 0)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# -- building from YAML + overrides ---------------------------------------------------------------------

def read_yaml(path: str | None, _seen: tuple[str, ...] = ()) -> dict:
    """The mapping of a YAML config file ({} for no file), composed: a `base:` key (a file or a list of files,
    relative to this one) names configs merged under it in order, each overriding the ones before and this
    file overriding them all; mappings merge key by key, anything else (lists included) is replaced."""
    if not path:
        return {}
    try:
        with open(path) as f:
            raw = yaml.safe_load(f) or {}
    except FileNotFoundError:
        where = f" (the base of {_seen[-1]})" if _seen else ""
        raise RunConfigError(f"{path}: config file not found{where}") from None
    except yaml.YAMLError as e:
        raise RunConfigError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(raw, dict):
        raise RunConfigError(f"{path}: the top level must be a mapping of keys, got {type(raw).__name__}")
    bases = raw.pop("base", None) or []
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) and b for b in bases):
        raise RunConfigError(f"{path}: base must be a config file or a list of them, got {bases!r}")
    here = os.path.realpath(path)
    if here in _seen:
        raise RunConfigError(f"{path}: config bases form a cycle ({' -> '.join(_seen + (here,))})")
    out: dict = {}
    for b in bases:
        out = merge_configs(out, read_yaml(os.path.join(os.path.dirname(path), b), _seen + (here,)))
    return merge_configs(out, raw)


def merge_configs(under: dict, over: dict) -> dict:
    """`over` on top of `under`: mappings merge key by key, every other value of `over` replaces."""
    out = dict(under)
    for k, v in over.items():
        out[k] = merge_configs(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load(path: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """A RunConfig from a YAML file (or the defaults) and `key=value` overrides, validated."""
    raw = read_yaml(path)
    source = path or "defaults"
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise RunConfigError(f"override {item!r} is not key=value (e.g. steps=100 or mesh.fsdp=8)")
        value = _yaml_value(value, item)
        check_override(RunConfig, key.strip(), value, item)
        _set_dotted(raw, key.strip(), value)
    cfg = _build(RunConfig, raw, source, "")
    validate(cfg)
    return cfg


def check_override(root, key: str, value, item: str) -> None:
    """An override's dotted key must name a field of the dataclass `root` (any key below a dict-valued field,
    e.g. optim.part_lr.vit), and its value must suit the field: errors name the override, not the file."""
    cls, prefix, parts = root, "", key.split(".")
    for i, part in enumerate(parts):
        fields = {f.name for f in dataclasses.fields(cls)}
        if part not in fields:
            close = difflib.get_close_matches(part, fields, n=1)
            hint = f"; did you mean {prefix}{close[0]}?" if close else f"; known keys: {', '.join(sorted(fields))}"
            raise RunConfigError(f"override {item!r}: unknown key {prefix}{part}{hint}")
        tp = typing.get_type_hints(cls)[part]
        if i == len(parts) - 1:
            _coerce(tp, value, f"override {item!r}", key)
            return
        if dataclasses.is_dataclass(tp):
            cls, prefix = tp, f"{prefix}{part}."
        elif typing.get_origin(tp) is dict:
            if i == len(parts) - 2:
                _coerce(typing.get_args(tp)[1], value, f"override {item!r}", key)
            return
        else:
            raise RunConfigError(f"override {item!r}: {prefix}{part} has no sub-keys")


def _yaml_value(text: str, item: str):
    """An override's value as YAML reads it (`3e-4`, `[[512, 1024]]`, `a,b`); empty means ""."""
    if not text.strip():
        return ""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise RunConfigError(f"override {item!r}: the value is not valid YAML ({str(e).splitlines()[0]})") from None


def _set_dotted(tree: dict, key: str, value) -> None:
    *parents, leaf = key.split(".")
    for p in parents:
        node = tree.get(p)
        if not isinstance(node, dict):
            node = tree[p] = {}
        tree = node
    tree[leaf] = value


def _build(cls, raw: dict, source: str, prefix: str):
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kw = {}
    for key, value in raw.items():
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=1)
            hint = f"; did you mean {prefix}{close[0]}?" if close else f"; known keys: {', '.join(fields)}"
            raise RunConfigError(f"{source}: unknown key {prefix}{key}{hint}")
        kw[key] = _coerce(hints[key], value, source, prefix + key)
    return cls(**kw)


def _coerce(tp, value, source: str, key: str) -> Any:
    """YAML gives `1e-4` as a string and `8` where a float is expected; make the value the field's type."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return None
        # The first type that takes the value; str only takes strings (a list spelt as its repr helps no one).
        args = [a for a in typing.get_args(tp) if a is not type(None) and (a is not str or isinstance(value, str))]
        for arg in args[:-1]:
            try:
                return _coerce(arg, value, source, key)
            except RunConfigError:
                pass
        return _coerce(args[-1], value, source, key)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise RunConfigError(f"{source}: {key} must be a mapping, got {value!r}")
        return _build(tp, value, source, key + ".")
    try:
        if tp is bool:
            if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
                return value.lower() in ("true", "yes", "1")
            if not isinstance(value, bool):
                raise ValueError
            return value
        if tp in (int, float):
            if isinstance(value, bool) or (tp is int and isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return tp(float(value)) if tp is int else float(value)
        if tp is str:
            return "" if value is None else str(value)
        if origin is list:
            (inner,) = typing.get_args(tp)
            items = value.split(",") if isinstance(value, str) else value
            return [_coerce(inner, v, source, f"{key}[{i}]") for i, v in enumerate(items)]
        if origin is dict:
            _, inner = typing.get_args(tp)
            return {str(k): _coerce(inner, v, source, f"{key}.{k}") for k, v in dict(value).items()}
    except (TypeError, ValueError):
        raise RunConfigError(f"{source}: {key} = {value!r} is not a valid {getattr(tp, '__name__', tp)}") from None
    return value


PARTS = ("vit", "merger", "llm")
STAGE_PARTS = {1: ("vit", "merger"), 2: ("vit", "merger", "llm"), 3: ("llm",)}


def trainable_parts(cfg: RunConfig) -> tuple[str, ...]:
    return tuple(cfg.trainable) if cfg.trainable is not None else STAGE_PARTS[cfg.stage]


LORA_GROUPS = [GroupConfig(match=r"/lora_[ab]$", name="lora")]


def param_groups(cfg: RunConfig):
    """The parameter-group rules of a run (`optim.Groups`): `optim.groups` when given, else the adapters
    alone with `lora.r` > 0, else the parts of `trainable` / `stage`."""
    from qwen2vl_jax.train import optim
    if cfg.optim.groups:
        return optim.Groups(cfg.optim.groups, cfg.optim)
    return optim.Groups(LORA_GROUPS if cfg.lora.r > 0 else trainable_parts(cfg), cfg.optim)


def adapter(cfg: RunConfig):
    """The run's `lora.Adapter`, or None for a full fine-tune."""
    if cfg.lora.r <= 0:
        return None
    from qwen2vl_jax import lora
    c = cfg.lora
    return lora.Adapter(r=c.r, alpha=c.alpha, rslora=c.rslora, dropout=c.dropout, targets=c.targets, quant=c.quant,
                        quant_group=c.quant_group, base_dtype=c.base_dtype)


def validate(cfg: RunConfig) -> None:
    problems = []
    if cfg.stage not in STAGE_PARTS:
        problems.append(f"stage must be 1, 2 or 3, got {cfg.stage}")
    elif not set(trainable_parts(cfg)) <= set(PARTS) or not trainable_parts(cfg):
        problems.append(f"trainable must be a non-empty subset of {list(PARTS)}, got {cfg.trainable}")
    if cfg.optim.groups:
        if cfg.optim.part_lr:
            problems.append("give optim.part_lr or optim.groups (with lr_mult), not both")
        for i, g in enumerate(cfg.optim.groups):
            if not g.match:
                problems.append(f"optim.groups[{i}] needs a match (a regex over param paths)")
            else:
                try:
                    re.compile(g.match)
                except re.error as e:
                    problems.append(f"optim.groups[{i}].match {g.match!r} is not a valid regex ({e})")
        if not any(g.train for g in cfg.optim.groups):
            problems.append("optim.groups trains nothing: at least one group needs train: true")
    if cfg.lora.r < 0:
        problems.append(f"lora.r must be >= 0 (0 = no adapters), got {cfg.lora.r}")
    elif cfg.lora.r > 0:
        try:
            adapter(cfg)
        except ValueError as e:
            problems.append(str(e))
    elif cfg.lora.init_adapter or cfg.lora.export_merged:
        problems.append("lora.init_adapter / lora.export_merged need lora.r > 0")
    unknown = set(cfg.optim.part_lr) - set(PARTS)
    if unknown:
        problems.append(f"optim.part_lr has unknown parts {sorted(unknown)}; parts are {list(PARTS)}")
    if cfg.optim.moments_dtype not in ("float32", "bfloat16"):
        problems.append(f"optim.moments_dtype must be float32 or bfloat16, got {cfg.optim.moments_dtype!r}")
    elif cfg.optim.moments_dtype == "bfloat16" and max(cfg.optim.b1, cfg.optim.b2) > 0.99:
        problems.append(f"optim.moments_dtype bfloat16 needs b1, b2 <= 0.99 (got {cfg.optim.b1}, {cfg.optim.b2}): "
                        "bfloat16 keeps 8 significant bits, so an EMA step below ~0.4% would round away")
    if cfg.dtype not in ("auto", "float32", "bfloat16"):
        problems.append(f"dtype must be auto, float32 or bfloat16, got {cfg.dtype!r}")
    if isinstance(cfg.data.buckets, str) and cfg.data.buckets != "auto":
        problems.append(f"data.buckets must be auto or a list of [text_len, patch_len] pairs, got "
                        f"{cfg.data.buckets!r}")
    elif not isinstance(cfg.data.buckets, str):
        from qwen2vl_jax.data.packing import PackingError, parse_buckets
        try:
            parse_buckets(cfg.data.buckets)
        except PackingError as e:
            problems.append(f"data.buckets: {e}")
    if cfg.data.check < 0:
        problems.append(f"data.check must be >= 0 (0 = no check), got {cfg.data.check}")
    if cfg.remat not in ("none", "full", "dots", "dots_no_batch"):
        problems.append(f"remat must be none, full, dots or dots_no_batch, got {cfg.remat!r}")
    if cfg.export_dtype not in ("float32", "bfloat16"):
        problems.append(f"export_dtype must be float32 or bfloat16, got {cfg.export_dtype!r}")
    if cfg.on_nan not in ("stop", "skip"):
        problems.append(f"on_nan must be stop or skip, got {cfg.on_nan!r}")
    for name in ("steps", "grad_accum", "checkpoint_every", "keep_checkpoints", "log_every"):
        if getattr(cfg, name) < 1:
            problems.append(f"{name} must be at least 1, got {getattr(cfg, name)}")
    if cfg.max_segment_len < 0:
        problems.append(f"max_segment_len must be >= 0 (0 = unknown), got {cfg.max_segment_len}")
    if cfg.loss_chunk < 0:
        problems.append(f"loss_chunk must be >= 0, got {cfg.loss_chunk}")
    if cfg.data.batch_size < 1:
        problems.append(f"data.batch_size must be at least 1, got {cfg.data.batch_size}")
    if not _data_spec_ok(cfg.data.train):
        problems.append(f"data.train must be files (a string) or a mixture [{{path: FILES, weight: W}}, ...] with "
                        f"positive weights, got {cfg.data.train!r}")
    if cfg.init_from and (cfg.init.vision or cfg.init.llm):
        problems.append("give either init_from or init.vision + init.llm, not both")
    if bool(cfg.init.vision) != bool(cfg.init.llm):
        problems.append("init.vision and init.llm go together (a CLIP ViT and a Qwen2 LLM to assemble)")
    for axis in ("data", "fsdp", "tensor"):
        v = getattr(cfg.mesh, axis)
        if v == 0 or v < -1:
            problems.append(f"mesh.{axis} must be a positive size or -1, got {v}")
    if problems:
        raise RunConfigError("invalid run config: " + "; ".join(problems))


def _data_spec_ok(spec) -> bool:
    if isinstance(spec, str):
        return bool(spec)
    if not isinstance(spec, list) or not spec:
        return False
    if all(isinstance(x, str) for x in spec):
        return True
    return all(isinstance(x, dict) and isinstance(x.get("path"), str) and set(x) <= {"path", "weight", "name"}
               and isinstance(x.get("weight", 1), (int, float)) and not isinstance(x.get("weight", 1), bool)
               and x.get("weight", 1) > 0 for x in spec)
