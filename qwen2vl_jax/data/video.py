"""Videos: frame sampling and per-video pixel budgets with the qwen-vl-utils defaults, then the reference
processor's video path (docs/design.md, "Image and video processing"): one `smart_resize` for all frames,
PIL bicubic on uint8, CLIP normalisation, odd frame counts padded with the last frame, frames 2k and 2k+1 in
temporal patch k.

The reference for the pixels is the PIL ("slow") path of transformers 4.57 (`Qwen2VLImageProcessor(videos=...)`);
its torchvision video processor resizes with antialiased bicubic and cannot be bit-identical to any PIL resize.
Video files (mp4, webm, ...) are decoded with PyAV when it is installed (`pip install av`).
"""

from __future__ import annotations

import io
import math
import os

import numpy as np

from qwen2vl_jax import storage

from qwen2vl_jax.data.image import (IMAGE_MAX_PIXELS, IMAGE_MIN_PIXELS, MERGE_SIZE, PATCH_SIZE,
                                    TEMPORAL_PATCH_SIZE, load_image, normalize, patchify, resize_frames,
                                    smart_resize)

# qwen-vl-utils defaults (Qwen2-VL release). Its later versions raised VIDEO_TOTAL_PIXELS to 128000*28*28*0.9.
VIDEO_MIN_PIXELS = 128 * 28 * 28                    # 100,352 per frame
VIDEO_MAX_PIXELS = 768 * 28 * 28                    # 602,112 per frame
VIDEO_TOTAL_PIXELS = 24576 * 28 * 28                # per video: at most 24,576 merged tokens
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


def sample_frame_indices(total_frames: int, n: int) -> np.ndarray:
    """n indices spread evenly over [0, total-1], rounded (qwen-vl-utils: `linspace(...).round()`)."""
    return np.rint(np.linspace(0, total_frames - 1, n)).astype(np.int64)


def frame_budget(nframes: int, min_pixels: int, max_pixels: int, total_pixels: int | None) -> int:
    """Per-frame max pixels so the whole video stays within `total_pixels` (qwen-vl-utils `fetch_video`),
    never below 1.05 * min_pixels and never above `max_pixels`."""
    if total_pixels is None:
        return max_pixels
    budget = max(min(max_pixels, total_pixels / nframes * FRAME_FACTOR), int(min_pixels * 1.05))
    return min(max_pixels, budget)


def read_video(path: str | bytes, indices=None) -> tuple[np.ndarray, float]:
    """Decode a video file (or its bytes, as embedded in a data shard) with PyAV: (T, H, W, 3) uint8 frames
    (only `indices`, if given) and its frame rate."""
    av = _import_av(_name(path))
    total, fps = probe_video(path)
    keep = None if indices is None else {int(i) for i in indices}
    frames = []
    try:
        with _av_open(av, path) as container:
            for i, frame in enumerate(container.decode(video=0)):
                if keep is None or i in keep:
                    frames.append(frame.to_ndarray(format="rgb24"))
    except av.error.FFmpegError as e:
        raise ValueError(f"{_name(path)}: unreadable video ({e})") from None
    if keep is not None and len(frames) < len(keep):
        raise ValueError(f"{_name(path)}: {total} frames were demuxed but fewer decoded; re-encode the video")
    return (np.stack(frames) if frames else np.zeros((0, 0, 0, 3), np.uint8)), fps


def probe_video(path: str | bytes) -> tuple[int, float]:
    """(frame count, frames per second) of a video file, object or its bytes. Frames are counted by demuxing,
    not read from the header, because container headers often hold estimates."""
    name = _name(path)
    if not isinstance(path, (bytes, bytearray)) and not storage.isfile(path):
        raise ValueError(f"video file not found: {path}")
    av = _import_av(name)
    try:
        with _av_open(av, path) as container:
            if not container.streams.video:
                raise ValueError(f"{name}: no video stream in this file")
            stream = container.streams.video[0]
            fps = float(stream.average_rate or stream.guessed_rate or 0)
            total = sum(1 for packet in container.demux(stream) if packet.size)
    except av.error.FFmpegError as e:
        raise ValueError(f"{name}: unreadable video ({e})") from None
    return total, fps


