"""Videos as users give them: real H.264 mp4 and VP9 webm files written with PyAV, against an independent
decode (every frame, PyAV) sampled and budgeted by the qwen-vl-utils 0.0.14 rule written out here, and
transformers 4.57.6 `Qwen2VLImageProcessor`'s video path for the pixels. Clip ranges in both record forms,
the Processor call and shards; odd frame counts; 29.97 fps; the budgets of 10, 60 and 300 s videos; the
exported video budget as transformers reads it; header-only record checks; the errors a user meets."""

import json
import math
from fractions import Fraction
import os
import sys

import numpy as np
import pytest

from qwen2vl_jax import storage
from qwen2vl_jax.config import tiny
from qwen2vl_jax.data import DataError, Processor
from qwen2vl_jax.data.check import check_records
from qwen2vl_jax.data.convert import convert
from qwen2vl_jax.data.image import normalize, patchify, smart_resize
from qwen2vl_jax.data.pipeline import read_records
from qwen2vl_jax.data.sources import open_source
from qwen2vl_jax.data.video import (frame_indices, frame_size, pixels_from_uint8, preprocess_video, probe_video,
                                    video_header)

av = pytest.importorskip("av")   # in the test extra; skipped only where PyAV is not installed
torch = pytest.importorskip("torch")
hf_image = pytest.importorskip("transformers.models.qwen2_vl.image_processing_qwen2_vl")


def write_clip(path, frames: int, rate=24, width=160, height=120, codec=None):
    """A red square crossing a gradient whose blue level changes per frame; H.264 (mp4) or VP9 (webm)."""
    codec = codec or ("libvpx-vp9" if str(path).endswith(".webm") else "libx264")
    if codec not in av.codecs_available:
        pytest.skip(f"this PyAV build has no {codec} encoder")
    y, x = np.mgrid[0:height, 0:width]
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=rate)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(frames):
            f = np.stack([x * 255 // width, y * 255 // height, np.full_like(x, (i * 7) % 256)], -1).astype(np.uint8)
            left = (i * 4) % (width - 24)
            f[40:64, left:left + 24] = (230, 20, 20)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        container.mux(stream.encode())
    return str(path)


def decode_all(path):
    with av.open(path) as c:
        rate = float(c.streams.video[0].average_rate)
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)]), rate


# -- qwen-vl-utils 0.0.14, written out (fetch_video, smart_nframes, calculate_video_frame_range) --------------

def qvu_plan(total, video_fps, ele):
    """(indices, max_pixels) by qwen-vl-utils 0.0.14's code path for a video file."""
    start, end = ele.get("video_start"), ele.get("video_end")
    if start is None and end is None:
        first, last = 0, total - 1
    else:
        duration = total / video_fps
        first = 0 if start is None else math.ceil(max(0.0, min(start, duration)) * video_fps)
        last = total - 1 if end is None else min(math.floor(max(0.0, min(end, duration)) * video_fps), total - 1)
    count = last - first + 1
    if "nframes" in ele:
        n = round(ele["nframes"] / 2) * 2
    else:
        fps = ele.get("fps", 2.0)
        min_frames = math.ceil(ele.get("min_frames", 4) / 2) * 2
        max_frames = math.floor(ele.get("max_frames", min(768, count)) / 2) * 2
        n = count / video_fps * fps
        n = math.floor(min(min(max(n, min_frames), max_frames), count) / 2) * 2
    indices = torch.linspace(first, last, n).round().long().numpy()
    min_pixels = ele.get("min_pixels", 128 * 28 * 28)
    total_pixels = ele.get("total_pixels", 128000 * 28 * 28 * 0.9)
    max_pixels = max(min(768 * 28 * 28, total_pixels / n * 2), int(min_pixels * 1.05))
    return indices, min(ele.get("max_pixels", max_pixels), max_pixels), min_pixels


def reference(path, ele=None):
    frames, rate = decode_all(path)
    indices, max_pixels, min_pixels = qvu_plan(len(frames), rate, ele or {})
    proc = hf_image.Qwen2VLImageProcessor(min_pixels=min_pixels, max_pixels=max_pixels)
    out = proc.preprocess(images=None, videos=[frames[indices]], input_data_format="channels_last")
    return out["pixel_values_videos"], out["video_grid_thw"], indices


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    root = tmp_path_factory.mktemp("clips")
    return {"mp4": write_clip(root / "clip.mp4", 144),                       # 6 s at 24 fps
            "webm": write_clip(root / "clip.webm", 75, rate=25),              # 3 s at 25 fps
            "odd": write_clip(root / "odd.mp4", 41),                          # 41 frames
            "ntsc": write_clip(root / "ntsc.mp4", 150, rate=Fraction(30000, 1001))}   # 5 s at 29.97 fps


