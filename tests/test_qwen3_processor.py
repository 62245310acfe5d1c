"""The Qwen3-VL processor against transformers 4.57.6 `Qwen3VLProcessor` built from the files ours writes: chat
text, ids and pixels on images (the PIL path), and the `<t seconds>` stamps and per-frame spans of a video given
as frames with its metadata (fps and sampled frame indices)."""

import numpy as np
import pytest

from qwen2vl_jax import config as qconfig
from qwen2vl_jax.data import Processor
from test_export import picture

transformers = pytest.importorskip("transformers")


class FramesVideoProcessor(transformers.BaseVideoProcessor):
    """Stands in for the torchvision video processor: reports the grid and metadata the test gives it."""

    def __init__(self, grids=None, metadata=None):
        self.merge_size = 2
        self.grids, self.metadata = grids, metadata

    def __call__(self, videos=None, **_):
        return {"video_grid_thw": np.asarray(self.grids), "video_metadata": list(self.metadata)}


@pytest.fixture(scope="module")
def both(tmp_path_factory):
    ours = Processor.for_model(qconfig.tiny_3())
    path = str(tmp_path_factory.mktemp("qwen3_processor"))
    ours.save_pretrained(path)
    video = FramesVideoProcessor()
    hf = transformers.Qwen3VLProcessor(image_processor=transformers.Qwen2VLImageProcessor.from_pretrained(path),
                                       tokenizer=transformers.AutoTokenizer.from_pretrained(path),
                                       video_processor=video, chat_template=ours.chat_template)
    return ours, hf, video, path


MESSAGES = [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}],
            [{"role": "system", "content": "Be brief."},
             {"role": "user", "content": [{"type": "video"}, {"type": "image"}, {"type": "text", "text": "Both?"}]}]]


def test_reads_back_as_qwen3(both):
    ours, _, _, path = both
    again = Processor.from_pretrained(path)
    assert again.frame_timestamps and again.processor_class == "Qwen3VLProcessor"
    assert again.image_mean == (0.5, 0.5, 0.5) and again.patch_size == 16
    assert again.chat_template == ours.chat_template


def test_images_ids_and_pixels_identical(both):
    ours, hf, _, _ = both
    texts = [hf.apply_chat_template(m, add_generation_prompt=True) for m in MESSAGES[:1]] * 2
    assert texts == [ours.apply_chat_template(m) for m in MESSAGES[:1]] * 2
    assert not texts[0].startswith("<|im_start|>system")   # no default system prompt
    images = [picture(350, 500), picture(123, 301)]
    got = ours(text=texts, images=images)
    ref = hf(text=texts, images=images, padding=True, padding_side="left", return_tensors="np")
    for key in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw"):
        np.testing.assert_array_equal(ref[key], got[key], err_msg=key)
    assert got["pixel_values"].shape[1] == 3 * 2 * 16 * 16


def test_video_timestamps_and_spans_identical(both):
    ours, hf, video, _ = both
    from transformers.video_utils import VideoMetadata
    texts = [hf.apply_chat_template(m, add_generation_prompt=True) for m in MESSAGES]
    assert texts == [ours.apply_chat_template(m) for m in MESSAGES]
    frames = [np.asarray(picture(100, 140)) for _ in range(5)]   # 5 frames -> 3 temporal patches
    indices = [0, 9, 18, 27, 36]
    images = [picture(350, 500), picture(90, 200)]
    got = ours(text=texts, images=images, videos=[frames],
               video_metadata=[{"fps": 8.0, "frames_indices": indices}])
    video.grids = got["video_grid_thw"]
    video.metadata = [VideoMetadata(total_num_frames=40, fps=8.0, frames_indices=indices)]
    ref = hf(text=texts, images=images, videos=[frames], padding=True, padding_side="left", return_tensors="np")
    for key in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw"):
        np.testing.assert_array_equal(ref[key], got[key], err_msg=key)
    text = ours.decode(got["input_ids"][1], skip_special_tokens=False)
    # Patches of frames (0, 9), (18, 27), (36, 36) at 8 fps.
    assert [s for s in ("<0.6 seconds>", "<2.8 seconds>", "<4.5 seconds>") if s in text] == \
        ["<0.6 seconds>", "<2.8 seconds>", "<4.5 seconds>"]
    assert text.count("<|vision_start|>") == 3 + 1
