"""JSONL + image/video files -> shards with the media bytes inside:

    python -m qwen2vl_jax.data.convert train.jsonl out/ --format parquet --shard-size 10000

Each record becomes one row in the Hugging Face datasets layout: `messages` (turns whose content is text with
`<image>`/`<video>` tags), `images` and `videos` (lists of `{bytes, path, settings}`; a video given as frames
keeps them under `frames`). Per-item pixel settings travel as JSON in `settings`. The bytes are the files'
own, so the shards decode to exactly the pixels the files do. ArrayRecord rows hold the same fields
(`sources.encode_row`). Shards are named `<name>-00000-of-00012.<ext>`; `out` may be a bucket URL.
"""

from __future__ import annotations

import argparse
import base64
import json
import math
import os
import sys
import tempfile

from qwen2vl_jax import storage
from qwen2vl_jax.data.records import IMAGE_KEYS, VIDEO_KEYS, DataError, Record
from qwen2vl_jax.data.sources import JsonlSource, Skipped, encode_row

EXTENSIONS = {"parquet": "parquet", "array_record": "array_record"}


def read_media(source, where: str) -> bytes:
    """The bytes of an image or video source as a record names it (path, URL in a bucket, data: URI)."""
    if isinstance(source, (bytes, bytearray)):
        return bytes(source)
    if not isinstance(source, str):
        raise DataError(f"{where}: cannot embed a {type(source).__name__}; give a file path")
    if source.startswith("data:"):
        return base64.b64decode(source.partition("base64,")[2])
    if source.startswith(("http://", "https://")):
        raise DataError(f"{where}: {source}: URLs are not fetched; download the file and give its path")
    try:
        return storage.read_bytes(source)
    except (FileNotFoundError, IsADirectoryError, PermissionError) as e:
        raise DataError(f"{where}: cannot read {source} ({type(e).__name__}); fix the path or drop the record "
                        "(--skip-bad)") from None


def record_to_row(record: Record) -> dict:
    """A canonical record -> a shard row (`sources.row_to_record` reads it back to the same record, media as
    bytes)."""
    messages, media = [], {"image": [], "video": []}
    for message in record.messages:
        text = []
        for item in message["content"]:
            kind = item["type"]
            if kind == "text":
                text.append(item["text"])
                continue
            text.append(f"<{kind}>")
            source = item[kind]
            where = f"{record.source}: {kind} {len(media[kind]) + 1}"
            entry = {"path": None, "bytes": None, "frames": None}
            if isinstance(source, list):        # a video as frame files
                entry["frames"] = [read_media(s, where) for s in source]
                entry["path"] = json.dumps(source) if all(isinstance(s, str) for s in source) else None
            else:
                entry["bytes"] = read_media(source, where)
                entry["path"] = source if isinstance(source, str) and not source.startswith("data:") else None
            settings = {k: item[k] for k in (IMAGE_KEYS if kind == "image" else VIDEO_KEYS) if k in item}
            entry["settings"] = json.dumps(settings) if settings else None
            media[kind].append(entry)
        messages.append({"role": message["role"], "content": "".join(text)})
    return {"messages": messages, "images": media["image"], "videos": media["video"]}


def parquet_schema():
    import pyarrow as pa
    image = pa.struct([("bytes", pa.binary()), ("path", pa.string()), ("settings", pa.string())])
    video = pa.struct([("bytes", pa.binary()), ("path", pa.string()), ("frames", pa.list_(pa.binary())),
                       ("settings", pa.string())])
    turn = pa.struct([("role", pa.string()), ("content", pa.string())])
    return pa.schema([("messages", pa.list_(turn)), ("images", pa.list_(image)), ("videos", pa.list_(video))])


