"""One small path layer: every path a user gives may be a local path or a URL (`gs://bucket/x`, `s3://...`,
any protocol fsspec knows). Local paths go to the OS; URLs go to the fsspec filesystem of their protocol.

Object stores are not file systems, and nothing here pretends they are:
- there are no directories: `makedirs` is a no-op for URLs and `isdir` means "some object has this prefix";
- objects cannot be appended to or renamed: write whole objects (`write_bytes` / `write_text`);
- `glob` supports `*`, `?` and `[...]` within one path level, never `**`.

Failures of a URL come back as one-line errors that say what to do: `BucketNotFound`, `ObjectNotFound` (both
FileNotFoundError), `NoCredentials` / `AccessDenied` (PermissionError) and `MissingClient` (ImportError).
Listings are never cached: another host (or orbax) may have written since.
"""

from __future__ import annotations

import contextlib
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


def _filesystem(proto: str):
    # Per process: a client's connections (and its event loop thread) do not survive a fork.
    return _filesystem_of(proto, os.getpid())


@functools.lru_cache(maxsize=None)
def _filesystem_of(proto: str, pid: int):
    try:
        import fsspec
        cls = fsspec.get_filesystem_class(proto)
    except (ImportError, ValueError) as e:   # ValueError: fsspec knows no such protocol
        raise MissingClient(proto, e) from None
    try:
        return cls(use_listings_cache=False)
    except TypeError:   # a client without fsspec's listings cache
        return cls()


class StorageError(Exception):
    """Base of the path layer's one-line errors (each also an OSError or ImportError subclass)."""


class MissingClient(StorageError, ImportError):
    """A URL whose protocol has no installed fsspec client."""

    PACKAGES = {"gs": "gcsfs", "gcs": "gcsfs", "s3": "s3fs", "s3a": "s3fs", "az": "adlfs", "abfs": "adlfs",
                "hf": "huggingface_hub"}

    def __init__(self, proto: str, cause: Exception):
        package = self.PACKAGES.get(proto)
        hint = f"pip install {package}" if package else "install the fsspec client for it"
        why = str(cause).splitlines()[0] if str(cause) else type(cause).__name__
        super().__init__(f"no client for {proto}:// paths is installed ({why}); {hint}")


class BucketNotFound(StorageError, FileNotFoundError):
    """The bucket of a URL does not exist (or the account in use cannot see it)."""


class ObjectNotFound(StorageError, FileNotFoundError):
    """No object (and no prefix) at a URL in an existing bucket."""


class NoCredentials(StorageError, PermissionError):
    """A store refused an anonymous request: no credentials were found."""


class AccessDenied(StorageError, PermissionError):
    """A store refused the request of the account in use."""


CREDENTIALS = {
    "gs": "set GOOGLE_APPLICATION_CREDENTIALS to a service-account key file or run `gcloud auth "
          "application-default login` (a TPU/GCE VM uses its service account)",
    "s3": "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE)",
}
CREDENTIALS["gcs"], CREDENTIALS["s3a"] = CREDENTIALS["gs"], CREDENTIALS["s3"]


def _bucket(path: str) -> str:
    proto, _, rest = path.partition("://")
    return f"{proto}://{rest.split('/', 1)[0]}"


def _anonymous(fs) -> bool:
    creds = getattr(fs, "credentials", None)   # gcsfs: the method it connected with
    return getattr(creds, "method", None) == "anon" or getattr(fs, "anon", False) is True


def _explain(path: str, fs, e: Exception) -> Exception | None:
    """A one-line error for a failed operation on URL `path`, or None to let `e` through."""
    proto = protocol(path)
    if isinstance(e, FileNotFoundError) and not isinstance(e, (BucketNotFound, ObjectNotFound)):
        bucket = _bucket(path)
        try:
            bucket_exists = fs.exists(bucket)
        except Exception:   # noqa: BLE001 - keep the original error when even this check fails
            bucket_exists = True
        if not bucket_exists:
            return BucketNotFound(f"{path}: the bucket {bucket} does not exist (or this account cannot see it); "
                                  "create it or fix the path")
        return ObjectNotFound(f"{path}: no such object")
    code = getattr(e, "code", None)
    text = str(e)
    if code in (401, 403) or (code is None and isinstance(e, OSError) and text.startswith("Forbidden")):
        how = CREDENTIALS.get(proto, f"configure credentials for {proto}://")
        if _anonymous(fs):
            return NoCredentials(f"{path}: access refused and no credentials were found; {how}")
        if code == 401:
            return NoCredentials(f"{path}: the credentials in use were refused (expired or invalid); {how}")
        first = text.splitlines()[-1] if text else "forbidden"
        return AccessDenied(f"{path}: the account in use may not access this ({first}); grant it access to "
                            f"{_bucket(path)} or use other credentials")
    return None


