"""`Processor`: tokenizer (the `tokenizers` library), the Qwen2-VL chat template, vision placeholder expansion,
assistant-only labels. Two entry points:

- `proc(text=[...], images=[...], videos=[...])`: the HF `Qwen2VLProcessor` call, same
  `input_ids` and pixels;
- `proc.encode_example(messages, ...)` / `proc.encode_record(record)`: one training example for packing.
"""

from __future__ import annotations

import functools
import json
import lzma
import os
import re

import numpy as np
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

from qwen2vl_jax import storage
from qwen2vl_jax.data.image import (IMAGE_MAX_PIXELS, IMAGE_MIN_PIXELS, MERGE_SIZE, OPENAI_CLIP_MEAN,
                                    OPENAI_CLIP_STD, PATCH_SIZE, TEMPORAL_PATCH_SIZE, describe, preprocess_image)
from qwen2vl_jax.data.records import IMAGE_KEYS, VIDEO_KEYS, DataError, Record, normalize_messages
from qwen2vl_jax.data.video import (FPS, FPS_MAX_FRAMES, FPS_MIN_FRAMES, VIDEO_MAX_PIXELS, VIDEO_MIN_PIXELS,
                                    VIDEO_TOTAL_PIXELS, preprocess_video)

IGNORE_INDEX = -100
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."
# The hub chat_template.json of Qwen2-VL-{2B,7B,72B}-Instruct. `render_chat` is its Python form.
QWEN2VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in "
    "content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] "
    "== 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content "
    "%}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}")
SPECIAL_TOKENS = {  # attribute -> token; ids come from the tokenizer (docs/design.md, "Tokens and chat template")
    "pad_token_id": "<|endoftext|>", "im_start_token_id": "<|im_start|>", "eos_token_id": "<|im_end|>",
    "vision_start_token_id": "<|vision_start|>", "vision_end_token_id": "<|vision_end|>",
    "image_token_id": "<|image_pad|>", "video_token_id": "<|video_pad|>",
}
_ASSISTANT_HEADER = re.compile(re.escape("<|im_start|>assistant\n"))
_GENERATION_TAG = re.compile(r"\{%-?\s*(end)?generation\s*-?%\}")


# -- chat template ---------------------------------------------------------------------------------------------

def render_chat(messages, add_generation_prompt: bool = True, add_vision_id: bool = False) -> str:
    """The Qwen2-VL chat template, rendered without jinja; equal to the hub template for every input."""
    out, counts = [], {"image": 0, "video": 0}
    for i, message in enumerate(messages):
        if i == 0 and message["role"] != "system":
            out.append(f"<|im_start|>system\n{DEFAULT_SYSTEM_PROMPT}<|im_end|>\n")
        out.append(f"<|im_start|>{message['role']}\n")
        content = message["content"]
        if isinstance(content, str):
            out.append(content)
        else:
            for item in content:
                kind = content_kind(item)
                if kind == "text":
                    out.append(str(item["text"]))
                elif kind is not None:
                    counts[kind] += 1
                    if add_vision_id:
                        out.append(f"{'Picture' if kind == 'image' else 'Video'} {counts[kind]}: ")
                    out.append(f"<|vision_start|><|{kind}_pad|><|vision_end|>")
        out.append("<|im_end|>\n")
    if add_generation_prompt:
        out.append("<|im_start|>assistant\n")
    return "".join(out)


def content_kind(item: dict) -> str | None:
    """'image', 'video', 'text' or None, with the template's precedence."""
    if item.get("type") == "image" or "image" in item or "image_url" in item:
        return "image"
    if item.get("type") == "video" or "video" in item:
        return "video"
    return "text" if "text" in item else None


@functools.lru_cache(maxsize=8)
def _compile(template: str):
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise ValueError(f"chat template: {message}")
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    # `{% generation %}` marks assistant text for HF's assistant masks; labels here come from the ChatML headers.
    return env.from_string(_GENERATION_TAG.sub("", template))


def assistant_spans(text: str) -> list[tuple[int, int]]:
    """Character spans of assistant replies in ChatML text: content plus the closing <|im_end|>."""
    spans = []
    for header in _ASSISTANT_HEADER.finditer(text):
        end = text.find("<|im_end|>", header.end())
        spans.append((header.end(), len(text) if end < 0 else end + len("<|im_end|>")))
    return spans


# -- tokenizers --------------------------------------------------------------------------------------------------

DEFAULT_TOKENIZER = os.path.join(os.path.dirname(__file__), "qwen2_tokenizer.json.xz")
DEFAULT_VOCAB = 151657   # tokens of that tokenizer; the models' embeddings are padded past it


