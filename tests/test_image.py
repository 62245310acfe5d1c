"""Images and videos against the reference: transformers 4.57.6 `Qwen2VLImageProcessor` (PIL path) and its
`smart_resize`; hygiene and sampling against hand-computed cases."""

import io
import math
import sys

import numpy as np
import pytest
from PIL import Image

from qwen2vl_jax.data.image import (IMAGE_MAX_PIXELS, IMAGE_MIN_PIXELS, load_image, preprocess_image,
                                    smart_resize)
from qwen2vl_jax.data.video import (VIDEO_MAX_PIXELS, VIDEO_MIN_PIXELS, frame_budget, preprocess_video,
                                    sample_frame_count, sample_frame_indices)

hf_image = pytest.importorskip("transformers.models.qwen2_vl.image_processing_qwen2_vl")
CLASS_MAX_PIXELS = 28 * 28 * 1280   # the reference class default (the hub config says 12,845,056)


def reference(images=None, videos=None, min_pixels=IMAGE_MIN_PIXELS, max_pixels=IMAGE_MAX_PIXELS):
    proc = hf_image.Qwen2VLImageProcessor(min_pixels=min_pixels, max_pixels=max_pixels)
    # channels_last stops the reference from guessing: it misreads 1- and 3-pixel-high images as channels-first.
    return proc.preprocess(images=images, videos=videos, input_data_format="channels_last")


def random_image(rng, h, w):
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


# -- smart_resize ----------------------------------------------------------------------------------------------

def test_smart_resize_matches_reference_on_random_sizes():
    rng = np.random.default_rng(0)
    budgets = [(IMAGE_MIN_PIXELS, IMAGE_MAX_PIXELS), (IMAGE_MIN_PIXELS, CLASS_MAX_PIXELS),
               (VIDEO_MIN_PIXELS, VIDEO_MAX_PIXELS), (4 * 28 * 28, 256 * 28 * 28)]
    sides = np.concatenate([rng.integers(1, 60, 600), rng.integers(1, 6000, 2400)])
    checked = errors = 0
    for i in range(len(sides)):
        h, w = int(sides[i]), int(rng.choice(sides))
        lo, hi = budgets[i % len(budgets)]
        try:
            expected = hf_image.smart_resize(h, w, 28, lo, hi)
        except ValueError:
            with pytest.raises(ValueError, match="aspect ratio must be smaller than 200"):
                smart_resize(h, w, 28, lo, hi)
            errors += 1
            continue
        assert smart_resize(h, w, 28, lo, hi) == expected, (h, w, lo, hi)
        checked += 1
    assert checked > 2500 and errors > 20


def test_smart_resize_matches_reference_on_every_small_size():
    # Sides under 28 are where rounding hits zero and the min-pixel branch takes over.
    for lo, hi in ((IMAGE_MIN_PIXELS, IMAGE_MAX_PIXELS), (VIDEO_MIN_PIXELS, VIDEO_MAX_PIXELS), (784, 3136)):
        for h in range(1, 121):
            for w in range(1, 121):
                assert smart_resize(h, w, 28, lo, hi) == hf_image.smart_resize(h, w, 28, lo, hi), (h, w, lo, hi)


@pytest.mark.parametrize("hw, class_default, hub", [  # examples observed on the reference
    ((70, 100), (56, 112), (56, 112)), ((42, 42), (56, 56), (56, 56)), ((14, 14), (56, 56), (56, 56)),
    ((224, 224), (224, 224), (224, 224)), ((1080, 1920), (728, 1316), (1092, 1932)),
    ((4000, 3000), (1148, 840), (4004, 2996)), ((5000, 5000), (980, 980), (3556, 3556)),
    ((50, 1400), (56, 1400), (56, 1400)), ((10, 2000), (28, 812), (28, 812))])
def test_smart_resize_reference_examples(hw, class_default, hub):
    assert smart_resize(*hw, max_pixels=CLASS_MAX_PIXELS) == class_default
    assert smart_resize(*hw) == hub


@pytest.mark.parametrize("hw", [(1, 1000), (1000, 1), (10, 2010)])
def test_aspect_ratio_over_200_raises_like_reference(hw):
    with pytest.raises(ValueError, match="absolute aspect ratio must be smaller than 200"):
        hf_image.smart_resize(*hw)
    with pytest.raises(ValueError, match=r"absolute aspect ratio must be smaller than 200, got .* crop or pad"):
        smart_resize(*hw)
    with pytest.raises(ValueError, match="absolute aspect ratio"):
        preprocess_image(np.zeros((*hw, 3), np.uint8))


