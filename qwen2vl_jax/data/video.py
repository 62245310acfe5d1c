"""Videos: frame sampling, clip ranges and per-video pixel budgets as qwen-vl-utils 0.0.14 computes them, then
the reference processor's video path (docs/design.md, "Image and video processing"): one `smart_resize` for all
frames, PIL bicubic on uint8, CLIP normalisation, odd frame counts padded with the last frame, frames 2k and
2k+1 in temporal patch k.

The reference for the pixels is the PIL ("slow") path of transformers 4.57 (`Qwen2VLImageProcessor(videos=...)`);
its torchvision video processor resizes with antialiased bicubic and cannot be bit-identical to any PIL resize.
Video files (mp4, webm, ...) are decoded with PyAV (`pip install av`, or the `video` extra): frames are decoded
in order, only the sampled ones are converted to RGB, each is resized as it arrives, and decoding stops after
the last sampled frame, so memory stays near the size of the output.

The rule, for a file of `total` frames at `video_fps` (docs/data.md, "Videos"):

1. clip range (`video_start`/`video_end`, seconds, clamped to the video): frames `ceil(start * video_fps)` ..
   `min(floor(end * video_fps), total - 1)`;
2. frame count (`smart_nframes`): `nframes` rounded to an even count, or `fps` (default 2) frames per second of
   the range, clamped to [min_frames, max_frames] (4, 768) and to the range, floored to an even count; the
   indices spread evenly over the range, rounded;
3. per-frame budget: `max(min(max_pixels, total_pixels / n * 2), int(1.05 * min_pixels))`, lowered (never
   raised) by an item's own `max_pixels`, where n is the frame count after padding to an even count, then
   `smart_resize` of the first sampled frame within [min_pixels, budget].

The defaults are qwen-vl-utils 0.0.14's: 128..768 x 28 x 28 pixels per frame and 128000 x 28 x 28 x 0.9 per
video (`MODEL_SEQ_LEN` 128000), so a video costs at most 768 x 768 / 4 = 147,456 merged tokens by the per-frame
cap and 115,200 by the total, except that the 1.05 x min_pixels floor wins past ~1,700 frames.
"""

from __future__ import annotations

import io
import math
import os

import numpy as np
from PIL import Image

from qwen2vl_jax import storage

from qwen2vl_jax.data.image import (IMAGE_MAX_PIXELS, IMAGE_MIN_PIXELS, MERGE_SIZE, OPENAI_CLIP_MEAN,
                                    OPENAI_CLIP_STD, PATCH_SIZE, TEMPORAL_PATCH_SIZE, load_image, normalize,
                                    smart_resize)

# qwen-vl-utils 0.0.14 (VIDEO_MIN_TOKEN_NUM, VIDEO_MAX_TOKEN_NUM, MODEL_SEQ_LEN * 0.9 merged tokens' pixels).
VIDEO_MIN_PIXELS = 128 * 28 * 28                    # 100,352 per frame
VIDEO_MAX_PIXELS = 768 * 28 * 28                    # 602,112 per frame
VIDEO_TOTAL_PIXELS = int(128000 * 28 * 28 * 0.9)    # 90,316,800 per video, shared by its frames
FPS = 2.0
FPS_MIN_FRAMES = 4
FPS_MAX_FRAMES = 768
FRAME_FACTOR = TEMPORAL_PATCH_SIZE


