"""Host-side conversion of a Hugging Face style call into the packed batch format (docs/design.md).

Each batch row becomes one packed row holding one example: its patches are the rows of `pixel_values` /
`pixel_values_videos` of the images and videos whose spans appear in that row, in text order.
"""

from __future__ import annotations

import numpy as np

from qwen2vl_jax.positions import (_as_grid, frame_spans, merged_token_count, rope_index, vision_patch_positions,
                                   vision_patch_segments, vision_window_index, window_patch_order)


class InputError(ValueError):
    """Model inputs that do not fit together (token counts, grids, pixel rows)."""


def _split_rows(pixels, grids, what):
    if len(grids) == 0:
        return []
    if pixels is None:
        raise InputError(f"{what}_grid_thw has {len(grids)} entries but no pixel values were given")
    pixels = np.asarray(pixels, np.float32)
    sizes = grids.prod(-1)
    if pixels.shape[0] != sizes.sum():
        raise InputError(f"{what} pixel values have {pixels.shape[0]} rows but {what}_grid_thw "
                         f"{grids.tolist()} needs {int(sizes.sum())}")
    return np.split(pixels, np.cumsum(sizes)[:-1])


def batch_from_hf(config, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None,
                  pixel_values_videos=None, video_grid_thw=None, patch_len: int | None = None,
                  second_per_grid_ts=None):
    """Returns (batch dict of numpy arrays, rope_deltas (B,)). `patch_len` pads the vision rows to a fixed
    budget (default: the longest row, rounded up to a multiple of 4). `second_per_grid_ts`: seconds per
    temporal patch of each video (families with absolute time)."""
    ids = np.asarray(input_ids)
    if ids.ndim == 1:
        ids = ids[None]
    b, l = ids.shape
    mask = np.ones((b, l), np.int32) if attention_mask is None else np.asarray(attention_mask, np.int32).reshape(b, l)
    img_grids, vid_grids = _as_grid(image_grid_thw), frame_spans(config, video_grid_thw)
    m = config.vision.spatial_merge_size
    _check_vocab(config, ids, mask)
    _check_counts(config, ids, mask, img_grids, vid_grids)
    img_rows = _split_rows(pixel_values, img_grids, "image")
    vid_rows = _split_rows(pixel_values_videos, vid_grids, "video")

    positions, deltas = rope_index(config, ids, img_grids, vid_grids, mask, second_per_grid_ts)
    batch = {"input_ids": ids.astype(np.int32), "positions": positions, "segment_ids": mask.copy()}
    if not len(img_grids) and not len(vid_grids):
        return batch, deltas

    # Assign spans to rows in order of appearance (the reference consumes grids row-major).
    row_items, ii, vi = [], 0, 0
    for r in range(b):
        toks = ids[r][mask[r] == 1]
        items = []
        for s in np.flatnonzero(toks[:-1] == config.vision_start_token_id):
            if toks[s + 1] == config.image_token_id:
                items.append((img_rows[ii], img_grids[ii]))
                ii += 1
            elif toks[s + 1] == config.video_token_id:
                items.append((vid_rows[vi], vid_grids[vi]))
                vi += 1
        row_items.append(items)
    if ii != len(img_grids) or vi != len(vid_grids):
        raise InputError(f"input_ids hold {ii} image and {vi} video spans (<|vision_start|> followed by a pad "
                         f"token), but {len(img_grids)} image and {len(vid_grids)} video grids were given")

    need = max(sum(int(g.prod()) for _, g in items) for items in row_items)
    mu = config.vision.merge_unit
    p = patch_len or max(mu, -(-need // mu) * mu)
    if need > p:
        raise InputError(f"a row needs {need} patches but patch_len is {p}")
    patches = np.zeros((b, p, config.vision.patch_dim), np.float32)
    seg = np.zeros((b, p), np.int32)
    win = np.zeros((b, p), np.int32) if config.vision.window_size else None
    ppos = np.zeros((b, p, 2), np.int32)
    vindex = np.full((b, l), -1, np.int32)
    for r, items in enumerate(row_items):
        if not items:
            continue
        grids = np.stack([g for _, g in items])
        rows = np.concatenate([x for x, _ in items])
        n = len(rows)
        patches[r, :n], seg[r, :n], ppos[r, :n] = rows, vision_patch_segments(grids), vision_patch_positions(grids, m)
        is_pad = ((ids[r] == config.image_token_id) | (ids[r] == config.video_token_id)) & (mask[r] == 1)
        n_tokens, n_merged = int(is_pad.sum()), int(merged_token_count(grids, m).sum())
        if n_tokens != n_merged:
            raise InputError(f"row {r}: {n_tokens} image/video pad tokens but its {len(items)} images/videos "
                             f"give {n_merged} merged tokens; each span must hold t*h*w/4 pad tokens")
        vindex[r, is_pad] = np.arange(n_tokens)
        if win is not None:   # windows made contiguous; the text reads each merged token where it now is
            order, sizes = vision_window_index(grids, m, config.vision.window_merged)
            perm = window_patch_order(order, m)
            patches[r, :n], ppos[r, :n], seg[r, :n] = patches[r, perm], ppos[r, perm], seg[r, perm]
            win[r, :n] = np.repeat(np.arange(1, len(sizes) + 1), sizes)
            vindex[r, is_pad] = np.argsort(order)
    batch.update(patches=patches, patch_segment_ids=seg, patch_positions=ppos, vision_index=vindex)
    if win is not None:
        batch["patch_window_ids"] = win
    return batch, deltas


def _check_vocab(config, ids, mask):
    """Real tokens must be rows of the embedding (padding slots may hold anything: the model zeroes them)."""
    bad = (mask == 1) & ((ids < 0) | (ids >= config.text.vocab_size))
    if bad.any():
        r, p = (int(i[0]) for i in np.nonzero(bad))
        raise InputError(f"input_ids[{r}, {p}] = {int(ids[r, p])} is outside the vocabulary (vocab_size "
                         f"{config.text.vocab_size}); the tokenizer does not belong to this model")


def _check_counts(config, ids, mask, img_grids, vid_grids):
    """The reference's own check: pad tokens must equal merged features, per kind."""
    m = config.vision.spatial_merge_size
    valid = mask == 1
    for what, tok, grids in (("Image", config.image_token_id, img_grids), ("Video", config.video_token_id, vid_grids)):
        tokens = int(((ids == tok) & valid).sum())
        features = int(merged_token_count(grids, m).sum())
        if tokens != features:
            raise InputError(f"{what} features and {what.lower()} tokens do not match, tokens: {tokens}, "
                             f"features: {features}. Expand each placeholder to t*h*w/4 pad tokens "
                             f"(the Processor does this) and pass one grid per {what.lower()}.")
