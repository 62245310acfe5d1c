"""The demo trains with a Qwen2.5-VL preset from the same CLI and keys: `python train.py
model=qwen2_5_vl-tiny` halves its loss within 40 steps and exports a checkpoint of its family."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow   # 40 steps of the demo: ~1-2 min on 2 cores
def test_qwen2_5_vl_demo_loss_halves(tmp_path):
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), "model=qwen2_5_vl-tiny", f"workdir={tmp_path / 'run'}",
           "steps=40", "progress=false", f"data.synthetic_dir={tmp_path / 'synthetic'}", "data.synthetic_size=400"]
    r = subprocess.run(cmd, env={**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}, capture_output=True,
                       text=True, timeout=1200)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["end_step"] == 40
    assert summary["loss_last10_mean"] <= 0.5 * summary["loss_first10_mean"], summary
    with open(tmp_path / "run" / "hf" / "config.json") as f:
        assert json.load(f)["architectures"] == ["Qwen2_5_VLForConditionalGeneration"]
