"""What a run reports: model FLOPs (vision tower included), MFU, tokens/s, `metrics.jsonl`, TensorBoard
events and the progress bar.

FLOPs are model FLOPs of the real (non-padding) tokens and patches, counted per part from the model's own
matmuls (matmuls.py reads them off the param shapes; 2 FLOPs per multiply-add): forward; the backward pass's
input gradients wherever a trainable param lies upstream (the patch embedding, reading pixels, never needs
one); its weight gradients only where the part trains. Checked against the dot FLOPs of XLA's compiled
gradient (tests/test_train_metrics.py). Frozen parts therefore cost their forward (and
pass-through) only, which is what the device runs. Attention counts the pairs each packed segment
attends to (causal: n(n+1)/2 in the LLM; full n^2 per image / temporal slice in the ViT). Recomputation by
remat is not model work and is not counted, as in the usual MFU definition.
"""

from __future__ import annotations

import io
import json
import time

import numpy as np

from qwen2vl_jax import storage
from qwen2vl_jax.config import Qwen2VLConfig

# Dense bf16 peak FLOP/s per device (one chip; a v4/v5p chip has two TensorCores, JAX shows one device).
PEAK_FLOPS = (
    ("TPU v6 lite", 918e12), ("TPU v6e", 918e12), ("TPU v5 lite", 197e12), ("TPU v5e", 197e12),
    ("TPU v5p", 459e12), ("TPU v5", 459e12), ("TPU v4", 275e12), ("TPU v3", 123e12),
    ("H200", 989e12), ("H100", 989e12), ("A100", 312e12),
)


def peak_flops(device_kind: str, override_tflops: float = 0.0) -> float | None:
    if override_tflops:
        return override_tflops * 1e12
    for name, flops in PEAK_FLOPS:
        if name.lower() in device_kind.lower():
            return flops
    return None


def _segment_pairs(segment_ids: np.ndarray, causal: bool) -> float:
    """Attention pairs of all non-zero segments of all rows; segment_ids (..., L)."""
    total = 0.0
    for row in segment_ids.reshape(-1, segment_ids.shape[-1]):
        n = np.bincount(row)[1:].astype(np.float64)
        total += float((n * (n + 1) / 2).sum() if causal else (n * n).sum())
    return total


def step_flops(config: Qwen2VLConfig, batch: dict, parts) -> float:
    """Model FLOPs of one optimizer step over `batch` (host numpy, any leading axes: (k, B, L) etc.), from the
    model's own matmuls (`matmuls.matmuls`: its param shapes) and the batch's real tokens, patches and
    attention pairs."""
    from qwen2vl_jax.train.matmuls import attention_width, matmuls
    parts = set(parts)
    patch_seg = batch.get("patch_segment_ids")
    items = {"tokens": float((batch["segment_ids"] > 0).sum()),
             "patches": 0.0 if patch_seg is None else float((patch_seg > 0).sum())}
    items["merged"] = items["patches"] / config.vision.merge_unit
    macs = {"vit": 0.0, "merger": 0.0, "llm": 0.0}
    first = 0.0   # the patch embedding reads the pixels themselves: no input gradient, ever
    for m in matmuls(config):
        macs[m.part] += m.macs * items[m.per]
        if "patch_embed" in m.path:
            first += m.macs * items[m.per]
    layers, width = attention_width(config, "llm")
    llm_attn = 2 * layers * width * _segment_pairs(batch["segment_ids"], True)   # QK^T and PV: 2 MACs a pair-dim
    vit_attn = 0.0
    if patch_seg is not None and items["patches"]:
        layers, width = attention_width(config, "vit")
        vit_attn = 2 * layers * width * _segment_pairs(patch_seg, False)

    def cost(macs, attn, input_grads, weight_grads):
        return 2 * macs * (1 + input_grads + weight_grads) + 2 * attn * (1 + 2 * input_grads)

    # Input gradients run wherever a trainable param lies upstream: in a part that trains (its norms and
    # embeddings come before its matmuls) or below one that does (the ViT feeds the merger feeds the LLM).
    merger_in = bool({"vit", "merger"} & parts)
    return (cost(macs["llm"], llm_attn, True, "llm" in parts)
            + cost(macs["merger"], 0.0, merger_in, "merger" in parts)
            + cost(macs["vit"], vit_attn, "vit" in parts, "vit" in parts) - 2 * first * ("vit" in parts))


# -- writers ----------------------------------------------------------------------------------------------

