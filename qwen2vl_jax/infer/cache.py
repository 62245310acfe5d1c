"""The decoding KV cache and the shape buckets that keep the number of compiled programs small.

The cache is the pair (k, v), each (layers, B, S, Hkv, Dh), holding post-rotary keys. Its
logical axes (`model.text.CACHE_AXES`) put `batch` on the data axes and `kv_heads` on the tensor axis, the
same split as the k/v projections, so each device keeps the cache of its own rows and heads and the decode
step needs no cache traffic between devices.

A row's prompt fills slots 0..L-1 (left-padded), generated token k goes to slot L + k; every row uses the same
slot numbers, so one `dynamic_update_slice` per layer writes a whole step.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from qwen2vl_jax.config import TextConfig
from qwen2vl_jax.model.text import CACHE_AXES


def cache_shape(config: TextConfig, batch: int, length: int) -> tuple[int, ...]:
    return (config.num_hidden_layers, batch, length, config.num_key_value_heads, config.head_dim)


def init_cache(config: TextConfig, batch: int, length: int, dtype):
    """Zeros (k, v); call inside jit so the cache is born on the device in its sharding."""
    shape = cache_shape(config, batch, length)
    cache = (jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))
    return constrain(cache)


def constrain(cache):
    """Pin the cache layout to its logical axes (a no-op without `nn.logical_axis_rules` and a mesh)."""
    return nn.with_logical_constraint(cache, (CACHE_AXES, CACHE_AXES))


def bucket(n: int, minimum: int = 16) -> int:
    """Smallest size >= n on the ladder 16, 24, 32, 48, 64, 96, ... (2^k and 1.5 * 2^k): at most a third
    of a prefill is padding, and a whole evaluation set compiles a handful of shapes."""
    if minimum < 2 or minimum & (minimum - 1):
        raise ValueError(f"minimum bucket {minimum} must be a power of two >= 2")
    size = minimum
    while size < n:
        size = size * 3 // 2 if (size & (size - 1)) == 0 else size * 4 // 3
    return size


def cache_length(prompt_len: int, max_new_tokens: int, multiple: int = 16) -> int:
    """Slots for the prompt and every new token, rounded up so that nearby `max_new_tokens` share a shape."""
    n = prompt_len + max_new_tokens
    return -(-n // multiple) * multiple