@pytest.mark.parametrize("name, ele", [("mp4", {}), ("webm", {}), ("odd", {}), ("ntsc", {}),
                                       ("mp4", {"video_start": 1.5, "video_end": 4.0}),
                                       ("ntsc", {"video_start": 1.0, "video_end": 3.3, "fps": 3.0}),
                                       ("mp4", {"video_start": 2.0}), ("odd", {"nframes": 7}),
                                       ("mp4", {"max_pixels": 200_000, "min_pixels": 50_000})])
def test_file_bit_exact_with_independent_decode_and_reference(clips, name, ele):
    path = clips[name]
    ref_pixels, ref_grid, _ = reference(path, ele)
    kw = {k: v for k, v in ele.items() if k != "max_pixels"}
    pixels, grid = preprocess_video(path, item_max_pixels=ele.get("max_pixels"), **kw)
    np.testing.assert_array_equal(grid, ref_grid)
    np.testing.assert_array_equal(pixels, ref_pixels)


def test_clip_range_rule_and_grid(clips):
    path = clips["mp4"]
    assert probe_video(path) == (144, 24.0)
    # 1.5-4.0 s of a 6 s clip at 24 fps: frames 36..96, 61 of them, 5.08 at 2 fps -> 4 sampled.
    idx = frame_indices(144, video_fps=24.0, video_start=1.5, video_end=4.0)
    assert idx.tolist() == [36, 56, 76, 96]
    assert preprocess_video(path, video_start=1.5, video_end=4.0)[1].tolist() == [[2, 20, 28]]
    assert preprocess_video(path)[1].tolist() == [[6, 20, 28]]
    # clamped to the video; an end past it is the last frame
    assert frame_indices(144, video_fps=24.0, video_start=-3, video_end=99).tolist() == \
        frame_indices(144, video_fps=24.0).tolist()
    with pytest.raises(ValueError, match=r"clip range video_start=3, video_end=3.01 s holds 1 frame\(s\) of this "
                                         r"6 s video \(frames 72..72 of 144 at 24 fps\)"):
        frame_indices(144, video_fps=24.0, video_start=3, video_end=3.01)
    with pytest.raises(ValueError, match="clip range .* needs the video's frame rate"):
        preprocess_video(np.zeros((8, 28, 28, 3), np.uint8), video_start=1.0)
    # frames given as an array with their rate: the same range rule, every frame of the range kept
    frames = np.zeros((40, 28, 28, 3), np.uint8)
    # frames 11..25 (15, padded to 16)
    assert preprocess_video(frames, video_fps=10.0, video_start=1.05, video_end=2.5)[1][0, 0] == 8


def test_clip_range_in_both_record_forms_the_call_and_shards(clips, tmp_path):
    proc = Processor.default()
    clip = {"video_start": 1.5, "video_end": 4.0}
    expected = preprocess_video(clips["mp4"], **clip)
    content = {"messages": [{"role": "user", "content": [{"type": "video", "video": clips["mp4"], **clip},
                                                         {"type": "text", "text": "Which way?"}]},
                            {"role": "assistant", "content": "right"}]}
    tagged = {"messages": [{"role": "user", "content": "<video>Which way?"}, {"role": "assistant", "content": "right"}],
              "videos": [{"path": clips["mp4"], **clip}]}
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps(content) + "\n" + json.dumps(tagged) + "\n")
    records = read_records(str(path))
    encoded = [proc.encode_record(r) for r in records]
    for e in encoded:
        np.testing.assert_array_equal(e["video_grid_thw"], expected[1])
        np.testing.assert_array_equal(e["pixel_values_videos"], expected[0])
        assert (e["input_ids"] == proc.video_token_id).sum() == 2 * 20 * 28 // 4
    out = proc(text="<|vision_start|><|video_pad|><|vision_end|>", videos=[clips["mp4"]], videos_kwargs=clip)
    np.testing.assert_array_equal(out["pixel_values_videos"], expected[0])
    for fmt in ("parquet", "array_record"):
        convert(str(path), str(tmp_path / fmt), fmt, progress=False)
        shard = open_source(str(tmp_path / fmt / f"train-*.{fmt}"))
        for i in range(2):
            video = shard[i].videos[0]
            assert isinstance(video["video"], bytes) and video["video_start"] == 1.5
            e = proc.encode_record(shard[i])
            np.testing.assert_array_equal(e["pixel_values_videos"], encoded[i]["pixel_values_videos"])
            np.testing.assert_array_equal(e["input_ids"], encoded[i]["input_ids"])
    bad = dict(content, messages=[{"role": "user", "content": [{"type": "video", "video": clips["mp4"],
                                                                "video_start": -1}]}])
    with pytest.raises(DataError, match=r"video setting video_start=-1 must be a number of seconds >= 0"):
        proc.encode_example(bad["messages"], require_assistant=False)


