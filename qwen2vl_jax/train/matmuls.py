"""The model's weight matmuls, read from its param shapes: what the FLOP count (metrics.step_flops) and the
memory estimate (memory.py) are derived from, so that a model family with other layers (a SwiGLU ViT MLP,
extra projections, a different merger) is counted as it is built, not as a hand-written formula says.

Every `kernel` leaf is one matmul per item of its stream: a ViT kernel per patch, a merger kernel per merged
token (patches / merge_unit), an LLM kernel per text token; a stacked (scanned) kernel counts each layer.
The tied word embedding is also the LM head's matmul. Biases and norm scales are elementwise and not counted.
Attention itself has no weights: its width (query heads x head dim per layer) comes from the query
projection, its pairs from the batch's segments.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import flax.linen as nn
import jax

from qwen2vl_jax import api
from qwen2vl_jax.config import Qwen2VLConfig
from qwen2vl_jax.model.qwen2vl import Qwen2VLModule


@dataclasses.dataclass(frozen=True)
class Matmul:
    path: tuple            # the kernel's path in the params
    part: str              # vit | merger | llm (what trains it: config.trainable_parts)
    per: str               # the stream it runs once per item of: patches | merged | tokens
    layers: int            # scanned layers it stands for (1 when not stacked)
    shape: tuple           # one layer's kernel shape (in..., out)
    out_axis: object       # logical axis name of the output dim (memory: how it splits over the mesh)

    @property
    def macs(self) -> int:   # multiply-adds per item, all layers
        return self.layers * math.prod(self.shape)


def _keys(path) -> tuple:
    return tuple(getattr(k, "key", getattr(k, "name", k)) for k in path)


@functools.lru_cache(maxsize=16)
def matmuls(config: Qwen2VLConfig) -> tuple[Matmul, ...]:
    """Every weight matmul of the model `config` builds."""
    boxed = api.abstract_params(Qwen2VLModule(config))
    specs = nn.get_partition_spec(boxed)
    shapes = nn.meta.unbox(boxed)
    spec_of = {_keys(p): s for p, s in jax.tree_util.tree_flatten_with_path(
        specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))[0]}
    out = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(shapes)[0]:
        keys = _keys(path)
        spec = tuple(spec_of.get(keys, ()))
        tied_head = keys[-1] == "embedding" and keys[0] != "visual" and config.tie_word_embeddings
        if keys[-1] != "kernel" and not tied_head:
            continue
        shape, stacked = tuple(leaf.shape), bool(spec) and spec[0] == "layers"
        layers = shape[0] if stacked else 1
        shape = shape[1:] if stacked else shape
        if tied_head:   # the (vocab, D) table read as the D -> vocab head
            shape, out_axis = shape[::-1], spec[0] if spec else None
        else:
            out_axis = spec[-1] if spec else None
        if keys[0] == "visual":
            part, per = ("merger", "merged") if "merger" in keys else ("vit", "patches")
        else:
            part, per = "llm", "tokens"
        out.append(Matmul(keys, part, per, layers, shape, out_axis))
    return tuple(out)


def attention_width(config: Qwen2VLConfig, part: str) -> tuple[int, int]:
    """(layers, query heads x head dim per layer) of the LLM ("llm") or the ViT ("vit"), from the query
    projection's shape (the ViT's fused qkv holds q, k and v alike)."""
    for m in matmuls(config):
        name = m.path[-2]
        if part == "llm" and m.part == "llm" and name == "q_proj":
            return m.layers, m.shape[-1]
        if part == "vit" and m.part == "vit" and name in ("qkv", "q"):
            return m.layers, m.shape[-1] // (3 if name == "qkv" else 1)
    raise ValueError(f"no query projection of part {part!r} among the params")
