"""Batch generation on the host side: HF-style prompt -> bucketed device arrays -> prefill -> decode loop.

The host does the ragged work: each prompt batch is left-padded to a length bucket, its vision
patches to a patch bucket, and the batch to a multiple of the mesh's data shards, so an evaluation over
thousands of prompts compiles a few prefill and decode programs. Padding rows and slots carry segment id 0
and never reach a real token's attention.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from qwen2vl_jax import schema
from qwen2vl_jax.config import Qwen2VLConfig
from qwen2vl_jax.infer import cache as kv
from qwen2vl_jax.infer.config import GenerationConfig
from qwen2vl_jax.infer.decode import Decoded, decode, prefill
from qwen2vl_jax.infer.sampling import Knobs, Sampler
from qwen2vl_jax.inputs import InputError, batch_from_hf


@dataclasses.dataclass
class Prompt:
    """A prompt batch laid out for the device (numpy until placed)."""
    batch: dict[str, np.ndarray]    # packed format, (B', L') with B' >= B rows and L' >= L left-padded slots
    next_pos: np.ndarray            # (B',) int32: first decode position per row (max prompt position + 1)
    rows: int                       # B: the caller's rows (the rest pad the batch to the data shards)
    input_ids: np.ndarray           # (B, L) the caller's ids, returned in front of the new tokens

    @property
    def length(self) -> int:
        return self.batch["input_ids"].shape[1]


@dataclasses.dataclass
class Output:
    sequences: np.ndarray           # (B, L + steps) int32: prompt, then new tokens (pad after EOS)
    steps: int                      # tokens generated before every row stopped
    logits: np.ndarray | None       # (B, steps, V) raw logits behind each new token, when asked for


def _left_padded(mask: np.ndarray) -> None:
    for r, row in enumerate(mask):
        if not row.any():
            raise InputError(f"attention_mask row {r} is all zeros: every prompt needs at least one token")
        first = int(np.argmax(row))
        if not row[first:].all():
            raise InputError(f"attention_mask row {r} has padding after its first token; generation appends at "
                             "the right, so prompts must be left-padded (tokenize with padding_side='left')")


class Generator:
    """Compiled prefill/decode for one model (config + module), optionally on a mesh.

    With a mesh, params must already live in their shardings (e.g. `load_pretrained(..., mesh=mesh)`); prompt
    rows are split over the mesh axes of the logical `batch` axis, and the cache as `infer.cache` describes.
    """

    def __init__(self, config: Qwen2VLConfig, module, mesh=None, rules=None, min_bucket: int = 16):
        from qwen2vl_jax import sharding
        self.config = config
        self.module = module
        self.mesh = mesh if mesh is not None and mesh.size > 1 else None
        self.rules = tuple(rules or sharding.RULES)
        self.min_bucket = min_bucket
        self.batch_multiple = sharding.batch_shards(self.mesh, self.rules) if self.mesh else 1
        # Part of the compile key: the logical constraints traced under a mesh depend on the rules.
        self._key = dict(module=module, rules=self.rules if self.mesh else None)

    # -- host: prompts -> device layout ------------------------------------------------------------

    def prepare(self, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None,
                pixel_values_videos=None, video_grid_thw=None, min_rows: int = 0, second_per_grid_ts=None) -> Prompt:
        """`min_rows`: pad the batch with empty rows up to this many (a fixed batch size compiles once).
        `second_per_grid_ts`: seconds per temporal patch of each video (families with absolute time)."""
        c = self.config
        ids = np.asarray(input_ids)
        if ids.ndim == 1:
            ids = ids[None]
        if ids.ndim != 2 or ids.shape[1] == 0:
            raise InputError(f"input_ids must be (batch, length) with length >= 1, got shape {ids.shape}")
        b, l = ids.shape
        mask = np.ones((b, l), np.int32) if attention_mask is None else np.asarray(attention_mask, np.int32)
        if mask.shape != ids.shape:
            raise InputError(f"attention_mask shape {mask.shape} != input_ids shape {ids.shape}")
        _left_padded(mask)
        # Rows to a multiple of the data shards, slots to a length bucket: both as extra left padding.
        rows = -(-max(b, min_rows) // self.batch_multiple) * self.batch_multiple
        length = kv.bucket(l, self.min_bucket)
        pids = np.full((rows, length), c.pad_token_id, np.int64)
        pmask = np.zeros((rows, length), np.int32)
        pids[:b, length - l:], pmask[:b, length - l:] = ids, mask
        batch, _ = batch_from_hf(c, pids, pmask, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw,
                                 second_per_grid_ts=second_per_grid_ts)
        if "patches" in batch:
            batch = _pad_patches(batch, kv.bucket(batch["patches"].shape[1], self.min_bucket))
        pos = np.where(pmask[None] == 1, batch["positions"], -1)
        next_pos = (pos.max(axis=(0, 2)) + 1).astype(np.int32)
        return Prompt(batch, next_pos, b, ids.astype(np.int32))

    def _put(self, x: np.ndarray, batch_axis: int):
        """Rows split like the logical `batch` axis; every other axis whole."""
        if self.mesh is None:
            return jnp.asarray(x)
        axes = [None] * x.ndim
        axes[batch_axis] = "batch"
        return jax.device_put(x, NamedSharding(self.mesh, nn.logical_to_mesh_axes(tuple(axes), self.rules)))

    @contextlib.contextmanager
    def _context(self):
        """Mesh + logical rules while tracing, so the model's logical constraints bind to mesh axes."""
        if self.mesh is None:
            yield
            return
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
            yield

    # -- device --------------------------------------------------------------------------------

    def start(self, params, prompt: Prompt, cfg: GenerationConfig):
        """Prefill: (next-token logits (B', V), cache, seen, kv_segment_ids) on the device."""
        b = prompt.batch
        batch = {k: self._put(v, 1 if k == "positions" else 0) for k, v in b.items()}
        s = kv.cache_length(prompt.length, cfg.max_new_tokens)
        kv_seg = np.concatenate([b["segment_ids"], np.ones((len(b["segment_ids"]), s - prompt.length), np.int32)], 1)
        kv_seg = self._put(kv_seg, 0)
        with self._context():
            logits, cache, seen = _prefill(params, batch, kv_seg, cache_len=s, with_seen=Sampler.of(cfg).penalty,
                                           **self._key)
        return logits, cache, seen, kv_seg

    def finish(self, params, prompt: Prompt, state, cfg: GenerationConfig, key, return_logits=False) -> Decoded:
        """The decode loop from a prefill state."""
        logits, cache, seen, kv_seg = state
        with self._context():
            return _decode(params, cache, logits, seen, kv_seg, self._put(prompt.next_pos, 0), key,
                           Knobs.of(cfg), np.asarray(cfg.eos_token_id or (-1,), np.int32),
                           np.int32(cfg.pad_token_id), prompt_len=prompt.length, max_new_tokens=cfg.max_new_tokens,
                           sampler=Sampler.of(cfg), return_logits=return_logits, **self._key)

    def generate(self, params, prompt: Prompt, cfg: GenerationConfig, seed: int | jax.Array = 0,
                 return_logits: bool = False) -> Output:
        key = jax.random.key(seed) if isinstance(seed, int) else seed
        out = self.finish(params, prompt, self.start(params, prompt, cfg), cfg, key, return_logits)
        steps = int(out.steps)
        tokens = np.asarray(out.tokens)[:prompt.rows, :steps]
        logits = None if out.logits is None else np.asarray(out.logits)[:prompt.rows, :steps]
        return Output(np.concatenate([prompt.input_ids, tokens], axis=1), steps, logits)


# Module-level jits keyed on the (hashable) module: every model object of one architecture shares the programs.
@functools.partial(jax.jit, static_argnames=("module", "rules", "cache_len", "with_seen"))
def _prefill(params, batch, kv_segment_ids, *, module, rules, cache_len, with_seen):
    del rules
    return prefill(module, params, batch, kv_segment_ids, cache_len, with_seen)


@functools.partial(jax.jit, static_argnames=("module", "rules", "prompt_len", "max_new_tokens", "sampler",
                                             "return_logits"))
def _decode(params, cache, logits, seen, kv_segment_ids, next_pos, key, knobs, eos, pad, *, module, rules,
            prompt_len, max_new_tokens, sampler, return_logits):
    del rules
    return decode(module, params, cache, logits, seen, kv_segment_ids, next_pos, key, knobs, eos, pad,
                  prompt_len=prompt_len, max_new_tokens=max_new_tokens, sampler=sampler,
                  return_logits=return_logits)


def _pad_patches(batch: dict, p: int) -> dict:
    extra = p - batch["patches"].shape[1]
    if extra <= 0:
        return batch
    return {k: schema.pad_to(v, k, 0, p) if schema.BY_NAME[k].length == "patch" else v for k, v in batch.items()}

