"""Random-access record sources: `len(source)` and `source[i]` -> `Record` (or `Skipped` for a bad record),
without holding the records in memory. Each host reads only the rows of its own shard, and grain's worker
processes receive a few paths (pickled) instead of a copy of every record.

- JSONL: a byte-offset index (one 16-byte entry per non-blank line), built once by scanning the file and
  cached next to it (or in `index_dir` when that is not writable), rebuilt when the file's size or mtime
  changes; locally it is memory-mapped, so worker processes share its pages.
- ArrayRecord shards (grain's own format): one row per record, written by `qwen2vl_jax.data.convert`.
- Parquet shards as Hugging Face datasets write them: a `messages` column (turns with `<image>`/`<video>`
  tags, or content lists), `images` / `videos` columns of `{bytes, path}` structs filling the tags in order.
  Random access reads one row group (cached per process), so shards meant for shuffled reading should have
  small row groups (the converter writes 100 rows per group).

JSONL and Parquet paths may be URLs (`gs://...`), read through `qwen2vl_jax.storage` with ranged reads;
ArrayRecord shards are opened by the array_record C++ reader, which takes local paths.
"""

from __future__ import annotations

import bisect
import dataclasses
import hashlib
import json
import os
import struct
from typing import Any, Sequence

import numpy as np

from qwen2vl_jax import storage
from qwen2vl_jax.data.records import IMAGE_KEYS, VIDEO_KEYS, DataError, Record, parse_record

JSONL_SUFFIXES = (".jsonl", ".json", ".jsonl.txt")
ARRAY_RECORD_SUFFIXES = (".array_record", ".arrayrecord")
PARQUET_SUFFIXES = (".parquet",)


@dataclasses.dataclass(frozen=True)
class Skipped:
    """A record that could not become an example, travelling down the pipeline to be counted."""
    source: str
    reason: str


class SourceError(DataError):
    """A data file that cannot be read as a whole (corrupt shard, missing column, stale index): not a bad
    record to skip but a dataset to fix, so it stops the run."""


def expand(spec: str | Sequence[str]) -> list[str]:
    """Comma-separated paths and glob patterns (`data/*.parquet`, `gs://b/shards/train-*.array_record`) ->
    the files, in order; a pattern that matches nothing, or a path that does not exist, is an error."""
    items = [p.strip() for p in (spec.split(",") if isinstance(spec, str) else spec) if p and p.strip()]
    files: list[str] = []
    for item in items:
        if any(c in item for c in "*?["):
            found = storage.glob(item)
            if not found:
                raise DataError(f"{item}: no files match this pattern")
            files.extend(found)
        elif not storage.exists(item):
            raise DataError(f"{item}: no such data file; check the path (data.train, or --data in eval.py)")
        else:
            files.append(item)
    if not files:
        raise DataError(f"no data files in {spec!r}")
    return files


def file_format(path: str) -> str:
    name = path.lower()
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if name.endswith(ARRAY_RECORD_SUFFIXES) or ".array_record-" in name:
        return "array_record"
    if name.endswith(PARQUET_SUFFIXES):
        return "parquet"
    raise DataError(f"{path}: unknown data format; name files *.jsonl, *.array_record or *.parquet")


def open_source(spec: str | Sequence[str], index_dir: str = "") -> "Source":
    """One source over the files of `spec` (all of one format), concatenated in order."""
    files = expand(spec)
    formats = {file_format(f) for f in files}
    if len(formats) > 1:
        raise DataError(f"{spec!r} mixes formats ({', '.join(sorted(formats))}); give each format as its own "
                        "mixture component (data.train: [{path: ..., weight: ...}, ...])")
    kind = formats.pop()
    if kind == "jsonl":
        return JsonlSource(files, index_dir)
    if kind == "array_record":
        return ArrayRecordSource(files)
    return ParquetSource(files)


class Source:
    """Files concatenated: a global index -> (file number, index within the file)."""

    files: list[str]

    def _set_counts(self, counts: Sequence[int]) -> None:
        self._ends = list(np.cumsum(counts, dtype=np.int64).tolist())

    def __len__(self) -> int:
        return self._ends[-1] if self._ends else 0

    def _locate(self, i: int) -> tuple[int, int]:
        i = int(i)
        if not 0 <= i < len(self):
            raise IndexError(f"record {i} of a source of {len(self)}")
        f = bisect.bisect_right(self._ends, i)
        return f, i - (self._ends[f - 1] if f else 0)


# -- JSONL with a byte-offset index -------------------------------------------------------------------------

