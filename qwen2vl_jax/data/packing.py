"""Packing variable-resolution examples into fixed-shape rows: `L` text tokens and `P` vision patches.

Every jitted step sees one of a few configured shapes (the buckets), yet almost nothing is spent on padding,
and examples packed into one row never see each other (segment ids in the LLM and the ViT).

Three layers, each usable alone:
- `prepare_example`: validate one encoded example and precompute everything that does not depend on where it
  lands (shifted labels, M-RoPE positions of the example alone, patches in text order, 2D patch positions).
  The pipeline runs it in its worker processes.
- `write_rows`: lay prepared examples out into the packed batch format (docs/design.md; cheap copies).
- `StreamingPacker`: choose, from a look-ahead window of examples, the bucket and the rows of the next batch
  (best fit on both budgets at once). `pack_examples` packs a given list in one call (first fit).

An example's text length counts its vision pad tokens, so L and P are coupled: an image of N patches needs
N/4 of the L budget as well. Vision spans are never cut.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Sequence

import numpy as np

from qwen2vl_jax import schema
from qwen2vl_jax.config import Qwen2VLConfig
from qwen2vl_jax.positions import frame_spans, rope_index, vision_patch_positions, vision_window_index, window_patch_order

Bucket = tuple[int, int]   # (L text tokens, P vision patches) per row

PACKED_KEYS = tuple(f.name for f in schema.FIELDS)   # patch_window_ids only for windowed families


class PackingError(ValueError):
    """An example that cannot be packed: malformed, or larger than every bucket."""


def parse_buckets(buckets) -> tuple[Bucket, ...]:
    """Validate a bucket list (pairs (L, P), e.g. from YAML) and sort it from small to large."""
    out = []
    for b in buckets:
        try:
            L, P = (int(v) for v in b)
        except (TypeError, ValueError):
            raise PackingError(f"bucket {b!r} is not a pair (text_len, patch_len)") from None
        if L <= 0 or P < 0 or P % 4:
            raise PackingError(f"bucket ({L}, {P}): text_len must be positive and patch_len a non-negative "
                               "multiple of 4 (the merger groups 4 patch rows into one token)")
        out.append((L, P))
    if not out:
        raise PackingError("no buckets configured; give at least one (text_len, patch_len) pair")
    return tuple(sorted(set(out), key=lambda b: (b[0] + b[1], b)))


def suggest_buckets(sizes, text_lens: Sequence[int] = (4096, 8192), spread: float = 0.1,
                    multiple: int = 128) -> tuple[Bucket, ...]:
    """Buckets for data whose examples have `sizes` (n, 2) = (text tokens, patches), e.g. from a sample.

    A bucket richer in patches than the data leaves patches empty, and vice versa, so each text length gets
    the patch budget that matches the data's patches per text token. The largest text length gets two
    buckets, at that ratio times (1 - spread) and (1 + spread): a sample's ratio is uncertain and the
    stream's drifts, and the packer then follows it batch by batch. The largest buckets are scaled up (same
    ratios) until one holds the sample's largest example.
    """
    sizes = np.asarray(sizes, np.int64).reshape(-1, 2)
    if not len(sizes):
        raise PackingError("suggest_buckets needs the sizes of at least one example")
    ratio = sizes[:, 1].sum() / sizes[:, 0].sum()

    def up(x):
        return int(math.ceil(x / multiple) * multiple)
    *small, top = sorted(text_lens)
    large = [(top, top * ratio * f) for f in ((1 - spread, 1 + spread) if spread and ratio else (1,))]
    t_max, p_max = sizes.max(0)
    scale = max(1.0, min(max(t_max / t, p_max / max(p, 1)) for t, p in large))
    return parse_buckets([(up(t), up(t * ratio)) for t in small] + [(up(t * scale), up(p * scale)) for t, p in large])


# -- one example ------------------------------------------------------------------------------------

@dataclasses.dataclass
class PreparedExample:
    """One example, validated, with everything that does not depend on its place in a row."""
    input_ids: np.ndarray        # (n,) int32
    positions: np.ndarray        # (3, n) int32: M-RoPE of the example alone (restarts at 0)
    labels: np.ndarray           # (n,) int32: next-token targets, shifted inside the example; 0 where masked
    loss_mask: np.ndarray        # (n,) float32
    vision_index: np.ndarray     # (n,) int32: merged-token index within the example, -1 on text
    patches: np.ndarray          # (N, patch_dim) float32: all images and videos, in text order (window order
                                 # inside each image when the ViT has windows)
    patch_positions: np.ndarray  # (N, 2) int32: (h, w) 2D RoPE positions
    segment_sizes: np.ndarray    # (S,) int32: patches per ViT attention segment (image / video temporal slice)
    merge_unit: int = 4          # patch rows per merged token
    source: str = ""             # where it came from ("data.jsonl:17"), for error messages
    window_sizes: np.ndarray | None = None   # (W,) int32: patches per window; None when the ViT has no windows

    @property
    def n_text(self) -> int:
        return len(self.input_ids)

    @property
    def n_patches(self) -> int:
        return len(self.patches)


def _array(example: Mapping[str, Any], key: str, dtype, shape_tail=()) -> np.ndarray | None:
    v = example.get(key)
    if v is None:
        return None
    v = np.asarray(v)
    return v.astype(dtype, copy=False).reshape((-1, *shape_tail)) if v.size else None


def _vision_spans(ids, config: Qwen2VLConfig, kind: str, grid, source: str):
    """(start, length) of each run of `kind` pad tokens, checked against its grid row (t*h*w/4 tokens)."""
    token = config.image_token_id if kind == "image" else config.video_token_id
    m = config.vision.spatial_merge_size
    edges = np.diff(np.concatenate([[0], (ids == token).astype(np.int8), [0]]))
    starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    n_grid = 0 if grid is None else len(grid)
    if len(starts) != n_grid:
        raise PackingError(f"{source}: the text holds {len(starts)} {kind} span(s) of <|{kind}_pad|> tokens but "
                           f"{kind}_grid_thw has {n_grid} row(s); each {kind} needs exactly one span "
                           "(<|vision_start|> pads <|vision_end|>), as the processor writes them")
    for i in range(n_grid):
        t, h, w = (int(x) for x in grid[i])
        if t < 1 or h % m or w % m:
            raise PackingError(f"{source}: {kind} {i} has grid (t, h, w) = ({t}, {h}, {w}); h and w must be "
                               f"multiples of spatial_merge_size {m} and t >= 1")
        want = t * h * w // (m * m)
        if ends[i] - starts[i] != want:
            raise PackingError(f"{source}: {kind} {i} has grid ({t}, {h}, {w}) = {want} merged tokens, but its "
                               f"span in the text holds {ends[i] - starts[i]} <|{kind}_pad|> tokens; "
                               "re-encode the example with the processor that produced the pixels")
    return starts, ends - starts


def _fits(n_text: int, n_patches: int, buckets: Sequence[Bucket]) -> bool:
    return any(n_text <= L and n_patches <= P for L, P in buckets)


def _truncation_point(ids, spans, buckets, vision_start: int) -> int:
    """Longest text prefix that fits some bucket without cutting a vision span (dropped spans go whole,
    together with their <|vision_start|>)."""
    best = 0
    for L, P in buckets:
        cut, patches = L, 0
        for start, length, n_patches in spans:                  # spans in text order
            block = start - 1 if start > 0 and ids[start - 1] == vision_start else start
            if start + length > cut or patches + n_patches > P:
                cut = min(cut, block)
                break
            patches += n_patches
        best = max(best, min(cut, len(ids)))
    return best


def prepare_example(example: Mapping[str, Any], config: Qwen2VLConfig | None = None, *, source: str | None = None,
                    buckets: Sequence[Bucket] | None = None, truncate: bool = False) -> PreparedExample:
    """Validate one encoded example (the processor's dict) and precompute its packed fields.

    With `buckets`, an example that fits none is rejected (PackingError naming it), or with `truncate=True`
    cut in its text tail at a point that fits, never inside a vision span (spans past the cut are dropped whole).
    """
    config = config or Qwen2VLConfig()
    source = source or str(example.get("source", "example"))
    ids = _array(example, "input_ids", np.int32)
    if ids is None:
        raise PackingError(f"{source}: the example has no input_ids")
    ids = ids.reshape(-1)
    labels = _array(example, "labels", np.int32)
    if labels is not None:
        labels = labels.reshape(-1)
        if len(labels) != len(ids):
            raise PackingError(f"{source}: labels has {len(labels)} entries for {len(ids)} input_ids")
    img_grid = _array(example, "image_grid_thw", np.int64, (3,))
    vid_grid = _array(example, "video_grid_thw", np.int64, (3,))
    if vid_grid is not None:   # one span per frame for a family that writes each frame's time as text
        vid_grid = frame_spans(config, vid_grid)
    patch_dim = config.vision.patch_dim
    pix = {"image": _array(example, "pixel_values", np.float32, (patch_dim,)),
           "video": _array(example, "pixel_values_videos", np.float32, (patch_dim,))}
    grids = {"image": img_grid, "video": vid_grid}

    # Spans in text order: (start, length, kind, index within kind).
    spans = []
    for kind in ("image", "video"):
        starts, lengths = _vision_spans(ids, config, kind, grids[kind], source)
        spans += [(int(s), int(n), kind, i) for i, (s, n) in enumerate(zip(starts, lengths))]
        need = 0 if grids[kind] is None else int(grids[kind].prod(-1).sum())
        have = 0 if pix[kind] is None else len(pix[kind])
        if need != have:
            key = "pixel_values" if kind == "image" else "pixel_values_videos"
            raise PackingError(f"{source}: {kind}_grid_thw describes {need} patches but {key} has {have} rows")
    spans.sort()
    mu = config.vision.merge_unit

    if buckets is not None and not _fits(len(ids), sum(n * mu for _, n, _, _ in spans), buckets):
        n_text, n_patches = len(ids), sum(n * mu for _, n, _, _ in spans)
        cut = _truncation_point(ids, [(s, n, n * mu) for s, n, _, _ in spans], buckets,
                                config.vision_start_token_id) if truncate else 0
        if cut == 0:
            largest = ", ".join(f"({L}, {P})" for L, P in buckets)
            raise PackingError(
                f"{source}: {n_text} text tokens (vision pads included) and {n_patches} vision patches fit none "
                f"of the buckets (text_len, patch_len) = {largest}; add a larger bucket, lower max_pixels or "
                "the number of video frames, or drop the example"
                + ("" if truncate else " (or enable truncation of the text tail)"))
        ids = ids[:cut]
        labels = None if labels is None else labels[:cut]
        kept = [s for s in spans if s[0] + s[1] <= cut]
        for kind in ("image", "video"):
            n_kept = sum(1 for s in kept if s[2] == kind)     # spans of one kind keep their order: a prefix
            if grids[kind] is not None:
                grids[kind] = grids[kind][:n_kept]
                pix[kind] = pix[kind][:int(grids[kind].prod(-1).sum())]
        spans = kept

    # Patches, 2D positions and ViT segments, one span after another in text order.
    offsets = {k: np.concatenate([[0], np.cumsum(g.prod(-1))]) if g is not None else None for k, g in grids.items()}
    vision_index = np.full(len(ids), -1, np.int32)
    chunks, grid_rows, merged = [], [], 0
    for start, length, kind, i in spans:
        chunks.append(pix[kind][offsets[kind][i]:offsets[kind][i + 1]])
        grid_rows.append(grids[kind][i])
        vision_index[start:start + length] = np.arange(merged, merged + length)
        merged += length
    kinds = {s[2] for s in spans}
    if len(kinds) == 1:   # the common case: one kind, already in text order; no copy
        patches = pix[kinds.pop()]
    else:
        patches = np.concatenate(chunks) if chunks else np.zeros((0, patch_dim), np.float32)
    grid = np.asarray(grid_rows, np.int64).reshape(-1, 3)
    seg_sizes = np.repeat(grid[:, 1] * grid[:, 2], grid[:, 0]).astype(np.int32)

    patch_positions = vision_patch_positions(grid, config.vision.spatial_merge_size)
    window_sizes = None
    if config.vision.window_size:   # each window's patches made contiguous; the text reads them where they are
        order, window_sizes = vision_window_index(grid, config.vision.spatial_merge_size, config.vision.window_merged)
        perm = window_patch_order(order, config.vision.spatial_merge_size)
        patches, patch_positions = patches[perm], patch_positions[perm]
        if len(order):
            vision_index = np.where(vision_index >= 0, np.argsort(order)[np.maximum(vision_index, 0)], -1)
            vision_index = vision_index.astype(np.int32)
        window_sizes = window_sizes.astype(np.int32)

    # M-RoPE of the example alone, so positions restart at 0 in every packed segment.
    seconds = _array(example, "second_per_grid_ts", np.float64)
    if seconds is not None and grids["video"] is not None:
        seconds = seconds.reshape(-1)[:len(grids["video"])]
    positions, _ = rope_index(config, ids[None], grids["image"], grids["video"],
                              second_per_grid_ts=seconds if grids["video"] is not None else None)

    # Next-token targets inside the example: position t predicts token t+1; the last token has no target.
    if labels is None:
        shifted = np.full(len(ids), -100, np.int32)
    else:
        shifted = np.concatenate([labels[1:], np.array([-100], np.int32)])
    loss_mask = shifted != -100
    return PreparedExample(
        input_ids=ids, positions=positions[:, 0], labels=np.where(loss_mask, shifted, 0).astype(np.int32),
        loss_mask=loss_mask.astype(np.float32), vision_index=vision_index, patches=patches,
        patch_positions=patch_positions, segment_sizes=seg_sizes, merge_unit=mu, source=source,
        window_sizes=window_sizes)


# -- rows -------------------------------------------------------------------------------------------

def empty_rows(batch_size: int, text_len: int, patch_len: int, pad_id: int = 0, patch_dim: int = 1176,
               windows: bool = False) -> dict:
    """An all-padding batch in the packed format (`windows`: with `patch_window_ids`)."""
    return schema.empty(batch_size, text_len, patch_len, patch_dim, pad_id=pad_id, windows=windows)


def write_rows(rows: Sequence[Sequence[PreparedExample]], text_len: int, patch_len: int, *, pad_id: int = 0,
               batch_size: int | None = None, example_ids: Sequence[Sequence[int]] | None = None) -> dict:
    """Lay out prepared examples, one inner list per row, into the packed batch format (docs/design.md).

    `example_ids[b][j]` is written to `example_index` for `rows[b][j]`; by default examples are numbered
    0, 1, ... in row-major order. Rows past `len(rows)` (up to `batch_size`) are padding.
    """
    batch_size = len(rows) if batch_size is None else batch_size
    if len(rows) > batch_size:
        raise PackingError(f"{len(rows)} rows do not fit a batch of {batch_size}")
    patch_dim = next((ex.patches.shape[1] for row in rows for ex in row if ex.n_patches), 1176)
    windows = any(ex.window_sizes is not None for row in rows for ex in row)
    out = empty_rows(batch_size, text_len, patch_len, pad_id, patch_dim, windows)
    k = 0
    for b, row in enumerate(rows):
        t = p = 0
        patch_seg = window = 1
        for j, ex in enumerate(row):
            n, N = ex.n_text, ex.n_patches
            if t + n > text_len or p + N > patch_len:
                raise PackingError(f"{ex.source}: row {b} overflows its bucket ({text_len}, {patch_len})")
            sl, psl = slice(t, t + n), slice(p, p + N)
            out["input_ids"][b, sl] = ex.input_ids
            out["positions"][:, b, sl] = ex.positions
            out["segment_ids"][b, sl] = j + 1
            out["labels"][b, sl] = ex.labels
            out["loss_mask"][b, sl] = ex.loss_mask
            # Merged tokens of the row follow its patches 4 rows to 1, so an example's merged tokens start
            # at (patches before it) / 4; every image holds a multiple of 4 patches.
            out["vision_index"][b, sl] = np.where(ex.vision_index >= 0, ex.vision_index + p // ex.merge_unit, -1)
            out["example_index"][b, sl] = k if example_ids is None else example_ids[b][j]
            if N:
                out["patches"][b, psl] = ex.patches
                out["patch_positions"][b, psl] = ex.patch_positions
                out["patch_segment_ids"][b, psl] = np.repeat(
                    np.arange(patch_seg, patch_seg + len(ex.segment_sizes), dtype=np.int32), ex.segment_sizes)
                patch_seg += len(ex.segment_sizes)
                if ex.window_sizes is not None:
                    out["patch_window_ids"][b, psl] = np.repeat(
                        np.arange(window, window + len(ex.window_sizes), dtype=np.int32), ex.window_sizes)
                    window += len(ex.window_sizes)
            t, p, k = t + n, p + N, k + 1
    return out


def pack_examples(examples: Sequence[Mapping[str, Any]], text_len: int, patch_len: int, *,
                  config: Qwen2VLConfig | None = None, batch_size: int | None = None,
                  truncate: bool = False) -> dict:
    """Pack encoded examples (processor outputs, one example each) into rows of `text_len` tokens and
    `patch_len` patches, first fit in the given order. Returns the packed batch format (docs/design.md) plus
    `example_index` (B, L): the index into `examples` of each token, -1 on padding.

    B is the number of rows needed, or `batch_size` (padding rows added; an error if more are needed).
    """
    config = config or Qwen2VLConfig()
    bucket = parse_buckets([(text_len, patch_len)])
    prepared = [ex if isinstance(ex, PreparedExample) else
                prepare_example(ex, config, source=str(ex.get("source", f"example {i}")), buckets=bucket,
                                truncate=truncate)
                for i, ex in enumerate(examples)]
    rows, ids, room = [], [], []   # room: (text, patches) left per row
    for i, ex in enumerate(prepared):
        if ex.n_text > text_len or ex.n_patches > patch_len:
            raise PackingError(f"{ex.source}: {ex.n_text} text tokens and {ex.n_patches} patches do not fit "
                               f"one row of ({text_len}, {patch_len})")
        b = next((b for b, (t, p) in enumerate(room) if ex.n_text <= t and ex.n_patches <= p), None)
        if b is None:
            rows.append([]), ids.append([]), room.append((text_len, patch_len))
            b = len(rows) - 1
        rows[b].append(ex)
        ids[b].append(i)
        room[b] = (room[b][0] - ex.n_text, room[b][1] - ex.n_patches)
    if batch_size is not None and len(rows) > batch_size:
        raise PackingError(f"{len(examples)} examples need {len(rows)} rows of ({text_len}, {patch_len}), more "
                           f"than batch_size {batch_size}")
    return write_rows(rows, text_len, patch_len, pad_id=config.pad_token_id or 0,
                      batch_size=batch_size or max(len(rows), 1), example_ids=ids)


# -- choosing rows and buckets from a look-ahead window ---------------------------------------------

# Weights of the balance term tried for every batch; the best filling wins. One weight is not robust: the
# right trade-off between "big examples first" and "keep the two budgets level" depends on the mix.
BALANCE_WEIGHTS = (2.0, 4.0, 8.0)


def fill_rows(sizes: np.ndarray, bucket: Bucket, batch_size: int, balance: float = 4.0,
              first: int | None = 0) -> list[list[int]]:
    """Fill up to `batch_size` rows of `bucket` from a pool of examples with sizes (W, 2) = (text, patches).

    Row by row, greedily add the example maximising  size - balance * |text fill - patch fill|  (both budgets
    normalised to 1). Pure largest-first fills the patch budget with big images and strands the text budget:
    what is left in the pool are small examples that each still need a few patches. Keeping the two fills
    level leaves room that the many small examples can close. `first` (the oldest example) opens row 0, so
    no example waits forever.
    """
    L, P = bucket
    tn = sizes[:, 0] / L
    if P:
        pn = sizes[:, 1] / P
    else:   # a text-only bucket: examples with patches never fit, and there is nothing to balance
        pn = np.where(sizes[:, 1] > 0, np.inf, 0.0)
        balance = 0.0
    size = tn + np.where(np.isfinite(pn), pn, 0.0)
    free = np.ones(len(sizes), bool)
    rows = []
    for b in range(batch_size):
        row, ut, up = [], 0.0, 0.0
        if b == 0 and first is not None:
            row, ut, up = [first], tn[first], pn[first]
            free[first] = False
        # Candidates only shrink while the row fills: what does not fit now never will in this row.
        cand = np.flatnonzero(free)
        while cand.size:
            cand = cand[(tn[cand] <= 1.0 - ut + 1e-9) & (pn[cand] <= 1.0 - up + 1e-9)]
            if not cand.size:
                break
            j = int(np.argmax(size[cand] - balance * np.abs((ut + tn[cand]) - (up + pn[cand]))))
            i = int(cand[j])
            cand = np.delete(cand, j)
            row.append(i)
            free[i] = False
            ut, up = ut + tn[i], up + pn[i]
        if not row:
            break
        rows.append(row)
    return rows


def plan_batch(sizes: np.ndarray, buckets: Sequence[Bucket], batch_size: int) -> tuple[int, list[list[int]]]:
    """The bucket (index) and rows (pool indices) of the next batch from a window of sizes (W, 2).

    Every bucket that holds the oldest example (pool index 0) is tried with every balance weight; the filling
    that wastes least wins (waste = unfilled fraction of the text budget + unfilled fraction of the patch
    budget, empty rows included), ties to the larger bucket.
    """
    sizes = np.asarray(sizes, np.int64).reshape(-1, 2)
    best = None
    for k, (L, P) in enumerate(buckets):
        if sizes[0, 0] > L or sizes[0, 1] > P:
            continue
        for balance in BALANCE_WEIGHTS:
            rows = fill_rows(sizes, (L, P), batch_size, balance)
            used = sizes[[i for r in rows for i in r]].sum(0)
            waste = 2.0 - used[0] / (batch_size * L) - (used[1] / (batch_size * P) if P else 1.0)
            if best is None or waste <= best[0] + 1e-9:
                best = (waste, k, rows)
    if best is None:
        raise PackingError(f"an example of {sizes[0, 0]} text tokens and {sizes[0, 1]} patches fits no bucket "
                           f"{list(buckets)}")
    return best[1], best[2]


class StreamingPacker:
    """Packs a stream of examples (anything with `n_text` and `n_patches`) into batches of `batch_size` rows
    that share one bucket, looking `window` examples ahead. Pure bookkeeping; the pipeline adds state.

        packer.add(example) until packer.ready(); then bucket, rows = packer.pop_batch()
        at the end of the stream: while packer.pending: packer.pop_batch()
    """

    def __init__(self, buckets: Sequence[Bucket], batch_size: int, window: int = 256):
        self.buckets = parse_buckets(buckets)
        if batch_size < 1 or window < 1:
            raise PackingError(f"batch_size ({batch_size}) and window ({window}) must be at least 1")
        self.batch_size, self.window = batch_size, window
        self.pool: list = []

    @property
    def pending(self) -> int:
        return len(self.pool)

    def ready(self) -> bool:
        return len(self.pool) >= self.window

    def add(self, example) -> None:
        if not _fits(example.n_text, example.n_patches, self.buckets):
            raise PackingError(f"{getattr(example, 'source', 'example')}: {example.n_text} text tokens and "
                               f"{example.n_patches} patches fit no bucket {list(self.buckets)}")
        self.pool.append(example)

    def pop_batch(self) -> tuple[Bucket, list[list[Any]]]:
        """Remove the next batch from the window: its bucket and its rows (lists of examples, oldest first)."""
        sizes = np.array([(ex.n_text, ex.n_patches) for ex in self.pool], np.int64)
        k, rows = plan_batch(sizes, self.buckets, self.batch_size)
        taken = {i for r in rows for i in r}
        out = [[self.pool[i] for i in sorted(r)] for r in rows]
        self.pool = [ex for i, ex in enumerate(self.pool) if i not in taken]
        return self.buckets[k], out
