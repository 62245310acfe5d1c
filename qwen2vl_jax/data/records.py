"""Conversation records: the JSONL training format (docs/design.md, "Data format") and the qwen-vl-utils
content-list form, brought to one canonical shape, with errors that name the file and line.

Two forms are accepted per message and may be mixed within a record:

    {"messages": [{"role": "user", "content": "<image>What colour is the square?"},
                  {"role": "assistant", "content": "red"}],
     "images": ["imgs/0001.png"]}                      # tags, filled in order from "images" / "videos"

    {"messages": [{"role": "user", "content": [{"type": "image", "image": "imgs/0001.png", "max_pixels": 50176},
                                               {"type": "text", "text": "What colour is the square?"}]},
                  {"role": "assistant", "content": "red"}]}

Canonical form: every message's content is a list of items; every image/video item holds its source under
"image"/"video" plus its own pixel settings. Paths in a JSONL file are relative to that file, also when it
lives in a bucket (gs://b/data/train.jsonl with "imgs/1.png" reads gs://b/data/imgs/1.png); absolute paths and
URLs are taken as they are.
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any, Callable, Iterator

from qwen2vl_jax import storage

ROLES = ("system", "user", "assistant")
IMAGE_KEYS = ("min_pixels", "max_pixels", "resized_height", "resized_width")
VIDEO_KEYS = IMAGE_KEYS + ("total_pixels", "fps", "nframes", "video_fps", "min_frames", "max_frames",
                           "video_start", "video_end")     # the clip range, seconds (qwen-vl-utils' keys)
_FROM_ZERO = ("video_start", "video_end")
# Text that would forge chat structure or vision placeholders and break the token/feature alignment.
RESERVED = ("<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|vision_start|>", "<|vision_end|>",
            "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")
_TAG = re.compile(r"(<image>|<video>)")


class DataError(ValueError):
    """A record that cannot become a training example. The message starts with `path:line:` (or the source
    the caller gave) and says what is wrong and what to do."""


@dataclasses.dataclass(frozen=True)
class Record:
    messages: list[dict]          # canonical form (module docstring)
    source: str                   # "path:line" for errors

    @property
    def images(self) -> list[dict]:
        return [it for m in self.messages for it in m["content"] if it["type"] == "image"]

    @property
    def videos(self) -> list[dict]:
        return [it for m in self.messages for it in m["content"] if it["type"] == "video"]


def read_jsonl(path: str, on_error: Callable[[DataError], None] | None = None) -> Iterator[Record]:
    """Records of a JSONL file, one per non-blank line. A bad line raises `DataError("path:line: ...")`, or,
    with `on_error`, is handed to it and skipped (the caller counts and enforces its skip budget)."""
    base = storage.dirname(storage.abspath(path))
    try:
        f = storage.open(path, "r", encoding="utf-8")
    except OSError as e:
        reason = e.strerror or str(e).removeprefix(f"{path}: ")   # storage errors name the path already
        raise DataError(f"{path}: cannot open the data file ({reason})") from None
    with f:
        lineno = 0
        while True:
            lineno += 1
            source = f"{path}:{lineno}"
            try:
                line = f.readline()
            except UnicodeDecodeError as e:
                raise DataError(f"{source}: not UTF-8 text ({e.reason}); re-encode the file as UTF-8") from None
            if not line:
                return
            if not line.strip():
                continue
            try:
                yield parse_record(line, source, base)
            except DataError as e:
                if on_error is None:
                    raise
                on_error(e)


def parse_record(line: str | dict, source: str, base_dir: str | None = None) -> Record:
    """One JSON object (text or already parsed) -> Record, or `DataError` prefixed with `source`."""
    try:
        obj = json.loads(line) if isinstance(line, str) else line
    except json.JSONDecodeError as e:
        raise DataError(f"{source}: not valid JSON ({e.msg} at column {e.colno})") from None
    try:
        if not isinstance(obj, dict):
            raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
        messages = obj.get("messages")
        if messages is None:
            raise ValueError(f"no 'messages' list (keys: {sorted(obj)}); expected "
                             "{\"messages\": [{\"role\": ..., \"content\": ...}], \"images\": [...]}")
        system = obj.get("system")
        if isinstance(system, str) and isinstance(messages, list) and messages \
                and isinstance(messages[0], dict) and messages[0].get("role") != "system":
            messages = [{"role": "system", "content": system}] + messages
        canonical = normalize_messages(messages, _list(obj, "images"), _list(obj, "videos"), base_dir)
    except ValueError as e:
        raise DataError(f"{source}: {e}") from None
    return Record(canonical, source)


def _list(obj: dict, key: str) -> list:
    value = obj.get(key)
    if value is None:
        return []
    if isinstance(value, (str, dict)):
        return [value]
    if not isinstance(value, list):
        raise ValueError(f"'{key}' must be a list of paths, got {type(value).__name__}")
    return value


def normalize_messages(messages, images=None, videos=None, base_dir: str | None = None) -> list[dict]:
    """Both record forms -> canonical form. `<image>`/`<video>` tags and items without a source take the next
    entry of `images`/`videos`; the counts must match. Raises ValueError naming the message and item."""
    if not isinstance(messages, list):
        raise ValueError(f"'messages' must be a list of turns, got {type(messages).__name__}")
    if not messages:
        raise ValueError("empty conversation: 'messages' has no turns")
    images, videos = list(images or []), list(videos or [])
    queues = {"image": iter(images), "video": iter(videos)}
    used = {"image": 0, "video": 0}
    out = []
    for i, message in enumerate(messages, 1):
        where = f"message {i}"
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise ValueError(f"{where}: expected an object with 'role' and 'content', got {_short(message)}")
        role, content = message["role"], message["content"]
        if role not in ROLES:
            raise ValueError(f"{where}: role {role!r} is not one of {', '.join(ROLES)}")
        if isinstance(content, str):
            content = [{"type": "text", "text": content}]
        elif not isinstance(content, list):
            raise ValueError(f"{where}: content must be a string or a list of items, got {type(content).__name__}")
        items = []
        for j, item in enumerate(content, 1):
            for piece in _split_item(item, f"{where}, item {j}"):
                kind = piece["type"]
                if kind == "text":
                    items.append(piece)
                    continue
                if piece.get(kind) is None:  # a tag or a source-less item: bind the next listed file
                    entry = next(queues[kind], None)
                    used[kind] += 1
                    if entry is None:
                        continue  # counted; reported below with the totals
                    piece = {**_entry(entry, kind, f"'{kind}s' entry {used[kind]}"), **_settings(piece, kind, where)}
                piece[kind] = _resolve(piece[kind], base_dir)
                items.append(piece)
        out.append({"role": role, "content": items})
    for kind, given in (("image", images), ("video", videos)):
        if used[kind] != len(given):
            raise ValueError(f"{used[kind]} <{kind}> tag(s) or source-less {kind} item(s) in the messages but "
                             f"{len(given)} {kind}(s) in '{kind}s'; they must match one to one")
    return out


def _split_item(item, where: str) -> list[dict]:
    """One content item -> canonical items; text is split at <image>/<video> tags."""
    if not isinstance(item, dict):
        raise ValueError(f"{where}: expected an object such as {{\"type\": \"text\", \"text\": ...}}, "
                         f"got {_short(item)}")
    kind = item.get("type")
    # Same precedence as the chat template: image, then video, then text.
    if kind == "image" or "image" in item or "image_url" in item:
        source = _first(item, "image", "image_url", "path", "url")
        if isinstance(source, dict):  # OpenAI style {"image_url": {"url": ...}}
            source = source.get("url")
        return [{"type": "image", "image": _source(source), **_settings(item, "image", where)}]
    if kind == "video" or "video" in item:
        source = _first(item, "video", "path", "url")
        return [{"type": "video", "video": _source(source), **_settings(item, "video", where)}]
    if "text" in item:
        text = item["text"]
        if not isinstance(text, str):
            raise ValueError(f"{where}: text must be a string, got {type(text).__name__}")
        for token in RESERVED:
            if token in text:
                raise ValueError(f"{where}: text contains the reserved token {token!r}; write <image>/<video> "
                                 "tags or image/video items instead of special tokens")
        pieces = []
        for part in _TAG.split(text):
            if part in ("<image>", "<video>"):
                pieces.append({"type": part[1:-1], part[1:-1]: None})
            elif part:
                pieces.append({"type": "text", "text": part})
        return pieces or [{"type": "text", "text": ""}]
    raise ValueError(f"{where}: unknown content item {_short(item)}; expected type text, image or video")


def _first(item: dict, *keys):
    return next((item[k] for k in keys if item.get(k) is not None), None)


def _source(value):
    # Arrays and PIL images pass through; only a missing or empty path means "take the next listed file".
    return None if value is None or (isinstance(value, str) and not value) else value


def _entry(entry, kind: str, where: str) -> dict:
    """An 'images'/'videos' list entry: a path (or frame list for videos), or an object with settings."""
    if isinstance(entry, dict):
        source = entry.get(kind, entry.get("path"))
        if source is None:
            raise ValueError(f"{where}: object without a '{kind}' or 'path' key: {_short(entry)}")
        return {"type": kind, kind: source, **_settings(entry, kind, where)}
    return {"type": kind, kind: entry}


def _settings(item: dict, kind: str, where: str = "") -> dict:
    out = {}
    for key in (IMAGE_KEYS if kind == "image" else VIDEO_KEYS):
        value = item.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 \
                or (value == 0 and key not in _FROM_ZERO):
            what = "a number of seconds >= 0" if key in _FROM_ZERO else "a positive number"
            raise ValueError(f"{where}: {kind} setting {key}={value!r} must be {what}")
        out[key] = value
    return out


def _resolve(source: Any, base_dir: str | None) -> Any:
    if isinstance(source, list):
        return [_resolve(s, base_dir) for s in source]
    if base_dir and isinstance(source, str) and not source.startswith(("data:", "http://", "https://", "file://")) \
            and not storage.isabs(source):
        return storage.join(base_dir, source)
    return source


def _short(value, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."
