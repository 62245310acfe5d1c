"""Record sources at scale: the JSONL byte-offset index, ArrayRecord and Parquet shards written by the converter
(the same batches as the JSONL + files they came from), exact resume per source and for a weighted mixture,
the mixture's proportions, and the errors for stale indices, corrupt shards and missing columns."""

import json
import os
import re

import numpy as np
import pytest

import qwen2vl_jax as qv
from qwen2vl_jax.data import Processor, read_jsonl, synthetic
from qwen2vl_jax.data import sources
from qwen2vl_jax.data.convert import convert
from qwen2vl_jax.data.pipeline import PipelineConfig, make_loader
from qwen2vl_jax.data.records import DataError
from qwen2vl_jax.train import config as run_config
from train_utils import assert_same_batches, take

pytest.importorskip("pyarrow")
pytest.importorskip("array_record")

CFG = qv.preset("tiny")
BASE = PipelineConfig(buckets=((256, 64), (512, 128)), batch_size=2, window=16, shard_index=0, shard_count=1)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """The synthetic set (images, and videos as frame files) as JSONL and as both shard formats."""
    root = str(tmp_path_factory.mktemp("sources"))
    train, _ = synthetic.generate(root, size=40, heldout_size=0, seed=1)
    specs = {"jsonl": train}
    for fmt in ("parquet", "array_record"):
        convert(train, os.path.join(root, fmt), fmt, shard_size=15, row_group_size=4, progress=False)
        specs[fmt] = os.path.join(root, fmt, f"train-*.{fmt}")
    return specs, Processor.from_config(CFG)


