"""qwen2vl-jax: Qwen2-VL and Qwen2.5-VL in JAX/Flax."""

from qwen2vl_jax.config import Qwen2VLConfig, TextConfig, VisionConfig, ConfigError, preset
from qwen2vl_jax.positions import rope_index
from qwen2vl_jax import families, schema
from qwen2vl_jax.api import Qwen2VL, load_pretrained
from qwen2vl_jax.inputs import InputError, batch_from_hf
from qwen2vl_jax.hf import CheckpointError
from qwen2vl_jax.data import (DataError, Processor, Record, load_image, preprocess_image, preprocess_video,
                              read_jsonl, smart_resize)
from qwen2vl_jax.assemble import LoadReport, assemble, assemble_params
from qwen2vl_jax.data.packing import PackingError, pack_examples
