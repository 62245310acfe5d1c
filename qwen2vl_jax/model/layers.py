"""Small building blocks shared by the vision tower and the LLM: Dense with logical axes, norms in f32.

Norm numerics follow the reference exactly (docs/design.md, "Numerics"): LayerNorm computes everything,
the affine part included, in f32 and casts the result; RMSNorm normalises in f32, casts to the activation
dtype, then multiplies by the weight.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any


def dense(features: int, axes: Sequence[str], *, use_bias: bool, dtype: Dtype, param_dtype: Dtype,
          name: str, init_std: float = 0.02) -> nn.Dense:
    """A Dense layer whose kernel carries logical axis names (bias takes the output axis)."""
    return nn.Dense(
        features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, name=name,
        kernel_init=nn.with_logical_partitioning(nn.initializers.normal(init_std), tuple(axes)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (axes[-1],)))


class LayerNorm(nn.Module):
    """torch.nn.LayerNorm semantics: biased variance, f32 maths, output cast to the activation dtype."""
    eps: float = 1e-6
    axis_name: str = "norm"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        d = x.shape[-1]
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones_init(), (self.axis_name,)),
                           (d,), self.param_dtype)
        bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros_init(), (self.axis_name,)),
                          (d,), self.param_dtype)
        x32 = x.astype(jnp.float32)
        mean = x32.mean(-1, keepdims=True)
        var = jnp.square(x32 - mean).mean(-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(self.dtype)


class RMSNorm(nn.Module):
    """Qwen2 RMSNorm: normalise in f32, cast to the activation dtype, then scale (no +1 offset)."""
    eps: float = 1e-6
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)),
                           (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.square(x32).mean(-1, keepdims=True) + self.eps)
        return scale.astype(self.dtype) * y.astype(self.dtype)


def quick_gelu(x):
    return x * jax.nn.sigmoid(1.702 * x)


def remat_policy(name: str | None):
    """Named rematerialisation policies for the scanned blocks (None = keep every activation)."""
    policies = {
        None: None, "none": None,
        "full": jax.checkpoint_policies.nothing_saveable,
        "dots": jax.checkpoint_policies.checkpoint_dots,
        "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
    }
    if name not in policies:
        raise ValueError(f"unknown remat policy {name!r}; choose one of {sorted(k for k in policies if k)}")
    return policies[name]
