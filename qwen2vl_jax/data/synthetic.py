"""A generated visual question answering set for the demo, the tests and the packing benchmark.

Images of flat shapes (circle, square, triangle) in named colours on a plain background, with questions whose
one-word answers can be read from the pixels: the colour of a shape, the shape of a colour, how many shapes,
which side a shape is on; for two images, which holds more shapes; for videos (H.264 mp4 files written with
PyAV at 2 frames per second, so the processor's 2 fps sampling keeps every frame; lists of frame PNGs where
PyAV is not installed, or with `video_format="frames"`), which way a shape moves. Text-only questions count
the colours in a written list. Everything is deterministic from the seed: example i of a split depends only
on (seed, split, i).

Written as the JSONL training format (paths relative to the file), with two extra keys the reader ignores:
`id`, and `meta` (task and ground truth) for per-task scores.
"""

from __future__ import annotations

import dataclasses
import json
import math
import io
from concurrent.futures import ProcessPoolExecutor

import numpy as np
from PIL import Image, ImageDraw

from qwen2vl_jax import storage
from qwen2vl_jax.data.image import IMAGE_MAX_PIXELS, IMAGE_MIN_PIXELS, smart_resize

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 70), "blue": (40, 80, 220), "yellow": (235, 205, 30),
           "purple": (140, 60, 180), "orange": (245, 140, 25)}
BACKGROUNDS = ((235, 235, 235), (60, 60, 60), (205, 195, 175))   # light grey, dark grey, beige: no shape colour
SHAPES = ("circle", "square", "triangle")
DIRECTIONS = ("left", "right", "up", "down")
_SPLITS = {"train": 0, "heldout": 1}


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
    min_side: int = 28                  # pixels: shortest side an image may have
    max_side: int = 112                 # pixels: longest side (the demo stays small; the benchmark uses 1500)
    max_area: int = 0                   # pixels: largest image area; 0 = max_side**2
    max_aspect: float = 3.0             # long side / short side, at most
    max_patches: int = 64               # ViT patches per example at most (images re-drawn smaller); 0 = no cap
    min_pixels: int = IMAGE_MIN_PIXELS  # the processor's image settings, to count patches for `max_patches`
    max_pixels: int = IMAGE_MAX_PIXELS
    p_text: float = 0.10                # text-only questions
    p_multi: float = 0.10               # questions over several images
    p_video: float = 0.05               # videos
    p_caption: float = 0.0              # single-image examples asking for a description of every shape (long)
    max_images: int = 2                 # images of a multi-image example: 2..max_images
    max_shapes: int = 4                 # shapes per image at most (fewer on small images)
    shape_scale: tuple[float, float] = (0.25, 0.5)   # side of a shape / short side of the image (up to 4 shapes)
    video_frames: tuple[int, int] = (4, 8)    # frames per video, inclusive range (even counts)
    video_side: tuple[int, int] = (56, 84)    # frame side range, pixels
    video_pixels: tuple[int, int] | None = (3136, 3136)   # (min, max) pixels per frame written into each video
    #                                                       item; None = the processor's video defaults
    video_format: str = "mp4"           # mp4 (falls back to frames without PyAV) | frames (a list of PNGs)

    @classmethod
    def demo(cls) -> "SyntheticConfig":
        """The set `python train.py` generates: one large shape per picture (half to four fifths of its short
        side) on 56-84 px images, so that the tiny demo model learns to read colours and shapes from the
        pixels within a few hundred CPU steps. With several small shapes it learns the answer priors and
        little more in that budget: colour questions stayed at chance after 900 steps."""
        return cls(min_side=56, max_side=84, max_shapes=1, shape_scale=(0.5, 0.8))

    @classmethod
    def realistic(cls) -> "SyntheticConfig":
        """The packing benchmark's mix: images from 28x28 to 1500x1000 (no downscaling), 10% text-only,
        10% with 2-4 images, 5% videos of 4-16 frames at the processor's video defaults, 30% of the
        single-image questions asking for a description of up to 32 shapes (answers of up to ~250
        tokens; the others are one word), text-only questions of up to ~150 tokens; at most 16384
        patches per example (four 1500x1000 images would be 31104)."""
        return cls(min_side=28, max_side=1500, max_area=1500 * 1000, max_patches=16384, p_text=0.10, p_multi=0.10,
                   p_video=0.05, p_caption=0.30, max_images=4, max_shapes=32, video_frames=(4, 16),
                   video_side=(140, 480), video_pixels=None, video_format="frames")


def train_path(data_dir: str) -> str:
    return storage.join(data_dir, "train.jsonl")


