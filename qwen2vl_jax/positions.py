"""Host-side (numpy) position maths shared by the data pipeline and the model's HF-style entry point.

- `rope_index`: the LLM's 3-stream M-RoPE position ids, original Qwen convention (docs/design.md, "Position ids").
- `vision_patch_positions`: the ViT's 2D (h, w) rotary positions per patch row.
- `vision_patch_segments`: one attention segment per image and per temporal slice.
- `vision_window_index`: the window order of a windowed ViT (Qwen2.5-VL) and its window segments.
"""

from __future__ import annotations

import numpy as np


def _as_grid(grid) -> np.ndarray:
    if grid is None:
        return np.zeros((0, 3), np.int64)
    return np.asarray(grid, np.int64).reshape(-1, 3)


def rope_index(config, input_ids, image_grid_thw=None, video_grid_thw=None, attention_mask=None,
               second_per_grid_ts=None):
    """M-RoPE position ids `(3, B, L)` and `rope_deltas` `(B,)`, as transformers 4.57 `get_rope_index`.

    Tokens with `attention_mask == 0` (left or right padding) get position 1, as in the reference; they are
    masked out of attention. Grids are consumed in order of appearance across the whole batch (row-major).
    `rope_deltas[b] = max(positions[:, b]) + 1 - L`, so decode step k of row b uses `L + k + rope_deltas[b]`.

    A family with absolute time (`vision.tokens_per_second` set: Qwen2.5-VL) places temporal patch k of a
    video at `k * second_per_grid_t * tokens_per_second` (`second_per_grid_ts`: one entry per video, default
    1.0) and every image patch at time 0. As transformers 4.57, `second_per_grid_t` is truncated to an integer
    before the product (0.5 s, i.e. 4 fps with 2-frame patches, gives time 0 throughout).

    A family that writes video time as text (Qwen3-VL) has one span per temporal patch, each at time 0
    (`frame_spans`); pass its `video_grid_thw` per video, as the processor gives it.
    """
    ids = np.asarray(input_ids)
    if ids.ndim == 1:
        ids = ids[None]
    B, L = ids.shape
    mask = np.ones_like(ids, bool) if attention_mask is None else np.asarray(attention_mask).reshape(B, L).astype(bool)
    images, videos = _as_grid(image_grid_thw), frame_spans(config, video_grid_thw)
    if len(images) == 0 and len(videos) == 0:
        pos = np.cumsum(mask, axis=-1) - 1
        pos = np.where(mask, pos, 1)
        deltas = pos.max(-1) + 1 - L
        return np.broadcast_to(pos, (3, B, L)).astype(np.int32).copy(), deltas.astype(np.int32)

    m = config.vision.spatial_merge_size
    tps = config.vision.tokens_per_second
    seconds = None if second_per_grid_ts is None else np.asarray(second_per_grid_ts, np.float64).reshape(-1)
    if seconds is not None and len(seconds) != len(videos):
        raise ValueError(f"second_per_grid_ts has {len(seconds)} entries for {len(videos)} videos")
    positions = np.ones((3, B, L), np.int64)
    deltas = np.zeros(B, np.int64)
    image_i = video_i = 0
    for b in range(B):
        tokens = ids[b][mask[b]]
        starts = np.flatnonzero(tokens[:-1] == config.vision_start_token_id)
        kinds = tokens[starts + 1]
        n_img = int((kinds == config.image_token_id).sum())
        n_vid = int((kinds == config.video_token_id).sum())
        chunks, st, next_pos = [], 0, 0
        img_left, vid_left = n_img, n_vid
        for _ in range(n_img + n_vid):
            ed_img = _find(tokens, config.image_token_id, st) if img_left else len(tokens) + 1
            ed_vid = _find(tokens, config.video_token_id, st) if vid_left else len(tokens) + 1
            if ed_img < ed_vid:
                if image_i >= len(images):
                    raise ValueError(f"row {b}: more image spans in input_ids than rows in image_grid_thw "
                                     f"({len(images)})")
                t, h, w = images[image_i]
                step = 1 if tps is None else 0
                image_i, img_left, ed = image_i + 1, img_left - 1, ed_img
            else:
                if video_i >= len(videos):
                    raise ValueError(f"row {b}: more video spans in input_ids than rows in video_grid_thw "
                                     f"({len(videos)})")
                t, h, w = videos[video_i]
                step = 1 if tps is None else int(seconds[video_i] if seconds is not None else 1.0) * tps
                video_i, vid_left, ed = video_i + 1, vid_left - 1, ed_vid
            gt, gh, gw = int(t), int(h) // m, int(w) // m
            text_len = ed - st
            chunks.append(np.broadcast_to(np.arange(text_len) + next_pos, (3, text_len)))
            base = next_pos + text_len
            tt, hh, ww = np.meshgrid(np.arange(gt), np.arange(gh), np.arange(gw), indexing="ij")
            chunks.append(np.stack([tt.ravel() * step, hh.ravel(), ww.ravel()]) + base)
            # Text after a vision span continues at its max + 1 (the 4.57 convention).
            next_pos = base + max((gt - 1) * step, gh - 1, gw - 1) + 1
            st = ed + gt * gh * gw
        if st < len(tokens):
            chunks.append(np.broadcast_to(np.arange(len(tokens) - st) + next_pos, (3, len(tokens) - st)))
        pos = np.concatenate(chunks, axis=1) if chunks else np.zeros((3, 0), np.int64)
        if pos.shape[1] != len(tokens):
            raise ValueError(f"row {b}: a vision span runs past the end of the sequence "
                             f"({pos.shape[1]} positions for {len(tokens)} tokens); the grids do not match "
                             "the number of image/video pad tokens")
        positions[:, b, mask[b]] = pos
        deltas[b] = (pos.max() + 1 if pos.size else 0) - L
    return positions.astype(np.int32), deltas.astype(np.int32)