@functools.lru_cache(maxsize=1)
def default_tokenizer_json() -> str:
    """The Qwen2 BPE tokenizer (151,643 tokens, Apache-2.0, by the Qwen team) with the 14 added tokens of
    Qwen2-VL at ids 151643-151656, shipped with the package as xz-compressed tokenizer.json."""
    with lzma.open(DEFAULT_TOKENIZER, "rt", encoding="utf-8") as f:
        return f.read()


def byte_tokenizer(config) -> Tokenizer:
    """A byte-level tokenizer for small test vocabularies (e.g. `config.tiny()`): special tokens at the config's
    ids (<|endoftext|> = pad_token_id, <|im_end|> = eos_token_id), <|im_start|> and the 256 bytes in the lowest
    free ids. No merges, so one token per byte."""
    return Tokenizer.from_str(byte_tokenizer_json(config))


def byte_tokenizer_json(config) -> str:
    """`byte_tokenizer(config)` as tokenizer.json text."""
    fixed = {"<|endoftext|>": config.pad_token_id, "<|im_end|>": config.eos_token_id,
             "<|vision_start|>": config.vision_start_token_id, "<|vision_end|>": config.vision_end_token_id,
             "<|vision_pad|>": config.vision_token_id, "<|image_pad|>": config.image_token_id,
             "<|video_pad|>": config.video_token_id}
    if len(set(fixed.values())) != len(fixed):
        raise ValueError(f"special token ids collide in the config: {fixed}")
    free = (i for i in range(config.text.vocab_size) if i not in fixed.values())
    vocab = dict(fixed)
    vocab["<|im_start|>"] = next(free)
    for char in _byte_chars():
        vocab[char] = next(free, None)
        if vocab[char] is None:
            raise ValueError(f"vocab_size {config.text.vocab_size} is too small for a byte tokenizer (needs 265)")
    # Built at consecutive ids, then moved to the real ones in the JSON: `tokenizers` prints an alarm when it
    # serialises a vocabulary with unused ids, which this one has by design.
    order = sorted(vocab, key=vocab.get)
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(order)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in list(fixed) + ["<|im_start|>"]])
    data = json.loads(tok.to_str())
    data["model"]["vocab"] = {t: vocab[t] for t in data["model"]["vocab"]}
    for added in data["added_tokens"]:
        added["id"] = vocab[added["content"]]
    return json.dumps(data, ensure_ascii=False)