def heldout_path(data_dir: str) -> str:
    return storage.join(data_dir, "heldout.jsonl")


def generate(data_dir: str, size: int = 2000, heldout_size: int = 200, seed: int = 0,
             config: SyntheticConfig | None = None, workers: int = 0) -> tuple[str, str]:
    """Write the train and held-out splits under `data_dir` (PNGs + JSONL); returns their JSONL paths.
    A directory already holding this exact set (same size, seed and config) is reused as it is."""
    config = config or SyntheticConfig()
    manifest = {"size": size, "heldout_size": heldout_size, "seed": seed, "config": dataclasses.asdict(config)}
    manifest_file = storage.join(data_dir, "manifest.json")
    if storage.exists(manifest_file) and storage.exists(heldout_path(data_dir)):
        if json.loads(storage.read_text(manifest_file)) == json.loads(json.dumps(manifest)):
            return train_path(data_dir), heldout_path(data_dir)
    storage.makedirs(data_dir)
    for split, n in (("train", size), ("heldout", heldout_size)):
        jobs = [(data_dir, split, i, seed, config) for i in range(n)]
        if workers > 0:
            with ProcessPoolExecutor(workers) as pool:
                records = list(pool.map(_make_job, jobs, chunksize=16))
        else:
            records = [_make_job(j) for j in jobs]
        path = train_path(data_dir) if split == "train" else heldout_path(data_dir)
        storage.write_text(path, "".join(json.dumps(r) + "\n" for r in records))
    # last: a half-written set is never taken for a finished one
    storage.write_text(manifest_file, json.dumps(manifest))
    return train_path(data_dir), heldout_path(data_dir)


def _make_job(job) -> dict:
    data_dir, split, i, seed, config = job
    return make_record(data_dir, split, i, seed, config)


# -- one example ------------------------------------------------------------------------------------------

def make_record(data_dir: str, split: str, index: int, seed: int, config: SyntheticConfig) -> dict:
    """Example `index` of `split`: draws it, writes its PNGs under `data_dir/split`, returns the JSONL record."""
    rng = np.random.default_rng([seed, _SPLITS[split], index])
    stem = f"{split}/{index:06d}"
    u = rng.random()
    if u < config.p_text:
        question, answer, meta, images, videos = _text_only(rng, config)
    elif u < config.p_text + config.p_video:
        question, answer, meta, videos = _video(rng, config, data_dir, stem)
        images = []
    elif u < config.p_text + config.p_video + config.p_multi:
        question, answer, meta, images = _multi_image(rng, config, data_dir, stem)
        videos = []
    else:
        question, answer, meta, images = _single_image(rng, config, data_dir, stem)
        videos = []
    tags = "<image>" * len(images) + "<video>" * len(videos)
    record = {"id": f"{split}-{index}",
              "messages": [{"role": "user", "content": tags + question}, {"role": "assistant", "content": answer}]}
    if images:
        record["images"] = images
    if videos:
        record["videos"] = videos
    record["meta"] = meta
    return record


def _single_image(rng, config, data_dir, stem):
    (w, h), = _image_sizes(rng, config, 1)
    shapes = _layout(rng, w, h, _shape_budget(rng, config, w, h), config.shape_scale)
    path = _save(_draw(rng, w, h, shapes), data_dir, f"{stem}.png")
    if rng.random() < config.p_caption:
        question, answer = "Describe every shape in the image.", _describe(shapes, w, h)
        return question, answer, {"task": "caption", "shapes": shapes}, [path]
    question, answer, task = _ask(rng, shapes, w)
    return question, answer, {"task": task, "shapes": shapes}, [path]


def _multi_image(rng, config, data_dir, stem):
    k = int(rng.integers(2, max(2, config.max_images) + 1))
    sizes = _image_sizes(rng, config, k)
    layouts = [_layout(rng, w, h, _shape_budget(rng, config, w, h), config.shape_scale) for w, h in sizes]
    if k == 2 and len(layouts[0]) == len(layouts[1]):   # "which has more" needs different counts
        fewer = 0 if len(layouts[0]) > 1 else 1
        layouts[fewer] = layouts[fewer][:-1] if len(layouts[fewer]) > 1 else layouts[fewer]
    counts = [len(x) for x in layouts]
    paths = [_save(_draw(rng, w, h, shapes), data_dir, f"{stem}_{j}.png")
             for j, ((w, h), shapes) in enumerate(zip(sizes, layouts))]
    if k == 2 and counts[0] != counts[1]:
        question = "Which image has more shapes, the first or the second?"
        answer = "first" if counts[0] > counts[1] else "second"
        task = "compare"
    else:
        question, answer, task = "How many shapes are there in all the images together?", str(sum(counts)), "total"
    return question, answer, {"task": task, "counts": counts, "shapes": layouts}, paths


