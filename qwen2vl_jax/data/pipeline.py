"""The grain input pipeline: a random-access record source (JSONL via a byte-offset index, ArrayRecord or
Parquet shards; `sources.py`) -> this host's shard -> shuffle (reseeded every epoch) -> [weighted mixture of
several sources] -> encode and prepare (processor + `prepare_example`, in worker processes when `workers > 0`)
-> pack -> batches.

Every batch holds `batch_size` rows of one bucket shape (L, P) in the packed format (docs/design.md). The packer
runs in the training process after the workers, so the batches do not depend on the number of workers, and
its state is small: the parent's state before the oldest example still waiting in the window, plus which of
the examples read since then are still waiting. Restoring replays those few examples, so a resumed run sees
exactly the batches it would have seen (`get_state()` / `set_state()`, JSON-serialisable).

Bad records (unreadable JSON, missing images, examples larger than every bucket) are skipped up to
`skip_budget` per host: each is logged with its file:line (or shard:row) and reason, counted in the state, and one more
than the budget stops the run with the list.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import time
from typing import Any, Sequence

import grain
import numpy as np

from qwen2vl_jax.config import Qwen2VLConfig
from qwen2vl_jax.data.packing import (Bucket, PackingError, PreparedExample, StreamingPacker, parse_buckets,
                                      prepare_example, write_rows)
from qwen2vl_jax.data.records import DataError, read_jsonl
from qwen2vl_jax.data.sources import Skipped, open_source

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    buckets: tuple[Bucket, ...] = ((256, 64),)   # (text_len, patch_len) row shapes; one compiled shape each
    batch_size: int = 8                 # rows per batch on this host
    window: int = 256                   # look-ahead of the packer, in examples; several batches' worth
    seed: int = 0                       # shuffle seed (each epoch reshuffles with seed + epoch)
    shuffle: bool = True
    num_epochs: int | None = None       # None: repeat forever
    workers: int = 0                    # grain worker processes for decoding; 0 = in this process
    worker_buffer: int = 32             # examples each worker prepares ahead
    prefetch: int = 2                   # batches packed ahead in a background thread; 0 = none
    skip_budget: int = 0                # bad records this host may skip before the run stops
    truncate: bool = False              # cut over-long examples in their text tail instead of skipping them
    require_assistant: bool = True      # records without an assistant reply are bad (training); False: eval
    shard_index: int | None = None      # this host's shard; default jax.process_index()
    shard_count: int | None = None      # default jax.process_count()
    index_dir: str = ""                 # where JSONL indices go when the data's own directory is not writable


class SkipBudgetExceeded(DataError):
    """More bad records than the configured budget."""


@dataclasses.dataclass(frozen=True)
class Component:
    """One source of a weighted mixture: files (comma-separated paths and globs, one format) and its weight."""
    path: str
    weight: float = 1.0
    name: str = ""            # how metrics and errors call it; default: the path

    @property
    def label(self) -> str:
        return self.name or self.path


def components(data) -> list[Component]:
    """A data spec -> mixture components. A string (comma-separated paths and globs) or a list of strings is
    one source; a list of mappings `{path, weight[, name]}` (or `Component`s) is a weighted mixture."""
    if isinstance(data, str) or (isinstance(data, (list, tuple)) and all(isinstance(d, str) for d in data)):
        return [Component(data if isinstance(data, str) else ",".join(data))]
    out = []
    for i, item in enumerate(data, 1):
        if isinstance(item, Component):
            out.append(item)
            continue
        if not isinstance(item, dict) or not item.get("path") or not set(item) <= {"path", "weight", "name"}:
            raise DataError(f"mixture component {i}: expected {{path: FILES, weight: W}} (optional name), got {item!r}")
        weight = item.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight > 0:
            raise DataError(f"mixture component {i} ({item['path']}): weight must be a positive number, got {weight!r}")
        out.append(Component(str(item["path"]), float(weight), str(item.get("name") or "")))
    if not out:
        raise DataError("the data mixture has no components")
    labels = [c.label for c in out]
    if len(set(labels)) != len(labels):
        raise DataError(f"mixture components need distinct paths or names, got {labels}")
    return out


# -- records to prepared examples ------------------------------------------------------------------------

def read_records(paths: str | Sequence[str]) -> list:
    """All records of the JSONL files in one list, unreadable lines as `Skipped` entries. For small files and
    whole-set checks only: the loader reads records by random access (`sources.py`) and never holds this list."""
    paths = [p for p in (paths.split(",") if isinstance(paths, str) else paths) if p]
    out: list = []
    for path in paths:
        def on_error(e: DataError):
            source, _, reason = str(e).partition(": ")
            out.append(Skipped(source, reason))
        out.extend(read_jsonl(path, on_error=on_error))
    if not out:
        raise DataError(f"no records in {', '.join(paths) or 'the (empty) list of data files'}")
    return out


class Encode:
    """Record -> prepared example, or a skip marker with the reason. Runs in the worker processes (picklable).

    Both leave as plain dicts: grain moves the numpy leaves of dicts through shared memory, while other
    objects are pickled through a pipe, which is slow for patches and can stall the workers' shutdown.
    """

    def __init__(self, processor, config: Qwen2VLConfig, buckets: Sequence[Bucket], truncate: bool = False,
                 require_assistant: bool = True):
        self.processor, self.config, self.buckets = processor, config, tuple(buckets)
        self.truncate, self.require_assistant = truncate, require_assistant

    def __call__(self, record) -> dict:
        if isinstance(record, Skipped):
            return {"skipped": record.source, "reason": record.reason}
        try:
            example = self.processor.encode_record(record, require_assistant=self.require_assistant)
            prepared = prepare_example(example, self.config, source=record.source, buckets=self.buckets,
                                       truncate=self.truncate)
        except (DataError, PackingError) as e:
            reason = str(e)
            if reason.startswith(record.source + ": "):
                reason = reason[len(record.source) + 2:]
            return {"skipped": record.source, "reason": reason}
        return {f.name: getattr(prepared, f.name) for f in dataclasses.fields(PreparedExample)}


# -- packing as a grain transformation -------------------------------------------------------------------

@dataclasses.dataclass
class _Pending:
    example: Any             # PreparedExample
    offset: int              # position in the parent stream, counted from the packer's base state
    state: Any               # parent state just before this example was read

    @property
    def n_text(self) -> int:
        return self.example.n_text

    @property
    def n_patches(self) -> int:
        return self.example.n_patches


class PackIterDataset(grain.IterDataset):
    """Prepared examples (and `Skipped` markers) -> {"batch": packed arrays, "sources": [...]} elements."""

    def __init__(self, parent: grain.IterDataset, buckets: Sequence[Bucket], batch_size: int, window: int,
                 pad_id: int = 0, skip_budget: int = 0):
        super().__init__(parent)
        self.buckets, self.batch_size, self.window = parse_buckets(buckets), batch_size, window
        self.pad_id, self.skip_budget = pad_id, skip_budget

    def __iter__(self):
        return _PackIterator(self._parent.__iter__(), self)

    def __str__(self):
        return f"PackIterDataset(buckets={list(self.buckets)}, batch_size={self.batch_size}, window={self.window})"


class _PackIterator(grain.DatasetIterator):

    def __init__(self, parent: grain.DatasetIterator, ds: PackIterDataset):
        super().__init__(parent)
        self._ds = ds
        self._reset(copy.deepcopy(parent.get_state()))
        self._skipped: dict[str, str] = {}   # source -> reason, in the order met

    def _parent_state(self):
        # A copy: a state kept for a later restore must not change if an iterator reuses its state objects.
        return copy.deepcopy(self._parent.get_state())

    def _reset(self, base_state) -> None:
        self._packer = StreamingPacker(self._ds.buckets, self._ds.batch_size, self._ds.window)
        self._base = base_state          # parent state before the oldest pending example
        self._read = 0                   # examples read from the parent since `_base`
        self._exhausted = False

    def _skip(self, item: Skipped) -> None:
        if item.source in self._skipped:  # met again in a later epoch: counted once
            return
        self._skipped[item.source] = item.reason
        if len(self._skipped) <= self._ds.skip_budget:
            log.warning("skipping bad record %s: %s (%d of a budget of %d)", item.source, item.reason,
                        len(self._skipped), self._ds.skip_budget)
        else:
            listing = "\n".join(f"  {s}: {r}" for s, r in list(self._skipped.items())[:20])
            raise SkipBudgetExceeded(
                f"{len(self._skipped)} bad records met, more than the skip budget of {self._ds.skip_budget}; "
                f"fix or drop them, or raise the skip budget:\n{listing}")

    def _pull(self) -> None:
        state = self._parent_state()
        try:
            item = next(self._parent)
        except StopIteration:
            self._exhausted = True
            return
        if "skipped" in item:
            self._read += 1
            self._skip(Skipped(item["skipped"], item["reason"]))
        else:
            self._packer.add(_Pending(PreparedExample(**item), self._read, state))
            self._read += 1
        if not self._packer.pending:       # nothing waiting: the replay can start from here
            self._base, self._read = self._parent_state(), 0

    def __next__(self):
        while not self._packer.ready() and not self._exhausted:
            self._pull()
        if not self._packer.pending:
            raise StopIteration
        start = time.perf_counter()
        (L, P), rows = self._packer.pop_batch()
        if self._packer.pending:           # rebase on the oldest example still waiting
            first = self._packer.pool[0]
            self._base, shift = first.state, first.offset
            for p in self._packer.pool:
                p.offset -= shift
            self._read -= shift
        else:
            self._base, self._read = self._parent_state(), 0
        examples = [[p.example for p in row] for row in rows]
        batch = write_rows(examples, L, P, pad_id=self._ds.pad_id, batch_size=self._ds.batch_size)
        return {"batch": batch, "sources": [ex.source for row in examples for ex in row],
                "pack_seconds": time.perf_counter() - start}

    def close(self) -> None:
        self._packer.pool.clear()          # frees the waiting examples' shared memory now, not at exit
        super().close()

    def get_state(self) -> dict:
        return {"parent": self._base, "read": self._read, "pending": [p.offset for p in self._packer.pool],
                "exhausted": self._exhausted, "skipped": [[s, r] for s, r in self._skipped.items()]}

    def set_state(self, state: dict) -> None:
        self._parent.set_state(state["parent"])
        self._reset(state["parent"])
        self._skipped = {s: r for s, r in state["skipped"]}
        pending = set(state["pending"])
        for offset in range(state["read"]):  # replay the examples read since the base; keep the waiting ones
            before = self._parent_state()
            try:
                item = next(self._parent)
            except StopIteration:
                raise ValueError("the data no longer matches the saved loader state (the stream ended during "
                                 "the replay); resume with the same files, seed and shard settings") from None
            if offset in pending:
                if "skipped" in item:
                    raise ValueError(f"the data no longer matches the saved loader state ({item['skipped']} was "
                                     "an example when the state was saved); resume with the same data")
                self._packer.pool.append(_Pending(PreparedExample(**item), offset, before))
        self._read = state["read"]
        self._exhausted = state["exhausted"]


# -- the loader ------------------------------------------------------------------------------------------

def to_json(x):
    """A grain iterator state as plain JSON: its per-worker dicts have int keys (JSON would make them strings)
    and numpy scalars; both are spelt out so `from_json` gives the state back exactly."""
    if isinstance(x, dict):
        if all(isinstance(k, str) for k in x):
            return {k: to_json(v) for k, v in x.items()}
        return {"__items__": [[to_json(k), to_json(v)] for k, v in x.items()]}
    if isinstance(x, tuple):
        return {"__tuple__": [to_json(v) for v in x]}
    if isinstance(x, list):
        return [to_json(v) for v in x]
    if isinstance(x, np.generic):
        return x.item()
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    raise TypeError(f"cannot store a {type(x).__name__} of the data pipeline state as JSON: {x!r}")


def from_json(x):
    if isinstance(x, dict):
        if set(x) == {"__items__"}:
            return {from_json(k): from_json(v) for k, v in x["__items__"]}
        if set(x) == {"__tuple__"}:
            return tuple(from_json(v) for v in x["__tuple__"])
        return {k: from_json(v) for k, v in x.items()}
    if isinstance(x, list):
        return [from_json(v) for v in x]
    return x


class Loader:
    """Iterator of packed batches (dicts of numpy arrays) with exact `get_state()` / `set_state()`.

    `sources` holds the "file:line" (or "shard:row N") of each example of the last batch (`example_index`
    indexes it); `skipped` maps each bad record met so far to its reason; `seen` counts the examples read from
    each mixture component (by its label), so a run shows what the model has seen.
    """

    def __init__(self, dataset: grain.IterDataset, config: PipelineConfig,
                 component_of: dict[str, str] | None = None):
        self.config = config
        self._it = dataset.__iter__()
        self._component_of = component_of or {}   # data file -> component label
        self.sources: list[str] = []
        self.batches = 0
        self.examples = 0
        self.seen = {label: 0 for label in dict.fromkeys(self._component_of.values())}
        self.pack_seconds = 0.0   # spent choosing rows and copying examples into batches (this process)

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self._it is None:
            raise ValueError("this loader was closed; make a new one (and set_state) to go on reading")
        element = next(self._it)
        self.sources = element["sources"]
        self.pack_seconds += element["pack_seconds"]
        self.batches += 1
        self.examples += len(self.sources)
        for source in self.sources:
            label = self._component_of.get(source.rpartition(":")[0])
            if label is not None:
                self.seen[label] += 1
        return element["batch"]

    @property
    def skipped(self) -> dict[str, str]:
        return {s: r for s, r in self._pack_state()["skipped"]}

    def _pack_state(self) -> dict:
        return self._closed_state if self._it is None else self._it.get_state()

    def get_state(self) -> dict:
        return {"pipeline": to_json(self._pack_state()), "batches": self.batches, "examples": self.examples,
                "seen": dict(self.seen)}

    def set_state(self, state: dict) -> None:
        if self._it is None:
            raise ValueError("this loader was closed; make a new one to restore a state into")
        self._it.set_state(from_json(state["pipeline"]))
        self.batches, self.examples = state["batches"], state["examples"]
        self.seen.update(state.get("seen", {}))
        self.sources = []

    def close(self) -> None:
        """Stops the workers and frees the shared memory of the examples still in flight."""
        if self._it is not None:
            self._closed_state = self._it.get_state()   # get_state and skipped still answer after close
            self._it.close()
            self._it = None   # grain keeps the last worker outputs alive until the iterator goes

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def make_loader(data, processor, config: Qwen2VLConfig | None = None,
                pipeline: PipelineConfig | None = None) -> Loader:
    """A `Loader` over data files (JSONL, ArrayRecord or Parquet: a list, or one string of comma-separated paths
    and globs) or over a weighted mixture of such sources (a list of `{path, weight}`; `components`)."""
    config = config or Qwen2VLConfig()
    pipeline = pipeline or PipelineConfig()
    buckets = parse_buckets(pipeline.buckets)
    index, count = pipeline.shard_index, pipeline.shard_count
    if index is None or count is None:
        import jax
        index = jax.process_index() if index is None else index
        count = jax.process_count() if count is None else count
    if not 0 <= index < count:
        raise ValueError(f"shard_index {index} is outside 0..{count - 1}")

    parts, component_of = [], {}
    mixture = components(data)
    for k, component in enumerate(mixture):
        source = open_source(component.path, pipeline.index_dir)
        if len(source) < count:
            raise DataError(f"{component.label}: {len(source)} records cannot be split over {count} hosts; every "
                            "host needs data")
        component_of.update({f: component.label for f in source.files})
        ds = grain.MapDataset.source(source)[index::count]   # disjoint per host; the same split every epoch
        if pipeline.shuffle:
            ds = ds.shuffle(seed=pipeline.seed + 7919 * k)     # reseeded per epoch by the repeat below
        parts.append(ds.repeat(pipeline.num_epochs))
    # A mixture interleaves its components deterministically in proportion to the weights (grain's
    # MapDataset.mix), so the mixed stream is a pure function of the step and resumes exactly.
    ds = parts[0] if len(parts) == 1 else grain.MapDataset.mix(parts, [c.weight for c in mixture])
    ds = ds.map(Encode(processor, config, buckets, pipeline.truncate, pipeline.require_assistant))
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
    if pipeline.workers > 0:
        _mark_flags_parsed()
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=pipeline.workers,
                                                         per_worker_buffer_size=pipeline.worker_buffer))
    it = PackIterDataset(it, buckets, pipeline.batch_size, pipeline.window, pad_id=config.pad_token_id or 0,
                         skip_budget=pipeline.skip_budget)
    if pipeline.prefetch > 0:
        it = grain.experimental.ThreadPrefetchIterDataset(it, prefetch_buffer_size=pipeline.prefetch)
    return Loader(it, pipeline, component_of if len(mixture) > 1 else None)


def _mark_flags_parsed() -> None:
    # grain's worker processes read absl flags; outside an absl app they are unparsed and the workers fail.
    from absl import flags
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
