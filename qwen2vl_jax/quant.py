"""Quantised storage of frozen Dense kernels (the base of a QLoRA fine-tune), dequantised on the fly.

Formats, for a kernel (..., in, out) (leading axes: a scanned stack):
- `int8`: symmetric, one float32 scale per output column (absmax / 127): `kernel_q` int8 (..., in, out),
  `kernel_scale` (..., 1, out). 1 byte per weight.
- `int4`: symmetric, one scale per `group` input rows of each column (absmax / 7), values -7..7;
  `nf4`: QLoRA's NormalFloat4 (16 quantiles of a normal, absmax-scaled per group, Dettmers et al. 2023).
  Both pack two 4-bit codes per byte along the input axis: `kernel_q` uint8 (..., in / 2, out),
  `kernel_scale` (..., in / group, out). 0.5 byte per weight plus 4 bytes per group of scales.
The codes are written and read with plain array ops, so a scanned layer dequantises only its own slice, and
XLA fuses the dequantisation into the consumer where it can.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

FORMATS = ("none", "int8", "int4", "nf4")
NF4 = np.array([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
                -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
                0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                0.7229568362236023, 1.0], np.float32)


def quantize(kernel, fmt: str, group: int = 64) -> dict:
    """{"kernel_q", "kernel_scale"} of a float kernel (..., in, out)."""
    w = jnp.asarray(kernel, jnp.float32)
    n_in = w.shape[-2]
    if fmt == "int8":
        scale = jnp.max(jnp.abs(w), axis=-2, keepdims=True) / 127.0
        scale = jnp.where(scale == 0, 1.0, scale)
        return {"kernel_q": jnp.clip(jnp.round(w / scale), -127, 127).astype(jnp.int8), "kernel_scale": scale}
    if fmt not in ("int4", "nf4"):
        raise ValueError(f"unknown quantisation format {fmt!r}; choose one of {FORMATS[1:]}")
    g = min(group, n_in)
    if n_in % g or g % 2:
        raise ValueError(f"a {fmt} kernel's input size {n_in} must be a multiple of the group size {g} (even)")
    grouped = w.reshape(*w.shape[:-2], n_in // g, g, w.shape[-1])
    absmax = jnp.max(jnp.abs(grouped), axis=-2, keepdims=True)
    absmax = jnp.where(absmax == 0, 1.0, absmax)
    if fmt == "int4":
        scale = absmax / 7.0
        codes = (jnp.clip(jnp.round(grouped / scale), -7, 7) + 8).astype(jnp.uint8)
    else:
        scale = absmax
        mid = jnp.asarray((NF4[1:] + NF4[:-1]) / 2)
        codes = jnp.searchsorted(mid, grouped / scale).astype(jnp.uint8)
    codes = codes.reshape(*w.shape[:-2], n_in // 2, 2, w.shape[-1])
    packed = codes[..., 0, :] | (codes[..., 1, :] << 4)
    return {"kernel_q": packed, "kernel_scale": scale[..., 0, :]}


def kernel_shape(q, scale) -> tuple[int, ...]:
    """The float kernel's shape from its stored codes."""
    if q.dtype == jnp.int8:
        return tuple(q.shape)
    return (*q.shape[:-2], 2 * q.shape[-2], q.shape[-1])


def dequantize(q, scale, fmt: str, dtype=jnp.float32) -> jax.Array:
    """The float kernel (..., in, out) in `dtype` (the maths in float32)."""
    if fmt == "int8":
        return (q.astype(jnp.float32) * scale.astype(jnp.float32)).astype(dtype)
    if fmt not in ("int4", "nf4"):
        raise ValueError(f"unknown quantisation format {fmt!r}; choose one of {FORMATS[1:]}")
    codes = jnp.stack([q & 0xF, q >> 4], axis=-2)                      # (..., in/2, 2, out)
    n_in, n_out = 2 * q.shape[-2], q.shape[-1]
    codes = codes.reshape(*q.shape[:-2], n_in, n_out)
    vals = codes.astype(jnp.float32) - 8.0 if fmt == "int4" else jnp.asarray(NF4)[codes]
    groups = scale.shape[-2]
    vals = vals.reshape(*q.shape[:-2], groups, n_in // groups, n_out) * scale.astype(jnp.float32)[..., None, :]
    return vals.reshape(*q.shape[:-2], n_in, n_out).astype(dtype)