INDEX_DTYPE = np.dtype([("start", "<u8"), ("length", "<u4"), ("line", "<u4")])
INDEX_MAGIC = b"QVJSONLIDX1"
HEADER_BYTES = 4096           # the entries start here, so a local index can be memory-mapped as it is
_SCAN_CHUNK = 8 << 20
_WHITESPACE = np.zeros(256, bool)
_WHITESPACE[[9, 10, 11, 12, 13, 32]] = True


def fingerprint(path: str) -> dict:
    """What identifies a version of a file: size plus mtime (local) or the store's generation/etag."""
    fs = storage.filesystem(path)
    if fs is None:
        st = os.stat(storage.abspath(path))
        return {"size": st.st_size, "version": st.st_mtime_ns}
    info = fs.info(path)
    version = next((info[k] for k in ("generation", "etag", "ETag", "md5Hash", "mtime", "LastModified", "updated",
                                             "created")
                    if info.get(k) is not None), None)
    return {"size": int(info["size"]), "version": str(version)}


def index_paths(path: str, index_dir: str) -> list[str]:
    """Where an index may live: next to the data, then in `index_dir` (named by the data's full path)."""
    out = [path + ".idx"]
    if index_dir:
        digest = hashlib.sha1(storage.abspath(path).encode()).hexdigest()[:16]
        out.append(storage.join(index_dir, f"{storage.basename(path)}.{digest}.idx"))
    return out


def build_index(path: str) -> np.ndarray:
    """One entry per non-blank line: byte start, byte length (with its newline), 1-based line number."""
    parts, carry, offset, line = [], b"", 0, 1
    with storage.open(path, "rb") as f:
        while True:
            chunk = f.read(_SCAN_CHUNK)
            data = carry + chunk
            if not data:
                break
            buf = np.frombuffer(data, np.uint8)
            ends = np.flatnonzero(buf == 10) + 1               # exclusive ends of the complete lines
            if not chunk and (not len(ends) or ends[-1] != len(buf)):
                ends = np.append(ends, len(buf))               # a last line without a newline
            if len(ends):
                starts = np.concatenate([[0], ends[:-1]])
                keep = np.logical_or.reduceat(~_WHITESPACE[buf[:ends[-1]]], starts)   # any non-blank byte
                entries = np.empty(int(keep.sum()), INDEX_DTYPE)
                entries["start"] = starts[keep] + offset
                entries["length"] = (ends - starts)[keep]
                entries["line"] = (np.arange(len(ends)) + line)[keep]
                parts.append(entries)
                line += len(ends)
                consumed = int(ends[-1])
            else:
                consumed = 0
            offset += consumed
            carry = data[consumed:]
            if not chunk:
                break
    return np.concatenate(parts) if parts else np.empty(0, INDEX_DTYPE)


def load_index(path: str, index_dir: str = "") -> tuple[np.ndarray, str]:
    """The index of a JSONL file and where it is stored: a cached one whose fingerprint matches the file, or a
    new one, written next to the data when possible, else to `index_dir`."""
    current = fingerprint(path)
    candidates = index_paths(path, index_dir)
    for where in candidates:
        header = _read_header(where)
        if header is not None and header.get("file") == current:
            return _read_entries(where, header["records"]), where
    entries = build_index(path)
    header = json.dumps({"file": current, "records": len(entries), "source": storage.abspath(path)}).encode()
    blob = (INDEX_MAGIC + b"\n" + header + b"\n").ljust(HEADER_BYTES, b" ") + entries.tobytes()
    for where in candidates:
        try:
            storage.write_bytes(where, blob)
            return _read_entries(where, len(entries)), where
        except (OSError, PermissionError, ValueError):   # a read-only data dir or bucket: try the next place
            continue
    return entries, ""   # nowhere writable: kept in memory (rebuilt by every process that opens the file)


def _read_header(where: str) -> dict | None:
    try:
        if not storage.exists(where) or storage.size(where) < HEADER_BYTES:
            return None
        raw = storage.read_range(where, 0, HEADER_BYTES)
    except OSError:
        return None
    magic, _, rest = raw.partition(b"\n")
    if magic != INDEX_MAGIC:
        return None
    try:
        return json.loads(rest.partition(b"\n")[0])
    except ValueError:
        return None


def _read_entries(where: str, n: int) -> np.ndarray:
    if n == 0:
        return np.empty(0, INDEX_DTYPE)
    if not storage.is_url(where):
        return np.memmap(storage.abspath(where), INDEX_DTYPE, mode="r", offset=HEADER_BYTES, shape=(n,))
    raw = storage.read_range(where, HEADER_BYTES, HEADER_BYTES + n * INDEX_DTYPE.itemsize)
    return np.frombuffer(raw, INDEX_DTYPE)


