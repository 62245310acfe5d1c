"""The generated VQA set: deterministic from its seed, answers readable from the pixels, and records that the
processor encodes within the configured patch budget."""

import json
import os

import numpy as np
from PIL import Image

import qwen2vl_jax as qv
from qwen2vl_jax.data import Processor, read_jsonl, synthetic
from qwen2vl_jax.data.video import read_video


def _records(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def _files(root):
    out = {}
    for d, _, names in os.walk(root):
        for n in names:
            if n.endswith(".png"):
                with open(os.path.join(d, n), "rb") as f:
                    out[os.path.relpath(os.path.join(d, n), root)] = f.read()
    return out


def test_deterministic_from_seed(tmp_path):
    a, _ = synthetic.generate(str(tmp_path / "a"), size=40, heldout_size=10, seed=3)
    b, _ = synthetic.generate(str(tmp_path / "b"), size=40, heldout_size=10, seed=3)
    c, _ = synthetic.generate(str(tmp_path / "c"), size=40, heldout_size=10, seed=4)
    assert _records(a) == _records(b)
    assert _files(tmp_path / "a") == _files(tmp_path / "b")
    assert _records(a) != _records(c)
    # Held-out examples are not train examples.
    train = {json.dumps(r["messages"]) + str(r.get("images")) for r in _records(a)}
    held = _records(synthetic.heldout_path(str(tmp_path / "a")))
    assert not any(json.dumps(r["messages"]) + str(r.get("images")) in train for r in held)
    # An existing identical set is reused, not rewritten.
    stamp = os.path.getmtime(a)
    synthetic.generate(str(tmp_path / "a"), size=40, heldout_size=10, seed=3)
    assert os.path.getmtime(a) == stamp


def _centre_colour(img, box, shape):
    x0, y0, x1, y1 = box
    cx = (x0 + x1) // 2
    cy = (y0 + 2 * y1) // 3 if shape == "triangle" else (y0 + y1) // 2   # a triangle is widest near its base
    return tuple(img.getpixel((cx, cy)))


def test_answers_agree_with_pixels(tmp_path):
    root = str(tmp_path)
    train, _ = synthetic.generate(root, size=150, heldout_size=0, seed=0)
    tasks = set()
    for r in _records(train):
        meta, answer = r["meta"], r["messages"][1]["content"]
        tasks.add(meta["task"])
        if meta["task"] in ("colour", "shape", "side", "count", "caption"):
            img = Image.open(os.path.join(root, r["images"][0])).convert("RGB")
            for s in meta["shapes"]:                 # every listed shape is drawn where and how it says
                assert _centre_colour(img, s["box"], s["shape"]) == synthetic.COLOURS[s["colour"]], r["id"]
            shapes = meta["shapes"]
            question = r["messages"][0]["content"]
            if meta["task"] == "colour":
                kind = question.split("the ")[1].rstrip("?")
                assert [s["colour"] for s in shapes if s["shape"] == kind] == [answer]
            elif meta["task"] == "shape":
                colour = question.split("the ")[1].split(" object")[0]
                assert [s["shape"] for s in shapes if s["colour"] == colour] == [answer]
            elif meta["task"] == "side":
                colour = question.split("the ")[1].split(" ")[0]
                (box,) = [s["box"] for s in shapes if s["colour"] == colour]
                assert (box[2] < img.width / 2) if answer == "left" else (box[0] > img.width / 2)
            elif meta["task"] == "count":
                assert answer == str(len(shapes))
        elif meta["task"] == "motion":
            video = r["videos"][0]["video"]
            if isinstance(video, str):   # an H.264 file (lossy: colours within a few levels)
                assert video.endswith(".mp4")
                frames = list(read_video(os.path.join(root, video))[0])
                assert len(frames) == meta["frames"]
            else:
                frames = [np.asarray(Image.open(os.path.join(root, f)).convert("RGB")) for f in video]
            colour = np.array(synthetic.COLOURS[meta["colour"]])

            def centre(frame):
                ys, xs = np.nonzero((np.abs(frame.astype(int) - colour) < 24).all(-1))
                return xs.mean(), ys.mean()
            (x0, y0), (x1, y1) = centre(frames[0]), centre(frames[-1])
            moved = {"left": x0 - x1, "right": x1 - x0, "up": y0 - y1, "down": y1 - y0}
            assert max(moved, key=moved.get) == answer and moved[answer] > 5, r["id"]
        elif meta["task"] == "compare":
            counts = meta["counts"]
            assert counts[0] != counts[1] and answer == ("first" if counts[0] > counts[1] else "second")
        elif meta["task"] == "text_count":
            listing = r["messages"][0]["content"].split(": ")[1].split(". How")[0].split(", ")
            colour = r["messages"][0]["content"].split("are ")[-1].rstrip("?")
            assert answer == str(sum(item.split()[1] == colour for item in listing))
    assert {"colour", "shape", "count", "motion", "text_count"} <= tasks


def test_records_encode_within_the_patch_budget(tmp_path):
    config = synthetic.SyntheticConfig()
    train, _ = synthetic.generate(str(tmp_path), size=60, heldout_size=0, seed=1, config=config)
    proc = Processor.from_config(qv.preset("tiny"))
    kinds = set()
    for record in read_jsonl(train):
        ex = proc.encode_record(record)
        patches = len(ex["pixel_values"]) + len(ex["pixel_values_videos"])
        assert patches <= config.max_patches, record.source
        kinds.add("video" if len(ex["video_grid_thw"]) else "image" if len(ex["image_grid_thw"]) else "text")
        assert (ex["labels"] != -100).any()
    assert kinds == {"video", "image", "text"}


def test_demo_mix_draws_one_large_shape_per_picture(tmp_path):
    """The demo set (`SyntheticConfig.demo`, what `python train.py` generates): every picture holds one shape
    whose side is half to four fifths of the picture's short side."""
    config = synthetic.SyntheticConfig.demo()
    train, _ = synthetic.generate(str(tmp_path), size=40, heldout_size=0, seed=2, config=config)
    seen = 0
    for line in open(train):
        r = json.loads(line)
        layouts = r["meta"].get("shapes")
        if layouts is None:
            continue
        for shapes, rel in zip(layouts if r["meta"]["task"] in ("compare", "total") else [layouts], r["images"]):
            w, h = Image.open(os.path.join(tmp_path, rel)).size
            assert len(shapes) == 1 and 56 <= min(w, h) and max(w, h) <= 84
            x0, _, x1, _ = shapes[0]["box"]
            assert int(0.5 * min(w, h)) <= x1 - x0 + 1 <= int(0.8 * min(w, h))
            seen += 1
    assert seen >= 20
