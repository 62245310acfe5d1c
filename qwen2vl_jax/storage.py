"""One small path layer: every path a user gives may be a local path or a URL (`gs://bucket/x`, `s3://...`,
any protocol fsspec knows). Local paths go to the OS; URLs go to the fsspec filesystem of their protocol.

Object stores are not file systems, and nothing here pretends they are:
- there are no directories: `makedirs` is a no-op for URLs and `isdir` means "some object has this prefix";
- objects cannot be appended to or renamed: write whole objects (`write_bytes` / `write_text`);
- `glob` supports `*`, `?` and `[...]` within one path level, never `**`.
"""

from __future__ import annotations

import functools
import io
import os
import posixpath
from typing import IO, Any

LOCAL_PROTOCOLS = ("", "file", "local")


def protocol(path: str | os.PathLike) -> str:
    """'gs' for gs://b/x, '' for a local path (also for 'file://...': fsspec's local protocol)."""
    path = os.fspath(path)
    head, sep, _ = path.partition("://")
    if not sep or "/" in head or not head:
        return ""
    return "" if head in LOCAL_PROTOCOLS else head


def is_url(path: str | os.PathLike) -> bool:
    """True when `path` names an object in a remote store (gs://, s3://, ...), not a local file."""
    return protocol(path) != ""


def _local(path: str | os.PathLike) -> str:
    path = os.fspath(path)
    return path[len("file://"):] if path.startswith("file://") else path


@functools.lru_cache(maxsize=None)
def _filesystem(proto: str):
    import fsspec
    try:
        return fsspec.filesystem(proto)
    except ImportError as e:
        raise MissingClient(proto, e) from None
    except ValueError as e:   # fsspec: "Protocol not known"
        raise MissingClient(proto, e) from None


class MissingClient(ImportError):
    """A URL whose protocol has no installed fsspec client."""

    PACKAGES = {"gs": "gcsfs", "gcs": "gcsfs", "s3": "s3fs", "s3a": "s3fs", "az": "adlfs", "abfs": "adlfs",
                "hf": "huggingface_hub"}

    def __init__(self, proto: str, cause: Exception):
        package = self.PACKAGES.get(proto)
        hint = f"install {package} (pip install {package})" if package else "install the fsspec client for it"
        super().__init__(f"no client for {proto}:// paths is installed ({cause}); {hint}")


def filesystem(path: str | os.PathLike):
    """The fsspec filesystem behind a URL (None for a local path)."""
    proto = protocol(path)
    return _filesystem(proto) if proto else None


def join(base: str | os.PathLike, *parts: str) -> str:
    base = os.fspath(base)
    if is_url(base):
        return posixpath.join(base, *parts)
    return os.path.join(base, *parts)


def dirname(path: str | os.PathLike) -> str:
    path = os.fspath(path)
    if is_url(path):
        proto, _, rest = path.partition("://")
        parent = posixpath.dirname(rest.rstrip("/"))
        return f"{proto}://{parent}"
    return os.path.dirname(path)


def basename(path: str | os.PathLike) -> str:
    path = os.fspath(path)
    return posixpath.basename(path.rstrip("/")) if is_url(path) else os.path.basename(path)


def abspath(path: str | os.PathLike) -> str:
    """Local paths made absolute; URLs unchanged."""
    path = os.fspath(path)
    return path if is_url(path) else os.path.abspath(_local(path))


def isabs(path: str | os.PathLike) -> bool:
    path = os.fspath(path)
    return is_url(path) or os.path.isabs(_local(path))


def open(path: str | os.PathLike, mode: str = "rb", **kwargs) -> IO[Any]:   # noqa: A001 - the module's verb
    """A file object for reading or writing a whole file/object. Append modes are refused for URLs: object
    stores would silently overwrite."""
    path = os.fspath(path)
    fs = filesystem(path)
    if fs is None:
        return io.open(_local(path), mode, **kwargs)
    if "a" in mode:
        raise ValueError(f"{path}: objects in a bucket cannot be appended to; write the whole object")
    if "b" not in mode:
        encoding = kwargs.pop("encoding", "utf-8")
        return io.TextIOWrapper(fs.open(path, mode.replace("t", "") + "b", **kwargs), encoding=encoding,
                                newline=kwargs.pop("newline", None))
    return fs.open(path, mode, **kwargs)


def exists(path: str | os.PathLike) -> bool:
    fs = filesystem(path)
    return os.path.exists(_local(path)) if fs is None else fs.exists(os.fspath(path))


def isfile(path: str | os.PathLike) -> bool:
    fs = filesystem(path)
    return os.path.isfile(_local(path)) if fs is None else fs.isfile(os.fspath(path))


def isdir(path: str | os.PathLike) -> bool:
    fs = filesystem(path)
    return os.path.isdir(_local(path)) if fs is None else fs.isdir(os.fspath(path))


def listdir(path: str | os.PathLike) -> list[str]:
    """Names (not paths) of the entries directly under `path`; [] when there are none."""
    fs = filesystem(path)
    if fs is None:
        return sorted(os.listdir(_local(path)))
    try:
        entries = fs.ls(os.fspath(path), detail=False)
    except FileNotFoundError:
        return []
    return sorted(posixpath.basename(e.rstrip("/")) for e in entries)


def glob(pattern: str | os.PathLike) -> list[str]:
    """Paths matching a pattern with `*`, `?`, `[...]` inside path levels (no `**`), sorted."""
    pattern = os.fspath(pattern)
    if "**" in pattern:
        raise ValueError(f"{pattern}: '**' is not supported (object stores cannot list recursively in every "
                         "client); name each level, e.g. data/*/part-*.parquet")
    fs = filesystem(pattern)
    if fs is None:
        import glob as globlib
        return sorted(globlib.glob(_local(pattern)))
    proto = protocol(pattern)
    return sorted(f"{proto}://{p}" if not p.startswith(f"{proto}://") else p for p in fs.glob(pattern))


def makedirs(path: str | os.PathLike) -> None:
    """Creates a local directory (and its parents); a no-op for URLs, whose prefixes exist with their objects."""
    if filesystem(path) is None:
        os.makedirs(_local(path), exist_ok=True)


def size(path: str | os.PathLike) -> int:
    fs = filesystem(path)
    return os.path.getsize(_local(path)) if fs is None else fs.size(os.fspath(path))


def read_bytes(path: str | os.PathLike) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def read_text(path: str | os.PathLike, encoding: str = "utf-8") -> str:
    return read_bytes(path).decode(encoding)


def read_range(path: str | os.PathLike, start: int, end: int) -> bytes:
    """Bytes [start, end) of a file or object: one ranged read for a URL, never the whole object."""
    fs = filesystem(path)
    if fs is None:
        with io.open(_local(path), "rb") as f:
            f.seek(start)
            return f.read(end - start)
    return fs.cat_file(os.fspath(path), start=start, end=end)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Writes a whole file or object. Local files are written beside and renamed into place, so a reader
    never sees half a file; an object store's single upload is atomic already."""
    path = os.fspath(path)
    fs = filesystem(path)
    if fs is None:
        local = _local(path)
        parent = os.path.dirname(local)
        if parent:
            os.makedirs(parent, exist_ok=True)
        tmp = f"{local}.tmp{os.getpid()}"
        with io.open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, local)
        return
    fs.pipe_file(path, data)


def write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> None:
    write_bytes(path, text.encode(encoding))


def remove(path: str | os.PathLike) -> None:
    fs = filesystem(path)
    if fs is None:
        os.remove(_local(path))
    else:
        fs.rm_file(os.fspath(path))
