"""Checking records before a run builds or compiles anything: what can be wrong with a record and is cheap to
see, found in seconds, reported with its file:line, instead of one bad record stopping the run minutes in.

Per record: it parses (sources that parse lazily raise `DataError` on indexing; the JSONL reader hands over
`Skipped` markers), its <image>/<video> tags match its files, a training record ends with an assistant reply,
the chat template renders, and every image opens: Pillow reads the header (format, size) and, for PNG,
walks the chunks checking their CRCs, without decompressing the pixels. From the header size and the
processor's pixel budget it computes the example's size (text tokens, vision pads included; ViT patches)
exactly as the processor would, so the run can size its buckets from the data (`data.buckets: auto`) and an
example that fits no bucket is reported now. Videos given as frames are checked the same way, frame by frame;
a video file by its container's header (frame count, frame rate, frame size: PyAV, no decoding), with the
processor's sampling and budget rule; the report sums the videos' frames and tokens.

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
from qwen2vl_jax.data.video import (FPS_MAX_FRAMES, FPS_MIN_FRAMES, _check_frames, frame_indices, frame_size,
                                    video_header)

CHUNK = 64   # records per task of the thread pool: one tokenizer batch


@dataclasses.dataclass
class CheckReport:
    total: int                          # records in the source
    checked: int                        # records looked at (all, or a sample of `limit`)
    problems: list[tuple[str, str]]     # (source "file:line", reason), in source order
    sizes: np.ndarray                   # (n, 2) (text tokens, patches) of the good records checked
    seconds: float
    videos: int = 0                     # video items of the good records checked
    video_frames: int = 0               # frames they keep after sampling
    video_tokens: int = 0               # merged LLM tokens they become

    @property
    def sampled(self) -> bool:
        return self.checked < self.total

    def describe(self) -> str:
        what = f"all {self.total:,} records" if not self.sampled else \
            f"{self.checked:,} of {self.total:,} records (a random sample)"
        bad = f"{len(self.problems)} bad" if self.problems else "no problems"
        videos = f"; {self.videos:,} video(s): {self.video_frames:,} frames, {self.video_tokens:,} tokens" \
            if self.videos else ""
        return f"data check: {what} in {self.seconds:.1f} s, {bad}{videos}"


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
    problems, sizes, videos = [], [], np.zeros(3, np.int64)
    threads = threads or min(32, (os.cpu_count() or 1) + 4)
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        for chunk_problems, chunk_sizes, chunk_videos in pool.map(task, chunks):
            videos += chunk_videos
            problems += chunk_problems
            sizes += chunk_sizes
    return CheckReport(total, len(picked), problems, np.asarray(sizes, np.int64).reshape(-1, 2),
                       time.perf_counter() - start, *(int(v) for v in videos))


class _Checker:
    def __init__(self, records, processor, buckets, truncate: bool, require_assistant: bool):
        self.records, self.processor, self.require_assistant = records, processor, require_assistant
        self.buckets = None if buckets is None or truncate else tuple(tuple(b) for b in buckets)

    def __call__(self, indices) -> tuple[list, list, np.ndarray]:
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
            return problems, [], np.zeros(3, np.int64)
        sizes, stats = [], np.zeros(3, np.int64)   # videos, their frames, their tokens
        encodings = self.processor.tokenizer.encode_batch(texts) if texts else []
        for enc, (tokens, patches, videos), source in zip(encodings, vision, sources):
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
            stats += [len(videos), sum(f for f, _ in videos), sum(t for _, t in videos)]
        return sorted(problems, key=lambda p: _order(p[0])), sizes, stats

    def _record(self, record: Record) -> tuple[str, tuple[list[int], list[int], list[tuple[int, int]]]]:
        """The record's chat text, its vision items' (merged tokens, patches) and its videos' (frames, tokens);
        ValueError when bad."""
        messages = record.messages
        if self.require_assistant:
            _check_trainable(messages)
        tokens, patches, videos = [], [], []
        items = [it for m in messages for it in m["content"] if it["type"] in ("image", "video")]
        for k, item in enumerate(items, 1):
            kind = item["type"]
            try:
                if kind == "image":
                    n = self._image(item)
                else:
                    n, frames = self._video(item)
                    videos.append((frames, n // 4))
            except ValueError as e:
                name = describe(item[kind])
                raise ValueError(f"{kind} {k}{'' if name in str(e) else f' ({name})'}: {e}") from None
            tokens.append(n // 4)
            patches.append(n)
        if self.processor is None:
            return "", (tokens, patches, videos)
        text = self.processor.apply_chat_template(messages, messages[-1]["role"] != "assistant")
        return text, (tokens, patches, videos)

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
        """ViT patches of one video item, from headers alone: the frames' image headers for a list, the shape of
        an array, the container's header (frame count, frame rate, size; PyAV) for a file. The processor's own
        sampling and budget rule (video.frame_indices / frame_size) turns them into the grid."""
        source, p = item["video"], self.processor
        sample = item.get("fps") is not None or item.get("nframes") is not None
        if isinstance(source, (list, tuple)):
            if not source:
                raise ValueError("video has zero frames; give at least one frame")
            total, rate, first = len(source), item.get("video_fps"), None
        elif isinstance(source, np.ndarray):
            _check_frames(source)
            total, rate, first = len(source), item.get("video_fps"), source.shape[1:3]
        elif p is None:   # no sizes wanted: the file only has to be there
            if isinstance(source, (str, os.PathLike)) and not storage.exists(source):
                raise ValueError(f"video file not found: {os.fspath(source)}")
            return 0, 0
        else:
            total, file_fps, height, width = video_header(source if isinstance(source, (bytes, bytearray))
                                                          else os.fspath(source))
            total, rate, first, sample = total, item.get("video_fps") or file_fps, (height, width), True
        if total == 0:
            raise ValueError("video has zero frames; give at least one frame")
        if p is None:
            for frame in source if isinstance(source, (list, tuple)) else ():
                image_size(frame)
            return 0, 0
        nframes = None if item.get("nframes") is None else int(item["nframes"])
        fps = item.get("fps", p.video_sample_fps if nframes is None else None)
        indices = frame_indices(total, video_fps=rate, sample=sample, fps=fps, nframes=nframes,
                                video_start=item.get("video_start"), video_end=item.get("video_end"),
                                min_frames=item.get("min_frames", FPS_MIN_FRAMES),
                                max_frames=item.get("max_frames", FPS_MAX_FRAMES))
        if isinstance(source, (list, tuple)):
            sizes = [image_size(frame) for frame in source]
            first = sizes[int(indices[0])]
        h, w = frame_size(len(indices), *first, min_pixels=item.get("min_pixels", p.video_min_pixels),
                          max_pixels=p.video_max_pixels, total_pixels=item.get("total_pixels", p.video_total_pixels),
                          item_max_pixels=item.get("max_pixels"), resized_height=item.get("resized_height"),
                          resized_width=item.get("resized_width"), factor=p.patch_size * p.merge_size)
        return -(-len(indices) // p.temporal_patch_size) * (h // p.patch_size) * (w // p.patch_size), len(indices)


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
