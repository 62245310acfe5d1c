"""pack_examples and the streaming packer: every field against hand-computed values, and invariants on
random mixes (budgets, spans never cut, vision_index pointing at the example's own patches)."""

import numpy as np
import pytest

from qwen2vl_jax.config import tiny
from qwen2vl_jax.data.packing import (PackingError, StreamingPacker, pack_examples, parse_buckets, plan_batch,
                                      prepare_example, suggest_buckets)
from qwen2vl_jax.positions import rope_index

CFG = tiny()                       # vision_start 990, vision_end 991, image 992, video 993, pad 0
VS, VE, IMG, VID = 990, 991, 992, 993


def _pixels(grid, base):
    """Patch rows whose first column says where they came from: base + row index."""
    n = int(np.prod(grid))
    out = np.zeros((n, 1176), np.float32)
    out[:, 0] = base + np.arange(n)
    return out


def _hand_examples():
    a = dict(input_ids=np.array([5, 6, VS, IMG, IMG, VE, 7, 8]),                # image grid (1, 2, 4): 2 tokens
             labels=np.array([-100] * 6 + [7, 8]),
             pixel_values=_pixels((1, 2, 4), 100), image_grid_thw=np.array([[1, 2, 4]]))
    b = dict(input_ids=np.array([[11, 12, 13]]), labels=np.array([-100, 12, 13]))   # (1, L) is accepted
    c = dict(input_ids=np.array([20, VS, VID, VID, VID, VID, VE, 21, VS, IMG, IMG, VE, 22]),
             labels=np.array([-100] * 12 + [22]),
             pixel_values=_pixels((1, 4, 2), 300), image_grid_thw=np.array([[1, 4, 2]]),
             pixel_values_videos=_pixels((2, 2, 4), 200), video_grid_thw=np.array([[2, 2, 4]]))
    return [a, b, c]


def test_hand_computed_rows():
    rows = pack_examples(_hand_examples(), text_len=16, patch_len=32, config=CFG)
    # First fit in order: a (8 tokens, 8 patches) and b (3 tokens) share row 0; c (13, 24) needs row 1.
    np.testing.assert_array_equal(rows["input_ids"], [
        [5, 6, VS, IMG, IMG, VE, 7, 8, 11, 12, 13, 0, 0, 0, 0, 0],
        [20, VS, VID, VID, VID, VID, VE, 21, VS, IMG, IMG, VE, 22, 0, 0, 0]])
    np.testing.assert_array_equal(rows["segment_ids"], [[1] * 8 + [2] * 3 + [0] * 5, [1] * 13 + [0] * 3])
    np.testing.assert_array_equal(rows["example_index"], [[0] * 8 + [1] * 3 + [-1] * 5, [2] * 13 + [-1] * 3])
    # M-RoPE by hand: a's image (merged 1x1x2) sits at 3, text resumes at 3 + 2 = 5.
    # c: video (merged 2x1x2) at base 2, text resumes at 2 + 2 = 4; image (merged 1x2x1) at 7, text at 9.
    t0, h0, w0 = [0, 1, 2, 3, 3, 5, 6, 7], [0, 1, 2, 3, 3, 5, 6, 7], [0, 1, 2, 3, 4, 5, 6, 7]
    pad = [0] * 5
    np.testing.assert_array_equal(rows["positions"][:, 0], [t0 + [0, 1, 2] + pad, h0 + [0, 1, 2] + pad,
                                                            w0 + [0, 1, 2] + pad])
    np.testing.assert_array_equal(rows["positions"][:, 1], [
        [0, 1, 2, 2, 3, 3, 4, 5, 6, 7, 7, 9, 10, 0, 0, 0],
        [0, 1, 2, 2, 2, 2, 4, 5, 6, 7, 8, 9, 10, 0, 0, 0],
        [0, 1, 2, 3, 2, 3, 4, 5, 6, 7, 7, 9, 10, 0, 0, 0]])
    # Next-token targets, shifted inside each example only: a's "6 -> 7" pair is at position 5 (VE predicts
    # 7), b's first token predicts 12; the last token of every example has no target.
    np.testing.assert_array_equal(rows["labels"], [[0, 0, 0, 0, 0, 7, 8, 0, 12, 13, 0, 0, 0, 0, 0, 0],
                                                   [0] * 11 + [22] + [0] * 4])
    np.testing.assert_array_equal(rows["loss_mask"], [[0, 0, 0, 0, 0, 1, 1, 0, 1, 1, 0, 0, 0, 0, 0, 0],
                                                      [0] * 11 + [1] + [0] * 4])
    assert rows["loss_mask"].dtype == np.float32
    np.testing.assert_array_equal(rows["vision_index"], [[-1, -1, -1, 0, 1] + [-1] * 11,
                                                         [-1, -1, 0, 1, 2, 3, -1, -1, -1, 4, 5] + [-1] * 5])
    # Patches in text order: c's video (rows 200..) before its image (rows 300..), zero padding after.
    np.testing.assert_array_equal(rows["patches"][0, :, 0], list(range(100, 108)) + [0] * 24)
    np.testing.assert_array_equal(rows["patches"][1, :, 0],
                                  list(range(200, 216)) + list(range(300, 308)) + [0] * 8)
    assert not rows["patches"][:, :, 1:].any()
    # One ViT segment per image and per temporal slice of a video.
    np.testing.assert_array_equal(rows["patch_segment_ids"], [[1] * 8 + [0] * 24,
                                                              [1] * 8 + [2] * 8 + [3] * 8 + [0] * 8])
    # 2D positions in merge-window order, repeated per temporal slice.
    win_2x4 = [(0, 0), (0, 1), (1, 0), (1, 1), (0, 2), (0, 3), (1, 2), (1, 3)]
    win_4x2 = [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1), (3, 0), (3, 1)]
    np.testing.assert_array_equal(rows["patch_positions"][0], win_2x4 + [(0, 0)] * 24)
    np.testing.assert_array_equal(rows["patch_positions"][1], win_2x4 * 2 + win_4x2 + [(0, 0)] * 8)
    for key, dtype in (("input_ids", np.int32), ("positions", np.int32), ("patches", np.float32),
                       ("patch_positions", np.int32), ("vision_index", np.int32), ("labels", np.int32)):
        assert rows[key].dtype == dtype, key


