"""Model families: what differs between Qwen2-VL, Qwen2.5-VL (and later generations) lives here.

A `Family` says how a family's Hugging Face `config.json` maps onto our dataclasses (its field meanings), what
its vision tower is made of (norm, MLP, window attention, M-RoPE time), which HF tensor names hold which of our
params (and the transforms both ways), and which path prefixes make up the three trainable parts. The model,
loader and exporter read a family; none of them branch on a family's name. Adding a family means one module
here with its `Family`, its presets in `config.py`, and nothing scattered elsewhere.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

Path = tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Family:
    model_type: str                          # HF `model_type` of config.json
    architecture: str                        # HF class that loads an exported checkpoint
    name: str                                # human name in messages ("Qwen2-VL")
    vision_act: str                          # the ViT MLP's activation the family is defined with
    vision_from_hf: Callable[[dict], dict]   # HF vision_config -> VisionConfig keyword arguments
    vision_to_hf: Callable[[Any], dict]      # VisionConfig -> HF vision_config
    vision_table: Callable[[Any], list]      # VisionConfig -> [(our path, hf name, per-layer count, to_ours, hf shape)]
    text_table: Callable[[Any], list]        # model config -> the same rows for the LLM and its head
    grounding: str                           # how the family's boxes are written (docs)
    # Extra TextConfig keyword arguments from the merged (root + text_config) HF dict and its rope dict.
    text_from_hf: Callable[[dict, dict], dict] | None = None
    # The config.json to write, from the model config and the flat legacy dict (a family that nests).
    to_hf: Callable[[Any, dict], dict] | None = None
    # Tensor name on disk for an exported checkpoint, from the legacy name of the key tables.
    disk_name: Callable[[str], str] = lambda name: name
    # Each temporal step of a video is its own vision span (with a text timestamp before it).
    video_frame_spans: bool = False
    # Trainable parts: part -> path prefixes in the params tree; the longest matching prefix wins.
    parts: tuple[tuple[str, tuple[Path, ...]], ...] = (
        ("vit", (("visual",),)),
        ("merger", (("visual", "merger"),)),
        ("llm", (("model",), ("lm_head",))),
    )

    def part_of(self, path: Path) -> str:
        """The trainable part (`vit`, `merger`, `llm`) a param belongs to, from its path."""
        best, best_len = None, -1
        for part, prefixes in self.parts:
            for p in prefixes:
                if tuple(path[:len(p)]) == p and len(p) > best_len:
                    best, best_len = part, len(p)
        if best is None:
            raise KeyError(f"param {'/'.join(path)} belongs to no part of {self.name}")
        return best


_FAMILIES: dict[str, Family] = {}


def register(family: Family) -> Family:
    _FAMILIES[family.model_type] = family
    return family


def get(model_type: str) -> Family:
    """The family of an HF `model_type`; a clear error naming the supported ones otherwise."""
    _load()
    try:
        return _FAMILIES[model_type]
    except KeyError:
        raise KeyError(f"model_type {model_type!r} is not supported; supported: "
                       + ", ".join(f"{k!r} ({f.name})" for k, f in sorted(_FAMILIES.items()))) from None


def supported() -> tuple[str, ...]:
    _load()
    return tuple(sorted(_FAMILIES))


def _load():
    if not _FAMILIES:
        from qwen2vl_jax.families import qwen2_5_vl, qwen2_vl, qwen3_vl   # noqa: F401  (each registers itself)