@contextlib.contextmanager
def _errors(path: str, fs):
    try:
        yield
    except Exception as e:   # noqa: BLE001 - re-raised unchanged unless it can be explained
        clear = _explain(path, fs, e)
        if clear is None:
            raise
        raise clear from None


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
    stores would silently overwrite. A URL written to is uploaded when the file is closed."""
    path = os.fspath(path)
    fs = filesystem(path)
    if fs is None:
        return io.open(_local(path), mode, **kwargs)
    if "a" in mode:
        raise ValueError(f"{path}: objects in a bucket cannot be appended to; write the whole object")
    if "w" in mode or "x" in mode:
        require_bucket(path)   # an upload fails only at close, far from here: check now
    binary_mode = mode.replace("t", "") + ("" if "b" in mode else "b")
    encoding, newline = kwargs.pop("encoding", "utf-8"), kwargs.pop("newline", None)
    with _errors(path, fs):
        f = fs.open(path, binary_mode, **kwargs)
    return f if "b" in mode else io.TextIOWrapper(f, encoding=encoding, newline=newline)


def require_bucket(path: str | os.PathLike) -> None:
    """Raises BucketNotFound / NoCredentials / AccessDenied unless the bucket of URL `path` can be used (a
    no-op for local paths). For the start of a run: orbax and TensorBoard would otherwise fail deep inside."""
    path = os.fspath(path)
    fs = filesystem(path)
    if fs is None:
        return
    bucket = _bucket(path)
    with _errors(path, fs):
        if not fs.exists(bucket):
            fs.ls(bucket)   # exists() swallows the reason (missing, forbidden); a listing raises it
            raise FileNotFoundError(bucket)


def _url_call(path, method: str, *args, **kwargs):
    path = os.fspath(path)
    fs = filesystem(path)
    with _errors(path, fs):
        return getattr(fs, method)(path, *args, **kwargs)


def exists(path: str | os.PathLike) -> bool:
    return os.path.exists(_local(path)) if not is_url(path) else _url_call(path, "exists")


def isfile(path: str | os.PathLike) -> bool:
    return os.path.isfile(_local(path)) if not is_url(path) else _url_call(path, "isfile")


def isdir(path: str | os.PathLike) -> bool:
    return os.path.isdir(_local(path)) if not is_url(path) else _url_call(path, "isdir")


def listdir(path: str | os.PathLike) -> list[str]:
    """Names (not paths) of the entries directly under `path`; [] when there are none (URLs)."""
    if not is_url(path):
        return sorted(os.listdir(_local(path)))
    try:
        entries = _url_call(path, "ls", detail=False)
    except ObjectNotFound:
        return []
    return sorted(posixpath.basename(e.rstrip("/")) for e in entries)


def glob(pattern: str | os.PathLike) -> list[str]:
    """Paths matching a pattern with `*`, `?`, `[...]` inside path levels (no `**`), sorted."""
    pattern = os.fspath(pattern)
    if "**" in pattern:
        raise ValueError(f"{pattern}: '**' is not supported (object stores cannot list recursively in every "
                         "client); name each level, e.g. data/*/part-*.parquet")
    if not is_url(pattern):
        import glob as globlib
        return sorted(globlib.glob(_local(pattern)))
    proto = protocol(pattern)
    return sorted(p if p.startswith(f"{proto}://") else f"{proto}://{p}" for p in _url_call(pattern, "glob"))


def makedirs(path: str | os.PathLike) -> None:
    """Creates a local directory (and its parents); a no-op for URLs, whose prefixes exist with their objects."""
    if not is_url(path):
        os.makedirs(_local(path), exist_ok=True)


def size(path: str | os.PathLike) -> int:
    return os.path.getsize(_local(path)) if not is_url(path) else _url_call(path, "size")


def read_bytes(path: str | os.PathLike) -> bytes:
    if not is_url(path):
        with io.open(_local(path), "rb") as f:
            return f.read()
    return _url_call(path, "cat_file")


def read_text(path: str | os.PathLike, encoding: str = "utf-8") -> str:
    return read_bytes(path).decode(encoding)


def read_range(path: str | os.PathLike, start: int, end: int) -> bytes:
    """Bytes [start, end) of a file or object: one ranged read for a URL, never the whole object."""
    if not is_url(path):
        with io.open(_local(path), "rb") as f:
            f.seek(start)
            return f.read(end - start)
    return _url_call(path, "cat_file", start=start, end=end)


def read_ranges(path: str | os.PathLike, ranges: list[tuple[int, int]]) -> list[bytes]:
    """Several [start, end) byte ranges of one file or object; for a URL the requests run concurrently."""
    if not is_url(path) or len(ranges) < 2:
        return [read_range(path, a, b) for a, b in ranges]
    path = os.fspath(path)
    fs = filesystem(path)
    with _errors(path, fs):
        return fs.cat_ranges([path] * len(ranges), [a for a, _ in ranges], [b for _, b in ranges])


def read_many(paths) -> dict[str, bytes]:
    """{url: bytes} of the URLs among `paths`, fetched concurrently (many small objects read one at a time
    would each wait a full round trip). Local paths and objects that cannot be read are left out: the
    caller's own read of those reports the error."""
    groups: dict[str, list[str]] = {}
    for p in dict.fromkeys(os.fspath(p) for p in paths):
        if is_url(p):
            groups.setdefault(protocol(p), []).append(p)
    out = {}
    for proto, group in groups.items():
        fs = _filesystem(proto)
        if len(group) == 1:
            try:
                out[group[0]] = fs.cat_file(group[0])
            except Exception:   # noqa: BLE001 - reported by the caller's own read
                pass
            continue
        got = fs.cat(group, on_error="omit")
        for p in group:
            data = got.get(p, got.get(fs._strip_protocol(p)))
            if data is not None:
                out[p] = data
    return out


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Writes a whole file or object. Local files are written beside and renamed into place, so a reader
    never sees half a file; an object store's single upload is atomic already."""
    path = os.fspath(path)
    if not is_url(path):
        local = _local(path)
        parent = os.path.dirname(local)
        if parent:
            os.makedirs(parent, exist_ok=True)
        tmp = f"{local}.tmp{os.getpid()}"
        with io.open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, local)
        return
    _url_call(path, "pipe_file", data)


def write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> None:
    write_bytes(path, text.encode(encoding))


def remove(path: str | os.PathLike) -> None:
    if not is_url(path):
        os.remove(_local(path))
    else:
        _url_call(path, "rm_file")