def _byte_chars() -> list[str]:
    """GPT-2's printable stand-in for each byte 0..255 (what the ByteLevel pre-tokenizer emits)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b], extra = chr(256 + extra), extra + 1
    return [chars[b] for b in range(256)]


ABSOLUTE_TIME_PROCESSOR = "Qwen2_5_VLProcessor"
# Qwen3-VL's processor: mean/std 0.5, 16 px patches, and videos written as one `<t seconds>` span per temporal
# patch (the time of the frames it merges, from the video's sampled frame indices and fps).
FRAME_TIMESTAMP_PROCESSOR = "Qwen3VLProcessor"
HALF = (0.5, 0.5, 0.5)
QWEN3_IMAGE_MIN_PIXELS, QWEN3_IMAGE_MAX_PIXELS = 65536, 16777216   # the released preprocessor_config "size"
DEFAULT_VIDEO_FPS = 24.0   # the reference's assumption for frames given without their fps (it warns)


# -- the processor ---------------------------------------------------------------------------------------------

class Processor:
    """Tokens and pixels for Qwen2-VL, equal to transformers' `Qwen2VLProcessor` (PIL image path).

    `tokenizer` is a `tokenizers.Tokenizer` holding the Qwen2-VL special tokens; their ids are read from it.
    `chat_template=None` means the Qwen2-VL template; any other jinja template must be ChatML-shaped for labels.
    """

    def __init__(self, tokenizer: Tokenizer, *, chat_template: str | None = None,
                 image_min_pixels: int = IMAGE_MIN_PIXELS, image_max_pixels: int = IMAGE_MAX_PIXELS,
                 video_min_pixels: int = VIDEO_MIN_PIXELS, video_max_pixels: int = VIDEO_MAX_PIXELS,
                 video_total_pixels: int | None = VIDEO_TOTAL_PIXELS, video_sample_fps: float = FPS,
                 padding_side: str = "left",
                 add_vision_id: bool = False, patch_size: int = PATCH_SIZE, merge_size: int = MERGE_SIZE,
                 temporal_patch_size: int = TEMPORAL_PATCH_SIZE, absolute_time: bool = False,
                 frame_timestamps: bool = False):
        if tokenizer.truncation or tokenizer.padding:  # the reference never truncates or pads inside a text
            tokenizer = Tokenizer.from_str(tokenizer.to_str())
            tokenizer.no_truncation()
            tokenizer.no_padding()
        self.tokenizer = tokenizer
        self._tokenizer_json: str | None = None   # the text `tokenizer` was read from, written back as is
        missing = [tok for tok in SPECIAL_TOKENS.values() if tokenizer.token_to_id(tok) is None]
        if missing:
            raise ValueError(f"the tokenizer lacks the Qwen2-VL special tokens {missing}")
        for attr, tok in SPECIAL_TOKENS.items():
            setattr(self, attr, tokenizer.token_to_id(tok))
        probe = "".join(SPECIAL_TOKENS.values())
        if tokenizer.encode(probe, add_special_tokens=False).ids != [getattr(self, a) for a in SPECIAL_TOKENS]:
            raise ValueError("the tokenizer does not treat the Qwen2-VL special tokens as added tokens; "
                             f"{probe!r} must encode to one id per token")
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        if chat_template is not None and _GENERATION_TAG.sub("", chat_template) == QWEN2VL_CHAT_TEMPLATE:
            chat_template = None
        self.chat_template = chat_template
        self.image_min_pixels, self.image_max_pixels = image_min_pixels, image_max_pixels
        self.video_min_pixels, self.video_max_pixels = video_min_pixels, video_max_pixels
        self.video_total_pixels = video_total_pixels
        if not video_sample_fps > 0:
            raise ValueError(f"video_sample_fps (frames sampled per second of a video file) must be positive, got "
                             f"{video_sample_fps}")
        self.video_sample_fps = video_sample_fps
        self.padding_side = padding_side
        self.add_vision_id = add_vision_id
        self.patch_size, self.merge_size, self.temporal_patch_size = patch_size, merge_size, temporal_patch_size
        # Qwen2.5-VL's processor: videos also report `second_per_grid_ts` (temporal_patch_size / sampling fps).
        self.absolute_time = absolute_time
        self.frame_timestamps = frame_timestamps
        self.image_mean, self.image_std = (HALF, HALF) if frame_timestamps else (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)

    # -- construction ------------------------------------------------------------------------------------------

    @classmethod
    def default(cls, **kwargs) -> "Processor":
        """The real Qwen2-VL vocabulary (shipped with the package) and the hub image settings."""
        return cls._from_json(default_tokenizer_json(), **kwargs)

    @classmethod
    def from_config(cls, config, tokenizer: Tokenizer | None = None, **kwargs) -> "Processor":
        """A processor whose token ids agree with `config` (a Qwen2VLConfig); without a tokenizer, a byte-level
        one is built at the config's ids (the way to get a processor for `config.tiny()`)."""
        v = config.vision
        kwargs = dict(patch_size=v.patch_size, merge_size=v.spatial_merge_size,
                      temporal_patch_size=v.temporal_patch_size,
                      absolute_time=v.tokens_per_second is not None, **kwargs)
        if config.family.video_frame_spans:
            from qwen2vl_jax.data.qwen3_template import QWEN3VL_CHAT_TEMPLATE
            kwargs = {"frame_timestamps": True, "chat_template": QWEN3VL_CHAT_TEMPLATE,
                      "image_min_pixels": QWEN3_IMAGE_MIN_PIXELS, "image_max_pixels": QWEN3_IMAGE_MAX_PIXELS, **kwargs}
        if tokenizer is None:
            proc = cls._from_json(byte_tokenizer_json(config), **kwargs)
        else:
            proc = cls(tokenizer, **kwargs)
        wrong = [f"{a}: tokenizer {getattr(proc, a)} != config {getattr(config, a)}" for a in SPECIAL_TOKENS
                 if hasattr(config, a) and getattr(proc, a) != getattr(config, a)]
        if wrong:
            raise ValueError("tokenizer and config disagree on special token ids: " + "; ".join(wrong))
        return proc

    @classmethod
    def for_model(cls, config, **kwargs) -> "Processor":
        """The processor a model of `config` was most likely trained with: the Qwen2-VL tokenizer when the
        vocabulary is large enough and the config uses its special token ids, else a byte-level one."""
        if config.text.vocab_size >= DEFAULT_VOCAB:
            try:
                proc = cls.from_config(config, Tokenizer.from_str(default_tokenizer_json()), **kwargs)
                proc._tokenizer_json = default_tokenizer_json()
                return proc
            except ValueError:   # other special token ids: the Qwen2-VL tokenizer would contradict the config
                pass
        return cls.from_config(config, **kwargs)

    @classmethod
    def from_pretrained(cls, path: str, **kwargs) -> "Processor":
        """An HF checkpoint directory: tokenizer.json, the chat template (chat_template.jinja / .json, or
        tokenizer_config.json) and the pixel settings of preprocessor_config.json (and
        video_preprocessor_config.json when present; otherwise the qwen-vl-utils video defaults)."""
        file = storage.join(path, "tokenizer.json")
        if not storage.isfile(file):
            raise ValueError(f"no tokenizer.json in {path}; give a complete HF Qwen2-VL checkpoint directory "
                             "(save_pretrained and the training export write one), or build the processor a "
                             "model's config implies: Processor.for_model(Qwen2VLConfig.from_pretrained(path))")
        settings = {}
        image = _read_json(storage.join(path, "preprocessor_config.json"))
        _check_vision_settings(image, path)
        settings["image_min_pixels"], settings["image_max_pixels"] = _pixels(image, IMAGE_MIN_PIXELS,
                                                                             IMAGE_MAX_PIXELS)
        video = _read_json(storage.join(path, "video_preprocessor_config.json"))
        if video:
            settings["video_min_pixels"], settings["video_max_pixels"] = _pixels(video, VIDEO_MIN_PIXELS,
                                                                                 VIDEO_MAX_PIXELS)
            if video.get("fps"):
                settings["video_sample_fps"] = float(video["fps"])
        for key in ("patch_size", "merge_size", "temporal_patch_size"):
            if key in image:
                settings[key] = int(image[key])
        settings["chat_template"] = _read_chat_template(path)
        settings["absolute_time"] = image.get("processor_class") == ABSOLUTE_TIME_PROCESSOR
        settings["frame_timestamps"] = image.get("processor_class") == FRAME_TIMESTAMP_PROCESSOR
        settings.update(kwargs)
        return cls._from_json(storage.read_text(file), **settings)

    @classmethod
    def _from_json(cls, text: str, **kwargs) -> "Processor":
        tokenizer = Tokenizer.from_str(text)
        proc = cls(tokenizer, **kwargs)
        if proc.tokenizer is tokenizer:   # not rebuilt without truncation or padding
            proc._tokenizer_json = text
        return proc

    def save_pretrained(self, path: str) -> None:
        """Write the processor files of an HF Qwen2-VL checkpoint, as the published ones lay them out:
        tokenizer.json, tokenizer_config.json (special tokens, chat template), chat_template.json and
        preprocessor_config.json and video_preprocessor_config.json (the per-frame video budget and sampling rate).
        transformers' `AutoProcessor` and `Processor.from_pretrained` read them back."""
        storage.makedirs(path)
        template = self.chat_template or QWEN2VL_CHAT_TEMPLATE
        added = self.tokenizer.get_added_tokens_decoder()
        specials = [t.content for _, t in sorted(added.items()) if t.special and t.content != "<|endoftext|>"]
        tokenizer_config = {
            "add_prefix_space": False,
            "added_tokens_decoder": {str(i): {"content": t.content, "lstrip": t.lstrip, "normalized": t.normalized,
                                              "rstrip": t.rstrip, "single_word": t.single_word,
                                              "special": t.special} for i, t in sorted(added.items())},
            "additional_special_tokens": specials,
            "bos_token": None, "chat_template": template, "clean_up_tokenization_spaces": False,
            "eos_token": "<|im_end|>", "errors": "replace", "model_max_length": 32768,
            "pad_token": "<|endoftext|>", "padding_side": self.padding_side, "processor_class": self.processor_class,
            "split_special_tokens": False, "tokenizer_class": "Qwen2Tokenizer", "unk_token": None,
        }
        image = {
            "do_convert_rgb": True, "do_normalize": True, "do_rescale": True, "do_resize": True,
            "image_mean": list(self.image_mean), "image_std": list(self.image_std),
            "image_processor_type": "Qwen2VLImageProcessor", "processor_class": self.processor_class,
            "min_pixels": self.image_min_pixels, "max_pixels": self.image_max_pixels,
            "size": {"shortest_edge": self.image_min_pixels, "longest_edge": self.image_max_pixels},
            "patch_size": self.patch_size, "merge_size": self.merge_size,
            "temporal_patch_size": self.temporal_patch_size, "resample": 3, "rescale_factor": 1 / 255,
        }
        files = {"tokenizer_config.json": tokenizer_config, "chat_template.json": {"chat_template": template},
                 "preprocessor_config.json": image}
        # Always written: without it transformers budgets videos as images (its fallback is
        # preprocessor_config.json, 3,136..12,845,056 pixels per frame).
        files["video_preprocessor_config.json"] = {
            **{k: image[k] for k in ("do_convert_rgb", "do_normalize", "do_rescale", "do_resize", "image_mean",
                                     "image_std", "patch_size", "merge_size", "temporal_patch_size", "resample",
                                     "rescale_factor", "processor_class")},
            "video_processor_type": "Qwen2VLVideoProcessor", "min_pixels": self.video_min_pixels,
            "max_pixels": self.video_max_pixels,
            "size": {"shortest_edge": self.video_min_pixels, "longest_edge": self.video_max_pixels},
            "do_sample_frames": False, "fps": self.video_sample_fps, "min_frames": FPS_MIN_FRAMES,
            "max_frames": FPS_MAX_FRAMES}
        storage.write_text(storage.join(path, "tokenizer.json"), self._tokenizer_json or self.tokenizer.to_str())
        for name, content in files.items():
            storage.write_text(storage.join(path, name), json.dumps(content, indent=2, ensure_ascii=False))

    # -- text --------------------------------------------------------------------------------------------------

    def apply_chat_template(self, messages, add_generation_prompt: bool = True,
                            add_vision_id: bool | None = None) -> str:
        """Chat text for HF-style messages (content a string or a list of {"type": ...} items)."""
        _check_turns(messages)
        add_vision_id = self.add_vision_id if add_vision_id is None else add_vision_id
        if self.chat_template is None:
            return render_chat(messages, add_generation_prompt, add_vision_id)
        return _compile(self.chat_template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                                   add_vision_id=add_vision_id, eos_token="<|im_end|>",
                                                   pad_token="<|endoftext|>")

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        ids = [int(i) for i in np.asarray(ids).ravel()]
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def batch_decode(self, ids, skip_special_tokens: bool = True) -> list[str]:
        return [self.decode(row, skip_special_tokens) for row in np.asarray(ids)]

    def _vision_tokens(self, grids: np.ndarray) -> np.ndarray:
        return grids.prod(axis=1) // (self.merge_size ** 2) if len(grids) else np.zeros(0, np.int64)

    def _expand(self, ids: np.ndarray, image_tokens, video_tokens, where: str = ""):
        """Repeat counts turning each <|image_pad|>/<|video_pad|> into its t*h*w/4 copies."""
        reps = np.ones(len(ids), np.int64)
        for token_id, counts, kind in ((self.image_token_id, image_tokens, "image"),
                                       (self.video_token_id, video_tokens, "video")):
            at = np.flatnonzero(ids == token_id)
            if len(at) != len(counts):
                raise ValueError(f"{where}{len(at)} <|{kind}_pad|> placeholder(s) in the text but {len(counts)} "
                                 f"{kind}(s) given; each {kind} needs exactly one placeholder")
            reps[at] = counts
        return reps

    # -- HF-compatible call ------------------------------------------------------------------------------------

    def __call__(self, text, images=None, videos=None, *, padding_side: str | None = None,
                 images_kwargs: dict | None = None, videos_kwargs: dict | None = None,
                 video_metadata: list[dict] | None = None) -> dict:
        """`input_ids`, `attention_mask` (B, L) int32, padded on `padding_side` with <|endoftext|>; with images
        `pixel_values` (N, 1176) float32 and `image_grid_thw` (n, 3) int64, with videos `pixel_values_videos`
        and `video_grid_thw`. Images and videos are consumed in text order across the batch, as HF does."""
        texts = [text] if isinstance(text, str) else list(text)
        images = _flatten(images)
        videos = [] if videos is None else list(videos)
        out = {}
        image_grids = video_grids = np.zeros((0, 3), np.int64)
        if images:
            kw = {"min_pixels": self.image_min_pixels, "max_pixels": self.image_max_pixels, **(images_kwargs or {})}
            out["pixel_values"], out["image_grid_thw"] = self._concat([self._image(im, **kw) for im in images])
            image_grids = out["image_grid_thw"]
        if videos:
            out["pixel_values_videos"], out["video_grid_thw"] = self._concat(
                [self._video(v, **self._video_kwargs(v, videos_kwargs or {})) for v in videos])
            fps = (videos_kwargs or {}).get("fps") or self.video_sample_fps
            video_grids = out["video_grid_thw"]
            if self.absolute_time:
                out["second_per_grid_ts"] = np.broadcast_to(self._seconds(fps), (len(videos),)).copy()
        if self.frame_timestamps and len(video_grids):   # `video_metadata`: per video {"fps", "frames_indices"}
            texts = self._timestamped(texts, video_grids, video_metadata)
            video_grids = np.repeat(video_grids, video_grids[:, 0], axis=0) * [0, 1, 1] + [1, 0, 0]
        rows = [np.asarray(e.ids, np.int32) for e in self.tokenizer.encode_batch(texts)]
        image_tokens, video_tokens = self._vision_tokens(image_grids), self._vision_tokens(video_grids)
        reps = self._expand(np.concatenate(rows) if rows else np.zeros(0, np.int32), image_tokens, video_tokens)
        bounds = np.cumsum([0] + [len(r) for r in rows])
        rows = [np.repeat(r, reps[a:b]) for r, a, b in zip(rows, bounds[:-1], bounds[1:])]
        out["input_ids"], out["attention_mask"] = self._pad(rows, padding_side or self.padding_side)
        return out

    def _video_kwargs(self, video, given: dict) -> dict:
        """`preprocess_video` settings: the processor's budgets and frame rate under `given`. The rate samples
        files only: frames given as a list or an array are used as given unless they ask for sampling (their
        source rate in `video_fps`); a bare `fps` for them is their rate, read for `second_per_grid_ts`."""
        kw = {"min_pixels": self.video_min_pixels, "max_pixels": self.video_max_pixels,
              "total_pixels": self.video_total_pixels, **given}
        given_frames = isinstance(video, (list, tuple, np.ndarray))
        if given_frames and "video_fps" not in kw:
            kw.pop("fps", None)   # for given frames `fps` is their rate (as transformers' processors read it)
        elif "fps" not in kw and "nframes" not in kw and not given_frames:
            kw["fps"] = self.video_sample_fps
        return kw

    @property
    def processor_class(self) -> str:
        """The transformers processor class these settings are (written to the checkpoint's files)."""
        if self.frame_timestamps:
            return FRAME_TIMESTAMP_PROCESSOR
        return ABSOLUTE_TIME_PROCESSOR if self.absolute_time else "Qwen2VLProcessor"

    def _seconds(self, fps) -> np.ndarray:
        """`second_per_grid_ts` of videos sampled at `fps` (one value or one per video), as Qwen2.5-VL's processor."""
        return self.temporal_patch_size / np.asarray(fps, np.float64).reshape(-1)

    def _patching(self) -> dict:
        return dict(patch_size=self.patch_size, merge_size=self.merge_size,
                    temporal_patch_size=self.temporal_patch_size)

    def _image(self, image, **kw):
        return preprocess_image(image, **kw, **self._patching(), mean=self.image_mean, std=self.image_std)

    def _video(self, video, **kw):
        pixels, grid = preprocess_video(video, **kw, **self._patching())
        if self.image_mean != OPENAI_CLIP_MEAN:   # the video reader normalises with the CLIP values: redo it
            c = 3
            cols = np.arange(pixels.shape[1]) // (pixels.shape[1] // c)
            clip_m, clip_s = np.asarray(OPENAI_CLIP_MEAN, np.float32), np.asarray(OPENAI_CLIP_STD, np.float32)
            raw = pixels * clip_s[cols] + clip_m[cols]
            pixels = ((raw - np.asarray(self.image_mean, np.float32)[cols])
                      / np.asarray(self.image_std, np.float32)[cols]).astype(np.float32)
        return pixels, grid

    def frame_times(self, frames_indices, fps: float | None) -> list[float]:
        """Seconds of each temporal patch of a video: the mean time of its first and last frame (the frame list
        padded with its last index to whole patches), as Qwen3-VL's processor computes them."""
        fps = DEFAULT_VIDEO_FPS if fps is None else float(fps)
        idx = [int(i) for i in np.asarray(frames_indices).reshape(-1)]
        m = self.merge_size
        if len(idx) % m:
            idx += [idx[-1]] * (m - len(idx) % m)
        t = [i / fps for i in idx]
        return [(t[i] + t[i + m - 1]) / 2 for i in range(0, len(t), m)]

    def _timestamped(self, texts: list[str], video_grids, metadata, where: str = "") -> list[str]:
        """Each video placeholder `<|vision_start|><|video_pad|><|vision_end|>` (in text order across `texts`)
        rewritten as one `<t seconds><|vision_start|><|video_pad|><|vision_end|>` per temporal patch."""
        span = "<|vision_start|><|video_pad|><|vision_end|>"
        out, k = [], 0
        for text in texts:
            parts = text.split(span)
            pieces = [parts[0]]
            for rest in parts[1:]:
                if k >= len(video_grids):
                    raise ValueError(f"{where}more video placeholders in the text than videos ({len(video_grids)})")
                meta = metadata[k] if metadata is not None and k < len(metadata) and metadata[k] else {}
                t = int(video_grids[k][0])
                indices = meta.get("frames_indices")
                if indices is None:
                    indices = np.arange(t * self.temporal_patch_size)
                times = self.frame_times(indices, meta.get("fps"))
                if len(times) != t:
                    raise ValueError(f"{where}video {k + 1}: frames_indices give {len(times)} temporal patches "
                                     f"but the video has {t}; pass the indices of the frames given")
                pieces.append("".join(f"<{s:.1f} seconds>{span}" for s in times) + rest)
                k += 1
            out.append("".join(pieces))
        return out

    @staticmethod
    def _concat(results) -> tuple[np.ndarray, np.ndarray]:
        return (np.concatenate([r[0] for r in results]).astype(np.float32, copy=False),
                np.concatenate([r[1] for r in results]).astype(np.int64, copy=False))

    def _pad(self, rows, side: str) -> tuple[np.ndarray, np.ndarray]:
        if side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {side!r}")
        L = max((len(r) for r in rows), default=0)
        ids = np.full((len(rows), L), self.pad_token_id, np.int32)
        mask = np.zeros((len(rows), L), np.int32)
        for b, r in enumerate(rows):
            sl = slice(L - len(r), L) if side == "left" else slice(0, len(r))
            ids[b, sl], mask[b, sl] = r, 1
        return ids, mask

    # -- training examples -------------------------------------------------------------------------------------

    def encode_example(self, messages, images=None, videos=None, require_assistant: bool = True,
                       source: str = "<example>", add_generation_prompt: bool | None = None) -> dict:
        """One conversation -> numpy arrays: `input_ids`, `labels` (L,) int32 (labels = input_ids on each
        assistant reply and its closing <|im_end|>, -100 elsewhere, unshifted), `pixel_values` (N, 1176),
        `image_grid_thw` (n, 3), `pixel_values_videos` (M, 1176), `video_grid_thw` (k, 3), always present.

        `messages` in either record form (records.py); `images`/`videos` fill `<image>`/`<video>` tags in order.
        Any problem raises `DataError` whose message starts with `source:`.
        """
        try:
            canonical = normalize_messages(messages, images, videos)
            if require_assistant:
                _check_trainable(canonical)
            if add_generation_prompt is None:
                add_generation_prompt = canonical[-1]["role"] != "assistant"
            text = self.apply_chat_template(canonical, add_generation_prompt)
            pixels, image_grids = self._encode_items(canonical, "image")
            pixels_videos, video_grids = self._encode_items(canonical, "video")
            spans = video_grids
            if self.frame_timestamps and len(video_grids):   # items may carry "fps" and "frames_indices"
                items = [it for m in canonical for it in m["content"] if it["type"] == "video"]
                meta = [{"fps": it.get("video_fps"), "frames_indices": it.get("frames_indices")} for it in items]
                text = self._timestamped([text], video_grids, meta, "the chat template produced ")[0]
                spans = np.repeat(video_grids, video_grids[:, 0], axis=0) * [0, 1, 1] + [1, 0, 0]
            enc = self.tokenizer.encode(text)
            ids = np.asarray(enc.ids, np.int32)
            reps = self._expand(ids, self._vision_tokens(image_grids), self._vision_tokens(spans),
                                "the chat template produced ")
        except DataError:
            raise
        except ValueError as e:
            raise DataError(f"{source}: {e}") from None
        labels = np.full(len(ids), IGNORE_INDEX, np.int32)
        offsets = np.asarray(enc.offsets, np.int64).reshape(-1, 2)
        for start, end in assistant_spans(text):
            inside = (offsets[:, 1] > start) & (offsets[:, 0] < end)
            labels[inside] = ids[inside]
        # Vision placeholders stand for features, not tokens to predict.
        labels[(ids == self.image_token_id) | (ids == self.video_token_id)] = IGNORE_INDEX
        out = {"input_ids": np.repeat(ids, reps), "labels": np.repeat(labels, reps),
               "pixel_values": pixels, "image_grid_thw": image_grids,
               "pixel_values_videos": pixels_videos, "video_grid_thw": video_grids}
        if self.absolute_time:   # each video item's sampling fps (qwen-vl-utils' default 2)
            items = [it for m in canonical for it in m["content"] if it["type"] == "video"]
            out["second_per_grid_ts"] = self._seconds([float(it.get("fps") or 2.0) for it in items]) \
                if items else np.zeros(0, np.float64)
        return out

    def encode_record(self, record: Record, require_assistant: bool = True) -> dict:
        """`encode_example` for a record from `read_jsonl`; errors name its file and line."""
        return self.encode_example(record.messages, require_assistant=require_assistant, source=record.source)

    def _encode_items(self, messages, kind: str) -> tuple[np.ndarray, np.ndarray]:
        items = [it for m in messages for it in m["content"] if it["type"] == kind]
        fetched = _fetch_urls(items, kind)
        results = []
        for k, item in enumerate(items, 1):
            try:
                if kind == "image":
                    kw = {key: item[key] for key in IMAGE_KEYS if key in item}
                    kw.setdefault("min_pixels", self.image_min_pixels)
                    kw.setdefault("max_pixels", self.image_max_pixels)
                    results.append(self._image(fetched.get(_key(item["image"]), item["image"]), **kw))
                else:
                    kw = {key: item[key] for key in VIDEO_KEYS if key in item}
                    # qwen-vl-utils 0.0.14: an item's max_pixels can only lower the per-frame budget.
                    if "max_pixels" in kw:
                        kw["item_max_pixels"] = kw.pop("max_pixels")
                    if "nframes" in kw:
                        kw["nframes"] = int(kw["nframes"])
                    video = item["video"]
                    kw = self._video_kwargs(video, kw)
                    if isinstance(video, (list, tuple)):   # frames: fetched ones as bytes
                        video = [fetched.get(_key(f), f) for f in video]
                    results.append(self._video(video, **kw))
            except ValueError as e:
                name = describe(item[kind])
                raise ValueError(f"{kind} {k}{'' if name in str(e) else f' ({name})'}: {e}") from None
        if not results:
            return (np.zeros((0, 3 * self.temporal_patch_size * self.patch_size ** 2), np.float32),
                    np.zeros((0, 3), np.int64))
        return self._concat(results)


