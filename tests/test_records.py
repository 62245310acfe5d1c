"""JSONL records: both forms, per-item pixel settings, and every bad input with an error naming file:line."""

import json

import numpy as np
import pytest
from PIL import Image

from qwen2vl_jax.data.processor import Processor
from qwen2vl_jax.data.records import DataError, read_jsonl


@pytest.fixture(scope="module")
def proc():
    return Processor.default(video_min_pixels=4 * 28 * 28, video_max_pixels=16 * 28 * 28)


@pytest.fixture
def folder(tmp_path):
    rng = np.random.default_rng(0)
    (tmp_path / "imgs").mkdir()
    for name, (h, w) in {"a.png": (60, 80), "b.png": (90, 40), "wide.png": (5, 1000), "narrow.png": (10, 2010)}.items():
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(tmp_path / "imgs" / name)
    for i in range(3):
        Image.fromarray(np.full((56, 56, 3), 40 * i, np.uint8)).save(tmp_path / "imgs" / f"f{i}.png")
    return tmp_path


def write(folder, *records) -> str:
    path = folder / "data.jsonl"
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in records))
    return str(path)


def only(path):
    return list(read_jsonl(path))


TAGGED = {"messages": [{"role": "user", "content": "<image>What is left? <image>And right?"},
                       {"role": "assistant", "content": "A cat and a dog."}],
          "images": ["imgs/a.png", "imgs/b.png"]}
LISTED = {"messages": [{"role": "user", "content": [{"type": "image", "image": "imgs/a.png"},
                                                    {"type": "text", "text": "What is left? "},
                                                    {"type": "image", "path": "imgs/b.png"},  # HF key
                                                    {"type": "text", "text": "And right?"}]},
                       {"role": "assistant", "content": [{"type": "text", "text": "A cat and a dog."}]}]}


def test_both_forms_give_the_same_example(proc, folder):
    path = write(folder, TAGGED, "", LISTED)
    tagged, listed = only(path)
    assert (tagged.source, listed.source) == (f"{path}:1", f"{path}:3")     # blank lines still count
    assert tagged.messages == listed.messages
    assert [im["image"] for im in tagged.images] == [str(folder / "imgs/a.png"), str(folder / "imgs/b.png")]
    a, b = proc.encode_record(tagged), proc.encode_record(listed)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    direct = proc.encode_example(TAGGED["messages"], images=[str(folder / "imgs/a.png"), str(folder / "imgs/b.png")])
    for key in a:
        np.testing.assert_array_equal(a[key], direct[key])
    assert a["image_grid_thw"].tolist() == [[1, 4, 6], [1, 6, 4]]


def test_per_item_pixel_settings_are_honoured(proc, folder):
    record = {"messages": [{"role": "user", "content": [
        {"type": "image", "image": "imgs/a.png", "min_pixels": 256 * 28 * 28, "max_pixels": 256 * 28 * 28},
        {"type": "video", "video": [f"imgs/f{i}.png" for i in range(3)], "max_pixels": 4 * 28 * 28},
        {"type": "image", "image": "imgs/b.png", "resized_height": 56, "resized_width": 112}]},
        {"role": "assistant", "content": "ok"}],
        "images": [], "videos": []}
    tagged = {"messages": [{"role": "user", "content": "<image><image>x"}, {"role": "assistant", "content": "ok"}],
              "images": [{"path": "imgs/a.png", "max_pixels": 28 * 28 * 4}, "imgs/b.png"]}
    ex, ex2 = (proc.encode_record(r) for r in only(write(folder, record, tagged)))
    # 60x80 upscaled past min_pixels: ceil(60*6.47/28)=14, ceil(80*6.47/28)=19 merged rows/cols; b fixed 56x112.
    assert ex["image_grid_thw"].tolist() == [[1, 28, 38], [1, 4, 8]]
    assert ex["video_grid_thw"].tolist() == [[2, 4, 4]]                 # 3 frames padded to 4, 56x56
    # 60x80 over 4*28*28 pixels: beta=sqrt(4800/3136), floor(60/beta/28)=1, floor(80/beta/28)=2 -> 28x56.
    assert ex2["image_grid_thw"].tolist() == [[1, 2, 4], [1, 6, 4]]


def test_system_key_becomes_the_system_turn(proc, folder):
    record = {"system": "Answer in French.", "messages": TAGGED["messages"], "images": TAGGED["images"]}
    (rec,) = only(write(folder, record))
    assert rec.messages[0] == {"role": "system", "content": [{"type": "text", "text": "Answer in French."}]}
    text = proc.decode(proc.encode_record(rec)["input_ids"], skip_special_tokens=False)
    assert text.startswith("<|im_start|>system\nAnswer in French.<|im_end|>\n<|im_start|>user\n")


def test_on_error_skips_and_reports_bad_lines(folder):
    bad = []
    path = write(folder, TAGGED, "{not json", {"messages": []}, TAGGED)
    records = list(read_jsonl(path, on_error=bad.append))
    assert [r.source for r in records] == [f"{path}:1", f"{path}:4"]
    assert [str(e).split(": ")[0] for e in bad] == [f"{path}:2", f"{path}:3"]