class JsonlSource(Source):
    """Records of JSONL files by line, read with one ranged read each. Sources are "path:line"."""

    def __init__(self, files: Sequence[str], index_dir: str = ""):
        self.files, self.index_dir = list(files), index_dir
        self._open_indices()
        if not len(self):
            raise DataError(f"no records in {', '.join(self.files)}")

    def _open_indices(self) -> None:
        loaded = [load_index(f, self.index_dir) for f in self.files]
        self._entries = [e for e, _ in loaded]
        self._index_files = [w for _, w in loaded]
        self._prints = [fingerprint(f) for f in self.files]
        self._set_counts([len(e) for e in self._entries])
        self._handles: dict[int, Any] = {}
        self._pid = os.getpid()

    def __getstate__(self):   # workers reopen the (memory-mapped) indices instead of receiving a copy
        return {"files": self.files, "index_dir": self.index_dir, "index_files": self._index_files,
                "prints": self._prints,
                "unsaved": [None if where else np.asarray(e) for e, where in zip(self._entries, self._index_files)]}

    def __setstate__(self, state):
        self.files, self.index_dir = state["files"], state["index_dir"]
        self._index_files, self._prints = state["index_files"], state["prints"]
        self._entries = []
        for f, where, fp, unsaved in zip(self.files, self._index_files, self._prints, state["unsaved"]):
            if unsaved is not None:    # an index nowhere writable travels with the source
                self._entries.append(unsaved)
                continue
            header = _read_header(where)
            if header is None or header.get("file") != fp:
                raise SourceError(f"{f}: its index {where or '(in memory)'} changed or vanished after the run "
                                  "opened it; do not modify data files or their .idx files during a run")
            self._entries.append(_read_entries(where, header["records"]))
        self._set_counts([len(e) for e in self._entries])
        self._handles, self._pid = {}, os.getpid()

    def _read(self, f: int, start: int, stop: int) -> bytes:
        path = self.files[f]
        if storage.is_url(path):
            return storage.read_range(path, start, stop)
        if self._pid != os.getpid():              # a forked copy must not share file offsets with its parent
            self._handles, self._pid = {}, os.getpid()
        fd = self._handles.get(f)
        if fd is None:
            fd = self._handles[f] = os.open(storage.abspath(path), os.O_RDONLY)
            if os.fstat(fd).st_size != self._prints[f]["size"]:
                raise SourceError(f"{path}: the file changed after its index was built ({self._prints[f]['size']} "
                                  f"bytes then, {os.fstat(fd).st_size} now); restart the run so the index is "
                                  "rebuilt (a resumed run then sees a different data order)")
        return os.pread(fd, stop - start, start)

    def __getitem__(self, i) -> Record | Skipped:
        f, j = self._locate(i)
        entry = self._entries[f][j]
        start, length, line = int(entry["start"]), int(entry["length"]), int(entry["line"])
        path = self.files[f]
        source = f"{path}:{line}"
        lead = 1 if start else 0
        raw = self._read(f, start - lead, start + length)
        body = raw[lead:]
        at_end = start + length == self._prints[f]["size"]
        if len(body) != length or (lead and raw[:1] != b"\n") or not (body.endswith(b"\n") or at_end):
            raise SourceError(f"{source}: the line is no longer at byte {start} where the index "
                              f"{self._index_files[f] or '(in memory)'} puts it; the file changed during the run. "
                              "Restart so the index is rebuilt")
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError as e:
            return Skipped(source, f"not UTF-8 text ({e.reason}); re-encode the file as UTF-8")
        base = storage.dirname(storage.abspath(path))
        try:
            return parse_record(text, source, base)
        except DataError as e:
            return Skipped(source, str(e)[len(source) + 2:] if str(e).startswith(source + ": ") else str(e))


# -- shards with embedded images --------------------------------------------------------------------------

ROW_MAGIC = b"QVR1"