def _text_jsonl(path, n, tag):
    rows = [{"messages": [{"role": "user", "content": f"{tag} question {i}"},
                          {"role": "assistant", "content": f"{tag} answer {i}"}]} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_each_source_gives_the_same_batches(data):
    specs, proc = data
    batches, order = {}, {}
    for name, spec in specs.items():
        with make_loader(spec, proc, CFG, BASE) as loader:
            batches[name] = take(loader, 12)                     # crosses into the second epoch
            order[name] = loader.sources
    assert_same_batches(batches["parquet"], batches["jsonl"])            # embedded bytes decode to the files' pixels
    assert_same_batches(batches["array_record"], batches["jsonl"])
    assert all(re.fullmatch(r".*/train-\d{5}-of-00003\.parquet:row \d+", s) for s in order["parquet"])
    assert any(b["patches"].any() for b in batches["jsonl"])


@pytest.mark.parametrize("name", ["jsonl", "parquet", "array_record", "mixture"])
def test_resume_mid_epoch_is_exact(data, tmp_path, name):
    specs, proc = data
    spec = specs.get(name) or [{"path": specs["parquet"], "weight": 2, "name": "shards"},
                               {"path": _text_jsonl(tmp_path / "text.jsonl", 30, "t"), "weight": 1, "name": "text"}]
    with make_loader(spec, proc, CFG, BASE) as loader:
        take(loader, 5)
        state = json.loads(json.dumps(loader.get_state()))       # what a checkpoint stores
        after = take(loader, 6)
        seen = dict(loader.seen)
    with make_loader(spec, proc, CFG, BASE) as resumed:
        resumed.set_state(state)
        assert_same_batches(take(resumed, 6), after)
        assert resumed.seen == seen
    if name == "mixture":
        assert set(seen) == {"shards", "text"} and sum(seen.values()) == loader.examples


def test_mixture_with_workers_matches_in_process(data, tmp_path):
    specs, proc = data
    spec = [{"path": specs["array_record"], "weight": 1}, {"path": specs["jsonl"], "weight": 1}]
    with make_loader(spec, proc, CFG, BASE) as single:
        expected = take(single, 6)
    with make_loader(spec, proc, CFG, PipelineConfig(**{**BASE.__dict__, "workers": 2})) as loader:
        assert_same_batches(take(loader, 6), expected)


def test_mixture_proportions_follow_the_weights(tmp_path):
    proc = Processor.from_config(CFG)
    spec = [{"path": _text_jsonl(tmp_path / "a.jsonl", 50, "a"), "weight": 0.6},
            {"path": _text_jsonl(tmp_path / "b.jsonl", 7, "b"), "weight": 0.3},    # small: repeats, still 30%
            {"path": _text_jsonl(tmp_path / "c.jsonl", 40, "c"), "weight": 0.1}]
    one = PipelineConfig(**{**BASE.__dict__, "batch_size": 1, "window": 1, "prefetch": 0})
    with make_loader(spec, proc, CFG, one) as loader:
        take(loader, 400)
        counts = loader.seen
    assert sum(counts.values()) == 400
    for component in spec:
        assert abs(counts[component["path"]] / 400 - component["weight"]) < 0.01, counts


def test_mixture_config_is_validated():
    cfg = run_config.load(None, ["data.train=[{path: a/*.parquet, weight: 0.7}, {path: b.jsonl, weight: 0.3}]"])
    assert cfg.data.train[0] == {"path": "a/*.parquet", "weight": 0.7}
    with pytest.raises(run_config.RunConfigError, match="data.train must be files"):
        run_config.load(None, ["data.train=[{path: a.jsonl, weight: -1}]"])
    with pytest.raises(DataError, match="weight must be a positive number"):
        make_loader([{"path": "a.jsonl", "weight": 0}], None, CFG, BASE)


# -- the JSONL index ----------------------------------------------------------------------------------------

def test_index_matches_the_line_reader(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "_SCAN_CHUNK", 7)      # lines straddle many scan chunks
    path = tmp_path / "d.jsonl"
    good = json.dumps({"messages": [{"role": "user", "content": "hi é"}, {"role": "assistant", "content": "yo"}]})
    path.write_bytes(f"{good}\n\n   \n{good}\r\n{{oops\n\t\n{good}".encode())   # blank lines, CRLF, no final \n
    src = sources.JsonlSource([str(path)])
    expected = []
    list(read_jsonl(str(path), on_error=lambda e: expected.append(str(e).partition(":")[0])))
    got = [src[i].source for i in range(len(src))]
    assert got == [f"{path}:{n}" for n in (1, 4, 5, 7)]
    assert [r.source for r in read_jsonl(str(path), on_error=lambda e: None)] == [got[0], got[1], got[3]]
    assert isinstance(src[2], sources.Skipped) and "not valid JSON" in src[2].reason
    assert src[3].messages == src[0].messages


def test_index_is_cached_and_rebuilt_when_the_file_changes(tmp_path):
    path = _text_jsonl(tmp_path / "d.jsonl", 10, "x")
    assert len(sources.JsonlSource([path])) == 10
    index = path + ".idx"
    stamp = os.stat(index).st_mtime_ns
    assert len(sources.JsonlSource([path])) == 10 and os.stat(index).st_mtime_ns == stamp   # reused
    with open(path, "a") as f:
        f.write(json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]})
                + "\n")
    assert len(sources.JsonlSource([path])) == 11                                            # rebuilt


def test_index_goes_to_index_dir_when_the_data_dir_is_not_writable(tmp_path, monkeypatch):
    path = _text_jsonl(tmp_path / "d.jsonl", 3, "x")
    real = sources.storage.write_bytes

    def refuse_next_to_data(where, blob):
        if where == path + ".idx":
            raise PermissionError("read-only")
        real(where, blob)

    monkeypatch.setattr(sources.storage, "write_bytes", refuse_next_to_data)
    src = sources.JsonlSource([path], index_dir=str(tmp_path / "cache"))
    assert src._index_files[0].startswith(str(tmp_path / "cache")) and len(src) == 3


def test_a_file_changed_during_the_run_is_a_clear_error(tmp_path):
    path = _text_jsonl(tmp_path / "d.jsonl", 10, "x")
    src = sources.JsonlSource([path])
    assert src[3].source == f"{path}:4"
    text = open(path).read()
    open(path, "w").write("#" * 5 + text[:-5])                   # same size, lines shifted
    with pytest.raises(sources.SourceError, match=r"d.jsonl:5: the line is no longer at byte .* changed"):
        src[4]
    open(path, "w").write(text + text)                            # grown: caught when a process opens it
    with pytest.raises(sources.SourceError, match=r"d.jsonl: the file changed after its index was built"):
        _in_new_process(src)[0]