# -- preprocess_image --------------------------------------------------------------------------------------------

SIZES = [(1, 1), (1, 200), (200, 1), (3, 300), (5, 1000), (1000, 5), (13, 17), (27, 29), (28, 28), (41, 43),
         (70, 100), (100, 70), (224, 224), (333, 500), (97, 1400), (640, 480)]


def test_preprocess_image_bit_exact_with_reference():
    rng = np.random.default_rng(1)
    sizes = SIZES + [tuple(int(s) for s in rng.integers(1, 400, 2)) for _ in range(24)]
    worst = 0.0
    for h, w in sizes:
        if max(h, w) / min(h, w) > 200:
            continue
        image = random_image(rng, h, w)
        ref = reference([image])
        pixels, grid = preprocess_image(image)
        np.testing.assert_array_equal(grid, ref["image_grid_thw"], err_msg=str((h, w)))
        assert pixels.dtype == np.float32 and grid.dtype == np.int64
        assert pixels.shape == ref["pixel_values"].shape
        worst = max(worst, float(np.abs(pixels - ref["pixel_values"]).max()))
    assert worst == 0.0


@pytest.mark.parametrize("min_pixels, max_pixels", [(IMAGE_MIN_PIXELS, CLASS_MAX_PIXELS), (28 * 28, 64 * 28 * 28),
                                                    (256 * 28 * 28, 512 * 28 * 28)])
def test_preprocess_image_pixel_budgets_match_reference(min_pixels, max_pixels):
    image = random_image(np.random.default_rng(2), 1300, 900)
    ref = reference([image], min_pixels=min_pixels, max_pixels=max_pixels)
    pixels, grid = preprocess_image(image, min_pixels, max_pixels)
    np.testing.assert_array_equal(grid, ref["image_grid_thw"])
    np.testing.assert_array_equal(pixels, ref["pixel_values"])


def test_patch_layout_by_hand():
    # One 56x56 image: row (bh, bw, mh, mw) covers pixels ((2bh+mh)*14.., (2bw+mw)*14..), columns (c, t, py, px).
    a = np.random.default_rng(3).integers(0, 256, (56, 56, 3), dtype=np.uint8)
    pixels, grid = preprocess_image(a)
    assert grid.tolist() == [[1, 4, 4]]
    x = ((a.astype(np.float64) / 255).astype(np.float32) - np.float32([0.48145466, 0.4578275, 0.40821073])) \
        / np.float32([0.26862954, 0.26130258, 0.27577711])
    row = 3                               # block (0, 0), in-block (1, 1) -> pixels [14:28, 14:28]
    cols = pixels[row].reshape(3, 2, 14, 14)
    np.testing.assert_array_equal(cols[:, 0], x[14:28, 14:28].transpose(2, 0, 1))
    np.testing.assert_array_equal(cols[:, 1], cols[:, 0])    # an image is two identical temporal slices
    right = pixels[4].reshape(3, 2, 14, 14)[:, 0]            # block (0, 1), in-block (0, 0) -> [0:14, 28:42]
    np.testing.assert_array_equal(right, x[0:14, 28:42].transpose(2, 0, 1))
    below = pixels[8].reshape(3, 2, 14, 14)[:, 0]            # block (1, 0), in-block (0, 0) -> [28:42, 0:14]
    np.testing.assert_array_equal(below, x[28:42, 0:14].transpose(2, 0, 1))


# -- hygiene -----------------------------------------------------------------------------------------------------

def encode(image: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kw)
    return buf.getvalue()


