"""Images: loading with the hygiene the reference leaves to users, `smart_resize`, and the PIL path of the
reference image processor (docs/design.md, "Image and video processing"), reproduced bit for bit.

Every failure a user can cause raises `ValueError` with what was wrong and what to do; the record reader adds
the file and line.
"""

from __future__ import annotations

import base64
import contextlib
import io
import math
import os

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from qwen2vl_jax import storage

PATCH_SIZE = 14
TEMPORAL_PATCH_SIZE = 2
MERGE_SIZE = 2
FACTOR = PATCH_SIZE * MERGE_SIZE                    # 28: resized sides are multiples of this
IMAGE_MIN_PIXELS = 56 * 56                          # 3136
IMAGE_MAX_PIXELS = 16384 * 28 * 28                  # 12,845,056: the hub preprocessor_config
MAX_ASPECT_RATIO = 200
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

_EXIF_ORIENTATION = 0x0112


def smart_resize(height: int, width: int, factor: int = FACTOR, min_pixels: int = IMAGE_MIN_PIXELS,
                 max_pixels: int = IMAGE_MAX_PIXELS) -> tuple[int, int]:
    """(height, width) rounded to multiples of `factor` with the pixel count in [min_pixels, max_pixels],
    exactly as the reference (Python's half-to-even `round`, no clamp before the budget checks)."""
    if height < 1 or width < 1:
        raise ValueError(f"image of {height}x{width} pixels (height x width) is empty")
    ratio = max(height, width) / min(height, width)
    if ratio > MAX_ASPECT_RATIO:
        raise ValueError(f"absolute aspect ratio must be smaller than {MAX_ASPECT_RATIO}, got {ratio} "
                         f"(image of {height}x{width} pixels, height x width); crop or pad it first")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    if h_bar < factor or w_bar < factor:
        # Only reachable with min_pixels < factor**2, where the reference would resize to an empty image.
        raise ValueError(f"image of {height}x{width} pixels resizes to {h_bar}x{w_bar} with min_pixels={min_pixels}; "
                         f"use min_pixels >= {factor * factor}")
    return h_bar, w_bar


# -- loading and colour hygiene ----------------------------------------------------------------------------

def load_image(source) -> Image.Image:
    """An upright RGB PIL image from a path, a URL of a store (gs://, s3://, ...), `file://` URI, base64 `data:`
    URI, raw bytes, PIL image, or a uint8 array (H, W), (H, W, 3) or (H, W, 4)."""
    if isinstance(source, Image.Image):
        return to_rgb(source)
    if isinstance(source, np.ndarray):
        return to_rgb(_from_array(source))
    if isinstance(source, (bytes, bytearray, memoryview)):
        return _open(io.BytesIO(bytes(source)), "image bytes")
    if isinstance(source, (str, os.PathLike)):
        name = os.fspath(source)
        if name.startswith("data:"):
            try:
                raw = base64.b64decode(name.partition("base64,")[2], validate=True)
            except ValueError as e:
                raise ValueError(f"data: URI is not valid base64 ({e})") from None
            return _open(io.BytesIO(raw), "data: URI")
        if name.startswith(("http://", "https://")):
            raise ValueError(f"{name}: URLs are not fetched; download the image and give its path")
        if name.startswith("file://"):
            name = name[len("file://"):]
        with open_image_file(name) as f:
            return _open(f, name)
    raise ValueError(f"cannot read an image from a {type(source).__name__}; give a path, bytes, a PIL image "
                     "or a uint8 array")


@contextlib.contextmanager
def open_image_file(name: str, whole: bool = True):
    """A local image file or a store's object (gs://, ...), opened for reading, with a missing or unreadable
    file worded for the user as a ValueError. An object is fetched in one read when `whole` (decoding needs
    all the bytes anyway), else read by ranges as the reader seeks (a header)."""
    try:
        if storage.is_url(name):
            f = io.BytesIO(storage.read_bytes(name)) if whole else storage.open(name, "rb")
        else:
            f = open(name, "rb")
    except FileNotFoundError:   # storage.ObjectNotFound included
        raise ValueError(f"image file not found: {name}") from None
    except IsADirectoryError:
        raise ValueError(f"image path is a directory, not a file: {name}") from None
    except PermissionError:
        raise ValueError(f"image file not readable (permission denied): {name}") from None
    with f:
        yield f


def _open(fp, name: str) -> Image.Image:
    try:
        image = Image.open(fp)
        image.load()  # decode now, so truncation surfaces here and not inside the resize
    except UnidentifiedImageError:
        raise ValueError(f"{name}: not an image (Pillow recognises no image format in these bytes)") from None
    except Image.DecompressionBombError as e:
        # Pillow's limit is kept on purpose: a tiny file can decode to gigabytes.
        raise ValueError(f"{name}: refused as a possible decompression bomb ({e}); if the file is trusted, "
                         "raise PIL.Image.MAX_IMAGE_PIXELS") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ValueError(f"{name}: truncated or corrupt image ({e})") from None
    return to_rgb(image)


def _from_array(a: np.ndarray) -> Image.Image:
    if a.dtype != np.uint8:
        raise ValueError(f"image array has dtype {a.dtype}; give uint8 values in 0..255")
    if a.ndim == 2 or (a.ndim == 3 and a.shape[-1] in (3, 4)):
        return Image.fromarray(np.ascontiguousarray(a))
    raise ValueError(f"image array has shape {a.shape}; expected (H, W), (H, W, 3) or (H, W, 4), channels last")


