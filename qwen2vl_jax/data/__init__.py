"""Host-side input: images, videos, tokenizer and chat template, JSONL records."""

from qwen2vl_jax.data.image import load_image, preprocess_image, smart_resize
from qwen2vl_jax.data.processor import IGNORE_INDEX, QWEN2VL_CHAT_TEMPLATE, Processor, byte_tokenizer
from qwen2vl_jax.data.records import DataError, Record, parse_record, read_jsonl
from qwen2vl_jax.data.video import preprocess_video, read_video
