"""The training data of a run: the grain pipeline over the configured JSONL files (or the generated demo set),
with the processor that matches the model's vocabulary, each host reading its own shard of every batch."""

from __future__ import annotations

import jax
from jax.sharding import Mesh

from qwen2vl_jax import storage
from qwen2vl_jax.config import Qwen2VLConfig
from qwen2vl_jax.data import Processor
from qwen2vl_jax.data.pipeline import Loader, PipelineConfig, make_loader
from qwen2vl_jax.train.batches import host_rows
from qwen2vl_jax.train.config import RunConfig

REAL_VOCAB = 151657   # tokens of the Qwen2-VL tokenizer (REFERENCE 4.1); smaller models use a byte tokenizer


def processor(cfg: RunConfig, config: Qwen2VLConfig) -> Processor:
    """`data.tokenizer` (an HF dir with tokenizer.json) if set, else the model's own HF dir when it has one,
    else the Qwen2 vocabulary for full-size models and a byte-level tokenizer at the config's ids for small
    test models such as the demo's."""
    kw = dict(image_min_pixels=cfg.data.image_min_pixels, image_max_pixels=cfg.data.image_max_pixels)
    for path in (cfg.data.tokenizer, cfg.init_from, cfg.model):
        if path and storage.isfile(storage.join(path, "tokenizer.json")):
            return Processor.from_pretrained(path, **kw)
    if cfg.data.tokenizer:
        raise FileNotFoundError(f"data.tokenizer = {cfg.data.tokenizer}: no tokenizer.json there")
    if config.text.vocab_size >= REAL_VOCAB:
        return Processor.default(**kw)
    return Processor.from_config(config, **kw)


def train_files(cfg: RunConfig) -> str:
    """The JSONL path(s) to train on; "synthetic" generates the demo set first (once; it is reused)."""
    if cfg.data.train != "synthetic":
        return cfg.data.train
    from qwen2vl_jax.data import synthetic
    out = cfg.data.synthetic_dir or storage.join(cfg.workdir, "synthetic")
    if jax.process_index() == 0:
        synthetic.generate(out, size=cfg.data.synthetic_size, config=synthetic.SyntheticConfig.demo())
    if jax.process_count() > 1:   # the other hosts read what host 0 wrote (a bucket or a shared filesystem)
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices("synthetic data written")
    return synthetic.train_path(out)


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
        truncate=cfg.data.truncate, shard_index=start // n, shard_count=cfg.data.batch_size // n)
    return make_loader(train_files(cfg), processor(cfg, config), config, pipeline)
