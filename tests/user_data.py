"""A data set as a user brings one: eight pictures of ordinary sizes and kinds (20x20 to 1000x700, greyscale,
RGBA, PNG and JPEG) under images/, and a JSONL of 16 records in both record forms, one file per split."""

from __future__ import annotations

import json
import os

import numpy as np
from PIL import Image

# (file, width, height, mode); the 1000x700 one is larger than the demo's buckets hold.
PICTURES = [("cat.jpg", 1000, 700, "RGB"), ("dot.png", 20, 20, "RGB"), ("scan.png", 640, 480, "L"),
            ("logo.png", 300, 300, "RGBA"), ("wide.jpg", 800, 200, "RGB"), ("tall.png", 120, 480, "RGB"),
            ("icon.png", 64, 48, "P"), ("photo.jpg", 512, 384, "RGB")]
COLOURS = {"red": (220, 40, 40), "green": (40, 190, 60), "blue": (40, 60, 220), "yellow": (230, 210, 40)}


def write_pictures(root) -> list[str]:
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    rng = np.random.default_rng(0)
    names = list(COLOURS)
    for i, (name, w, h, mode) in enumerate(PICTURES):
        rgb = np.array(COLOURS[names[i % 4]]) + rng.integers(-15, 15, (h, w, 3))
        image = Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))
        if mode == "RGBA":
            alpha = np.full((h, w, 1), 255, np.uint8)
            alpha[: h // 4] = 0
            image = Image.fromarray(np.concatenate([np.asarray(image), alpha], -1), "RGBA")
        elif mode in ("L", "P"):
            image = image.convert(mode)
        image.save(os.path.join(root, "images", name))
    return [names[i % 4] for i in range(len(PICTURES))]


def records(colours: list[str], n: int = 16) -> list[dict]:
    """`n` records over the pictures: even ones in the tag form, odd ones in the content-list form; one in
    eight with two pictures, one text-only."""
    out = []
    for i in range(n):
        k = i % len(PICTURES)
        name = f"images/{PICTURES[k][0]}"
        if i == 5:
            out.append({"messages": [{"role": "user", "content": "Say hello."},
                                     {"role": "assistant", "content": "hello"}]})
        elif i == 3:
            other = f"images/{PICTURES[(k + 1) % len(PICTURES)][0]}"
            out.append({"messages": [{"role": "user", "content": "<image><image>Which colour comes first?"},
                                     {"role": "assistant", "content": colours[k]}], "images": [name, other]})
        elif i % 2 == 0:
            out.append({"messages": [{"role": "user", "content": "<image>What colour is it?"},
                                     {"role": "assistant", "content": colours[k]}], "images": [name]})
        else:
            out.append({"messages": [{"role": "user", "content": [{"type": "image", "image": name},
                                                                  {"type": "text", "text": "Colour?"}]},
                                     {"role": "assistant", "content": colours[k]}]})
    return out


def write_jsonl(path, recs) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for r in recs:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


def write_set(root) -> tuple[str, str]:
    """(train.jsonl, val.jsonl) under `root`."""
    colours = write_pictures(root)
    recs = records(colours)
    return (write_jsonl(os.path.join(root, "train.jsonl"), recs),
            write_jsonl(os.path.join(root, "val.jsonl"), recs[:8]))