def _in_new_process(src):
    clone = sources.JsonlSource.__new__(sources.JsonlSource)
    clone.__setstate__(src.__getstate__())     # what a worker process receives
    return clone


# -- shards -------------------------------------------------------------------------------------------------

def test_corrupt_shards_name_the_shard_and_row(data, tmp_path):
    specs, _ = data
    shard = sources.expand(specs["parquet"])[0]
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(open(shard, "rb").read()[:-100])
    with pytest.raises(sources.SourceError, match=r"broken.parquet: not a readable Parquet file"):
        sources.open_source(str(broken))
    junk = tmp_path / "junk.array_record"
    junk.write_bytes(b"\x00" * 4096)
    with pytest.raises(sources.SourceError, match=r"junk.array_record: not a readable ArrayRecord shard"):
        sources.open_source(str(junk))
    good = open(sources.expand(specs["array_record"])[0], "rb").read()
    for name, blob in (("truncated", good[:len(good) // 2]), ("flipped", good[:1000] + bytes([good[1000] ^ 255])
                                                               + good[1001:])):
        (tmp_path / f"{name}.array_record").write_bytes(blob)
    with pytest.raises(sources.SourceError, match=r"truncated.array_record: not a readable ArrayRecord shard"):
        sources.open_source(str(tmp_path / "truncated.array_record"))
    flipped = sources.open_source(str(tmp_path / "flipped.array_record"))
    with pytest.raises(sources.SourceError, match=r"flipped.array_record:row \d+: unreadable \(Corrupted"):
        [flipped[i] for i in range(len(flipped))]
    from array_record.python.array_record_module import ArrayRecordWriter
    foreign = tmp_path / "foreign.array_record"
    writer = ArrayRecordWriter(str(foreign), "group_size:1")
    writer.write(sources.encode_row({"messages": [{"role": "user", "content": "q"},
                                                  {"role": "assistant", "content": "a"}]}))
    writer.write(b"a tf.Example, say")
    writer.close()
    src = sources.open_source(str(foreign))
    assert src[0].messages[1]["content"][0]["text"] == "a"
    with pytest.raises(sources.SourceError, match=r"foreign.array_record:row 1: not a record written by"):
        src[1]


def test_missing_or_null_columns(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"conversations": ["x"]}), tmp_path / "nomsg.parquet")
    with pytest.raises(sources.SourceError, match=r"nomsg.parquet: no 'messages' column \(columns: conversations\)"):
        sources.open_source(str(tmp_path / "nomsg.parquet"))
    turns = [{"role": "user", "content": "<image>what?"}, {"role": "assistant", "content": "red"}]
    pq.write_table(pa.table({"messages": [turns, None, turns]}), tmp_path / "rows.parquet")
    src = sources.open_source(str(tmp_path / "rows.parquet"))
    assert isinstance(src[1], sources.Skipped) and src[1].source.endswith("rows.parquet:row 1")
    assert "'messages' is empty" in src[1].reason
    assert isinstance(src[0], sources.Skipped) and "1 <image> tag(s)" in src[0].reason   # no images column