def _av_open(av, path):
    """The same decoder reads a file, its embedded bytes (shards) and a URL's object (through a seekable file
    object: ranged reads, not a local copy), so all give the same frames."""
    if isinstance(path, (bytes, bytearray)):
        return av.open(io.BytesIO(bytes(path)))
    return av.open(storage.open(path, "rb") if storage.is_url(path) else path)


def _name(path) -> str:
    return "video bytes" if isinstance(path, (bytes, bytearray)) else str(path)


def _import_av(path: str):
    try:
        import av
    except ImportError:
        raise ValueError(f"{path}: decoding video files needs PyAV (pip install av, or the 'video' extra); "
                         "or give the frames as a (T, H, W, 3) uint8 array or a list of images") from None
    return av


def preprocess_video(frames, min_pixels: int = VIDEO_MIN_PIXELS, max_pixels: int = VIDEO_MAX_PIXELS,
                     total_pixels: int | None = VIDEO_TOTAL_PIXELS, *, fps: float | None = None,
                     nframes: int | None = None, video_fps: float | None = None,
                     min_frames: int = FPS_MIN_FRAMES, max_frames: int = FPS_MAX_FRAMES,
                     resized_height: int | None = None, resized_width: int | None = None,
                     patch_size: int = PATCH_SIZE, merge_size: int = MERGE_SIZE,
                     temporal_patch_size: int = TEMPORAL_PATCH_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """One video -> `pixel_values_videos` (t*h*w, 1176) float32 and `grid_thw` [[t, h, w]] int64.

    `frames`: a (T, H, W, 3) uint8 array, a list of images (paths, PIL images, arrays), or a video file path or its
    bytes (decoded with PyAV, sampled at `fps`=2 unless `nframes` is given). Arrays and lists are used as given unless
    `fps` (with `video_fps`) or `nframes` asks for sampling. `total_pixels` caps the whole video (None: no cap);
    `resized_height`/`resized_width` fix the frame size (still rounded to multiples of 28).
    """
    if isinstance(frames, (str, os.PathLike, bytes, bytearray)):
        path = frames if isinstance(frames, (bytes, bytearray)) else os.fspath(frames)
        total, file_fps = probe_video(path)
        if total == 0:
            raise ValueError(f"{_name(path)}: video has zero frames")
        n = sample_frame_count(total, video_fps or file_fps, fps, nframes, min_frames, max_frames)
        frames = read_video(path, sample_frame_indices(total, n))[0]
    else:
        _check_frames(frames)
        if len(frames) and (fps is not None or nframes is not None):
            n = sample_frame_count(len(frames), video_fps, fps, nframes, min_frames, max_frames)
            frames = [frames[i] for i in sample_frame_indices(len(frames), n)]
    if len(frames) == 0:
        raise ValueError("video has zero frames; give at least one frame")
    pil = [load_image(f) for f in frames]
    factor = patch_size * merge_size
    if resized_height is not None and resized_width is not None:
        h, w = smart_resize(resized_height, resized_width, factor, IMAGE_MIN_PIXELS, IMAGE_MAX_PIXELS)
    else:
        # One size for every frame, from the first (as the reference); later frames of another size are resized
        # to it.
        budget = frame_budget(len(pil), min_pixels, max_pixels, total_pixels)
        h, w = smart_resize(pil[0].height, pil[0].width, factor, min_pixels, budget)
    return patchify(normalize(resize_frames(pil, h, w)), patch_size, temporal_patch_size, merge_size)


def _check_frames(frames) -> None:
    if isinstance(frames, np.ndarray):
        if frames.ndim != 4 or frames.shape[-1] != 3:
            raise ValueError(f"video array has shape {frames.shape}; expected (T, H, W, 3), channels last")
        if frames.dtype != np.uint8:
            raise ValueError(f"video array has dtype {frames.dtype}; give uint8 values in 0..255")
    elif not isinstance(frames, (list, tuple)):
        raise ValueError(f"cannot read a video from a {type(frames).__name__}; give a (T, H, W, 3) uint8 array, "
                         "a list of images, or a video file path")


__all__ = ["preprocess_video", "read_video", "probe_video", "sample_frame_count", "sample_frame_indices",
           "frame_budget", "VIDEO_MIN_PIXELS", "VIDEO_MAX_PIXELS", "VIDEO_TOTAL_PIXELS", "FPS"]