# -- bad inputs: each names the record (file:line) and the problem --------------------------------------------------

def error_of(proc, folder, record, line=2):
    path = write(folder, *([TAGGED] * (line - 1)), record)
    with pytest.raises(DataError) as info:
        for rec in read_jsonl(path):
            proc.encode_record(rec)
    message = str(info.value)
    assert message.startswith(f"{path}:{line}: "), message
    return message[len(f"{path}:{line}: "):]


def user_with(content, **extra):
    return {"messages": [{"role": "user", "content": content}, {"role": "assistant", "content": "ok"}], **extra}


def test_aspect_ratio_over_200(proc, folder):
    message = error_of(proc, folder, user_with("<image>x", images=["imgs/narrow.png"]))
    assert message == (f"image 1: {folder}/imgs/narrow.png: absolute aspect ratio must be smaller than 200, "
                       "got 201.0 (image of 10x2010 pixels, height x width); crop or pad it first")
    proc.encode_record(only(write(folder, user_with("<image>x", images=["imgs/wide.png"])))[0])  # 200 is fine


def test_tag_count_differs_from_image_count(proc, folder):
    message = error_of(proc, folder, user_with("<image><image>x", images=["imgs/a.png"]))
    assert message == ("2 <image> tag(s) or source-less image item(s) in the messages but 1 image(s) in 'images'; "
                       "they must match one to one")
    message = error_of(proc, folder, user_with("x", videos=["clip.mp4"]))
    assert message.startswith("0 <video> tag(s) or source-less video item(s) in the messages but 1 video(s)")


def test_missing_image_file(proc, folder):
    message = error_of(proc, folder, user_with("<image>x", images=["imgs/gone.png"]))
    assert message == f"image 1: image file not found: {folder}/imgs/gone.png"


def test_unreadable_image_path(proc, folder):
    message = error_of(proc, folder, user_with("<image>x", images=["imgs"]))
    assert message == f"image 1: image path is a directory, not a file: {folder}/imgs"


def test_truncated_jpeg(proc, folder):
    Image.fromarray(np.full((64, 64, 3), 99, np.uint8)).save(folder / "imgs/full.jpg")
    data = (folder / "imgs/full.jpg").read_bytes()
    (folder / "imgs/cut.jpg").write_bytes(data[: len(data) * 2 // 3])
    message = error_of(proc, folder, user_with("<image>x", images=["imgs/cut.jpg"]))
    assert message.startswith(f"image 1: {folder}/imgs/cut.jpg: truncated or corrupt image (")


def test_non_image_bytes(proc, folder):
    (folder / "imgs/fake.png").write_text("<html>404 not found</html>")
    message = error_of(proc, folder, user_with("<image>x", images=["imgs/fake.png"]))
    assert message == (f"image 1: {folder}/imgs/fake.png: not an image "
                       "(Pillow recognises no image format in these bytes)")


def test_empty_conversation(proc, folder):
    assert error_of(proc, folder, {"messages": []}) == "empty conversation: 'messages' has no turns"


def test_assistant_turn_missing(proc, folder):
    message = error_of(proc, folder, {"messages": [{"role": "user", "content": "Hi"}]})
    assert message.startswith("no assistant turn: training needs at least one assistant reply")
    message = error_of(proc, folder, {"messages": [{"role": "user", "content": "Hi"},
                                                   {"role": "assistant", "content": "Hello"},
                                                   {"role": "user", "content": "And?"}]})
    assert message == ("the conversation ends with a 'user' turn that has no assistant reply; "
                       "add the reply or drop the trailing turn")


def test_video_with_zero_frames(proc, folder):
    message = error_of(proc, folder, user_with([{"type": "video", "video": []}, {"type": "text", "text": "x"}]))
    assert message == "video 1 (list): video has zero frames; give at least one frame"


def test_structural_errors(proc, folder):
    assert error_of(proc, folder, "{oops").startswith("not valid JSON (Expecting property name")
    assert error_of(proc, folder, {"conversations": []}).startswith("no 'messages' list (keys: ['conversations'])")
    assert error_of(proc, folder, {"messages": [{"role": "bot", "content": "x"}]}) == \
        "message 1: role 'bot' is not one of system, user, assistant"
    assert error_of(proc, folder, user_with("<|image_pad|> sneaky")) == (
        "message 1, item 1: text contains the reserved token '<|image_pad|>'; write <image>/<video> tags or "
        "image/video items instead of special tokens")
    assert error_of(proc, folder, user_with([{"type": "audio", "audio": "x.wav"}])) == (
        "message 1, item 1: unknown content item {'type': 'audio', 'audio': 'x.wav'}; "
        "expected type text, image or video")
    assert error_of(proc, folder, user_with([{"type": "image", "image": "imgs/a.png", "max_pixels": -1}])) == \
        "message 1, item 1: image setting max_pixels=-1 must be a positive number"