def encode_row(row: dict) -> bytes:
    """A record in the shard row form (`row_to_record`) -> one ArrayRecord payload: magic, JSON header, then
    the media bytes, which the header addresses by (offset, length)."""
    blobs: list[bytes] = []
    end = [0]

    def put(b):
        if b is None:
            return None
        blobs.append(bytes(b))
        end[0] += len(b)
        return [end[0] - len(b), len(b)]

    header = {"messages": row["messages"]}
    for kind in ("images", "videos"):
        header[kind] = [{"path": e.get("path"), "settings": e.get("settings"), "bytes": put(e.get("bytes")),
                         "frames": None if e.get("frames") is None else [put(b) for b in e["frames"]]}
                        for e in row.get(kind) or []]
    head = json.dumps(header, ensure_ascii=False).encode()
    return ROW_MAGIC + struct.pack("<I", len(head)) + head + b"".join(blobs)


def decode_row(payload: bytes, source: str) -> dict:
    if payload[:4] != ROW_MAGIC or len(payload) < 8:
        raise SourceError(f"{source}: not a record written by qwen2vl_jax.data.convert (bad magic bytes); "
                          "re-create the shard with python -m qwen2vl_jax.data.convert")
    (n,) = struct.unpack("<I", payload[4:8])
    try:
        header = json.loads(payload[8:8 + n])
    except ValueError as e:
        raise SourceError(f"{source}: corrupt record header ({e}); re-create the shard") from None
    blobs = memoryview(payload)[8 + n:]

    def get(span):
        if span is None:
            return None
        start, length = span
        if start + length > len(blobs):
            raise SourceError(f"{source}: record truncated (media bytes end at {start + length} of {len(blobs)}); "
                              "re-create the shard")
        return bytes(blobs[start:start + length])

    for kind in ("images", "videos"):
        header[kind] = [{**e, "bytes": get(e["bytes"]),
                         "frames": None if e.get("frames") is None else [get(s) for s in e["frames"]]}
                        for e in header.get(kind) or []]
    return header


def row_to_record(row: dict, source: str, base_dir: str | None = None) -> Record:
    """A shard row -> Record. `messages` is a list of turns (or its JSON text); `images`/`videos` entries are
    `{bytes, path}` structs (HF datasets), plus optional `frames` (a video as image bytes) and `settings`
    (JSON of per-item pixel settings). Missing bytes fall back to the path, relative to the shard."""
    messages = row.get("messages")
    if messages is None:
        raise DataError(f"{source}: 'messages' is empty (null); every row needs its conversation")
    if isinstance(messages, str):
        try:
            messages = json.loads(messages)
        except ValueError as e:
            raise DataError(f"{source}: 'messages' is text but not JSON ({e})") from None
    obj = {"messages": _drop_nulls(messages),
           "images": [_media(e, "image", source) for e in row.get("images") or []],
           "videos": [_media(e, "video", source) for e in row.get("videos") or []]}
    if row.get("system"):
        obj["system"] = row["system"]
    return parse_record(obj, source, base_dir)


def _drop_nulls(x):
    # Arrow structs give every field to every element (None where absent); a None "image" key would turn a
    # text item into an image item (the chat template's precedence).
    if isinstance(x, dict):
        return {k: _drop_nulls(v) for k, v in x.items() if v is not None}
    if isinstance(x, list):
        return [_drop_nulls(v) for v in x]
    return x


def _media(entry, kind: str, source: str):
    if not isinstance(entry, dict):
        return entry               # a path, or raw bytes
    settings = entry.get("settings")
    if isinstance(settings, str):
        try:
            settings = json.loads(settings)
        except ValueError:
            raise DataError(f"{source}: {kind} settings {settings!r} are not JSON") from None
    settings = {k: v for k, v in (settings or {}).items() if k in (IMAGE_KEYS if kind == "image" else VIDEO_KEYS)}
    for k in (IMAGE_KEYS if kind == "image" else VIDEO_KEYS):
        if entry.get(k) is not None:
            settings[k] = entry[k]
    if entry.get("bytes") is not None:
        media = entry["bytes"]
    elif entry.get("frames") is not None:
        media = list(entry["frames"])
    elif entry.get("path"):
        media = entry["path"]
    else:
        raise DataError(f"{source}: a {kind} entry has neither bytes nor a path")
    return {kind: media, **settings}


