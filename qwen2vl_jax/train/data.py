"""The training data of a run: the grain pipeline over the configured JSONL files (or the generated demo set),
with the processor that matches the model's vocabulary, each host reading its own shard of every batch."""

from __future__ import annotations

import base64
import dataclasses
import json
import zlib

import jax
import numpy as np
from jax.sharding import Mesh

from qwen2vl_jax import sharding, storage
from qwen2vl_jax.config import ConfigError, Qwen2VLConfig
from qwen2vl_jax.data import DataError, Processor
from qwen2vl_jax.data.check import check_records
from qwen2vl_jax.data.packing import PackingError, suggest_buckets
from qwen2vl_jax.hf import CheckpointError
from qwen2vl_jax.lora import AdapterError
from qwen2vl_jax.data.pipeline import Loader, PipelineConfig, components, make_loader
from qwen2vl_jax.data.sources import SourceError, open_source
from qwen2vl_jax.storage import StorageError
from qwen2vl_jax.train.batches import host_rows
from qwen2vl_jax.train.config import RunConfig, RunConfigError

# what a host's start-up may end in, by name: the other hosts raise the same kind (train.py: exit 2); any
# other exception is raised there as sharding.HostFailed (exit 1)
START_ERRORS = {c.__name__: c for c in (DataError, SourceError, PackingError, RunConfigError, StorageError,
                                        ConfigError, CheckpointError, AdapterError)}

AUTO_SAMPLE = 10_000  # examples measured for data.buckets: auto when data.check is 0


def processor(cfg: RunConfig, config: Qwen2VLConfig) -> Processor:
    """`data.tokenizer` (an HF dir with tokenizer.json) if set, else the model's own HF dir when it has one,
    else the Qwen2 vocabulary for full-size models and a byte-level tokenizer at the config's ids for small
    test models such as the demo's."""
    d = cfg.data
    kw = dict(image_min_pixels=d.image_min_pixels, image_max_pixels=d.image_max_pixels,
              video_min_pixels=d.video_min_pixels, video_max_pixels=d.video_max_pixels,
              video_total_pixels=d.video_total_pixels or None, video_sample_fps=d.video_sample_fps)
    for path in (cfg.data.tokenizer, cfg.init_from, cfg.model):
        if path and storage.isfile(storage.join(path, "tokenizer.json")):
            return Processor.from_pretrained(path, **kw)
    if cfg.data.tokenizer:
        raise FileNotFoundError(f"data.tokenizer = {cfg.data.tokenizer}: no tokenizer.json there")
    return Processor.for_model(config, **kw)


def generation(cfg: RunConfig):
    """The generation settings of the checkpoint the run started from (its generation_config.json), or None."""
    from qwen2vl_jax.infer.config import GenerationConfig
    for path in (cfg.init_from, cfg.model):
        if path and storage.isfile(storage.join(path, "generation_config.json")):
            return GenerationConfig.from_pretrained(path)
    return None


def train_files(cfg: RunConfig):
    """The data to train on (files or a mixture, `pipeline.components`); "synthetic" generates the demo set
    first (once; it is reused)."""
    if cfg.data.train != "synthetic":
        return cfg.data.train
    from qwen2vl_jax.data import synthetic
    out = cfg.data.synthetic_dir or storage.join(cfg.workdir, "synthetic")
    error = None
    if jax.process_index() == 0:
        try:
            synthetic.generate(out, size=cfg.data.synthetic_size, config=synthetic.SyntheticConfig.demo())
        except Exception as e:
            error = e
    # the other hosts read what host 0 wrote (a bucket or a shared filesystem) once it says it is there
    sharding.agree("synthetic data", error, START_ERRORS)
    return synthetic.train_path(out)


def _shard(cfg: RunConfig, mesh: Mesh) -> tuple[int, int]:
    """(this host's shard, shards): one shard per distinct block of batch rows (see `make_source`)."""
    start, stop = host_rows(mesh, cfg.data.batch_size)
    return start // (stop - start), cfg.data.batch_size // (stop - start)


