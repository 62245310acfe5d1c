"""Rotary maths on the device: 2D RoPE for the ViT and M-RoPE for the LLM (docs/design.md, "Vision tower" and
"Language model").

Both use the rotate-half (NeoX) convention. The host-side position ids live in `qwen2vl_jax.positions`.
"""

from __future__ import annotations

import itertools

import jax.numpy as jnp
import numpy as np


def inv_freq(dim: int, theta: float):
    """1 / theta^(2i/dim), i < dim/2, in f32 like the reference."""
    return 1.0 / (theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))


def rotate_half(x):
    a, b = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-b, a], axis=-1)


def vision_cos_sin(patch_positions, head_dim: int, theta: float):
    """patch_positions (B, P, 2) [h, w] -> cos, sin (B, P, head_dim) in f32.

    Angle layout [h*f | w*f | h*f | w*f] with head_dim/4 frequencies f over a rotary dim of head_dim/2.
    """
    f = inv_freq(head_dim // 2, theta)                                   # (head_dim/4,)
    pos = patch_positions.astype(jnp.float32)
    ang = jnp.concatenate([pos[..., 0:1] * f, pos[..., 1:2] * f], axis=-1)   # (B, P, head_dim/2)
    ang = jnp.concatenate([ang, ang], axis=-1)
    return jnp.cos(ang), jnp.sin(ang)


def apply_vision_rotary(x, cos, sin):
    """x (B, P, H, Dh): rotated in f32 and cast back, as the reference."""
    x32 = x.astype(jnp.float32)
    c, s = cos[:, :, None, :], sin[:, :, None, :]
    return (x32 * c + rotate_half(x32) * s).astype(x.dtype)


def mrope_streams(head_dim: int, mrope_section, interleaved: bool = False) -> np.ndarray:
    """The position stream (0 = t, 1 = h, 2 = w) of each rotary pair. Chunked: t for i < s0, h for
    i < s0+s1, w after. Interleaved (Qwen3-VL): pair i is h when i % 3 == 1 and i < 3*s1, w when i % 3 == 2
    and i < 3*s2, t otherwise."""
    i = np.arange(head_dim // 2)
    if interleaved:
        s = mrope_section
        return np.where((i % 3 == 1) & (i < 3 * s[1]), 1, np.where((i % 3 == 2) & (i < 3 * s[2]), 2, 0))
    bounds = np.asarray(list(itertools.accumulate(mrope_section)))
    return np.minimum(np.searchsorted(bounds, i, side="right"), 2)


def mrope_cos_sin(positions, head_dim: int, theta: float, mrope_section, dtype, interleaved: bool = False):
    """positions (3, B, L) t/h/w -> cos, sin (B, L, head_dim) in the activation dtype.

    Rotary pair i takes its angle from the stream `mrope_streams` gives it; the duplicated second half uses
    the same mapping.
    """
    f = inv_freq(head_dim, theta)                                        # (head_dim/2,)
    ang = positions.astype(jnp.float32)[..., None] * f                   # (3, B, L, head_dim/2)
    if interleaved:
        streams = jnp.asarray(mrope_streams(head_dim, mrope_section, True))
        ang = jnp.where(streams == 0, ang[0], jnp.where(streams == 1, ang[1], ang[2]))
    else:
        bounds = [0, *itertools.accumulate(mrope_section)]
        ang = jnp.concatenate([ang[i, ..., bounds[i]:bounds[i + 1]] for i in range(3)], axis=-1)
    ang = jnp.concatenate([ang, ang], axis=-1)
    return jnp.cos(ang).astype(dtype), jnp.sin(ang).astype(dtype)


def apply_rotary(x, cos, sin):
    """x (B, L, H, Dh) in the activation dtype (the reference's LLM rotates in that dtype)."""
    c, s = cos[:, :, None, :], sin[:, :, None, :]
    return x * c + rotate_half(x) * s
