"""Training: run config, stage masks + AdamW, loss, the sharded jitted step, orbax checkpoints, metrics, loop.

`restore_params(path) -> (config, params)` reads the params of any training checkpoint (a workdir, its
`checkpoints/` dir or one step dir) without the optimizer state or the run's YAML.
"""

from qwen2vl_jax.train.checkpoint import restore_params

__all__ = ["restore_params"]
