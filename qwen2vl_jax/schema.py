"""The packed batch format in one place (docs/design.md, "One packed batch format").

Every module that builds, pads, shards or reads packed batches takes the field list from here: which fields the
model reads, which the train step needs, each field's logical axes, which axis is the text or patch length, its
dtype and its padding value.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class Field:
    name: str
    axes: tuple                 # logical axes (sharding.RULES) of the unstacked field
    length: str | None          # "text" or "patch": the axis that grows with the bucket, else None
    dtype: type
    pad: int | float = 0        # value of padding slots
    model: bool = True          # read by the model (else only by the loss or the bookkeeping)
    step: bool = True           # carried into the train step
    vision: bool = False        # absent from text-only batches
    windows: bool = False       # only for families with window attention

    @property
    def length_axis(self) -> int | None:
        """Index of the bucket-length axis in `axes`."""
        want = {"text": "length", "patch": "patches"}.get(self.length)
        return self.axes.index(want) if want else None


FIELDS: tuple[Field, ...] = (
    Field("input_ids", ("batch", "length"), "text", np.int32),
    Field("positions", (None, "batch", "length"), "text", np.int32),         # (3, B, L) M-RoPE t/h/w
    Field("segment_ids", ("batch", "length"), "text", np.int32),             # 1..k per example, 0 = padding
    Field("labels", ("batch", "length"), "text", np.int32, model=False),
    Field("loss_mask", ("batch", "length"), "text", np.float32, model=False),
    Field("patches", ("batch", "patches", None), "patch", np.float32, vision=True),   # (B, P, patch_dim)
    Field("patch_segment_ids", ("batch", "patches"), "patch", np.int32, vision=True),  # image / temporal slice
    Field("patch_positions", ("batch", "patches", None), "patch", np.int32, vision=True),   # (B, P, 2) h, w
    Field("patch_window_ids", ("batch", "patches"), "patch", np.int32, vision=True, windows=True),  # one per window
    Field("vision_index", ("batch", "length"), "text", np.int32, pad=-1, vision=True),
    Field("example_index", ("batch", "length"), "text", np.int32, pad=-1, model=False, step=False),
)

BY_NAME = {f.name: f for f in FIELDS}
MODEL_KEYS = tuple(f.name for f in FIELDS if f.model)
STEP_KEYS = tuple(f.name for f in FIELDS if f.step)
VISION_KEYS = tuple(f.name for f in FIELDS if f.vision)
BATCH_AXES = {f.name: f.axes for f in FIELDS}


def empty(batch_size: int, text_len: int, patch_len: int, patch_dim: int, *, pad_id: int = 0,
          windows: bool = False) -> dict:
    """An all-padding batch in the packed format (with `patch_window_ids` when `windows`)."""
    out = {}
    for f in FIELDS:
        if f.windows and not windows:
            continue
        shape = [d for d in {"input_ids": (batch_size, text_len), "positions": (3, batch_size, text_len),
                             "patches": (batch_size, patch_len, patch_dim),
                             "patch_positions": (batch_size, patch_len, 2)}.get(
            f.name, (batch_size, patch_len) if f.length == "patch" else (batch_size, text_len))]
        out[f.name] = np.full(shape, pad_id if f.name == "input_ids" else f.pad, f.dtype)
    return out


def pad_to(x: np.ndarray, name: str, text_len: int, patch_len: int, stacked: bool = False) -> np.ndarray:
    """Field `name` padded along its length axis to `text_len` or `patch_len` with its padding value."""
    f = BY_NAME[name]
    axis = f.length_axis
    if axis is None:
        return x
    axis += int(stacked)
    target = patch_len if f.length == "patch" else text_len
    if x.shape[axis] >= target:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, target - x.shape[axis])
    return np.pad(x, widths, constant_values=f.pad)