def frame_spans(config, video_grid_thw) -> np.ndarray:
    """Video grids as the vision spans in the text: for a family whose videos carry their time as text
    (Qwen3-VL), each temporal step of a video is its own span, so a (t, h, w) video becomes t grids (1, h, w);
    other families keep one span per video."""
    grids = _as_grid(video_grid_thw)
    if not config.family.video_frame_spans or not len(grids):
        return grids
    out = np.repeat(grids, grids[:, 0], axis=0)
    out[:, 0] = 1
    return out


def _find(tokens: np.ndarray, value: int, start: int) -> int:
    hits = np.flatnonzero(tokens[start:] == value)
    return int(hits[0]) + start if len(hits) else len(tokens) + 1


def vision_patch_positions(grid_thw, merge_size: int = 2) -> np.ndarray:
    """(sum t*h*w, 2) int32 [hpos, wpos] per patch row, rows in merge-window order."""
    out = []
    for t, h, w in _as_grid(grid_thw):
        hpos, wpos = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        def order(a):
            return a.reshape(h // merge_size, merge_size, w // merge_size, merge_size).transpose(0, 2, 1, 3).ravel()
        block = np.stack([order(hpos), order(wpos)], axis=-1)
        out.append(np.tile(block, (int(t), 1)))
    return np.concatenate(out).astype(np.int32) if out else np.zeros((0, 2), np.int32)


def vision_patch_segments(grid_thw, first_id: int = 1) -> np.ndarray:
    """(sum t*h*w,) int32 segment ids: each temporal slice of each image/video is its own segment."""
    sizes = [int(h * w) for t, h, w in _as_grid(grid_thw) for _ in range(int(t))]
    return np.repeat(np.arange(first_id, first_id + len(sizes)), sizes).astype(np.int32)


def merged_token_count(grid_thw, merge_size: int = 2) -> np.ndarray:
    """Merged (LLM) tokens per image/video: t * h * w / merge_size**2."""
    g = _as_grid(grid_thw)
    return (g[:, 0] * g[:, 1] * g[:, 2]) // (merge_size ** 2)


def vision_window_index(grid_thw, merge_size: int, window_merged: int):
    """The window order of a windowed ViT, as the reference's `get_window_index`.

    Each temporal slice of each image is cut into windows of `window_merged` x `window_merged` merged tokens,
    row-major, those at the bottom and right edges partial. Returns `(index, sizes)`: `index` (n_merged,)
    int64 lists the merged tokens (in the usual merge-window order, images one after another) window by
    window, so `x[index]` puts each window's tokens next to each other; `sizes` holds the patches of each
    window (a multiple of merge_size**2). `argsort(index)` restores the original order.
    """
    out, sizes, offset = [], [], 0
    ws = window_merged
    for t, h, w in _as_grid(grid_thw):
        gh, gw = int(h) // merge_size, int(w) // merge_size
        idx = np.arange(int(t) * gh * gw).reshape(int(t), gh, gw)
        nh, nw = -(-gh // ws), -(-gw // ws)
        padded = np.full((int(t), nh * ws, nw * ws), -1, np.int64)
        padded[:, :gh, :gw] = idx
        win = padded.reshape(int(t), nh, ws, nw, ws).transpose(0, 1, 3, 2, 4).reshape(-1, ws * ws)
        for row in win:
            kept = row[row >= 0]
            if len(kept):
                out.append(kept + offset)
                sizes.append(len(kept) * merge_size ** 2)
        offset += int(t) * gh * gw
    index = np.concatenate(out) if out else np.zeros(0, np.int64)
    return index, np.asarray(sizes, np.int64)


def window_patch_order(merged_index: np.ndarray, merge_size: int) -> np.ndarray:
    """Patch-row order of a merged-token order: the merge_size**2 rows of each merged token stay together."""
    mu = merge_size ** 2
    return (np.asarray(merged_index, np.int64)[:, None] * mu + np.arange(mu)).reshape(-1)