def test_hf_style_rows_with_content_lists_and_paths(tmp_path):
    """Rows as HF datasets write them: content lists as structs (null fields where absent), images whose bytes
    are missing fall back to their path, relative to the shard."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image
    Image.new("RGB", (40, 30), (200, 10, 10)).save(tmp_path / "red.png")
    png = (tmp_path / "red.png").read_bytes()
    turns = [{"role": "user", "content": [{"type": "image", "text": None}, {"type": "text", "text": "colour?"}]},
             {"role": "assistant", "content": [{"type": "text", "text": "red"}]}]
    pq.write_table(pa.table({"messages": [turns, turns],
                             "images": [[{"bytes": png, "path": "red.png"}], [{"bytes": None, "path": "red.png"}]]}),
                   tmp_path / "hf.parquet")
    src = sources.open_source(str(tmp_path / "hf.parquet"))
    proc = Processor.from_config(CFG)
    embedded, by_path = proc.encode_record(src[0]), proc.encode_record(src[1])
    assert src[1].images[0]["image"] == str(tmp_path / "red.png")
    for k in embedded:
        np.testing.assert_array_equal(embedded[k], by_path[k])


def test_sources_read_from_a_bucket(data, tmp_path):
    """JSONL (with its index) and Parquet shards from a URL (fsspec's in-memory store stands in for gs://)."""
    import fsspec
    specs, proc = data
    fs, url = fsspec.filesystem("memory"), "memory://qv-sources"
    text = _text_jsonl(tmp_path / "text.jsonl", 12, "t")
    shard = sources.expand(specs["parquet"])[0]
    fs.pipe_file(f"{url}/text.jsonl", open(text, "rb").read())
    fs.pipe_file(f"{url}/shard.parquet", open(shard, "rb").read())
    try:
        remote, local = sources.open_source(f"{url}/text.jsonl"), sources.open_source(text)
        assert fs.exists(f"{url}/text.jsonl.idx")
        assert [r.messages for r in (remote[i] for i in range(12))] == [local[i].messages for i in range(12)]
        remote, local = sources.open_source(f"{url}/shard.parquet"), sources.open_source(shard)
        assert len(remote) == len(local)
        for i in range(len(local)):
            assert remote[i].messages == local[i].messages and remote[i].source.startswith(url)
        with pytest.raises(DataError, match="no such data file"):
            sources.open_source(f"{url}/misspelt.jsonl")
        fs.pipe_file(f"{url}/x.array_record", b"")
        with pytest.raises(DataError, match="the array_record reader opens local files only"):
            sources.open_source(f"{url}/x.array_record")
        with make_loader(f"{url}/shard.parquet", proc, CFG, BASE) as a, make_loader(shard, proc, CFG, BASE) as b:
            assert_same_batches(take(a, 3), take(b, 3))
    finally:
        fs.rm(url, recursive=True)


def test_an_index_kept_in_memory_travels_to_workers(tmp_path, monkeypatch):
    path = _text_jsonl(tmp_path / "d.jsonl", 5, "x")

    def read_only(where, blob):
        raise PermissionError("read-only")

    monkeypatch.setattr(sources.storage, "write_bytes", read_only)
    src = sources.JsonlSource([path])
    assert src._index_files == [""]
    clone = sources.JsonlSource.__new__(sources.JsonlSource)
    clone.__setstate__(src.__getstate__())
    assert [clone[i].source for i in range(5)] == [f"{path}:{n}" for n in range(1, 6)]


@pytest.mark.slow   # two train.py processes (compile twice): ~1-4 min on 2 loaded cores
def test_train_on_a_mixture_logs_what_it_saw_and_resumes(tmp_path):
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    train, _ = synthetic.generate(str(tmp_path / "syn"), size=40, heldout_size=0, seed=2,
                                  config=synthetic.SyntheticConfig.demo())
    convert(train, str(tmp_path / "pq"), "parquet", shard_size=20, progress=False)
    mixture = (f"data.train=[{{path: '{tmp_path}/pq/train-*.parquet', weight: 3, name: shards}}, "
               f"{{path: '{train}', weight: 1, name: files}}]")
    work = tmp_path / "run"

    def run(steps):
        r = subprocess.run([sys.executable, os.path.join(root, "train.py"), f"workdir={work}", f"steps={steps}",
                            "checkpoint_every=3", "progress=false", "export_hf=false", "data.batch_size=2",
                            "data.window=8", mixture], env={**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""},
                           capture_output=True, text=True, timeout=900)
        assert r.returncode == 0, r.stderr[-3000:]

    run(3)
    run(5)                                                 # resumes from step 3
    rows = [json.loads(line) for line in open(work / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    totals = [r["seen/shards"] + r["seen/files"] for r in rows]
    assert totals == sorted(totals) and totals[0] > 0       # counts carry across the resume
    assert 0.65 < rows[-1]["seen/shards"] / totals[-1] < 0.85