# -- helpers -------------------------------------------------------------------------------------------------------

def _check_turns(messages) -> None:
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} turns")
    for i, m in enumerate(messages, 1):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError(f"message {i}: expected an object with 'role' and 'content'")


def _check_trainable(messages) -> None:
    roles = [m["role"] for m in messages]
    if "assistant" not in roles:
        raise ValueError("no assistant turn: training needs at least one assistant reply to learn from "
                         "(use require_assistant=False for prompts)")
    if roles[-1] != "assistant":
        raise ValueError(f"the conversation ends with a {roles[-1]!r} turn that has no assistant reply; "
                         "add the reply or drop the trailing turn")


def _flatten(images) -> list:
    if images is None:
        return []
    if not isinstance(images, (list, tuple)):
        return [images]
    return [im for entry in images for im in (entry if isinstance(entry, (list, tuple)) else [entry])]


def _key(source):
    return source if isinstance(source, str) else None


def _fetch_urls(items: list[dict], kind: str) -> dict[str, bytes]:
    """The bytes of every image (or video frame) of a record that lives at a URL, read concurrently; a
    missing one is left out so that its own read names it."""
    urls = []
    for item in items:
        frames = isinstance(item[kind], (list, tuple))
        if kind == "video" and not frames:
            continue   # a video file is decoded from a seekable remote file instead
        urls += [s for s in (item[kind] if frames else [item[kind]]) if isinstance(s, str) and storage.is_url(s)]
    return storage.read_many(urls) if urls else {}