class ShardWriter:
    """Writes rows to one local shard file of either format."""

    def __init__(self, path: str, fmt: str, row_group_size: int, row_group_bytes: int = 1 << 20):
        self.path, self.fmt = path, fmt
        self.row_group_size, self.row_group_bytes = row_group_size, row_group_bytes
        if fmt == "array_record":
            from array_record.python.array_record_module import ArrayRecordWriter
            self._writer = ArrayRecordWriter(path, "group_size:1")   # one record per chunk: random access
        else:
            import pyarrow.parquet as pq
            self._schema = parquet_schema()
            # No column statistics: nothing filters on them, and min/max of image bytes would bloat the footer,
            # which every reader process holds in memory for every shard.
            self._writer = pq.ParquetWriter(path, self._schema, compression="zstd", write_statistics=False)
            self._rows: list[dict] = []
            self._bytes = 0

    def write(self, row: dict) -> None:
        if self.fmt == "array_record":
            self._writer.write(encode_row(row))
            return
        self._rows.append({"messages": row["messages"],
                           "images": [{k: e[k] for k in ("bytes", "path", "settings")} for e in row["images"]],
                           "videos": row["videos"]})
        self._bytes += sum(len(e["bytes"] or b"") + sum(map(len, e.get("frames") or []))
                           for e in row["images"] + row["videos"]) + sum(len(m["content"]) for m in row["messages"])
        # A row group is the unit of a random read, and each costs footer metadata in every reader: groups of
        # about `row_group_bytes` keep both small (a few images, or a thousand text records).
        if len(self._rows) >= self.row_group_size or self._bytes >= self.row_group_bytes:
            self._flush()

    def _flush(self) -> None:
        import pyarrow as pa
        if self._rows:
            self._writer.write_table(pa.Table.from_pylist(self._rows, schema=self._schema),
                                     row_group_size=len(self._rows))
            self._rows, self._bytes = [], 0

    def close(self) -> None:
        if self.fmt != "array_record":
            self._flush()
        self._writer.close()


def convert(inputs: str, out: str, fmt: str = "parquet", shard_size: int = 10_000, name: str = "train",
            row_group_size: int = 1000, row_group_mb: float = 1.0, skip_bad: bool = False,
            progress: bool = True) -> list[str]:
    """Converts JSONL file(s) to shards under `out`; returns the shard paths. Bad records stop the conversion
    with their file:line, or with `skip_bad` are reported and left out."""
    if fmt not in EXTENSIONS:
        raise ValueError(f"format must be one of {', '.join(EXTENSIONS)}, got {fmt!r}")
    if shard_size < 1 or row_group_size < 1:
        raise ValueError("shard_size and row_group_size must be at least 1")
    source = JsonlSource([p for p in inputs.split(",") if p])
    n_shards = max(1, math.ceil(len(source) / shard_size))
    storage.makedirs(out)
    paths = [storage.join(out, f"{name}-{i:05d}-of-{n_shards:05d}.{EXTENSIONS[fmt]}") for i in range(n_shards)]
    from tqdm import tqdm
    bar = tqdm(total=len(source), unit="rec", desc=f"{fmt} shards", disable=not progress)
    skipped = []
    with tempfile.TemporaryDirectory() as tmp:
        for s, path in enumerate(paths):
            local = os.path.join(tmp, storage.basename(path)) if storage.is_url(path) else path
            writer = ShardWriter(local, fmt, row_group_size, int(row_group_mb * (1 << 20)))
            for i in range(s * shard_size, min(len(source), (s + 1) * shard_size)):
                record = source[i]
                try:
                    if isinstance(record, Skipped):
                        raise DataError(f"{record.source}: {record.reason}")
                    writer.write(record_to_row(record))
                except DataError as e:
                    if not skip_bad:
                        writer.close()
                        raise
                    skipped.append(str(e))
                    bar.write(f"skipped {e}")
                bar.update()
            writer.close()
            if local != path:
                with open(local, "rb") as f:
                    storage.write_bytes(path, f.read())
                os.remove(local)
    bar.close()
    if skipped:
        print(f"{len(skipped)} bad record(s) left out", file=sys.stderr)
    return paths


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m qwen2vl_jax.data.convert", description=__doc__.split("\n\n")[0])
    p.add_argument("inputs", help="JSONL file(s), comma-separated")
    p.add_argument("out", help="output directory (local or a bucket URL)")
    p.add_argument("--format", default="parquet", choices=sorted(EXTENSIONS))
    p.add_argument("--shard-size", type=int, default=10_000, help="records per shard")
    p.add_argument("--row-group-size", type=int, default=1000, help="Parquet: at most this many rows per row group")
    p.add_argument("--row-group-mb", type=float, default=1.0,
                   help="Parquet: at most about this many MB per row group (a random read costs one group)")
    p.add_argument("--name", default="train", help="shard name prefix")
    p.add_argument("--skip-bad", action="store_true", help="leave out bad records instead of stopping")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    try:
        paths = convert(a.inputs, a.out, a.format, a.shard_size, a.name, a.row_group_size, a.row_group_mb,
                        a.skip_bad, not a.no_progress)
    except DataError as e:
        sys.exit(f"error: {e}")
    print(f"wrote {len(paths)} shard(s): {paths[0]}" + (f" ... {paths[-1]}" if len(paths) > 1 else ""))


if __name__ == "__main__":
    main()
