"""qwen2vl-jax: Qwen2-VL in JAX/Flax."""

from qwen2vl_jax.config import Qwen2VLConfig, TextConfig, VisionConfig, ConfigError, preset
from qwen2vl_jax.positions import rope_index
