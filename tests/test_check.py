"""The up-front record check: sizes equal to what the pipeline makes, every bad kind found with its file:line,
a bounded sample for large sets, buckets sized from the data."""

import json

import numpy as np
import pytest
from PIL import Image

import user_data
from qwen2vl_jax import config as C
from qwen2vl_jax.data import DataError, Processor
from qwen2vl_jax.data.check import check_records, image_size
from qwen2vl_jax.data.packing import prepare_example
from qwen2vl_jax.data.pipeline import read_records
from qwen2vl_jax.train.data import auto_buckets


@pytest.fixture(scope="module")
def user_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("user")
    train, _ = user_data.write_set(str(root))
    return root, train


def test_sizes_equal_the_encoded_examples(user_set):
    root, train = user_set
    recs = [json.loads(x) for x in open(train)]
    recs.append({"messages": [{"role": "user", "content": [
        {"type": "image", "image": "images/cat.jpg", "max_pixels": 50176}, {"type": "text", "text": "Colour?"}]},
        {"role": "assistant", "content": "red"}]})
    recs.append({"messages": [{"role": "user", "content": [
        {"type": "image", "image": "images/scan.png", "resized_height": 100, "resized_width": 300},
        {"type": "text", "text": "Colour?"}]}, {"role": "assistant", "content": "red"}]})
    frames = [f"images/{name}" for name, *_ in user_data.PICTURES[4:]] * 3     # 12 frames, 800x200 first
    for video in ({"video": frames[:5]}, {"video": frames[:7], "nframes": 4},            # odd; sampled
                  {"video": frames[:9], "fps": 1.0, "video_fps": 4.0, "max_pixels": 20000},
                  {"video": frames, "total_pixels": 100_000},
                  {"video": frames[:2], "resized_height": 60, "resized_width": 90}):
        recs.append({"messages": [{"role": "user", "content": [{"type": "video", **video}, {"type": "text",
                     "text": "Which way?"}]}, {"role": "assistant", "content": "left"}]})
    path = user_data.write_jsonl(root / "all.jsonl", recs)
    cfg = C.tiny()
    proc = Processor.from_config(cfg, image_max_pixels=1_000_000)
    records = read_records(path)
    report = check_records(records, proc, threads=3)
    assert report.problems == [] and report.checked == report.total == 23 and not report.sampled
    exact = [prepare_example(proc.encode_record(r), cfg) for r in records]
    assert report.sizes.tolist() == [[e.n_text, e.n_patches] for e in exact]
    assert report.sizes[:, 1].max() == 3600 and report.sizes[:, 1].min() == 0   # 1000x700; text only


def test_every_bad_kind_is_named_with_its_line(user_set, tmp_path):
    root, train = user_set
    good = json.loads(open(train).readline())
    (tmp_path / "images").symlink_to(root / "images")
    (tmp_path / "garbage.png").write_bytes(b"not an image")
    png = np.asarray(Image.open(root / "images" / "scan.png"))
    Image.fromarray(png).save(tmp_path / "cut.png")
    (tmp_path / "cut.png").write_bytes((tmp_path / "cut.png").read_bytes()[:3000])

    def with_image(name):
        return {**good, "images": [name]}
    lines = [good, "{not json", with_image("missing.png"), with_image("garbage.png"), with_image("cut.png"),
             {**good, "images": []}, {"messages": [{"role": "user", "content": "Hi"}]}, good]
    path = user_data.write_jsonl(tmp_path / "bad.jsonl", lines)
    proc = Processor.from_config(C.tiny())
    report = check_records(read_records(path), proc, buckets=[[512, 1024]])
    found = {src.rpartition(":")[2]: reason for src, reason in report.problems}
    assert all(src.startswith(path + ":") for src, _ in report.problems)
    assert set(found) == {"1", "2", "3", "4", "5", "6", "7", "8"}
    assert "fit none of the buckets" in found["1"] and "data.buckets to auto" in found["1"]   # the 1000x700 one
    assert "not valid JSON" in found["2"]
    assert "image file not found" in found["3"] and "missing.png" in found["3"]
    assert "not an image" in found["4"]
    assert "truncated or corrupt" in found["5"] and "cut.png" in found["5"]
    assert "1 <image> tag(s)" in found["6"] and "0 image(s)" in found["6"]
    assert "no assistant turn" in found["7"]
    assert report.sizes.shape == (0, 2)
    # Without buckets (auto) the large example is fine; without a processor no sizes are measured.
    assert {s.rpartition(":")[2] for s, _ in check_records(read_records(path), proc).problems} == set("234567")
    assert check_records(read_records(path), require_assistant=False).sizes.shape == (0, 2)


class LazySource:
    """A random-access source that parses on indexing, as an indexed or columnar store does."""

    def __init__(self, records):
        self.records = records

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i):
        if i == 2:
            raise DataError("shard-00001.parquet:41: 'messages' must be a list of turns, got str")
        return self.records[i]


def test_limit_checks_a_seeded_sample_of_any_source(user_set):
    _, train = user_set
    records = read_records(train)
    proc = Processor.from_config(C.tiny())
    report = check_records(LazySource(records), proc)
    assert report.problems == [("shard-00001.parquet:41", "'messages' must be a list of turns, got str")]
    sample = check_records(records, proc, limit=5, seed=1)
    assert sample.checked == 5 and sample.total == 16 and sample.sampled and len(sample.sizes) == 5
    assert "5 of 16 records (a random sample)" in sample.describe()
    again = check_records(records, proc, limit=5, seed=1)
    assert again.sizes.tolist() == sample.sizes.tolist()
    assert check_records(records, proc, limit=5, seed=2).sizes.tolist() != sample.sizes.tolist()


def test_auto_buckets_hold_every_example_with_room_to_pack():
    sizes = np.array([[982, 3600], [77, 16], [474, 1564], [74, 0], [326, 1008]])
    (L, P), = auto_buckets(sizes, sampled=False)
    assert L % 128 == 0 and P % 128 == 0
    assert L >= 4 * sizes[:, 0].mean() and (L, P) >= (982, 3600) and P >= 3600
    two = auto_buckets(sizes, sampled=True)   # a sample's patches per token are uncertain: two ratios
    assert len(two) == 2 and all(b[0] == two[0][0] for b in two)
    assert any(L >= 982 and P >= 3600 for L, P in two)
    with pytest.raises(DataError, match="at least one good record"):
        auto_buckets(np.zeros((0, 2)), sampled=False)


def test_image_size_reads_headers_of_every_kind(user_set):
    root, _ = user_set
    for name, w, h, _ in user_data.PICTURES:
        assert image_size(str(root / "images" / name)) == (h, w)
        assert image_size("file://" + str(root / "images" / name)) == (h, w)
    assert image_size(np.zeros((5, 7, 3), np.uint8)) == (5, 7)
    with pytest.raises(ValueError, match="image path is a directory"):
        image_size(str(root))
