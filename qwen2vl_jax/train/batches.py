"""From the data pipeline's packed batches to the step's input: k micro-batches stacked on a leading axis,
padded to one shape, and placed on the mesh as global arrays.

The pipeline may pick a different bucket (L, P) for each micro-batch; the step needs one shape per call,
so the smaller ones are padded up with padding tokens (segment 0, no target, no vision) and padding
patches (segment 0), which the model and the loss ignore exactly.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh

from qwen2vl_jax import schema, sharding

STEP_KEYS = schema.STEP_KEYS


def _pad(x: np.ndarray, key: str, text_len: int, patch_len: int) -> np.ndarray:
    return schema.pad_to(x, key, text_len, patch_len)


def stack_micro_batches(batches: list[dict]) -> dict:
    """k packed batches (B, ...) -> one dict of (k, B, ...) arrays (positions (k, 3, B, L))."""
    text_len = max(b["input_ids"].shape[1] for b in batches)
    patch_len = max(b["patches"].shape[1] if b.get("patches") is not None else 0 for b in batches)
    rows = {b["input_ids"].shape[0] for b in batches}
    if len(rows) != 1:
        raise ValueError(f"micro-batches of one step must have the same number of rows, got {sorted(rows)}")
    keys = [k for k in STEP_KEYS if batches[0].get(k) is not None]
    if patch_len == 0:
        keys = [k for k in keys if k not in schema.VISION_KEYS]
    return {k: np.stack([_pad(np.asarray(b[k]), k, text_len, patch_len) for b in batches]) for k in keys}


def check_rows(rows: int, mesh: Mesh) -> None:
    shards = sharding.batch_shards(mesh)
    if rows % shards:
        raise ValueError(f"data.batch_size {rows} does not split over the {shards} batch shards of the mesh "
                         f"(data x fsdp = {shards}); make it a multiple of {shards}")


def host_rows(mesh: Mesh, rows: int) -> tuple[int, int]:
    """The rows [start, stop) of every global batch that this process's devices hold. Processes whose devices
    share rows (a tensor group spanning hosts) get the same range and must load the same data."""
    spec = sharding.batch_sharding(mesh, "input_ids")
    held = sorted({(idx[0].start or 0, rows if idx[0].stop is None else idx[0].stop)
                   for idx in spec.addressable_devices_indices_map((rows, 1)).values()})
    if any(a > b_prev for (_, b_prev), (a, _) in zip(held, held[1:])):
        raise ValueError(f"this process's devices hold non-contiguous rows {held}; order the mesh so each "
                         "host's devices hold one block of rows")
    return held[0][0], max(b for _, b in held)


def to_device(batch: dict, shardings: dict) -> dict:
    """Host arrays (this process's rows) -> global jax arrays laid out by `shardings`. On one host this is a
    plain sharded transfer; on many, each host contributes its rows of the global batch."""
    return {k: jax.make_array_from_process_local_data(shardings[k], v) for k, v in batch.items()}