def test_exif_orientation_is_applied():
    a = np.random.default_rng(4).integers(0, 256, (30, 50, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6                      # "rotate 90 CW to view"
    raw = encode(Image.fromarray(a), "PNG", exif=exif)
    upright = load_image(raw)
    assert upright.size == (30, 50)       # width and height swap
    np.testing.assert_array_equal(np.asarray(upright), np.rot90(a, k=-1))


def test_transparency_is_composited_onto_white():
    rgba = np.zeros((28, 28, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:, :14, 3] = 255                 # left half opaque red-ish, right half fully transparent
    rgb = np.asarray(load_image(Image.fromarray(rgba, "RGBA")))
    assert (rgb[:, :14] == [200, 0, 0]).all() and (rgb[:, 14:] == 255).all()
    la = np.asarray(load_image(Image.fromarray(rgba[..., [0, 3]], "LA")))
    assert (la[:, :14] == 200).all() and (la[:, 14:] == 255).all()
    palette = Image.fromarray(rgba, "RGBA").convert("P")  # palette image whose transparency lives in info
    palette.info["transparency"] = palette.getpixel((20, 0))
    assert (np.asarray(load_image(palette))[:, 14:] == 255).all()


def test_grey_cmyk_and_16_bit_become_rgb():
    grey = np.random.default_rng(5).integers(0, 256, (20, 20), dtype=np.uint8)
    np.testing.assert_array_equal(np.asarray(load_image(Image.fromarray(grey, "L"))), np.repeat(grey[..., None], 3, -1))
    cmyk = Image.new("CMYK", (8, 8), (0, 255, 255, 0))      # pure red in CMYK
    assert (np.asarray(load_image(cmyk)) == [255, 0, 0]).all()
    deep = Image.open(io.BytesIO(encode(Image.fromarray(grey.astype(np.uint16) * 257), "PNG")))
    np.testing.assert_array_equal(np.asarray(load_image(deep))[..., 0], grey)   # 16-bit scaled, not clipped


def test_decompression_bomb_limit_is_kept(monkeypatch):
    raw = encode(Image.new("RGB", (100, 100)), "PNG")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100 * 100 // 4)
    with pytest.raises(ValueError, match="decompression bomb.*MAX_IMAGE_PIXELS"):
        load_image(raw)


def test_unreadable_images_raise_clear_errors(tmp_path):
    jpeg = encode(Image.fromarray(np.full((64, 64, 3), 128, np.uint8)), "JPEG")
    (tmp_path / "cut.jpg").write_bytes(jpeg[:len(jpeg) // 2])
    (tmp_path / "text.png").write_bytes(b"this is not an image\n")
    with pytest.raises(ValueError, match=r"cut\.jpg: truncated or corrupt image"):
        preprocess_image(str(tmp_path / "cut.jpg"))
    with pytest.raises(ValueError, match=r"text\.png: not an image"):
        preprocess_image(str(tmp_path / "text.png"))
    with pytest.raises(ValueError, match="image file not found: .*missing.png"):
        preprocess_image(str(tmp_path / "missing.png"))
    with pytest.raises(ValueError, match="dtype float32; give uint8"):
        preprocess_image(np.zeros((28, 28, 3), np.float32))


# -- videos --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("frames, h, w", [(1, 40, 60), (4, 64, 80), (5, 64, 80), (7, 30, 200)])
def test_preprocess_video_bit_exact_with_reference_video_path(frames, h, w):
    # Reference: the 4.57 PIL processor's video path (`videos=`), which pads odd frame counts like the video one.
    video = np.random.default_rng(frames).integers(0, 256, (frames, h, w, 3), dtype=np.uint8)
    ref = reference(videos=[video], min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 30)
    pixels, grid = preprocess_video(video, 28 * 28 * 4, 28 * 28 * 30, total_pixels=None)
    assert grid[0, 0] == math.ceil(frames / 2)
    np.testing.assert_array_equal(grid, ref["video_grid_thw"])
    np.testing.assert_array_equal(pixels, ref["pixel_values_videos"])
    listed, _ = preprocess_video([Image.fromarray(f) for f in video], 28 * 28 * 4, 28 * 28 * 30, total_pixels=None)
    np.testing.assert_array_equal(listed, pixels)


def test_video_frames_fill_temporal_slots_in_order():
    video = np.zeros((3, 28, 28, 3), np.uint8)
    video[1], video[2] = 100, 200
    pixels, grid = preprocess_video(video, 28 * 28, 28 * 28, total_pixels=None)
    assert grid.tolist() == [[2, 2, 2]]
    t = pixels.reshape(2, 4, 3, 2, 196)[:, 0, 0, :, 0]        # (temporal patch, slot): first value, red channel
    levels = ((np.float32([0, 100, 200]) / np.float32(255) - np.float32(0.48145466)) / np.float32(0.26862954))
    np.testing.assert_allclose(t, [[levels[0], levels[1]], [levels[2], levels[2]]], rtol=1e-6)  # last repeated


def test_frame_sampling_follows_qwen_vl_utils():
    assert sample_frame_count(300, video_fps=30.0) == 20                  # 10 s at 2 fps
    assert sample_frame_count(30, video_fps=30.0) == 4                    # 1 s -> min 4 frames
    assert sample_frame_count(5, video_fps=30.0) == 4                     # fewer than min: all (even)
    assert sample_frame_count(30000, video_fps=1.0) == 768                # max frames
    assert sample_frame_count(100, nframes=9) == 8                        # round(9 / 2) * 2, half to even
    assert sample_frame_indices(10, 4).tolist() == [0, 3, 6, 9]
    with pytest.raises(ValueError, match="either fps or nframes"):
        sample_frame_count(10, 30.0, fps=1.0, nframes=4)
    with pytest.raises(ValueError, match="needs its frame rate"):
        preprocess_video(np.zeros((10, 28, 28, 3), np.uint8), fps=2.0)
    with pytest.raises(ValueError, match="cannot sample 12 frames from a video of 10"):
        sample_frame_count(10, nframes=12)


def test_video_pixel_budget():
    # 24576*28*28 total over 64 frames -> 768*28*28 per pair of frames; capped by max_pixels, floored by min*1.05.
    assert frame_budget(64, VIDEO_MIN_PIXELS, VIDEO_MAX_PIXELS, 24576 * 28 * 28) == VIDEO_MAX_PIXELS
    assert frame_budget(256, VIDEO_MIN_PIXELS, VIDEO_MAX_PIXELS, 24576 * 28 * 28) == 192 * 28 * 28
    assert frame_budget(4096, VIDEO_MIN_PIXELS, VIDEO_MAX_PIXELS, 24576 * 28 * 28) == int(VIDEO_MIN_PIXELS * 1.05)
    video = np.zeros((16, 224, 224, 3), np.uint8)
    _, grid = preprocess_video(video[:8])  # 224*224 is under the 128*28*28 per-frame floor: up to 336x336
    assert grid.tolist() == [[4, 24, 24]]
    # 16 frames sharing 64 merged tokens' worth of pixels: 6272 per frame -> 56x56 by hand (smart_resize step 3).
    _, grid = preprocess_video(video, min_pixels=28 * 28, total_pixels=64 * 28 * 28)
    assert grid.tolist() == [[8, 4, 4]]


def test_zero_frame_video_raises():
    with pytest.raises(ValueError, match="zero frames"):
        preprocess_video(np.zeros((0, 28, 28, 3), np.uint8))
    with pytest.raises(ValueError, match="zero frames"):
        preprocess_video([])


def test_video_file_without_pyav_says_what_to_install(tmp_path, monkeypatch):
    (tmp_path / "clip.mp4").write_bytes(b"\0" * 64)
    monkeypatch.setitem(sys.modules, "av", None)         # import av now raises ImportError
    with pytest.raises(ValueError, match=r"clip\.mp4: decoding video files needs PyAV: pip install av"):
        preprocess_video(str(tmp_path / "clip.mp4"))
    with pytest.raises(ValueError, match="video file not found: .*gone.mp4"):
        preprocess_video(str(tmp_path / "gone.mp4"))


@pytest.mark.parametrize("name, codec", [("clip.mp4", "mpeg4"), ("clip.webm", "libvpx-vp9")])
def test_video_file_decoding_with_pyav(tmp_path, name, codec):
    av = pytest.importorskip("av")   # PyAV is the optional `video` extra, not installed by the test extra
    # The test writes its clip first; some PyAV wheels ship without one of these encoders (decoding is
    # what is under test, so there is nothing to check without a file to decode).
    if codec not in av.codecs_available:
        pytest.skip(f"this PyAV build has no {codec} encoder")
    frames = np.repeat(np.arange(30, dtype=np.uint8)[:, None, None, None] * 8, 64 * 96 * 3).reshape(30, 64, 96, 3)
    path = str(tmp_path / name)
    with av.open(path, "w") as container:
        stream = container.add_stream(codec, rate=10)
        stream.width, stream.height, stream.pix_fmt = 96, 64, "yuv420p"
        for f in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        container.mux(stream.encode())
    pixels, grid = preprocess_video(path, min_pixels=28 * 28, max_pixels=64 * 96)
    assert grid.tolist() == [[3, 4, 6]]                 # 3 s at 10 fps, sampled at 2 fps -> 6 frames
    first = pixels.reshape(3, 24, 3, 2, 196)[:, 0, 0, :, 0] * 0.26862954 + 0.48145466
    np.testing.assert_allclose(first.ravel() * 255, np.array([0, 6, 12, 17, 23, 29]) * 8, atol=6)