def test_batch_size_pads_rows_and_missing_labels_mean_no_loss():
    ex = dict(input_ids=np.array([1, 2, 3]))
    rows = pack_examples([ex], text_len=8, patch_len=4, config=CFG, batch_size=3)
    assert rows["input_ids"].shape == (3, 8) and rows["patches"].shape == (3, 4, 1176)
    assert rows["positions"].shape == (3, 3, 8)
    assert not rows["loss_mask"].any() and (rows["segment_ids"][1:] == 0).all()
    assert (rows["example_index"][1:] == -1).all() and (rows["vision_index"] == -1).all()
    with pytest.raises(PackingError, match="more than batch_size 1"):
        pack_examples([ex, ex, ex], text_len=4, patch_len=4, config=CFG, batch_size=1)


def _random_examples(rng, n):
    """Examples mixing text-only, images and videos; pixel rows say (example, row) in column 0."""
    out = []
    for i in range(n):
        ids, img, vid = list(rng.integers(1, 900, rng.integers(1, 12))), [], []
        for _ in range(rng.integers(0, 3)):
            grid = (int(rng.integers(1, 3)) if rng.random() < 0.3 else 1, 2 * int(rng.integers(1, 4)),
                    2 * int(rng.integers(1, 4)))
            video = grid[0] > 1
            (vid if video else img).append(grid)
            ids += [VS] + [VID if video else IMG] * (int(np.prod(grid)) // 4) + [VE]
            ids += list(rng.integers(1, 900, rng.integers(0, 4)))
        ex = dict(input_ids=np.array(ids), labels=np.where(rng.random(len(ids)) < 0.5, np.array(ids), -100))
        if img:
            ex["image_grid_thw"] = np.array(img)
            ex["pixel_values"] = _pixels((sum(int(np.prod(g)) for g in img),), 10_000 * i)
        if vid:
            ex["video_grid_thw"] = np.array(vid)
            ex["pixel_values_videos"] = _pixels((sum(int(np.prod(g)) for g in vid),), 10_000 * i + 5_000)
        out.append(ex)
    return out


def test_invariants_on_random_mix():
    rng = np.random.default_rng(0)
    examples = _random_examples(rng, 40)
    L, P = 64, 160
    rows = pack_examples(examples, text_len=L, patch_len=P, config=CFG)
    seen = set()
    for b in range(rows["input_ids"].shape[0]):
        ids, seg, vix, exi = (rows[k][b] for k in ("input_ids", "segment_ids", "vision_index", "example_index"))
        for s in range(1, seg.max() + 1):
            where = np.flatnonzero(seg == s)
            i = int(exi[where[0]])
            assert (exi[where] == i).all() and i not in seen
            seen.add(i)
            ex = examples[i]
            # The example lies whole and contiguous in its row, with its own positions and shifted labels.
            np.testing.assert_array_equal(where, np.arange(where[0], where[0] + len(ex["input_ids"])))
            np.testing.assert_array_equal(ids[where], ex["input_ids"])
            alone, _ = rope_index(CFG, ex["input_ids"][None], ex.get("image_grid_thw"), ex.get("video_grid_thw"))
            np.testing.assert_array_equal(rows["positions"][:, b, where], alone[:, 0])
            want = np.append(ex["labels"][1:], -100)
            np.testing.assert_array_equal(rows["loss_mask"][b, where], want != -100)
            np.testing.assert_array_equal(rows["labels"][b, where], np.where(want != -100, want, 0))
            # The j-th <|image_pad|> of an example stands for its image patch rows 4j..4j+3 (HF's scatter
            # order), likewise for videos; vision_index must point there inside the row.
            for token, base in ((IMG, 10_000 * i), (VID, 10_000 * i + 5_000)):
                pads = where[ids[where] == token]
                got = rows["patches"][b, (4 * vix[pads])[:, None] + np.arange(4), 0]
                np.testing.assert_array_equal(got, base + 4 * np.arange(len(pads))[:, None] + np.arange(4))
        # Budgets: real tokens and patches within the row.
        assert (seg > 0).sum() <= L and (rows["patch_segment_ids"][b] > 0).sum() <= P
        assert not rows["patches"][b][rows["patch_segment_ids"][b] == 0].any()
    assert seen == set(range(len(examples)))
    # Patch segment ids are unique within a row and cover each image / temporal slice once.
    for b in range(rows["input_ids"].shape[0]):
        ps = rows["patch_segment_ids"][b]
        ids_in_row = np.unique(ps[ps > 0])
        np.testing.assert_array_equal(ids_in_row, np.arange(1, len(ids_in_row) + 1))


def test_validation_names_the_example():
    bad = dict(input_ids=np.array([5, VS, IMG, VE]), pixel_values=_pixels((1, 2, 4), 0),
               image_grid_thw=np.array([[1, 2, 4]]), source="data.jsonl:7")
    with pytest.raises(PackingError, match=r"data.jsonl:7: image 0 has grid \(1, 2, 4\) = 2 merged tokens, "
                                           r"but its span in the text holds 1"):
        pack_examples([bad], text_len=16, patch_len=16, config=CFG)
    wrong_rows = dict(bad, input_ids=np.array([5, VS, IMG, IMG, VE]), pixel_values=_pixels((4,), 0))
    with pytest.raises(PackingError, match="describes 8 patches but pixel_values has 4 rows"):
        pack_examples([wrong_rows], text_len=16, patch_len=16, config=CFG)
    no_grid = dict(input_ids=np.array([5, VS, IMG, IMG, VE]))
    with pytest.raises(PackingError, match="1 image span"):
        pack_examples([no_grid], text_len=16, patch_len=16, config=CFG)


def test_oversize_is_rejected_or_cut_in_its_text_tail():
    a = _hand_examples()[0]                      # 8 tokens, 8 patches; the image span is tokens 2..5
    with pytest.raises(PackingError, match=r"example 0: 8 text tokens .* and 8 vision patches fit none of the "
                                           r"buckets \(text_len, patch_len\) = \(6, 16\)"):
        pack_examples([a], text_len=6, patch_len=16, config=CFG)
    cut = pack_examples([a], text_len=7, patch_len=16, config=CFG, truncate=True)
    np.testing.assert_array_equal(cut["input_ids"][0], [5, 6, VS, IMG, IMG, VE, 7])
    np.testing.assert_array_equal(cut["loss_mask"][0], [0, 0, 0, 0, 0, 1, 0])   # 7's target (8) is cut off
    # A cut inside the span drops the whole span with its <|vision_start|>, and its patches.
    cut = pack_examples([a], text_len=4, patch_len=16, config=CFG, truncate=True)
    np.testing.assert_array_equal(cut["input_ids"][0], [5, 6, 0, 0])
    assert not cut["patches"].any() and (cut["vision_index"] == -1).all()
    # Too many patches for any bucket: the span goes, the text before it stays.
    cut = pack_examples([a], text_len=16, patch_len=4, config=CFG, truncate=True)
    np.testing.assert_array_equal(cut["input_ids"][0, :3], [5, 6, 0])


def test_bucket_choice_wastes_least():
    buckets = parse_buckets([(64, 32), (16, 8)])
    assert buckets == ((16, 8), (64, 32))           # sorted small to large
    # One small example: the small bucket wastes less.
    assert plan_batch(np.array([[10, 4]]), buckets, 1)[0] == 0
    # One example too big for the small bucket: the big one, whatever the waste.
    assert plan_batch(np.array([[20, 4]]), buckets, 1)[0] == 1
    # Enough examples to fill the big bucket: the big one.
    k, rows = plan_batch(np.array([[8, 4]] * 8), buckets, 1)
    assert k == 1 and sorted(rows[0]) == list(range(8))
    # The oldest example always opens the batch.
    k, rows = plan_batch(np.array([[3, 0], [16, 8], [16, 8]]), buckets, 2)
    assert 0 in rows[0]


def test_streaming_packer_emits_everything_once_in_few_shapes():
    rng = np.random.default_rng(1)
    prepared = [prepare_example(ex, CFG, source=f"ex{i}") for i, ex in enumerate(_random_examples(rng, 200))]
    packer = StreamingPacker([(32, 32), (64, 64), (128, 96)], batch_size=3, window=24)
    out, shapes = [], set()
    for ex in prepared:
        packer.add(ex)
        if packer.ready():
            bucket, rows = packer.pop_batch()
            shapes.add(bucket)
            out += [(bucket, row) for row in rows]
    while packer.pending:
        bucket, rows = packer.pop_batch()
        shapes.add(bucket)
        out += [(bucket, row) for row in rows]
    assert sorted(ex.source for _, row in out for ex in row) == sorted(ex.source for ex in prepared)
    for (L, P), row in out:
        assert sum(ex.n_text for ex in row) <= L and sum(ex.n_patches for ex in row) <= P
    assert len(shapes) <= 3


def test_fill_on_a_realistic_size_mix():
    """Sizes only: a stream whose text/patch ratio matches the bucket fills both budgets >= 0.95."""
    rng = np.random.default_rng(2)

    class Item:
        def __init__(self, t, p):
            self.n_text, self.n_patches = t, p

    items = []
    for _ in range(3000):
        text = int(rng.integers(30, 350))
        if rng.random() < 0.1:
            items.append(Item(text, 0))
            continue
        k = int(rng.integers(2, 4)) if rng.random() < 0.1 else 1
        patches = sum(4 * int(np.exp(rng.uniform(np.log(4), np.log(1900)))) for _ in range(k))
        items.append(Item(text + patches // 4, patches))
    ratio = sum(x.n_patches for x in items) / sum(x.n_text for x in items)
    bucket = (4096, int(4096 * ratio) // 4 * 4)
    packer = StreamingPacker([bucket], batch_size=4, window=256)
    used, batches = np.zeros(2), 0
    for x in items:
        if x.n_patches > bucket[1]:
            continue
        packer.add(x)
        if packer.ready():
            _, rows = packer.pop_batch()
            used += [sum(e.n_text for r in rows for e in r), sum(e.n_patches for r in rows for e in r)]
            batches += 1
    fill = used / (batches * 4 * np.array(bucket))
    assert (fill >= 0.95).all(), fill


def test_suggest_buckets_follow_the_data_ratio_and_hold_the_largest():
    sizes = [(100, 300), (300, 900), (50, 0), (550, 1800)]        # 3000 patches for 1000 tokens: ratio 3
    assert suggest_buckets(sizes, text_lens=(512, 1024), multiple=4) == ((512, 1536), (1024, 2768), (1024, 3380))
    # The largest example (4000 tokens, 30000 patches) scales the two large buckets until one holds it.
    big = suggest_buckets(sizes + [(4000, 30000)], text_lens=(512, 1024), multiple=4)
    assert any(L >= 4000 and P >= 30000 for L, P in big) and big[0] == (512, 3380)     # ratio 6.6 now
    assert big[2][1] / big[2][0] == pytest.approx(big[1][1] / big[1][0] * 1.1 / 0.9, rel=1e-2)