def sample_frame_count(total_frames: int, video_fps: float | None = None, fps: float | None = None,
                       nframes: int | None = None, min_frames: int = FPS_MIN_FRAMES,
                       max_frames: int = FPS_MAX_FRAMES) -> int:
    """How many frames to keep, as qwen-vl-utils `smart_nframes`: `nframes` rounded to an even count, or
    `fps` frames per second of video clamped to [min_frames, max_frames] and to the frames there are."""
    if fps is not None and nframes is not None:
        raise ValueError("give either fps or nframes for a video, not both")
    if nframes is not None:
        n = round(nframes / FRAME_FACTOR) * FRAME_FACTOR
    else:
        if video_fps is None or video_fps <= 0:
            raise ValueError("sampling a video by fps needs its frame rate (video_fps); pass video_fps=..., "
                             "or nframes=..., or pre-sampled frames")
        lo = math.ceil(min_frames / FRAME_FACTOR) * FRAME_FACTOR
        hi = math.floor(min(max_frames, total_frames) / FRAME_FACTOR) * FRAME_FACTOR
        n = total_frames / video_fps * (FPS if fps is None else fps)
        n = math.floor(min(max(n, lo), hi, total_frames) / FRAME_FACTOR) * FRAME_FACTOR
    if not FRAME_FACTOR <= n <= total_frames:
        raise ValueError(f"cannot sample {n} frames from a video of {total_frames} frames; need between "
                         f"{FRAME_FACTOR} and {total_frames} (lower nframes/fps, or give a longer video)")
    return n


def sample_frame_indices(total_frames: int, n: int, start: int = 0) -> np.ndarray:
    """n indices spread evenly over [start, start + total - 1], rounded (qwen-vl-utils: `linspace(...).round()`,
    half to even)."""
    return np.rint(np.linspace(start, start + total_frames - 1, n)).astype(np.int64)


def clip_range(total_frames: int, video_fps: float | None, video_start: float | None = None,
               video_end: float | None = None) -> tuple[int, int]:
    """(first frame, frame count) of the clip `video_start`..`video_end` seconds (qwen-vl-utils 0.0.14
    `calculate_video_frame_range`): both clamped to the video's duration, the first frame `ceil(start * fps)`,
    the last `min(floor(end * fps), total - 1)`. Without either bound: the whole video."""
    if video_start is None and video_end is None:
        return 0, total_frames
    if video_fps is None or video_fps <= 0:
        raise ValueError("a clip range (video_start/video_end) needs the video's frame rate; give video_fps "
                         "for frames given as a list or an array")
    duration = total_frames / video_fps
    first = 0 if video_start is None else math.ceil(max(0.0, min(video_start, duration)) * video_fps)
    last = total_frames - 1 if video_end is None else \
        min(math.floor(max(0.0, min(video_end, duration)) * video_fps), total_frames - 1)
    if first >= last:
        raise ValueError(f"clip range video_start={video_start}, video_end={video_end} s holds "
                         f"{max(0, last - first + 1)} frame(s) of this {duration:.3g} s video (frames {first}..{last} of {total_frames} at "
                         f"{video_fps:g} fps); give a range of at least two frames inside the video")
    return first, last - first + 1


def frame_budget(nframes: int, min_pixels: int, max_pixels: int, total_pixels: int | None,
                 item_max_pixels: int | None = None) -> int:
    """Per-frame max pixels (qwen-vl-utils 0.0.14 `fetch_video`): the `total_pixels` of the video shared by
    its `nframes` frames (counted after padding to an even count), never below 1.05 * min_pixels, never above
    `max_pixels` (the per-frame cap); an item's own `item_max_pixels` can only lower the result."""
    nframes += nframes % FRAME_FACTOR
    budget = max_pixels if total_pixels is None else \
        max(min(max_pixels, total_pixels / nframes * FRAME_FACTOR), int(min_pixels * 1.05))
    return budget if item_max_pixels is None else min(item_max_pixels, budget)


def frame_indices(total_frames: int, *, video_fps: float | None = None, sample: bool = True,
                  fps: float | None = None, nframes: int | None = None, video_start: float | None = None,
                  video_end: float | None = None, min_frames: int = FPS_MIN_FRAMES,
                  max_frames: int = FPS_MAX_FRAMES) -> np.ndarray:
    """The frames a video of `total_frames` keeps (steps 1 and 2 of the module docstring). `sample=False`
    (frames given as a list or an array, with no fps/nframes) keeps every frame of the range."""
    if total_frames <= 0:
        raise ValueError("video has zero frames; give at least one frame")
    first, count = clip_range(total_frames, video_fps, video_start, video_end)
    if not sample:
        return np.arange(first, first + count, dtype=np.int64)
    return sample_frame_indices(count, sample_frame_count(count, video_fps, fps, nframes, min_frames, max_frames),
                                first)


