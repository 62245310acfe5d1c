"""Generation settings: the fields of a Hugging Face `generation_config.json` that this decoder implements.

Defaults are transformers' `GenerationConfig` defaults (so `do_sample=True` alone means temperature 1,
top-k 50, as in HF). The published Qwen2-VL checkpoints ship their own values (eos
[151645, 151643], temperature 0.1, top_k 1, top_p 0.001, repetition_penalty 1.05); `from_pretrained` reads them.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Iterable

from qwen2vl_jax import storage


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = 32             # tokens generated per row, EOS included
    do_sample: bool = False              # False: greedy (argmax after the repetition penalty)
    temperature: float = 1.0             # sampling only
    top_k: int = 50                      # sampling only; 0 disables
    top_p: float = 1.0                   # sampling only; 1.0 disables
    repetition_penalty: float = 1.0      # CTRL penalty on every token already in the row (greedy and sampling)
    eos_token_id: tuple[int, ...] = ()   # a row stops at the first of these; () never stops early
    pad_token_id: int = 0                # written after a row's EOS, as HF does

    def __post_init__(self):
        problems = []
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            problems.append(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if self.do_sample and not self.temperature > 0:
            problems.append(f"temperature must be > 0 when sampling, got {self.temperature!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            problems.append(f"top_k must be an integer >= 0 (0 disables it), got {self.top_k!r}")
        if not 0 < self.top_p <= 1:
            problems.append(f"top_p must be in (0, 1] (1 disables it), got {self.top_p!r}")
        if not self.repetition_penalty > 0:
            problems.append(f"repetition_penalty must be > 0 (1.0 disables it), got {self.repetition_penalty!r}")
        if problems:
            raise ValueError("invalid generation settings: " + "; ".join(problems))

    def replace(self, **kw) -> "GenerationConfig":
        return dataclasses.replace(self, **kw)

    @property
    def sampling(self) -> bool:
        """True when the next token is drawn at random; top_k=1 is greedy however it is spelled."""
        return self.do_sample and self.top_k != 1

    @classmethod
    def create(cls, eos_token_id: int | Iterable[int] | None = None, **kw: Any) -> "GenerationConfig":
        """Like the constructor, but `eos_token_id` may be an int, a list, or None (no early stop), and
        `temperature`/`top_k`/`top_p` given as None take the defaults (the HF calling convention)."""
        kw = {k: v for k, v in kw.items() if v is not None}
        return cls(eos_token_id=_ids(eos_token_id), **kw)

    @classmethod
    def from_pretrained(cls, path: str, **overrides: Any) -> "GenerationConfig":
        """Read `generation_config.json` from an HF checkpoint directory (a missing file gives the defaults).
        Unknown keys are ignored; `overrides` win over the file."""
        file = storage.join(path, "generation_config.json")
        d: dict[str, Any] = {}
        if storage.exists(file):
            try:
                d = json.loads(storage.read_text(file))
            except json.JSONDecodeError as e:
                raise ValueError(f"{file}: not valid JSON ({e})") from None
        fields = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in fields and v is not None}
        kw.update(overrides)
        return cls.create(**kw)

    def save_pretrained(self, path: str, bos_token_id: int | None = None) -> None:
        """Write `generation_config.json`: transformers' `generate()` then decodes as this config does."""
        d: dict[str, Any] = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        eos = list(self.eos_token_id)
        d["eos_token_id"] = eos[0] if len(eos) == 1 else (eos or None)
        if bos_token_id is not None:
            d["bos_token_id"] = bos_token_id
        storage.write_text(storage.join(path, "generation_config.json"), json.dumps(d, indent=2, sort_keys=True))


def _ids(x) -> tuple[int, ...]:
    if x is None:
        return ()
    if isinstance(x, int):
        return (x,)
    return tuple(int(i) for i in x)
