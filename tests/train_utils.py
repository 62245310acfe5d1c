"""Shared pieces of the training tests: tiny packed batches built with the real processor and packer, and
params with the model's shapes that need no compilation."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from qwen2vl_jax import api, config as C
from qwen2vl_jax.data import Processor
from qwen2vl_jax.data.packing import pack_examples
from qwen2vl_jax.model.qwen2vl import Qwen2VLModule

COLOURS = ("red", "green", "blue", "yellow")


def tiny_config():
    return C.tiny()


def examples(cfg, n: int, seed: int = 0) -> list[dict]:
    """`n` one-image VQA examples (a 56x56 image of one colour, the answer its name), processor-encoded (at
    its own size: the 56x56 px floor of Qwen2-VL, which Qwen3-VL's larger default would raise to 256x256)."""
    proc = Processor.from_config(cfg, image_min_pixels=56 * 56)
    rng = np.random.default_rng(seed)
    rgb = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30)}
    out = []
    for _ in range(n):
        name = COLOURS[rng.integers(len(COLOURS))]
        img = np.clip(np.array(rgb[name]) + rng.integers(-20, 20, (56, 56, 3)), 0, 255).astype(np.uint8)
        msgs = [{"role": "user", "content": "<image>Colour?"}, {"role": "assistant", "content": name}]
        out.append(proc.encode_example(msgs, images=[img]))
    return out


def packed(cfg, n_examples: int, rows: int, seed: int = 0, text_len: int = 160, patch_len: int = 32) -> dict:
    """A packed batch (B=rows, numpy) of `n_examples` examples, two per row when they fit."""
    return pack_examples(examples(cfg, n_examples, seed), text_len=text_len, patch_len=patch_len, config=cfg,
                         batch_size=rows)


def text_packed(cfg, answers: list[str], rows: int, text_len: int = 160) -> dict:
    """A text-only packed batch (no vision fields): one short question per example, `answers` as replies."""
    proc = Processor.from_config(cfg)
    exs = [proc.encode_example([{"role": "user", "content": "Colour?"}, {"role": "assistant", "content": a}])
           for a in answers]
    b = pack_examples(exs, text_len=text_len, patch_len=0, config=cfg, batch_size=rows)
    return {k: v for k, v in b.items() if not k.startswith("patch") and k != "vision_index"}


def stack(*batches: dict) -> dict:
    """Micro-batches (B, ...) -> one stacked batch (k, B, ...), positions (k, 3, B, L)."""
    return {k: np.stack([b[k] for b in batches]) for k in batches[0]}


def random_params(module: Qwen2VLModule, seed: int = 0) -> dict:
    """Params of the model's shapes, normal(0.02) (norm scales near 1), built on the host without jit."""
    shapes = nn.meta.unbox(api.abstract_params(module))
    rng = np.random.default_rng(seed)

    def one(path, s):
        name = path[-1].key
        x = rng.normal(0, 0.02, s.shape).astype(np.float32)
        return jnp.asarray(x + 1.0 if name == "scale" else x)
    return jax.tree_util.tree_map_with_path(one, shapes)


def take(loader, n):
    """The next `n` batches of a loader."""
    return [next(loader) for _ in range(n)]


def assert_same_batches(a, b):
    """Two lists of packed batches hold the same arrays, key for key."""
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)
