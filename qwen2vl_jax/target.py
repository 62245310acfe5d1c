"""The platform a program is traced for.

Some code paths depend on where the program runs: the CPU-only Dense weight gradient (model/layers.py), the
CPU-only ordering of the optimizer's in-place moment writes (train/optim.py), the blockwise attention's block
size and `attn_impl: auto`. A program is normally traced for the process's own backend; `compile_for`
(train/aot.py) traces the run's step for a TPU slice on a CPU host, and must trace the TPU paths, or the
compiler's figures would be those of a program no TPU host ever runs. jax caches a function's trace, so
`tracing_for` applies to functions traced for the first time inside it (compile_for builds its step anew).
"""

from __future__ import annotations

import contextlib
import contextvars

import jax

_TARGET: contextvars.ContextVar[str | None] = contextvars.ContextVar("qwen2vl_jax_target_platform", default=None)


def platform() -> str:
    """'cpu', 'gpu' or 'tpu': the platform being traced for (jax's default backend unless `tracing_for`)."""
    return _TARGET.get() or jax.default_backend()


@contextlib.contextmanager
def tracing_for(name: str):
    """Trace as if for the platform `name` ('tpu', 'gpu', 'cpu') inside the block."""
    if name not in ("cpu", "gpu", "tpu"):
        raise ValueError(f"unknown platform {name!r}; one of cpu, gpu, tpu")
    token = _TARGET.set(name)
    try:
        yield
    finally:
        _TARGET.reset(token)
