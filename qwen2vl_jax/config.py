"""Model configuration: dataclasses, presets, and the Hugging Face `config.json` reader/writer.

Numbers are those of the published configs (docs/design.md, "Model sizes" and "Vision tower").
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any


class ConfigError(ValueError):
    """A configuration that cannot describe a model of a supported family (Qwen2-VL, Qwen2.5-VL, Qwen3-VL)."""


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    depth: int = 32                    # ViT blocks
    embed_dim: int = 1280              # ViT width E
    num_heads: int = 16                # head_dim = E / num_heads = 80
    mlp_ratio: float = 4.0             # MLP hidden = int(E * mlp_ratio)
    hidden_size: int = 3584            # merger output = LLM hidden size (not the ViT width)
    in_channels: int = 3
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    hidden_act: str = "quick_gelu"
    rope_theta: float = 10000.0        # 2D RoPE base, hard-coded in the reference
    norm: str = "layernorm"            # ViT block and merger norm: "layernorm" (Qwen2-VL) or "rmsnorm" (Qwen2.5-VL)
    mlp: str = "fc"                    # ViT MLP: "fc" (fc1-act-fc2) or "swiglu" (gate/up/down, with biases)
    intermediate_size: int | None = None   # MLP hidden when set (Qwen2.5-VL), else int(embed_dim * mlp_ratio)
    window_size: int = 0               # window side in pixels for window attention; 0 = full attention everywhere
    fullatt_block_indexes: tuple[int, ...] = ()   # blocks that attend over the whole image when windowed
    tokens_per_second: int | None = None   # M-RoPE time of videos: None = one step per temporal patch (Qwen2-VL)
    num_position_embeddings: int = 0   # learned absolute position table (side**2 entries), bilinearly resized
    #                                    to each image's grid and added after the patch embedding; 0 = none
    deepstack_visual_indexes: tuple[int, ...] = ()   # blocks whose outputs feed the DeepStack mergers
    patch_bias: bool = False           # the patch embedding has a bias (Qwen3-VL)

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def mlp_dim(self) -> int:
        return self.intermediate_size if self.intermediate_size else int(self.embed_dim * self.mlp_ratio)

    @property
    def window_merged(self) -> int:  # window side in merged tokens (112 px -> 4); 0 = no windows
        return self.window_size // (self.spatial_merge_size * self.patch_size) if self.window_size else 0

    def full_attention_blocks(self) -> tuple[bool, ...]:
        """Per block: attends over the whole image (True) or within its windows (False)."""
        return tuple(not self.window_size or i in self.fullatt_block_indexes for i in range(self.depth))

    @property
    def patch_dim(self) -> int:  # 3 * 2 * 14 * 14 = 1176 columns per patch row
        return self.in_channels * self.temporal_patch_size * self.patch_size ** 2

    @property
    def merge_unit(self) -> int:  # patches per merged token (4)
        return self.spatial_merge_size ** 2


@dataclasses.dataclass(frozen=True)
class TextConfig:
    vocab_size: int = 152064
    hidden_size: int = 3584            # D
    intermediate_size: int = 18944     # SwiGLU hidden
    num_hidden_layers: int = 28
    num_attention_heads: int = 28
    num_key_value_heads: int = 4
    rms_norm_eps: float = 1e-6         # the HF class default 1e-5 is wrong for every published config
    rope_theta: float = 1e6
    mrope_section: tuple[int, int, int] = (16, 24, 24)   # t, h, w rotary pairs; sums to head_dim / 2
    max_position_embeddings: int = 32768
    hidden_act: str = "silu"
    explicit_head_dim: int | None = None   # head width when the config gives one (Qwen3), else D / heads
    attention_bias: bool = True        # q/k/v projections carry biases (Qwen2); Qwen3 has none
    qk_norm: bool = False              # RMSNorm over each head of q and k before the rotation (Qwen3)
    mrope_interleaved: bool = False    # M-RoPE pairs cycle t, h, w (Qwen3-VL) instead of chunks per stream

    @property
    def head_dim(self) -> int:
        return self.explicit_head_dim or self.hidden_size // self.num_attention_heads


@dataclasses.dataclass(frozen=True)
class Qwen2VLConfig:
    """A model of one family (`model_type`: "qwen2_vl" or "qwen2_5_vl"); `qwen2vl_jax.families` says what differs."""
    vision: VisionConfig = dataclasses.field(default_factory=VisionConfig)
    text: TextConfig = dataclasses.field(default_factory=TextConfig)
    tie_word_embeddings: bool = False  # True for 2B: lm_head is the embedding matrix
    bos_token_id: int = 151643
    eos_token_id: int = 151645
    pad_token_id: int = 151643
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    vision_token_id: int = 151654
    image_token_id: int = 151655
    video_token_id: int = 151656
    model_type: str = "qwen2_vl"       # the family (HF model_type)

    def __post_init__(self):
        validate(self)

    def replace(self, **kw) -> "Qwen2VLConfig":
        return dataclasses.replace(self, **kw)

    # -- Hugging Face config.json ------------------------------------------------------------------

    @property
    def family(self):
        from qwen2vl_jax import families
        return families.get(self.model_type)

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], source: str = "config") -> "Qwen2VLConfig":
        return from_hf_dict(d, source)

    @classmethod
    def from_pretrained(cls, path: str) -> "Qwen2VLConfig":
        from qwen2vl_jax import storage
        file = storage.join(path, "config.json") if storage.isdir(path) else path
        try:
            d = json.loads(storage.read_text(file))
        except FileNotFoundError:
            raise ConfigError(f"{file}: no config.json; expected a Hugging Face Qwen2-VL, Qwen2.5-VL or "
                              "Qwen3-VL checkpoint directory") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{file}: not valid JSON ({e})") from None
        return from_hf_dict(d, file)

    def to_hf_dict(self) -> dict[str, Any]:
        return to_hf_dict(self)

    def save_pretrained(self, path: str) -> None:
        from qwen2vl_jax import storage
        storage.write_text(storage.join(path, "config.json"), json.dumps(self.to_hf_dict(), indent=2, sort_keys=True))


def validate(c: Qwen2VLConfig) -> None:
    from qwen2vl_jax import families
    v, t = c.vision, c.text
    problems = []
    try:
        fam = families.get(c.model_type)
    except KeyError as e:
        raise ConfigError(str(e.args[0])) from None
    if t.hidden_size % t.num_attention_heads and not t.explicit_head_dim:
        problems.append(f"text hidden_size {t.hidden_size} is not divisible by num_attention_heads {t.num_attention_heads}")
    elif sum(t.mrope_section) * 2 != t.head_dim:
        problems.append(f"mrope_section {list(t.mrope_section)} sums to {sum(t.mrope_section)}, "
                        f"but must sum to head_dim/2 = {t.head_dim // 2}")
    if len(t.mrope_section) != 3:
        problems.append(f"mrope_section must have 3 entries (t, h, w), got {list(t.mrope_section)}")
    if t.num_attention_heads % t.num_key_value_heads:
        problems.append(f"num_attention_heads {t.num_attention_heads} is not a multiple of "
                        f"num_key_value_heads {t.num_key_value_heads}")
    if v.embed_dim % v.num_heads:
        problems.append(f"vision embed_dim {v.embed_dim} is not divisible by num_heads {v.num_heads}")
    elif v.head_dim % 4:
        problems.append(f"vision head_dim {v.head_dim} must be a multiple of 4 for the 2D RoPE (h and w halves)")
    if v.hidden_size != t.hidden_size:
        problems.append(f"vision hidden_size (merger output) {v.hidden_size} != text hidden_size {t.hidden_size}")
    if v.hidden_act != fam.vision_act:
        problems.append(f"vision hidden_act {v.hidden_act!r} is not supported ({fam.name} uses {fam.vision_act})")
    if v.norm not in ("layernorm", "rmsnorm"):
        problems.append(f"vision norm {v.norm!r} must be 'layernorm' or 'rmsnorm'")
    if v.mlp not in ("fc", "swiglu"):
        problems.append(f"vision mlp {v.mlp!r} must be 'fc' or 'swiglu'")
    unit = v.spatial_merge_size * v.patch_size
    if v.window_size < 0 or v.window_size % unit:
        problems.append(f"vision window_size {v.window_size} must be a non-negative multiple of "
                        f"spatial_merge_size * patch_size = {unit} pixels")
    bad = [i for i in v.fullatt_block_indexes if not 0 <= i < v.depth]
    if bad:
        problems.append(f"fullatt_block_indexes {bad} are not blocks of a {v.depth}-block ViT")
    bad = [i for i in v.deepstack_visual_indexes if not 0 <= i < v.depth]
    if bad:
        problems.append(f"deepstack_visual_indexes {bad} are not blocks of a {v.depth}-block ViT")
    if len(v.deepstack_visual_indexes) > t.num_hidden_layers:
        problems.append(f"{len(v.deepstack_visual_indexes)} DeepStack levels need as many LLM layers, "
                        f"the LLM has {t.num_hidden_layers}")
    side = int(round(v.num_position_embeddings ** 0.5))
    if v.num_position_embeddings and side * side != v.num_position_embeddings:
        problems.append(f"num_position_embeddings {v.num_position_embeddings} is not a square (side x side table)")
    if t.hidden_act != "silu":
        problems.append(f"text hidden_act {t.hidden_act!r} is not supported ({fam.name} uses silu)")
    # The pad id is embedded (left-padded prompts) and is transformers' `padding_idx`, which must be a row.
    for name in ("pad_token_id", "vision_start_token_id", "vision_end_token_id", "image_token_id", "video_token_id"):
        if not 0 <= getattr(c, name) < t.vocab_size:
            problems.append(f"{name} {getattr(c, name)} is outside the vocabulary (vocab_size {t.vocab_size})")
    if problems:
        raise ConfigError(f"invalid {fam.name} config: " + "; ".join(problems))


# -- presets (docs/design.md, "Model sizes") -----------------------------------------------------------------

def _preset(D, layers, heads, kv, inter, vocab, tied) -> Qwen2VLConfig:
    return Qwen2VLConfig(
        vision=VisionConfig(hidden_size=D),
        text=TextConfig(vocab_size=vocab, hidden_size=D, intermediate_size=inter, num_hidden_layers=layers,
                        num_attention_heads=heads, num_key_value_heads=kv),
        tie_word_embeddings=tied)


def tiny(vocab_size: int = 1000) -> Qwen2VLConfig:
    """The tiny random model of the parity tests (special tokens at the top of a 1000-entry vocabulary)."""
    return Qwen2VLConfig(
        vision=VisionConfig(depth=2, embed_dim=32, num_heads=4, hidden_size=64),
        text=TextConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, mrope_section=(2, 3, 3),
                        max_position_embeddings=4096),
        bos_token_id=0, eos_token_id=1, pad_token_id=0,
        vision_start_token_id=vocab_size - 10, vision_end_token_id=vocab_size - 9, vision_token_id=vocab_size - 5,
        image_token_id=vocab_size - 8, video_token_id=vocab_size - 7)


def small(vocab_size: int = 1000) -> Qwen2VLConfig:
    """A CPU-sized model that still learns to read pixels in minutes: 4-block ViT (width 64), 4-layer LLM
    (width 128). Same token ids as `tiny` (a 1000-entry byte vocabulary with the special tokens on top)."""
    t = tiny(vocab_size)
    return dataclasses.replace(
        t, vision=VisionConfig(depth=4, embed_dim=64, num_heads=4, hidden_size=128),
        text=TextConfig(vocab_size=vocab_size, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                        num_attention_heads=4, num_key_value_heads=2, mrope_section=(4, 6, 6),
                        max_position_embeddings=4096))


def qwen2_5_vision(out: int, depth: int = 32, width: int = 1280, heads: int = 16, inter: int = 3420,
                   window: int = 112, fullatt=(7, 15, 23, 31)) -> VisionConfig:
    """A Qwen2.5-VL vision tower (the released ones: 32 blocks of width 1280, windows of 112 px)."""
    return VisionConfig(depth=depth, embed_dim=width, num_heads=heads, hidden_size=out, hidden_act="silu",
                        norm="rmsnorm", mlp="swiglu", intermediate_size=inter, window_size=window,
                        fullatt_block_indexes=tuple(fullatt), tokens_per_second=2)


def _preset_2_5(D, layers, heads, kv, inter, vocab, tied, vit_inter) -> Qwen2VLConfig:
    return Qwen2VLConfig(
        vision=qwen2_5_vision(D, inter=vit_inter),
        text=TextConfig(vocab_size=vocab, hidden_size=D, intermediate_size=inter, num_hidden_layers=layers,
                        num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=128000),
        tie_word_embeddings=tied, model_type="qwen2_5_vl")


def tiny_2_5(vocab_size: int = 1000) -> Qwen2VLConfig:
    """The tiny Qwen2.5-VL of the parity tests and the demo: 4-block ViT with windows of 56 px (2x2 merged
    tokens) and full attention in block 1, the `tiny` LLM and token ids."""
    return dataclasses.replace(
        tiny(vocab_size), model_type="qwen2_5_vl",
        vision=qwen2_5_vision(64, depth=4, width=32, heads=4, inter=48, window=56, fullatt=(1,)))


def qwen3_vision(out: int, depth: int = 27, width: int = 1152, heads: int = 16, inter: int = 4304,
                 deepstack=(8, 16, 24), positions: int = 2304) -> VisionConfig:
    """A Qwen3-VL vision tower (the released ones: 27 blocks of width 1152, or 24 of 1024 for 2B and 4B)."""
    return VisionConfig(depth=depth, embed_dim=width, num_heads=heads, hidden_size=out,
                        hidden_act="gelu_pytorch_tanh", intermediate_size=inter, patch_size=16,
                        num_position_embeddings=positions, deepstack_visual_indexes=tuple(deepstack), patch_bias=True)


def qwen3_text(D, layers, heads, kv, inter, vocab=151936, head_dim=128, section=(24, 20, 20),
               max_pos=262144) -> TextConfig:
    return TextConfig(vocab_size=vocab, hidden_size=D, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv, rope_theta=5e6, mrope_section=section,
                      max_position_embeddings=max_pos, explicit_head_dim=head_dim, attention_bias=False,
                      qk_norm=True, mrope_interleaved=True)


def _preset_3(D, layers, heads, kv, inter, tied, small_vit) -> Qwen2VLConfig:
    vit = qwen3_vision(D, 24, 1024, 16, 4096, (5, 11, 17)) if small_vit else qwen3_vision(D)
    return Qwen2VLConfig(vision=vit, text=qwen3_text(D, layers, heads, kv, inter), tie_word_embeddings=tied,
                         model_type="qwen3_vl")


def tiny_3(vocab_size: int = 1000) -> Qwen2VLConfig:
    """The tiny Qwen3-VL of the parity tests and the demo: 4-block ViT (width 32) with a 4x4 position table and
    DeepStack from blocks 1 and 2, a 2-layer Qwen3 LLM with head_dim 16 (not D / heads), the `tiny` token ids."""
    return dataclasses.replace(
        tiny(vocab_size), model_type="qwen3_vl",
        vision=qwen3_vision(64, depth=4, width=32, heads=4, inter=48, deepstack=(1, 2), positions=16),
        text=qwen3_text(64, 2, 4, 2, 128, vocab=vocab_size, head_dim=16, section=(4, 2, 2), max_pos=4096))


PRESETS = {
    "tiny": tiny,
    "small": small,
    "2b": lambda: _preset(1536, 28, 12, 2, 8960, 151936, True),
    "7b": lambda: _preset(3584, 28, 28, 4, 18944, 152064, False),
    "72b": lambda: _preset(8192, 80, 64, 8, 29568, 152064, False),
    # Qwen2.5-VL (the released config.json files).
    "qwen2_5_vl-tiny": tiny_2_5,
    "qwen2_5_vl-3b": lambda: _preset_2_5(2048, 36, 16, 2, 11008, 151936, True, 3420),
    "qwen2_5_vl-7b": lambda: _preset_2_5(3584, 28, 28, 4, 18944, 152064, False, 3420),
    "qwen2_5_vl-32b": lambda: _preset_2_5(5120, 64, 40, 8, 27648, 152064, False, 3456),
    "qwen2_5_vl-72b": lambda: _preset_2_5(8192, 80, 64, 8, 29568, 152064, False, 3456),
    # Qwen3-VL dense (the released config.json files).
    "qwen3_vl-tiny": tiny_3,
    "qwen3_vl-2b": lambda: _preset_3(2048, 28, 16, 8, 6144, True, True),
    "qwen3_vl-4b": lambda: _preset_3(2560, 36, 32, 8, 9728, True, True),
    "qwen3_vl-8b": lambda: _preset_3(4096, 36, 32, 8, 12288, False, False),
    "qwen3_vl-32b": lambda: _preset_3(5120, 64, 64, 8, 25600, False, False),
}


def preset(name: str) -> Qwen2VLConfig:
    try:
        return PRESETS[name.lower()]()
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}") from None


# -- HF config.json in both forms --------------------------------------------------------------------

_TEXT_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "rms_norm_eps", "rope_theta", "max_position_embeddings", "hidden_act")
_TOKEN_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id", "vision_start_token_id", "vision_end_token_id",
               "vision_token_id", "image_token_id", "video_token_id")


def from_hf_dict(d: dict[str, Any], source: str = "config") -> Qwen2VLConfig:
    """Read an HF config of a supported family: the flat legacy form (text keys at the root, `rope_scaling`)
    or the nested 5.x form (`text_config` with `rope_parameters`). The family (`model_type`) says what the
    `vision_config` fields mean."""
    from qwen2vl_jax import families
    model_type = d.get("model_type")
    try:
        fam = families.get(model_type)
    except KeyError as e:
        raise ConfigError(f"{source}: {e.args[0]}") from None
    nested = d.get("text_config") or {}
    # Nested (5.x) values win over flat ones; flat-only files have no (or a default) text_config.
    text_src = {**d, **{k: v for k, v in nested.items() if k in _TEXT_KEYS or k in ("rope_parameters", "rope_scaling")}}
    rope = text_src.get("rope_parameters") or text_src.get("rope_scaling") or {}
    text_kw = {k: text_src[k] for k in _TEXT_KEYS if k in text_src}
    if "rope_theta" in rope and "rope_theta" not in text_kw:
        text_kw["rope_theta"] = rope["rope_theta"]
    # The reference hard-wires [16, 24, 24] when the section is missing.
    text_kw["mrope_section"] = tuple(rope.get("mrope_section", (16, 24, 24)))
    if fam.text_from_hf is not None:
        text_kw.update(fam.text_from_hf({**d, **nested}, rope))
    vision_kw = fam.vision_from_hf(dict(d.get("vision_config") or {}))
    tok_src = {**d, **{k: v for k, v in nested.items() if k in _TOKEN_KEYS}}
    tok_kw = {k: tok_src[k] for k in _TOKEN_KEYS if isinstance(tok_src.get(k), int)}
    if "pad_token_id" not in tok_kw:   # absent or null: transformers then pads generation with the EOS id
        tok_kw["pad_token_id"] = default_pad_id(text_kw.get("vocab_size", TextConfig.vocab_size), tok_kw)
    tie = d.get("tie_word_embeddings", nested.get("tie_word_embeddings", False))
    try:
        return Qwen2VLConfig(vision=VisionConfig(**vision_kw), text=TextConfig(**text_kw),
                             tie_word_embeddings=bool(tie), model_type=fam.model_type, **tok_kw)
    except (ConfigError, TypeError) as e:
        raise ConfigError(f"{source}: {e}") from None


def default_pad_id(vocab_size: int, token_ids: dict[str, int]) -> int:
    """The pad id of a config that names none: the BOS id (`<|endoftext|>`, what the Qwen2-VL checkpoints pad
    with) when it lies inside the vocabulary and is no other special token, else the lowest id that is neither.
    `token_ids`: the config's special token ids (the dataclass defaults fill the rest)."""
    ids = {f.name: token_ids.get(f.name, f.default) for f in dataclasses.fields(Qwen2VLConfig)
           if f.name in _TOKEN_KEYS}
    taken = {ids[k] for k in _TOKEN_KEYS if k not in ("bos_token_id", "pad_token_id")}
    for candidate in (ids["bos_token_id"], *range(vocab_size)):
        if 0 <= candidate < vocab_size and candidate not in taken:
            return candidate
    raise ConfigError(f"vocab_size {vocab_size} leaves no id for padding besides the special tokens")


def to_hf_dict(c: Qwen2VLConfig) -> dict[str, Any]:
    """The flat legacy form that the published checkpoints use and transformers 4.x and 5.x both read."""
    t, fam = c.text, c.family
    d: dict[str, Any] = {
        "architectures": [fam.architecture],
        "model_type": fam.model_type,
        **{k: getattr(t, k) for k in _TEXT_KEYS},
        "rope_scaling": {"type": "mrope", "mrope_section": list(t.mrope_section)},
        "tie_word_embeddings": c.tie_word_embeddings,
        "use_sliding_window": False,
        "sliding_window": t.max_position_embeddings,
        "max_window_layers": t.num_hidden_layers,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "use_cache": True,
        "torch_dtype": "float32",
        **{k: getattr(c, k) for k in _TOKEN_KEYS},
        "vision_config": fam.vision_to_hf(c.vision),
    }
    return fam.to_hf(c, d) if fam.to_hf is not None else d