class ArrayRecordSource(Source):
    """Rows of ArrayRecord shards (`encode_row` payloads). Sources are "shard:row N" (0-based)."""

    OPTIONS = "readahead_buffer_size:0,max_parallelism:0"   # random access, no read-ahead

    def __init__(self, files: Sequence[str]):
        self.files = list(files)
        remote = [f for f in self.files if storage.is_url(f)]
        if remote:
            raise DataError(f"{remote[0]}: the array_record reader opens local files only; mount the bucket "
                            "(e.g. gcsfuse) and give the local path, or convert to Parquet, which is read from "
                            "buckets directly")
        self._readers: dict[int, Any] = {}
        self._set_counts([self._reader(f).num_records() for f in range(len(self.files))])   # kept open for reading
        if not len(self):
            raise DataError(f"no records in {', '.join(self.files)}")

    def _reader(self, f: int):
        reader = self._readers.get(f)
        if reader is None:
            from array_record.python.array_record_module import ArrayRecordReader
            path = self.files[f]
            try:
                reader = ArrayRecordReader(storage.abspath(path), self.OPTIONS)
                problem = None if reader.ok() else "truncated, or not ArrayRecord"
            except Exception as e:   # the C++ reader raises plain RuntimeError/ValueError with riegeli's text
                problem = str(e)
            if problem:
                raise SourceError(f"{path}: not a readable ArrayRecord shard ({problem}); re-create it with "
                                  "python -m qwen2vl_jax.data.convert")
            self._readers[f] = reader
        return reader

    def __getstate__(self):
        return {"files": self.files, "_ends": self._ends}

    def __setstate__(self, state):
        self.files, self._ends, self._readers = state["files"], state["_ends"], {}

    def __getitem__(self, i) -> Record | Skipped:
        f, j = self._locate(i)
        source = f"{self.files[f]}:row {j}"
        try:
            payload = self._reader(f).read([j])[0]
        except SourceError:
            raise
        except Exception as e:
            raise SourceError(f"{source}: unreadable ({e}); the shard is corrupt, re-create it") from None
        try:
            return row_to_record(decode_row(payload, source), source, storage.dirname(storage.abspath(self.files[f])))
        except SourceError:
            raise
        except DataError as e:
            return Skipped(source, str(e)[len(source) + 2:])


class ParquetSource(Source):
    """Rows of Parquet shards (HF datasets layout). Sources are "shard:row N" (0-based within the shard)."""

    COLUMNS = ("messages", "images", "videos", "system")
    CACHED_GROUPS = 2

    def __init__(self, files: Sequence[str]):
        self.files = list(files)
        self._groups: list[np.ndarray] = []      # per file: the end row of each row group
        self._columns: list[list[str]] = []
        self._open, self._cache = {}, {}
        for f, path in enumerate(self.files):
            pf = self._file(f)      # kept open: shuffled reading soon touches every shard
            meta, names = pf.metadata, pf.schema_arrow.names
            if "messages" not in names:
                raise SourceError(f"{path}: no 'messages' column (columns: {', '.join(names)}); shards need "
                                  "'messages' and, for media, 'images' / 'videos' columns")
            self._columns.append([c for c in self.COLUMNS if c in names])
            self._groups.append(np.cumsum([meta.row_group(g).num_rows for g in range(meta.num_row_groups)]))
        self._set_counts([int(g[-1]) if len(g) else 0 for g in self._groups])
        if not len(self):
            raise DataError(f"no records in {', '.join(self.files)}")

    def _file(self, f: int):
        pf = self._open.get(f)
        if pf is not None:
            return pf
        import pyarrow.parquet as pq
        path = self.files[f]
        try:
            pf = pq.ParquetFile(storage.open(path, "rb") if storage.is_url(path) else storage.abspath(path))
        except Exception as e:   # pyarrow.ArrowInvalid / OSError for a truncated or non-Parquet file
            raise SourceError(f"{path}: not a readable Parquet file ({e}); re-create the shard") from None
        self._open[f] = pf
        return pf

    def __getstate__(self):
        return {"files": self.files, "_groups": self._groups, "_columns": self._columns, "_ends": self._ends}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._open, self._cache = {}, {}

    def __getitem__(self, i) -> Record | Skipped:
        f, j = self._locate(i)
        g = int(np.searchsorted(self._groups[f], j, side="right"))
        r = j - (int(self._groups[f][g - 1]) if g else 0)
        source = f"{self.files[f]}:row {j}"
        table = self._cache.get((f, g))
        if table is None:
            try:
                table = self._file(f).read_row_group(g, columns=self._columns[f])
            except SourceError:
                raise
            except Exception as e:
                raise SourceError(f"{source}: row group {g} is unreadable ({e}); the shard is corrupt, "
                                  "re-create it") from None
            if len(self._cache) >= self.CACHED_GROUPS:
                self._cache.pop(next(iter(self._cache)))
            self._cache[(f, g)] = table
        row = table.slice(r, 1).to_pylist()[0]
        try:
            return row_to_record(row, source, storage.dirname(storage.abspath(self.files[f])))
        except DataError as e:
            return Skipped(source, str(e)[len(source) + 2:])