def frame_size(nframes: int, height: int, width: int, *, min_pixels: int = VIDEO_MIN_PIXELS,
               max_pixels: int = VIDEO_MAX_PIXELS, total_pixels: int | None = VIDEO_TOTAL_PIXELS,
               item_max_pixels: int | None = None, resized_height: int | None = None,
               resized_width: int | None = None, factor: int = PATCH_SIZE * MERGE_SIZE) -> tuple[int, int]:
    """(height, width) every frame of a video of `nframes` kept frames, the first `height` x `width`, is resized
    to (step 3 of the module docstring); `resized_height`/`resized_width` ask for a size instead, rounded to
    multiples of 28 within the image limits as qwen-vl-utils does."""
    if resized_height is not None and resized_width is not None:
        return smart_resize(resized_height, resized_width, factor, IMAGE_MIN_PIXELS, IMAGE_MAX_PIXELS)
    budget = frame_budget(nframes, min_pixels, max_pixels, total_pixels, item_max_pixels)
    return smart_resize(height, width, factor, min_pixels, budget)


# -- decoding --------------------------------------------------------------------------------------------------

def probe_video(path: str | bytes) -> tuple[int, float]:
    """(frame count, frames per second) of a video file, object or its bytes. Frames are counted by demuxing
    (no decoding), not read from the header, because container headers often hold estimates."""
    return _probe(path, count=True)[:2]


def video_header(path: str | bytes) -> tuple[int, float, int, int]:
    """(frame count, frames per second, height, width) from the container's header alone (no demuxing): what
    the data check needs to count a video's tokens. The count is the header's, or duration x frame rate when
    the container stores none (WebM); `probe_video` counts exactly."""
    return _probe(path, count=False)


def _probe(path, count: bool) -> tuple[int, float, int, int]:
    name = _name(path)
    _check_source(path)
    av = _import_av(name)
    try:
        with _av_open(av, path) as container:
            if not container.streams.video:
                raise ValueError(f"{name}: no video stream in this file")
            stream = container.streams.video[0]
            fps = float(stream.average_rate or stream.guessed_rate or 0)
            height, width = stream.codec_context.height, stream.codec_context.width
            if count:
                total = sum(1 for packet in container.demux(stream) if packet.size)
            elif stream.frames:
                total = int(stream.frames)
            else:
                seconds = float(stream.duration * stream.time_base) if stream.duration else \
                    (container.duration or 0) / 1e6
                total = round(seconds * fps)
    except av.error.FFmpegError as e:
        raise ValueError(f"{name}: unreadable video ({e})") from None
    return total, fps, height, width


def read_video(path: str | bytes, indices=None) -> tuple[np.ndarray, float]:
    """Decode a video file (or its bytes, as embedded in a data shard) with PyAV: (T, H, W, 3) uint8 frames
    (only `indices`, if given, in their order) and its frame rate."""
    total, fps = probe_video(path)
    indices = np.arange(total) if indices is None else np.asarray(indices, np.int64)
    frames = list(_decode(path, indices, lambda frame: frame.to_ndarray(format="rgb24")))
    return (np.stack(frames) if frames else np.zeros((0, 0, 0, 3), np.uint8)), fps


def _decode(path, indices: np.ndarray, convert):
    """`convert(frame)` of the frames at `indices` (sorted, repeats allowed), decoding in order and stopping
    after the last one; frames between them are decoded (inter frames need them) but never converted."""
    name = _name(path)
    av = _import_av(name)
    wanted = np.unique(indices)
    repeats = np.bincount(np.searchsorted(wanted, indices), minlength=len(wanted))
    k = 0
    try:
        with _av_open(av, path) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            for i, frame in enumerate(container.decode(stream)):
                if k == len(wanted):
                    break
                if i == wanted[k]:
                    converted = convert(frame)
                    for _ in range(repeats[k]):
                        yield converted
                    k += 1
    except av.error.FFmpegError as e:
        raise ValueError(f"{name}: unreadable video ({e})") from None
    if k < len(wanted):
        raise ValueError(f"{name}: frame {wanted[k]} was demuxed but never decoded (the file holds fewer "
                         "decodable frames than packets); re-encode the video")