class MetricsLog:
    """`<workdir>/metrics.jsonl` (one object per logged step) and TensorBoard events in
    `<workdir>/tensorboard`; the workdir may be a URL. On resume, records past the restored step are dropped
    first, so the file reads as one run.

    Objects in a bucket cannot be appended to (an append silently overwrites), so there the file is kept in
    memory and uploaded whole: at most every `flush_secs`, at every checkpoint (`flush`) and at the end. A
    run resumed from step S therefore finds every record up to S. The cost is one upload of the whole file per
    flush: about 300 bytes a logged step, so 3 MB once 10,000 steps are logged, every `flush_secs` at most.
    A local file is appended to and flushed at each record."""

    def __init__(self, workdir: str, resume_step: int = 0, enabled: bool = True, flush_secs: float = 60.0):
        self.enabled = enabled
        if not enabled:
            return
        storage.makedirs(workdir)
        self.path = storage.join(workdir, "metrics.jsonl")
        self.remote, self.flush_secs, self.last_flush = storage.is_url(workdir), flush_secs, time.monotonic()
        self.lines: list[str] = []
        if storage.exists(self.path):
            with storage.open(self.path, "r") as f:
                self.lines = [line if line.endswith("\n") else line + "\n" for line in f
                              if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            storage.write_text(self.path, "".join(self.lines))
        self.file = None if self.remote else storage.open(self.path, "a")
        from tensorboardX import SummaryWriter
        if self.remote:
            _register_event_writer(storage.protocol(workdir))
        # The suffix keeps a resumed run's event file apart from the one it resumes, even within one second.
        self.tb = SummaryWriter(storage.join(workdir, "tensorboard"), purge_step=resume_step + 1,
                                filename_suffix=f".from{resume_step}")

    def write(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        record = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        line = json.dumps(record) + "\n"
        if self.remote:
            self.lines.append(line)
            if time.monotonic() - self.last_flush >= self.flush_secs:
                self.flush()
        else:
            self.file.write(line)
            self.file.flush()
        for k, v in record.items():
            if k != "step" and isinstance(v, (int, float)) and v is not None:
                self.tb.add_scalar(k, v, step)

    def flush(self) -> None:
        """Make every record written so far durable (call before a checkpoint is saved)."""
        if not self.enabled:
            return
        if self.remote:
            storage.write_text(self.path, "".join(self.lines))
            self.last_flush = time.monotonic()
        self.tb.flush()

    def close(self) -> None:
        if self.enabled:
            self.flush()
            if self.file is not None:
                self.file.close()
            self.tb.close()


class _EventObject:
    """A TensorBoard event file at a URL, written through `storage` (so every protocol, and its errors, are
    the path layer's). An object cannot be appended to: the file is kept in memory and uploaded whole on
    flush, and only when it changed, so flushes after the last write (close, interpreter exit) cost nothing."""

    def __init__(self, path: str):
        self.path, self.buffer, self.dirty = path, io.BytesIO(), True

    def write(self, data: bytes) -> None:
        self.buffer.write(data)
        self.dirty = True

    def flush(self) -> None:
        if self.dirty:
            storage.write_bytes(self.path, self.buffer.getvalue())
            self.dirty = False

    def close(self) -> None:
        self.flush()


class _EventObjects:
    def open(self, path: str) -> _EventObject:
        return _EventObject(path)

    def directory_check(self, path: str) -> None:
        pass   # prefixes need no creating


def _register_event_writer(proto: str) -> None:
    from tensorboardX import record_writer
    record_writer.register_writer_factory(proto, _EventObjects())


def _plain(v):
    v = v.item() if hasattr(v, "item") else v
    return None if isinstance(v, float) and not np.isfinite(v) else v


class Progress:
    """A tqdm bar over optimizer steps with loss, tokens/s and step time."""

    def __init__(self, total: int, initial: int, enabled: bool = True):
        self.bar = None
        if enabled:
            from tqdm import tqdm
            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)

    def update(self, step: int, loss: float, tokens_per_s: float, step_time: float) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(f"loss {loss:.4f}  {tokens_per_s:,.0f} tok/s  {step_time * 1e3:.0f} ms/step",
                                     refresh=False)
            self.bar.update(step - self.bar.n)

    def write(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class StepTimer:
    """Wall time between consecutive step completions (the first one includes compilation)."""

    def __init__(self):
        self.last = time.perf_counter()

    def lap(self) -> float:
        now = time.perf_counter()
        dt, self.last = now - self.last, now
        return dt