def test_video_url_in_a_bucket(clips, bucket):
    url = f"{bucket}/videos/clip.webm"
    storage.write_bytes(url, open(clips["webm"], "rb").read())
    np.testing.assert_array_equal(preprocess_video(url, video_end=2.0)[0],
                                  preprocess_video(clips["webm"], video_end=2.0)[0])
    assert video_header(url)[2:] == (120, 160)


# -- budgets ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("seconds, rate, width, height, ele, frames, size, tokens", [
    (10, 30, 640, 360, {}, 20, (364, 644), 2_990),
    (60, 30, 640, 360, {}, 120, (364, 644), 17_940),
    (300, 30, 640, 360, {}, 600, (364, 644), 89_700),
    (60, 30, 1280, 720, {}, 120, (560, 1008), 43_200),
    (300, 30, 1280, 720, {}, 600, (392, 728), 109_200),
    (600, 30, 1920, 1080, {}, 768, (336, 644), 105_984),
    (20, 24, 1280, 720, {"max_pixels": 1280 * 28 * 28}, 40, (560, 1008), 14_400),    # item max only lowers
    (300, 30, 640, 360, {"total_pixels": 24576 * 28 * 28}, 600, (224, 420), 36_000),  # 0.0.8's total
    (10, 30, 640, 360, {"fps": 1.0}, 10, (364, 644), 1_495),
    (10, 30, 640, 360, {"nframes": 7}, 8, (364, 644), 1_196),
])
def test_budget_follows_qwen_vl_utils_0_0_14(seconds, rate, width, height, ele, frames, size, tokens):
    total = seconds * rate
    kw = {k: v for k, v in ele.items() if k in ("fps", "nframes")}
    indices = frame_indices(total, video_fps=rate, **kw)
    ref_indices, max_pixels, min_pixels = qvu_plan(total, rate, ele)
    assert indices.tolist() == ref_indices.tolist() and len(indices) == frames
    h, w = frame_size(len(indices), height, width, total_pixels=ele.get("total_pixels", 90_316_800),
                      item_max_pixels=ele.get("max_pixels"))
    assert (h, w) == smart_resize(height, width, 28, min_pixels, max_pixels) == size
    assert len(indices) // 2 * (h // 28) * (w // 28) == tokens


def test_odd_frame_lists_are_budgeted_on_the_padded_count():
    # 67 frames of 1280x720 become 68 (the last repeated): 24576*28*28 / 68 * 2 per frame -> 980x560, where
    # 67 would give 1008x560.
    assert frame_size(67, 720, 1280, total_pixels=24576 * 28 * 28) == (560, 980)
    assert frame_size(68, 720, 1280, total_pixels=24576 * 28 * 28) == (560, 980)
    assert frame_size(66, 720, 1280, total_pixels=24576 * 28 * 28) == (560, 1008)
    frames = np.random.default_rng(0).integers(0, 256, (5, 60, 90, 3), np.uint8)
    pixels, grid = preprocess_video(frames)
    ref = hf_image.Qwen2VLImageProcessor(min_pixels=128 * 28 * 28, max_pixels=768 * 28 * 28).preprocess(
        images=None, videos=[frames], input_data_format="channels_last")
    assert grid.tolist() == [[3, 20, 28]]
    np.testing.assert_array_equal(pixels, ref["pixel_values_videos"])


def test_lookup_table_equals_float_normalisation():
    frames = np.random.default_rng(1).integers(0, 256, (5, 56, 84, 3), np.uint8)
    for got, want in zip(pixels_from_uint8(frames), patchify(normalize(frames))):
        np.testing.assert_array_equal(got, want)


def test_processor_video_knobs(clips):
    proc = Processor.default(video_sample_fps=4.0, video_max_pixels=200 * 28 * 28, video_total_pixels=None)
    assert proc._encode_items([{"role": "user", "content": [{"type": "video", "video": clips["mp4"]}]}],
                              "video")[1].tolist() == [[12, 20, 28]]     # 6 s at 4 fps
    # an item's max_pixels above the per-frame cap does not raise it (qwen-vl-utils 0.0.14)
    clip = np.zeros((4, 720, 1280, 3), np.uint8)
    item = {"role": "user", "content": [{"type": "video", "video": clip, "max_pixels": 1280 * 28 * 28}]}
    assert Processor.default()._encode_items([item], "video")[1].tolist() == [[2, 40, 72]]      # 1008x560
    item["content"][0]["max_pixels"] = 200_000
    assert Processor.default()._encode_items([item], "video")[1].tolist() == [[2, 22, 42]]      # 588x308: lowered
    with pytest.raises(ValueError, match="video_sample_fps .* must be positive"):
        Processor.default(video_sample_fps=0)


