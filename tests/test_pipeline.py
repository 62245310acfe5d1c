"""The grain pipeline: exact resume (0 and 2 worker processes), the skip budget, per-host sharding, and that
the packed rows hold what the processor makes of each record."""

import json
import os

import numpy as np
import pytest

import qwen2vl_jax as qv
from qwen2vl_jax.data import Processor, read_jsonl, synthetic
from qwen2vl_jax.data.pipeline import PipelineConfig, SkipBudgetExceeded, make_loader
from train_utils import assert_same_batches, take

CFG = qv.preset("tiny")
BASE = PipelineConfig(buckets=((256, 64), (512, 128)), batch_size=2, window=16, shard_index=0, shard_count=1)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("synthetic"))
    train, _ = synthetic.generate(root, size=60, heldout_size=0, seed=0)
    return train, Processor.from_config(CFG)


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_gives_the_identical_next_batches(data, workers):
    train, proc = data
    pipeline = PipelineConfig(**{**BASE.__dict__, "workers": workers})
    with make_loader(train, proc, CFG, pipeline) as loader:
        first = take(loader, 8)
        state = json.loads(json.dumps(loader.get_state()))   # what a checkpoint stores
        after = take(loader, 6)                              # crosses into the second epoch
        assert loader.examples > 60
    with make_loader(train, proc, CFG, pipeline) as resumed:
        resumed.set_state(state)
        assert_same_batches(take(resumed, 6), after)
        assert resumed.examples == loader.examples
    for batch in first + after:
        assert batch["input_ids"].shape[0] == 2
        assert (batch["input_ids"].shape[1], batch["patches"].shape[1]) in BASE.buckets
    if workers:   # packing runs after the workers, so their number does not change the batches
        with make_loader(train, proc, CFG, BASE) as single:
            assert_same_batches(take(single, 14), first + after)


def test_rows_hold_the_processor_output(data):
    train, proc = data
    records = {r.source: r for r in read_jsonl(train)}
    with make_loader(train, proc, CFG, BASE) as loader:
        for _ in range(3):
            batch = next(loader)
            for i, source in enumerate(loader.sources):
                ex = proc.encode_record(records[source])
                where = batch["example_index"] == i
                np.testing.assert_array_equal(batch["input_ids"][where], ex["input_ids"])
                b = np.flatnonzero(where.any(1))[0]
                pads = batch["vision_index"][b][where[b]]
                pads = pads[pads >= 0]
                pixels = np.concatenate([ex["pixel_values"], ex["pixel_values_videos"]])
                # Synthetic examples have images or a video, not both, so text order is pixel order.
                np.testing.assert_array_equal(batch["patches"][b, 4 * pads[0]:4 * pads[-1] + 4] if len(pads)
                                              else np.zeros((0, 1176)), pixels)


def test_skip_budget_counts_reports_and_stops(tmp_path, data):
    train, proc = data
    good = open(train).read().splitlines()[:10]
    good = [json.dumps({**json.loads(line), "images": [os.path.join(os.path.dirname(train), p)
                                                       for p in json.loads(line).get("images", [])]})
            if "videos" not in line else None for line in good]
    good = [g for g in good if g]
    bad = ['{"messages": [oops',                                                             # not JSON
           json.dumps({"messages": [{"role": "user", "content": "<image>Hi"},
                                    {"role": "assistant", "content": "x"}], "images": ["missing.png"]}),
           json.dumps({"messages": [{"role": "user", "content": "long " * 200},            # fits no bucket
                                    {"role": "assistant", "content": "x"}]}),
           json.dumps({"messages": [{"role": "user", "content": "no reply"}]})]              # nothing to learn
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(good[:3] + bad[:2] + good[3:] + bad[2:]) + "\n")
    bad_lines = {f"{path}:{n}" for n in (4, 5, len(good) + 3, len(good) + 4)}
    two_epochs = PipelineConfig(**{**BASE.__dict__, "num_epochs": 2, "skip_budget": 4})
    with make_loader(str(path), proc, CFG, two_epochs) as loader:
        batches = list(loader)
        assert set(loader.skipped) == bad_lines              # counted once although met in both epochs
        reasons = " | ".join(loader.skipped.values())
        for words in ("not valid JSON", "missing.png", "fit none of the buckets", "no assistant turn"):
            assert words in reasons
        assert loader.examples == 2 * len(good) and batches
        state = loader.get_state()
    with make_loader(str(path), proc, CFG, two_epochs) as resumed:     # the count survives a restore
        resumed.set_state(json.loads(json.dumps(state)))
        assert resumed.skipped == loader.skipped
    with make_loader(str(path), proc, CFG, PipelineConfig(**{**two_epochs.__dict__, "skip_budget": 3})) as loader:
        with pytest.raises(SkipBudgetExceeded, match="4 bad records met, more than the skip budget of 3") as e:
            list(loader)
        assert all(line in str(e.value) for line in bad_lines)


def test_hosts_get_disjoint_shards_and_epochs_are_reshuffled(data):
    train, proc = data
    seen = []
    for index in range(2):
        pipeline = PipelineConfig(**{**BASE.__dict__, "num_epochs": 1, "shard_index": index, "shard_count": 2})
        with make_loader(train, proc, CFG, pipeline) as loader:
            sources = [s for _ in loader for s in loader.sources]
        assert len(sources) == len(set(sources)) == 30
        seen.append(set(sources))
    assert not seen[0] & seen[1] and len(seen[0] | seen[1]) == 60
    # A window of one example emits in reading order, which shows the shuffle itself.
    pipeline = PipelineConfig(**{**BASE.__dict__, "num_epochs": 2, "window": 1, "batch_size": 1})
    with make_loader(train, proc, CFG, pipeline) as loader:
        order = [s for _ in loader for s in loader.sources]
    assert sorted(order[:60]) == sorted(order[60:]) == sorted(set(order)) and order[:60] != order[60:]
    unshuffled = [r.source for r in read_jsonl(train)]
    assert order[:60] != unshuffled