def check(cfg: RunConfig, config: Qwen2VLConfig, mesh: Mesh, log=print) -> RunConfig:
    """Check this host's shard of the training records before anything is built (data/check.py): more bad
    records than `data.skip_budget` raise a one-line `DataError`; fewer are listed and left to the pipeline to
    skip. Returns `cfg` with `data.buckets: auto` replaced by the buckets the checked examples call for."""
    auto = cfg.data.buckets == "auto"
    if not cfg.data.check and not auto:
        return cfg
    error, report = None, None
    try:   # every host checks its own shard; all of them agree on the verdict before anything else
        proc = processor(cfg, config)
        index, count = _shard(cfg, mesh)
        records = HostRecords([open_source(c.path, index_dir(cfg))
                               for c in components(train_files(cfg))], index, count)
        report = check_records(records, proc, limit=cfg.data.check or AUTO_SAMPLE, seed=cfg.seed,
                               buckets=None if auto else cfg.data.buckets, truncate=cfg.data.truncate)
        log(report.describe())
        if cfg.data.check:   # with data.check 0 the records were only measured for the buckets
            _within_budget(report.problems, cfg.data.skip_budget, log)
            _within_segment_bound(report.sizes, cfg.max_segment_len)
        if auto:
            _publish_sizes(report.sizes)
    except Exception as e:   # any kind: the other hosts must not go on to the first collective without it
        error = e
    sharding.agree("data check", error, START_ERRORS)
    if not auto:
        return cfg
    buckets, examples = _agreed_buckets(report.sizes, sampled=report.sampled or jax.process_count() > 1)
    log(f"data.buckets: auto -> {json.dumps([list(b) for b in buckets])} (text tokens, vision patches) per row, "
        f"from {examples:,} examples; to pin them: data.buckets='{json.dumps([list(b) for b in buckets])}'")
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, buckets=[list(b) for b in buckets]))


class HostRecords:
    """This host's records of every source, as the pipeline splits them (`[index::count]` of each), read on
    demand: a check of a sample never opens the records it does not pick."""

    def __init__(self, sources, index: int, count: int):
        self.sources, self.index, self.count = sources, index, count
        self.ends = np.cumsum([len(range(index, len(s), count)) for s in sources])

    def __len__(self) -> int:
        return int(self.ends[-1]) if len(self.ends) else 0

    def __getitem__(self, i: int):
        k = int(np.searchsorted(self.ends, i, side="right"))
        local = i - (int(self.ends[k - 1]) if k else 0)
        return self.sources[k][self.index + local * self.count]


def _within_budget(problems: list, budget: int, log) -> None:
    if len(problems) > budget:
        (source, reason), more = problems[0], len(problems) - 1
        also = f" (and {more} more bad record{'s' * (more > 1)})" if more else ""
        raise DataError(f"{source}: {reason}{also}; fix or drop the record{'s' * bool(more)}, or let the run skip "
                        f"up to N bad records with data.skip_budget=N (now {budget})")
    for source, reason in problems:
        log(f"  will skip {source}: {reason}")


def _within_segment_bound(sizes: np.ndarray, bound: int) -> None:
    """`max_segment_len` promises the attention kernels that no example is longer; the checked ones must keep it
    (a longer one would still train correctly, on a wider, slower grid, so the promise is checked up front)."""
    sizes = np.asarray(sizes).reshape(-1, 2)
    if bound and len(sizes) and sizes[:, 0].max() > bound:
        over = int((sizes[:, 0] > bound).sum())
        raise DataError(f"max_segment_len={bound}: {over} checked example{'s' * (over > 1)} {'are' if over > 1 else 'is'} "
                        f"longer (the longest has {int(sizes[:, 0].max())} text tokens); raise max_segment_len to "
                        "that, or set it to 0 (unknown)")