# -- export ----------------------------------------------------------------------------------------------------

def test_export_writes_the_video_budget_transformers_reads(tmp_path):
    from transformers.video_processing_utils import BaseVideoProcessor
    Processor.default().save_pretrained(str(tmp_path))
    written, _ = BaseVideoProcessor.get_video_processor_dict(str(tmp_path))   # the file 4.57.6 loads
    assert written["video_processor_type"] == "Qwen2VLVideoProcessor"
    assert (written["min_pixels"], written["max_pixels"]) == (128 * 28 * 28, 768 * 28 * 28)
    assert written["size"] == {"shortest_edge": 128 * 28 * 28, "longest_edge": 768 * 28 * 28}
    clip = np.random.default_rng(2).integers(0, 256, (4, 1080, 1920, 3), np.uint8)
    hf = hf_image.Qwen2VLImageProcessor(min_pixels=written["min_pixels"], max_pixels=written["max_pixels"])
    ref = hf.preprocess(images=None, videos=[clip], input_data_format="channels_last")
    pixels, grid = preprocess_video(clip)
    assert grid.tolist() == ref["video_grid_thw"].tolist() == [[2, 40, 72]]
    np.testing.assert_array_equal(pixels, ref["pixel_values_videos"])
    back = Processor.from_pretrained(str(tmp_path))
    assert (back.video_min_pixels, back.video_max_pixels, back.video_sample_fps) == (128 * 28 * 28, 768 * 28 * 28, 2.0)
    custom = Processor.default(video_max_pixels=300 * 28 * 28, video_sample_fps=1.0)
    custom.save_pretrained(str(tmp_path / "custom"))
    back = Processor.from_pretrained(str(tmp_path / "custom"))
    assert (back.video_max_pixels, back.video_sample_fps) == (300 * 28 * 28, 1.0)


# -- the record check and errors --------------------------------------------------------------------------------

def test_record_check_reads_headers_and_sums_videos(clips, tmp_path, monkeypatch):
    rows = [{"messages": [{"role": "user", "content": [{"type": "video", "video": clips[name], **ele},
                                                       {"type": "text", "text": "Which way?"}]},
                          {"role": "assistant", "content": "right"}]}
            for name, ele in (("mp4", {}), ("odd", {}), ("ntsc", {"video_start": 1.0}), ("mp4", {"nframes": 6}),
                              ("webm", {}))]   # WebM stores no frame count: duration x rate
    path = tmp_path / "v.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    records = read_records(str(path))
    proc = Processor.from_config(tiny())
    exact = [proc.encode_record(r) for r in records]
    import qwen2vl_jax.data.video as video

    def no_decoding(*a, **k):
        raise AssertionError("the check decoded a video")
    monkeypatch.setattr(video, "_decode", no_decoding)
    report = check_records(records, proc)
    assert report.problems == []
    assert report.sizes.tolist() == [[len(e["input_ids"]), len(e["pixel_values_videos"])] for e in exact]
    tokens = sum(int(e["video_grid_thw"].prod()) // 4 for e in exact)
    assert (report.videos, report.video_frames, report.video_tokens) == (5, 12 + 4 + 8 + 6 + 6, tokens)
    assert f"5 video(s): 36 frames, {tokens:,} tokens" in report.describe()


def test_errors_a_user_meets(clips, tmp_path, monkeypatch):
    proc = Processor.default()
    message = lambda source: [{"role": "user", "content": [{"type": "video", "video": source}]}]   # noqa: E731
    payload = "data:video/mp4;base64," + "A" * 100_000
    with pytest.raises(DataError) as e:
        proc.encode_example(message(payload), require_assistant=False)
    assert len(str(e.value)) < 300 and "data: URI is not read" in str(e.value)
    with pytest.raises(DataError, match="URLs are not fetched; download the video"):
        proc.encode_example(message("https://example.com/v.mp4"), require_assistant=False)
    monkeypatch.setitem(sys.modules, "av", None)          # import av now raises ImportError
    with pytest.raises(DataError) as e:
        proc.encode_example(message(clips["mp4"]), require_assistant=False)
    text = str(e.value)
    assert text.count("video 1") == 1 and text.count(os.path.basename(clips["mp4"])) == 1 and "\n" not in text
    assert text.endswith("decoding video files needs PyAV: pip install av (or the project's 'video' extra)")
    path = tmp_path / "v.jsonl"
    path.write_text(json.dumps({"messages": message(clips["mp4"]) + [{"role": "assistant", "content": "x"}]}))
    report = check_records(read_records(str(path)), proc)
    (source, reason), = report.problems
    assert reason.count("video 1") == 1 and "needs PyAV" in reason
