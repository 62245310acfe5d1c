"""`layers.linear`, the Dense layers' dot: the plain dot's values and gradients, and seen by the remat policies."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qwen2vl_jax.model.layers import linear, remat_policy

DENSE = (((2,), (0,)), ((), ()))


@pytest.mark.parametrize("k,n", [(16, 48), (48, 16)])   # the two forms of the weight gradient
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_linear_matches_dot_general(k, n, dtype):
    kx, kw, kc = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (2, 40, k), dtype)
    w = jax.random.normal(kw, (k, n), dtype)
    cot = jax.random.normal(kc, (2, 40, n), jnp.float32)
    plain = lambda x, w: jax.lax.dot_general(x, w, DENSE)
    loss = lambda dot: lambda x, w: (jnp.tanh(dot(x, w).astype(jnp.float32)) * cot).sum()
    np.testing.assert_array_equal(jax.jit(lambda x, w: linear(x, w, DENSE))(x, w), jax.jit(plain)(x, w))
    got = jax.jit(jax.grad(loss(lambda x, w: linear(x, w, DENSE)), argnums=(0, 1)))(x, w)
    want = jax.jit(jax.grad(loss(plain), argnums=(0, 1)))(x, w)
    # f32: accumulation order only. bf16: both sides round their result to 8 significant bits, and the two
    # forms of the weight gradient sum in different orders before that rounding: a few bf16 steps of the max.
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    for name, a, b in zip(("dx", "dw"), got, want):
        assert a.dtype == b.dtype == dtype, name
        scale = float(jnp.abs(b.astype(jnp.float32)).max())
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), atol=tol * scale,
                                   rtol=0, err_msg=name)


def test_dots_policy_saves_linear_outputs(capsys):
    """On the CPU `linear` is a custom VJP, which `checkpoint_dots` alone does not count as a dot: the "dots"
    policies must still save its outputs (by name), or remat "dots" would recompute every Dense layer."""
    dn = (((1,), (0,)), ((), ()))
    f = lambda x, w1, w2: jnp.sin(linear(jnp.tanh(linear(x, w1, dn)), w2, dn)).sum()
    args = jnp.ones((8, 4)), jnp.ones((4, 6)), jnp.ones((6, 3))
    for policy in ("dots", "dots_no_batch"):
        jax.ad_checkpoint.print_saved_residuals(jax.checkpoint(f, policy=remat_policy(policy)), *args)
        saved = capsys.readouterr().out
        assert "f32[8,6] named 'linear'" in saved and "f32[8,3] named 'linear'" in saved, (policy, saved)