def _av_open(av, path):
    """The same decoder reads a file, its embedded bytes (shards) and a store's object (through a seekable
    file object: ranged reads, not a local copy), so all give the same frames."""
    if isinstance(path, (bytes, bytearray, memoryview)):
        return av.open(io.BytesIO(bytes(path)))
    if isinstance(path, str) and path.startswith("file://"):
        path = path[len("file://"):]
    return av.open(storage.open(path, "rb") if storage.is_url(path) else path)


def _check_source(path) -> None:
    if isinstance(path, (bytes, bytearray, memoryview)):
        return
    if path.startswith("data:"):
        raise ValueError("a video given as a data: URI is not read; give its path, or its bytes in a shard "
                         "(python -m qwen2vl_jax.data.convert embeds them)")
    if path.startswith(("http://", "https://")):
        raise ValueError(f"{_short(path)}: URLs are not fetched; download the video and give its path (or a "
                         "bucket URL: gs://, s3://)")
    if not storage.isfile(path):
        raise ValueError(f"video file not found: {_short(path)}")


def _name(path) -> str:
    return "video bytes" if isinstance(path, (bytes, bytearray, memoryview)) else _short(str(path))


def _short(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def _import_av(name: str):
    try:
        import av
    except ImportError:
        raise ValueError(f"{name}: decoding video files needs PyAV: pip install av (or the project's 'video' "
                         "extra)") from None
    return av


# -- pixels ----------------------------------------------------------------------------------------------------

def _lookup_table(mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD) -> np.ndarray:
    """(3 * 256,) float32: `normalize` of every uint8 level per channel, channel-major. Gathering from it is
    bit-identical to `normalize` (the same element-wise arithmetic, done once per level)."""
    levels = np.repeat(np.arange(256, dtype=np.uint8)[:, None], 3, axis=1)[None, None]   # (1, 1, 256, 3)
    return np.ascontiguousarray(normalize(levels, mean, std)[0, 0].T).reshape(-1)


_LUT = _lookup_table()


def pixels_from_uint8(frames: np.ndarray, patch_size: int = PATCH_SIZE, temporal_patch_size: int = TEMPORAL_PATCH_SIZE,
                      merge_size: int = MERGE_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """(T, H, W, 3) uint8 resized frames -> (`pixel_values_videos`, grid), equal bit for bit to
    `patchify(normalize(frames))`: each value is looked up in a 256-level table per channel, one temporal patch
    at a time, so nothing of the output's size is made but the output."""
    T, H, W, C = frames.shape
    tp, m, p = temporal_patch_size, merge_size, patch_size
    gt, gh, gw = -(-T // tp), H // p, W // p
    cols = C * tp * p * p
    offset = (np.arange(cols, dtype=np.intp) // (tp * p * p)) * 256      # each column's channel, times 256
    out = np.empty((gt * gh * gw, cols), np.float32)
    for t in range(gt):   # one temporal patch at a time; an odd count repeats the last frame
        x = frames[[min(t * tp + j, T - 1) for j in range(tp)]].reshape(tp, gh // m, m, p, gw // m, m, p, C)
        # rows (block_h, block_w, in_h, in_w), columns (c, tp, py, px): as `patchify`
        rows = x.transpose(1, 4, 2, 5, 7, 0, 3, 6).reshape(gh * gw, cols)
        np.take(_LUT, rows + offset, out=out[t * gh * gw:(t + 1) * gh * gw])
    return out, np.array([[gt, gh, gw]], np.int64)


def preprocess_video(frames, min_pixels: int = VIDEO_MIN_PIXELS, max_pixels: int = VIDEO_MAX_PIXELS,
                     total_pixels: int | None = VIDEO_TOTAL_PIXELS, *, fps: float | None = None,
                     nframes: int | None = None, video_fps: float | None = None,
                     video_start: float | None = None, video_end: float | None = None,
                     min_frames: int = FPS_MIN_FRAMES, max_frames: int = FPS_MAX_FRAMES,
                     item_max_pixels: int | None = None,
                     resized_height: int | None = None, resized_width: int | None = None,
                     patch_size: int = PATCH_SIZE, merge_size: int = MERGE_SIZE,
                     temporal_patch_size: int = TEMPORAL_PATCH_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """One video -> `pixel_values_videos` (t*h*w, 1176) float32 and `grid_thw` [[t, h, w]] int64.

    `frames`: a video file path, a bucket URL (gs://, ...) or its bytes (decoded with PyAV, sampled at `fps`=2
    unless `nframes` is given), a (T, H, W, 3) uint8 array, or a list of images (paths, PIL images, arrays).
    Arrays and lists are used as given unless `fps` (with `video_fps`) or `nframes` asks for sampling.
    `video_start`/`video_end` (seconds) keep a clip of it. `max_pixels` caps each frame, `total_pixels` the whole
    video (None: no cap), `item_max_pixels` (a record item's `max_pixels`) only lowers the resulting budget;
    `resized_height`/`resized_width` fix the frame size (still rounded to multiples of 28). The rule: module
    docstring.
    """
    sampling = dict(fps=fps, nframes=nframes, video_start=video_start, video_end=video_end,
                    min_frames=min_frames, max_frames=max_frames)
    sizing = dict(min_pixels=min_pixels, max_pixels=max_pixels, total_pixels=total_pixels,
                  item_max_pixels=item_max_pixels, resized_height=resized_height, resized_width=resized_width,
                  factor=patch_size * merge_size)
    if isinstance(frames, (str, os.PathLike, bytes, bytearray, memoryview)):
        path = frames if isinstance(frames, (bytes, bytearray, memoryview)) else os.fspath(frames)
        total, file_fps = probe_video(path)
        if total == 0:
            raise ValueError(f"{_name(path)}: video has zero frames")
        indices = frame_indices(total, video_fps=video_fps or file_fps, **sampling)
        size = []

        def resize(frame):   # each sampled frame is converted and resized as it is decoded
            image = Image.fromarray(frame.to_ndarray(format="rgb24"))
            if not size:     # one size for all frames, from the first sampled one
                size.append(frame_size(len(indices), image.height, image.width, **sizing)[::-1])
            return np.asarray(image if image.size == size[0] else image.resize(size[0], Image.Resampling.BICUBIC))
        source = _decode(path, indices, resize)
    else:
        _check_frames(frames)
        if len(frames) == 0:
            raise ValueError("video has zero frames; give at least one frame")
        sample = fps is not None or nframes is not None
        indices = frame_indices(len(frames), video_fps=video_fps, sample=sample, **sampling)
        first = load_image(frames[int(indices[0])])
        size = [frame_size(len(indices), first.height, first.width, **sizing)[::-1]]

        def resized():   # frames of another size than the first are resized to it as well
            for k, i in enumerate(indices):
                image = first if k == 0 else load_image(frames[int(i)])
                yield np.asarray(image if image.size == size[0] else image.resize(size[0], Image.Resampling.BICUBIC))
        source = resized()
    out = None
    for k, frame in enumerate(source):
        if out is None:
            out = np.empty((len(indices), *frame.shape), np.uint8)
        out[k] = frame
    return pixels_from_uint8(out, patch_size, temporal_patch_size, merge_size)


def _check_frames(frames) -> None:
    if isinstance(frames, np.ndarray):
        if frames.ndim != 4 or frames.shape[-1] != 3:
            raise ValueError(f"video array has shape {frames.shape}; expected (T, H, W, 3), channels last")
        if frames.dtype != np.uint8:
            raise ValueError(f"video array has dtype {frames.dtype}; give uint8 values in 0..255")
    elif not isinstance(frames, (list, tuple)):
        raise ValueError(f"cannot read a video from a {type(frames).__name__}; give a video file path, a "
                         "(T, H, W, 3) uint8 array or a list of images")


__all__ = ["preprocess_video", "read_video", "probe_video", "video_header", "sample_frame_count",
           "sample_frame_indices", "clip_range", "frame_budget", "frame_indices", "frame_size", "pixels_from_uint8",
           "VIDEO_MIN_PIXELS", "VIDEO_MAX_PIXELS", "VIDEO_TOTAL_PIXELS", "FPS"]