def to_rgb(image: Image.Image) -> Image.Image:
    """EXIF orientation applied, transparency composited onto white (as transformers 5.x; 4.57 drops alpha),
    16-bit and float modes scaled to 8 bits, every other mode (L, 1, P, CMYK, YCbCr, ...) converted to RGB."""
    if image.getexif().get(_EXIF_ORIENTATION, 1) not in (0, 1):
        image = ImageOps.exif_transpose(image)
    mode = image.mode
    if mode == "RGB":
        return image
    if mode.startswith("I;16") or mode == "I":
        # 16-bit grey: map 0..65535 onto 0..255 (PIL's convert would clip everything above 255 to white).
        a = np.asarray(image).astype(np.float64) / 257.0
        return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8)).convert("RGB")
    if mode == "F":
        a = np.asarray(image, np.float64)
        a = a * 255.0 if a.size and np.nanmax(a) <= 1.0 else a
        return Image.fromarray(np.clip(np.rint(np.nan_to_num(a)), 0, 255).astype(np.uint8)).convert("RGB")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


# -- the reference pipeline ----------------------------------------------------------------------------------

def resize_frames(frames: list[Image.Image], height: int, width: int) -> np.ndarray:
    """(T, height, width, 3) uint8: PIL bicubic on the 8-bit image, as the reference PIL path."""
    out = np.empty((len(frames), height, width, 3), np.uint8)
    for i, f in enumerate(frames):
        out[i] = np.asarray(f.resize((width, height), Image.Resampling.BICUBIC))
    return out


def normalize(frames: np.ndarray, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD) -> np.ndarray:
    """uint8 -> float32 in the reference's exact arithmetic: x * (1/255) in float64, cast to float32, then
    (x - mean) / std in float32, as the reference's PIL path."""
    x = (frames.astype(np.float64) * (1 / 255)).astype(np.float32)
    return (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


def patchify(frames: np.ndarray, patch_size: int = PATCH_SIZE, temporal_patch_size: int = TEMPORAL_PATCH_SIZE,
             merge_size: int = MERGE_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """(T, H, W, C) float32 -> pixel rows (t*h*w, C*tp*p*p) and grid [[t, h, w]] (row and column order:
    docs/design.md, "Image and video processing").

    A frame count that is not a multiple of `temporal_patch_size` is padded by repeating the last frame; that is
    also how a single image becomes two identical temporal slices."""
    T, H, W, C = frames.shape
    if T % temporal_patch_size:
        pad = np.repeat(frames[-1:], temporal_patch_size - T % temporal_patch_size, axis=0)
        frames = np.concatenate([frames, pad])
    gt, gh, gw = frames.shape[0] // temporal_patch_size, H // patch_size, W // patch_size
    m, p = merge_size, patch_size
    x = frames.reshape(gt, temporal_patch_size, gh // m, m, p, gw // m, m, p, C)
    # rows (t, block_h, block_w, in_h, in_w), columns (c, tp, py, px)
    x = x.transpose(0, 2, 5, 3, 6, 8, 1, 4, 7)
    rows = x.reshape(gt * gh * gw, C * temporal_patch_size * p * p)
    return np.ascontiguousarray(rows, np.float32), np.array([[gt, gh, gw]], np.int64)


def preprocess_image(image, min_pixels: int = IMAGE_MIN_PIXELS, max_pixels: int = IMAGE_MAX_PIXELS,
                     *, resized_height: int | None = None, resized_width: int | None = None,
                     patch_size: int = PATCH_SIZE, merge_size: int = MERGE_SIZE,
                     temporal_patch_size: int = TEMPORAL_PATCH_SIZE, mean=OPENAI_CLIP_MEAN,
                     std=OPENAI_CLIP_STD) -> tuple[np.ndarray, np.ndarray]:
    """One image -> `pixel_values` (h*w, 1176) float32 and `grid_thw` [[1, h, w]] int64, equal to the reference
    PIL-path processor (transformers 4.57 `Qwen2VLImageProcessor`) for RGB input.

    `resized_height`/`resized_width` ask for a size (rounded to multiples of 28 as qwen-vl-utils does) instead
    of the min/max pixel budget."""
    pil = load_image(image)
    factor = patch_size * merge_size
    try:
        if resized_height is not None and resized_width is not None:
            h, w = smart_resize(resized_height, resized_width, factor, IMAGE_MIN_PIXELS, IMAGE_MAX_PIXELS)
        else:
            h, w = smart_resize(pil.height, pil.width, factor, min_pixels, max_pixels)
    except ValueError as e:
        if isinstance(image, (str, os.PathLike)):  # name the file; smart_resize only knows the size
            raise ValueError(f"{describe(image)}: {e}") from None
        raise
    frames = normalize(resize_frames([pil], h, w), mean, std)
    return patchify(frames, patch_size, temporal_patch_size, merge_size)


def describe(source) -> str:
    """A short name for an image or video source in error messages."""
    if isinstance(source, (str, os.PathLike)):
        name = os.fspath(source)
        return "data: URI" if name.startswith("data:") else name
    if isinstance(source, np.ndarray):
        return f"array of shape {source.shape}"
    return type(source).__name__
