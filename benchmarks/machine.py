"""The machine behind a benchmark's figures: CPU model, vector ISA (AVX-512 or not) and load, for its JSON line.

CPU figures depend on the vector width (XLA and PyTorch both dispatch on it) and, on a shared machine, on what
else runs: every benchmark prints this beside its ratios.
"""

from __future__ import annotations

import os


def machine() -> dict:
    flags, model = set(), ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags") and not flags:
                    flags = set(line.split(":", 1)[1].split())
                elif line.startswith("model name") and not model:
                    model = line.split(":", 1)[1].strip()
    except OSError:   # not Linux: leave the ISA unknown
        pass
    return {"cpu_model": model, "avx512": "avx512f" in flags, "avx2": "avx2" in flags,
            "cpu_count": os.cpu_count(), "loadavg_1m": round(os.getloadavg()[0], 2),
            "xla_flags": os.environ.get("XLA_FLAGS", "")}
