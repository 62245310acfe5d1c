"""Checking records before a run builds or compiles anything: what can be wrong with a record and is cheap to
see, found in seconds, reported with its file:line, instead of one bad record stopping the run minutes in.

Per record: it parses (sources that parse lazily raise `DataError` on indexing; the JSONL reader hands over
`Skipped` markers), its <image>/<video> tags match its files, a training record ends with an assistant reply,
the chat template renders, and every image opens: Pillow reads the header (format, size) and, for PNG,
walks the chunks checking their CRCs, without decompressing the pixels. From the header size and the
processor's pixel budget it computes the example's size (text tokens, vision pads included; ViT patches)
exactly as the processor would, so the run can size its buckets from the data (`data.buckets: auto`) and an
example that fits no bucket is reported now. Videos given as frames are checked the same way, frame by frame;
a video file is decoded (the only exact way to its frame count), so a set of video files checks slower.

What it cannot see is found when the pipeline reads the record and counts against the same skip budget: a
JPEG cut short (its header is intact; Pillow notices only when decoding) or a record outside the sample.

Cost: records are checked in a thread pool (Pillow and the tokenizer release the GIL for file reads and
tokenising). At most `limit` records are checked: all of them when there are no more, else `limit` chosen
at random (seeded), so the check of a very large set costs the same as that of `limit` records.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import time
from typing import Any, Sequence

import numpy as np
from PIL import Image

from qwen2vl_jax import storage
from qwen2vl_jax.data.image import (FACTOR, IMAGE_MAX_PIXELS, IMAGE_MIN_PIXELS, describe, load_image,
                                    open_image_file, smart_resize)
from qwen2vl_jax.data.processor import _check_trainable
from qwen2vl_jax.data.records import DataError, Record
from qwen2vl_jax.data.video import (FPS_MAX_FRAMES, FPS_MIN_FRAMES, _check_frames, frame_budget,
                                    sample_frame_count)

CHUNK = 64   # records per task of the thread pool: one tokenizer batch


@dataclasses.dataclass
class CheckReport:
    total: int                          # records in the source
    checked: int                        # records looked at (all, or a sample of `limit`)
    problems: list[tuple[str, str]]     # (source "file:line", reason), in source order
    sizes: np.ndarray                   # (n, 2) (text tokens, patches) of the good records checked
    seconds: float

    @property
    def sampled(self) -> bool:
        return self.checked < self.total

    def describe(self) -> str:
        what = f"all {self.total:,} records" if not self.sampled else \
            f"{self.checked:,} of {self.total:,} records (a random sample)"
        bad = f"{len(self.problems)} bad" if self.problems else "no problems"
        return f"data check: {what} in {self.seconds:.1f} s, {bad}"


def check_records(records: Sequence, processor=None, *, limit: int = 0, seed: int = 0, buckets=None,
                  truncate: bool = False, require_assistant: bool = True, threads: int | None = None
                  ) -> CheckReport:
    """Check `records` (a sequence of `Record`s; an item may also be a marker with `source` and `reason`, or
    indexing may raise `DataError`, both counting as a bad record). `limit` > 0 checks at most that many.

    With a `processor` (its tokenizer, chat template and pixel budgets) the report holds each good record's
    size, and with `buckets` an example larger than every bucket is a problem (unless `truncate`).
    """
    start = time.perf_counter()
    total = len(records)
    picked = np.arange(total)
    if limit and total > limit:
        picked = np.sort(np.random.default_rng(seed).choice(total, limit, replace=False))
    chunks = [picked[i:i + CHUNK] for i in range(0, len(picked), CHUNK)]
    task = _Checker(records, processor, buckets, truncate, require_assistant)
    problems, sizes = [], []
    threads = threads or min(32, (os.cpu_count() or 1) + 4)
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        for chunk_problems, chunk_sizes in pool.map(task, chunks):
            problems += chunk_problems
            sizes += chunk_sizes
    return CheckReport(total, len(picked), problems, np.asarray(sizes, np.int64).reshape(-1, 2),
                       time.perf_counter() - start)


class _Checker:
    def __init__(self, records, processor, buckets, truncate: bool, require_assistant: bool):
        self.records, self.processor, self.require_assistant = records, processor, require_assistant
        self.buckets = None if buckets is None or truncate else tuple(tuple(b) for b in buckets)

    def __call__(self, indices) -> tuple[list, list]:
        problems, texts, vision, sources = [], [], [], []
        for i in indices:
            try:
                record = self.records[int(i)]
            except DataError as e:
                problems.append(_split(str(e), f"record {int(i)}"))
                continue
            if not isinstance(record, Record):   # a marker of a line that did not parse
                problems.append((record.source, record.reason))
                continue
            try:
                text, counts = self._record(record)
            except ValueError as e:
                problems.append((record.source, str(e)))
                continue
            texts.append(text)
            vision.append(counts)
            sources.append(record.source)
        if self.processor is None:
            return problems, []
        sizes = []
        encodings = self.processor.tokenizer.encode_batch(texts) if texts else []
        for enc, (tokens, patches), source in zip(encodings, vision, sources):
            # The placeholders count once in the ids and expand to their merged tokens.
            n_text = len(enc.ids) - len(tokens) + sum(tokens)
            n_patches = sum(patches)
            if self.buckets and not any(n_text <= L and n_patches <= P for L, P in self.buckets):
                problems.append((source, f"{n_text} text tokens (vision pads included) and {n_patches} vision "
                                 f"patches fit none of the buckets (text_len, patch_len) = "
                                 f"{', '.join(map(str, self.buckets))}; set data.buckets to auto to size them from "
                                 "the data, add a larger bucket, or lower data.image_max_pixels"))
                continue
            sizes.append((n_text, n_patches))
        return sorted(problems, key=lambda p: _order(p[0])), sizes

    def _record(self, record: Record) -> tuple[str, tuple[list[int], list[int]]]:
        """The record's chat text and its vision items' (merged tokens, patches); ValueError when bad."""
        messages = record.messages
        if self.require_assistant:
            _check_trainable(messages)
        tokens, patches = [], []
        items = [it for m in messages for it in m["content"] if it["type"] in ("image", "video")]
        for k, item in enumerate(items, 1):
            kind = item["type"]
            try:
                n = self._image(item) if kind == "image" else self._video(item)
            except ValueError as e:
                name = describe(item[kind])
                raise ValueError(f"{kind} {k}{'' if name in str(e) else f' ({name})'}: {e}") from None
            tokens.append(n // 4)
            patches.append(n)
        if self.processor is None:
            return "", (tokens, patches)
        text = self.processor.apply_chat_template(messages, messages[-1]["role"] != "assistant")
        return text, (tokens, patches)

    def _image(self, item: dict) -> int:
        """ViT patches of one image item, from its header."""
        height, width = image_size(item["image"])
        p = self.processor
        patch, merge = (p.patch_size, p.merge_size) if p is not None else (FACTOR // 2, 2)
        if "resized_height" in item and "resized_width" in item:
            h, w = smart_resize(item["resized_height"], item["resized_width"], patch * merge,
                                IMAGE_MIN_PIXELS, IMAGE_MAX_PIXELS)
        else:
            lo = item.get("min_pixels", p.image_min_pixels if p is not None else IMAGE_MIN_PIXELS)
            hi = item.get("max_pixels", p.image_max_pixels if p is not None else IMAGE_MAX_PIXELS)
            h, w = smart_resize(height, width, patch * merge, lo, hi)
        return (h // patch) * (w // patch)

    def _video(self, item: dict) -> int:
        """ViT patches of one video item: frames given as a list or an array from their headers and shapes
        (the processor's sampling and pixel budget, computed); a video file by decoding it, the only way to
        its frame count and frame size (PyAV)."""
        source, p = item["video"], self.processor
        if isinstance(source, (list, tuple)):
            sizes = [image_size(frame) for frame in source]
        elif isinstance(source, np.ndarray):
            _check_frames(source)
            sizes = [source.shape[1:3]] * len(source)
        elif p is None:   # no sizes wanted: the file only has to be there
            if isinstance(source, (str, os.PathLike)) and not storage.exists(source):
                raise ValueError(f"video file not found: {os.fspath(source)}")
            return 0
        else:
            _, grids = p._encode_items([{"role": "user", "content": [item]}], "video")
            return int(grids.prod(-1).sum())
        if not sizes:
            raise ValueError("video has zero frames; give at least one frame")
        if p is None:
            return 0
        n = len(sizes)
        if item.get("fps") is not None or item.get("nframes") is not None:
            n = sample_frame_count(n, item.get("video_fps"), item.get("fps"),
                                   None if item.get("nframes") is None else int(item["nframes"]),
                                   item.get("min_frames", FPS_MIN_FRAMES), item.get("max_frames", FPS_MAX_FRAMES))
        factor = p.patch_size * p.merge_size
        if "resized_height" in item and "resized_width" in item:
            h, w = smart_resize(item["resized_height"], item["resized_width"], factor, IMAGE_MIN_PIXELS,
                                IMAGE_MAX_PIXELS)
        else:   # one size for all frames, from the first (always among the sampled ones)
            lo = item.get("min_pixels", p.video_min_pixels)
            hi = item.get("max_pixels", p.video_max_pixels)
            total = item.get("total_pixels", p.video_total_pixels)
            h, w = smart_resize(*sizes[0], factor, lo, frame_budget(n, lo, hi, total))
        return -(-n // p.temporal_patch_size) * (h // p.patch_size) * (w // p.patch_size)


def image_size(source: Any) -> tuple[int, int]:
    """(height, width) of an image from its header; ValueError as `load_image` words it for a file that is
    missing, not an image, or (PNG) damaged. Paths (local or URLs) and PIL images are read from their header;
    other sources (data: URIs, bytes, arrays) are loaded in full."""
    if isinstance(source, (str, os.PathLike)) and not os.fspath(source).startswith(("data:", "http://", "https://")):
        name = os.fspath(source)
        name = name[len("file://"):] if name.startswith("file://") else name
        with open_image_file(name, whole=False) as f:   # an object in a store: ranged reads of its header
            return _header(f, name)
    if isinstance(source, Image.Image):
        return source.height, source.width
    image = load_image(source)
    return image.height, image.width


def _header(f, name: str) -> tuple[int, int]:
    try:
        image = Image.open(f)
        width, height = image.size
        image.verify()   # PNG: chunk lengths and CRCs, no inflate; most formats: nothing more to read
    except Image.DecompressionBombError as e:
        raise ValueError(f"{name}: refused as a possible decompression bomb ({e}); if the file is trusted, "
                         "raise PIL.Image.MAX_IMAGE_PIXELS") from None
    except Image.UnidentifiedImageError:
        raise ValueError(f"{name}: not an image (Pillow recognises no image format in these bytes)") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ValueError(f"{name}: truncated or corrupt image ({e})") from None
    return height, width


def _split(message: str, default: str) -> tuple[str, str]:
    """A DataError's "file:line: reason" -> (source, reason)."""
    source, sep, reason = message.partition(": ")
    return (source, reason) if sep and ":" in source else (default, message)


def _order(source: str):
    path, _, line = source.rpartition(":")
    return (path, int(line)) if line.isdigit() else (source, 0)