def auto_buckets(sizes: np.ndarray, sampled: bool) -> tuple:
    """Buckets for examples of `sizes` (n, 2) (text tokens, patches): rows of T text tokens, T a multiple of 128
    that holds the longest example and four of the average one (so the packer has room to fill rows), with
    the patch budget of the data's patches per token (`suggest_buckets`). A sample's ratio is uncertain and
    gets a second bucket (its `spread`); a fully checked set's is known, and one shape compiles once."""
    sizes = np.asarray(sizes).reshape(-1, 2)
    sizes = sizes[sizes[:, 0] > 0]
    if not len(sizes):
        raise DataError("data.buckets: auto needs at least one good record to size the buckets from")
    text = int(max(sizes[:, 0].max(), 4 * sizes[:, 0].mean()))
    text = -(-text // 128) * 128
    return suggest_buckets(sizes, text_lens=(text,), spread=0.1 if sampled else 0.0)


def _publish_sizes(sizes: np.ndarray) -> None:
    """This host's checked sizes, for host 0 to size every host's buckets from (multi-host runs)."""
    h = sharding.hosts()
    if h is not None:
        a = np.ascontiguousarray(np.asarray(sizes, np.int64).reshape(-1, 2).astype(np.int32))
        h.client.key_value_set(f"qwen2vl/sizes/{h.me}", base64.b64encode(zlib.compress(a.tobytes())).decode())


def _agreed_buckets(sizes: np.ndarray, sampled: bool) -> tuple[tuple, int]:
    """(buckets, examples they were sized from): from every host's checked sizes, computed by host 0 and
    taken from it by the others, so that all hosts compile the same shapes."""
    h = sharding.hosts()
    if h is None:
        return auto_buckets(sizes, sampled), len(sizes)
    value, error = "", None
    if h.me == 0:
        try:
            every = [np.frombuffer(zlib.decompress(base64.b64decode(
                h.client.blocking_key_value_get(f"qwen2vl/sizes/{i}", 60_000))), np.int32).reshape(-1, 2)
                for i in range(h.n)]
            every = np.concatenate(every)
            value = json.dumps({"buckets": [list(map(int, b)) for b in auto_buckets(every, sampled)],
                                "examples": len(every)})
        except Exception as e:
            error = e
    agreed = json.loads(sharding.agree("data buckets", error, START_ERRORS, value)[0])
    return tuple(tuple(b) for b in agreed["buckets"]), agreed["examples"]


def index_dir(cfg: RunConfig) -> str:
    """Where JSONL indices go when the data's own folder cannot take them."""
    return storage.join(cfg.workdir, "data_index")


def layout(cfg: RunConfig, mesh: Mesh) -> dict:
    """What this host's stream of batches depends on. A saved iterator state only fits a loader of the same
    layout; after a change (other hosts, rows, buckets or files) the exact data order cannot be kept."""
    start, stop = host_rows(mesh, cfg.data.batch_size)
    return {"files": cfg.data.train, "rows": [start, stop], "batch_size": cfg.data.batch_size,
            "buckets": [list(b) for b in cfg.data.buckets], "window": cfg.data.window, "seed": cfg.seed}


def make_source(cfg: RunConfig, config: Qwen2VLConfig, mesh: Mesh, seed_offset: int = 0) -> Loader:
    """This host's rows of every global batch (`batches.host_rows`), with exact get/set_state. The files are
    split into as many disjoint shards as there are distinct row blocks; hosts holding the same rows (a
    tensor group across hosts) read the same shard. `seed_offset` reshuffles (a resume whose layout changed)."""
    start, stop = host_rows(mesh, cfg.data.batch_size)
    n = stop - start
    pipeline = PipelineConfig(
        buckets=tuple(tuple(b) for b in cfg.data.buckets), batch_size=n, window=cfg.data.window,
        seed=cfg.seed + seed_offset, workers=cfg.data.workers, skip_budget=cfg.data.skip_budget,
        truncate=cfg.data.truncate, shard_index=start // n, shard_count=cfg.data.batch_size // n,
        index_dir=index_dir(cfg))
    return make_loader(train_files(cfg), processor(cfg, config), config, pipeline)