def _read_json(file: str) -> dict:
    if not storage.isfile(file):
        return {}
    try:
        return json.loads(storage.read_text(file))
    except json.JSONDecodeError as e:
        raise ValueError(f"{file}: not valid JSON ({e})") from None


def _pixels(cfg: dict, min_default: int, max_default: int) -> tuple[int, int]:
    size = cfg.get("size") or {}
    return (int(cfg.get("min_pixels") or size.get("shortest_edge") or min_default),
            int(cfg.get("max_pixels") or size.get("longest_edge") or max_default))


def _check_vision_settings(cfg: dict, path: str) -> None:
    if cfg.get("processor_class") == FRAME_TIMESTAMP_PROCESSOR:
        for key in ("image_mean", "image_std"):
            if key in cfg and not np.allclose(cfg[key], HALF, rtol=0, atol=1e-8):
                raise ValueError(f"{path}/preprocessor_config.json: {key} {cfg[key]} differs from the values "
                                 f"{list(HALF)} that Qwen3-VL uses; this processor supports only those")
        return
    for key, expected in (("image_mean", OPENAI_CLIP_MEAN), ("image_std", OPENAI_CLIP_STD)):
        if key in cfg and not np.allclose(cfg[key], expected, rtol=0, atol=1e-8):
            raise ValueError(f"{path}/preprocessor_config.json: {key} {cfg[key]} differs from the CLIP values "
                             f"{list(expected)} that Qwen2-VL uses; this processor supports only those")


def _read_chat_template(path: str) -> str | None:
    jinja = storage.join(path, "chat_template.jinja")
    if storage.isfile(jinja):
        return storage.read_text(jinja)
    for name in ("chat_template.json", "tokenizer_config.json"):
        template = _read_json(storage.join(path, name)).get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        if template:
            return template
    return None
