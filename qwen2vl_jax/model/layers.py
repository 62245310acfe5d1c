"""Small building blocks shared by the vision tower and the LLM: Dense with logical axes, norms in f32.

Norm numerics follow the reference exactly (docs/design.md, "Numerics"): LayerNorm computes everything,
the affine part included, in f32 and casts the result; RMSNorm normalises in f32, casts to the activation
dtype, then multiplies by the weight.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from qwen2vl_jax import target

Dtype = Any


def dense(features: int, axes: Sequence[str], *, use_bias: bool, dtype: Dtype, param_dtype: Dtype,
          name: str, init_std: float = 0.02) -> nn.Dense:
    """A Dense layer whose kernel carries logical axis names (bias takes the output axis)."""
    return nn.Dense(
        features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, name=name, dot_general=linear,
        kernel_init=nn.with_logical_partitioning(nn.initializers.normal(init_std), tuple(axes)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (axes[-1],)))


def linear(x, w, dimension_numbers, precision=None, preferred_element_type=None):
    """`lax.dot_general` for a Dense layer, (..., K) x (K, N) -> (..., N). On the CPU its weight gradient takes
    the form XLA:CPU computes without a slow transposed copy (`_linear_cpu`); elsewhere it is the plain dot."""
    plain = functools.partial(jax.lax.dot_general, dimension_numbers=dimension_numbers, precision=precision,
                              preferred_element_type=preferred_element_type)
    dense_pattern = dimension_numbers == (((x.ndim - 1,), (0,)), ((), ())) and w.ndim == 2
    if not dense_pattern or target.platform() != "cpu":
        return plain(x, w)
    return checkpoint_name(_linear_cpu(x, w, precision, preferred_element_type), "linear")


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _linear_cpu(x, w, precision, preferred_element_type):
    return jax.lax.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())), precision=precision,
                               preferred_element_type=preferred_element_type)


def _linear_cpu_fwd(x, w, precision, preferred_element_type):
    return _linear_cpu(x, w, precision, preferred_element_type), (x, w)


def _linear_cpu_bwd(precision, preferred_element_type, res, g):
    """dx = g w^T as autodiff has it. The weight gradient x^T g contracts over the tokens; left to itself,
    XLA:CPU's layout assignment writes the wider of x and g transposed (tokens minor) for that dot, inside
    the elementwise fusion that produces it, and such a transposing fusion runs at a fraction of memory
    speed: for the LLM's SwiGLU it was ~20% of the CPU train step. Here the narrower of the two is
    transposed instead, as a plain copy behind an optimization barrier (so XLA cannot fold the transpose
    back into the dot), and the dot is then in XLA's canonical (M, K) x (K, N) form. Same sums, same result
    up to the order of accumulation."""
    x, w = res
    k, n = w.shape
    dx = jax.lax.dot_general(g, w, (((g.ndim - 1,), (1,)), ((), ())), precision=precision,
                             preferred_element_type=preferred_element_type).astype(x.dtype)
    x2, g2 = x.reshape(-1, k), g.reshape(-1, n)
    if k <= n:
        xt = jax.lax.optimization_barrier(x2.T)                      # (K, T)
        dw = jax.lax.dot_general(xt, g2, (((1,), (0,)), ((), ())), precision=precision,
                                 preferred_element_type=preferred_element_type)
    else:
        gt = jax.lax.optimization_barrier(g2.T)                      # (N, T)
        dw = jax.lax.dot_general(gt, x2, (((1,), (0,)), ((), ())), precision=precision,
                                 preferred_element_type=preferred_element_type).T
    return dx, dw.astype(w.dtype)


_linear_cpu.defvjp(_linear_cpu_fwd, _linear_cpu_bwd)


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
    axis_name: str = "norm"

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones_init(), (self.axis_name,)),
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
        # Dense layers' outputs on the CPU come from `linear`'s custom VJP, which the dot policies do not
        # see as dots: they are saved by name.
        "dots": jax.checkpoint_policies.save_from_both_policies(
            jax.checkpoint_policies.checkpoint_dots, jax.checkpoint_policies.save_only_these_names("linear")),
        "dots_no_batch": jax.checkpoint_policies.save_from_both_policies(
            jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
            jax.checkpoint_policies.save_only_these_names("linear")),
    }
    if name not in policies:
        raise ValueError(f"unknown remat policy {name!r}; choose one of {sorted(k for k in policies if k)}")
    return policies[name]
