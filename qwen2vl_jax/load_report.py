"""What an assembled initialisation took from where: every loaded, initialised and skipped tensor.

`qwen2vl_jax.assemble` fills a `LoadReport`; training prints `to_text()` at start-up and `save(workdir)`
writes `load_report.txt` and `load_report.json` beside the run's metrics.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections import defaultdict

from qwen2vl_jax import storage


@dataclasses.dataclass
class LoadReport:
    seed: int = 0
    dtype: str = "float32"
    vision: dict = dataclasses.field(default_factory=dict)       # source path, layout, geometry, activation
    llm: dict = dataclasses.field(default_factory=dict)          # source path, hidden size, vocab, head tying
    checks: list[str] = dataclasses.field(default_factory=list)  # pairing checks that passed
    warnings: list[str] = dataclasses.field(default_factory=list)
    loaded: list[dict] = dataclasses.field(default_factory=list)       # {param, shape, from, layers, how}
    initialised: list[dict] = dataclasses.field(default_factory=list)  # {param, shape, how}
    skipped: list[dict] = dataclasses.field(default_factory=list)      # {tensor, source, reason}

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def source_tensors(self) -> int:
        """How many checkpoint tensors went into the loaded params."""
        return sum(len(e["from"]) * (e["layers"] or 1) for e in self.loaded)

    def to_text(self) -> str:
        v, m = self.vision, self.llm
        lines = [f"Qwen2-VL assembled from a CLIP ViT and a Qwen2 LLM "
                 f"(params {self.dtype}, fresh init seed {self.seed})"]
        if v:
            lines.append(f"vision  {v['path']}  [{v['layout']}, prefix {v['prefix']!r}]  width {v['width']}, "
                         f"depth {v['depth']}, heads {v['heads']}, MLP {v['mlp']}, act {v['act']}")
        if m:
            lines.append(f"llm     {m['path']}  [{m['model_type']}]  hidden {m['hidden_size']}, vocab "
                         f"{m['vocab_size']}, {m['layers']} layers, tied head {m['tie_word_embeddings']}")
        lines.append(f"checks ({len(self.checks)}):")
        lines += [f"  ok  {c}" for c in self.checks]
        lines.append(f"warnings ({len(self.warnings)}):")
        lines += [f"  !!  {w}" for w in self.warnings]
        lines.append(f"loaded: {len(self.loaded)} params from {self.source_tensors()} checkpoint tensors")
        for e in self.loaded:
            src = _layers(_fused(e["from"]), e["layers"])
            lines.append(f"  {e['param']} {tuple(e['shape'])} <- {src}  ({e['how']})")
        lines.append(f"initialised: {len(self.initialised)} params")
        lines += [f"  {e['param']} {tuple(e['shape'])}  {e['how']}" for e in self.initialised]
        lines.append(f"skipped: {len(self.skipped)} checkpoint tensors")
        by_reason = defaultdict(list)
        for e in self.skipped:
            by_reason[(e["source"], e["reason"])].append(e["tensor"])
        for (source, reason), names in by_reason.items():
            lines.append(f"  {source}: {reason}")
            lines += [f"    {n}" for n in compress(names)]
        return "\n".join(lines)

    __str__ = to_text

    def save(self, workdir: str) -> tuple[str, str]:
        """Write `load_report.txt` and `load_report.json` into `workdir`; returns both paths."""
        txt, js = storage.join(workdir, "load_report.txt"), storage.join(workdir, "load_report.json")
        storage.write_text(txt, self.to_text() + "\n")
        storage.write_text(js, self.to_json() + "\n")
        return txt, js


def _fused(names: list[str]) -> str:
    """`a.q_proj.w`, `a.k_proj.w`, `a.v_proj.w` -> `a.{q,k,v}_proj.w`."""
    if len(names) == 1:
        return names[0]
    pre = os.path.commonprefix(names)
    suf = os.path.commonprefix([n[len(pre):][::-1] for n in names])[::-1]
    return pre + "{" + ",".join(n[len(pre): len(n) - len(suf)] for n in names) + "}" + suf


def _layers(name: str, n: int | None) -> str:
    return name.replace("{i}", f"{{0..{n - 1}}}") if n else name


def compress(names: list[str]) -> list[str]:
    """Names that differ only in their first layer index, folded: `a.{0..11}.b` (or `a.{0,3}.b`)."""
    groups: dict[str, list[int]] = defaultdict(list)
    for n in names:
        m = re.search(r"\.(\d+)\.", n)
        if m is None:
            groups[n] = []
        else:
            groups[n[:m.start()] + ".{}." + n[m.end():]].append(int(m.group(1)))
    out = []
    for pattern, idx in groups.items():
        if not idx:
            out.append(pattern)
            continue
        idx = sorted(idx)
        if len(idx) == 1:
            out.append(pattern.replace("{}", str(idx[0])))
            continue
        run = idx == list(range(idx[0], idx[-1] + 1))
        out.append(pattern.replace("{}", f"{{{idx[0]}..{idx[-1]}}}" if run else "{" + ",".join(map(str, idx)) + "}"))
    return out