def _video(rng, config, data_dir, stem):
    lo, hi = config.video_frames
    n = 2 * int(rng.integers(max(1, lo // 2), max(1, hi // 2) + 1))
    w, h = (int(rng.integers(config.video_side[0], config.video_side[1] + 1)) for _ in range(2))
    if config.video_format == "mp4" and _has_av():
        w, h = w - w % 2, h - h % 2          # 4:2:0 chroma needs even sides
    colour = str(rng.choice(list(COLOURS)))
    shape = str(rng.choice(SHAPES))
    direction = str(rng.choice(DIRECTIONS))
    s = max(8, int(0.3 * min(w, h)))
    # The shape crosses from one side to the other, so the direction is plain from any two frames.
    margin = 2
    along = (w if direction in ("left", "right") else h) - s - 2 * margin
    start = margin + rng.integers(0, max(1, (h if direction in ("left", "right") else w) - s - 2 * margin))
    background = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
    frames = []
    for f in range(n):
        step = margin + round(along * f / max(1, n - 1))
        pos = step if direction in ("right", "down") else margin + along - (step - margin)
        x, y = (pos, int(start)) if direction in ("left", "right") else (int(start), pos)
        item = {"shape": shape, "colour": colour, "box": [int(x), int(y), int(x) + s, int(y) + s]}
        frames.append(_draw(rng, w, h, [item], background))
    if config.video_format == "mp4" and _has_av():
        video = {"video": _save_mp4(frames, data_dir, f"{stem}.mp4")}
    else:
        video = {"video": [_save(frame, data_dir, f"{stem}/{f:02d}.png") for f, frame in enumerate(frames)]}
    if config.video_pixels is not None:
        video["min_pixels"], video["max_pixels"] = config.video_pixels
    question = f"Which way does the {colour} {shape} move?"
    return question, direction, {"task": "motion", "colour": colour, "shape": shape, "frames": n}, [video]


def _text_only(rng, config):
    n = int(rng.integers(1, max(1, config.max_shapes) + 1))
    items = [(str(rng.choice(list(COLOURS))), str(rng.choice(SHAPES))) for _ in range(n)]
    colour = items[int(rng.integers(n))][0]
    listing = ", ".join(f"a {c} {s}" for c, s in items)
    question = f"Here is a list of shapes: {listing}. How many of them are {colour}?"
    return question, str(sum(c == colour for c, _ in items)), {"task": "text_count"}, [], []


# -- questions -------------------------------------------------------------------------------------------

def _ask(rng, shapes, width):
    """A question about one image whose answer is unambiguous from its pixels; counting when nothing else is."""
    by_shape = {s: [x for x in shapes if x["shape"] == s] for s in SHAPES}
    by_colour = {c: [x for x in shapes if x["colour"] == c] for c in COLOURS}
    options = []
    unique_shape = [s for s, xs in by_shape.items() if len(xs) == 1]
    unique_colour = [c for c, xs in by_colour.items() if len(xs) == 1]
    if unique_shape:
        s = unique_shape[int(rng.integers(len(unique_shape)))]
        options.append((f"What colour is the {s}?", by_shape[s][0]["colour"], "colour"))
    if unique_colour:
        c = unique_colour[int(rng.integers(len(unique_colour)))]
        options.append((f"What shape is the {c} object?", by_colour[c][0]["shape"], "shape"))
        x0, _, x1, _ = by_colour[c][0]["box"]
        if x1 < width / 2 or x0 > width / 2:      # wholly on one side
            side = "left" if x1 < width / 2 else "right"
            options.append((f"Is the {c} {by_colour[c][0]['shape']} on the left or the right?", side, "side"))
    options.append(("How many shapes are there?", str(len(shapes)), "count"))
    return options[int(rng.integers(len(options)))]


def _describe(shapes, w, h) -> str:
    rows, cols = ("top", "middle", "bottom"), ("left", "centre", "right")
    parts = [f"There {'is' if len(shapes) == 1 else 'are'} {len(shapes)} shape{'' if len(shapes) == 1 else 's'}."]
    for x in sorted(shapes, key=lambda x: (x["box"][1], x["box"][0])):
        x0, y0, x1, y1 = x["box"]
        r, c = rows[min(2, int(3 * (y0 + y1) / 2 / h))], cols[min(2, int(3 * (x0 + x1) / 2 / w))]
        where = "the centre" if (r, c) == ("middle", "centre") else f"the {r} {c}".replace(" centre", "")
        size = "large" if (x1 - x0) > 0.25 * min(w, h) else "small"
        parts.append(f"A {size} {x['colour']} {x['shape']} at {where}.")
    return " ".join(parts)


# -- drawing ---------------------------------------------------------------------------------------------

def _image_sizes(rng, config, k):
    """k (width, height) pairs: log-uniform area, log-uniform aspect ratio, within the patch budget."""
    max_area = config.max_area or config.max_side ** 2
    for _ in range(100):
        sizes = []
        for _ in range(k):
            area = math.exp(rng.uniform(math.log(config.min_side ** 2), math.log(max_area)))
            aspect = math.exp(rng.uniform(-math.log(config.max_aspect), math.log(config.max_aspect)))
            w = int(np.clip(round(math.sqrt(area * aspect)), config.min_side, config.max_side))
            h = int(np.clip(round(area / w), config.min_side, config.max_side))
            sizes.append((w, h))
        if not config.max_patches or sum(_patches(config, w, h) for w, h in sizes) <= config.max_patches:
            return sizes
    return [(config.min_side, config.min_side)] * k


def _patches(config, w, h) -> int:
    rh, rw = smart_resize(h, w, 28, config.min_pixels, config.max_pixels)
    return rh * rw // 196


def _shape_budget(rng, config, w, h) -> int:
    room = max(1, int(w * h / 48 ** 2))   # about one shape per 48x48 pixels of canvas
    return int(rng.integers(1, max(1, min(config.max_shapes, room)) + 1))


def _layout(rng, w, h, n, scale=(0.25, 0.5)):
    """Up to n non-overlapping shapes: [{"shape", "colour", "box": [x0, y0, x1, y1]}] (box inclusive)."""
    short = min(w, h)
    lo, hi = max(8, int(scale[0] * short)), max(8, int(scale[1] * short))
    if n > 4:  # many shapes: smaller ones, so they fit
        lo, hi = max(8, int(0.6 * short / math.sqrt(n))), max(8, int(1.2 * short / math.sqrt(n)))
    shapes = []
    for _ in range(n * 30):
        if len(shapes) == n:
            break
        s = int(rng.integers(lo, hi + 1))
        if s + 2 > min(w, h):
            s = min(w, h) - 2
        x0, y0 = int(rng.integers(1, w - s)), int(rng.integers(1, h - s))
        box = [x0, y0, x0 + s - 1, y0 + s - 1]
        if all(box[2] + 2 < o[0] or o[2] + 2 < box[0] or box[3] + 2 < o[1] or o[3] + 2 < box[1]
               for o in (x["box"] for x in shapes)):
            shapes.append({"shape": str(rng.choice(SHAPES)), "colour": str(rng.choice(list(COLOURS))), "box": box})
    return shapes


def _draw(rng, w, h, shapes, background=None) -> Image.Image:
    if background is None:
        background = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
    img = Image.new("RGB", (w, h), background)
    draw = ImageDraw.Draw(img)
    for x in shapes:
        x0, y0, x1, y1 = x["box"]
        fill = COLOURS[x["colour"]]
        if x["shape"] == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=fill)
        elif x["shape"] == "square":
            draw.rectangle((x0, y0, x1, y1), fill=fill)
        else:
            draw.polygon([((x0 + x1) / 2, y0), (x0, y1), (x1, y1)], fill=fill)
    return img


def _has_av() -> bool:
    try:
        import av  # noqa: F401
    except ImportError:
        return False
    return True


VIDEO_RATE = 2   # frames per second of the written clips: the processor's default sampling keeps them all


def _save_mp4(frames: list, data_dir: str, rel: str) -> str:
    """An H.264 clip of `frames` at VIDEO_RATE fps, near-lossless (crf 12) and deterministic (one thread)."""
    import av
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=VIDEO_RATE, options={"crf": "12", "preset": "fast"})
        stream.width, stream.height, stream.pix_fmt = frames[0].width, frames[0].height, "yuv420p"
        stream.codec_context.thread_count = 1
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_image(frame)))
        container.mux(stream.encode())
    storage.write_bytes(storage.join(data_dir, rel), buf.getvalue())
    return rel


def _save(img: Image.Image, data_dir: str, rel: str) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)   # fast; PNG stays lossless and deterministic
    storage.write_bytes(storage.join(data_dir, rel), buf.getvalue())
    return rel
