"""Kill -9 and resume: `train.py` killed after a checkpoint was committed and restarted in the same workdir
ends with params bit-identical to a run that went straight through (same data order, same RNG, same
schedule), and its metrics.jsonl holds every step once. Then a SIGTERM stops a run cleanly with a checkpoint.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from qwen2vl_jax.train.checkpoint import restore_params

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS, EVERY = 16, 4
# Each test starts train.py two or three times (a shared compilation cache spares all but the first compile).
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    return tmp_path_factory.mktemp("shared")


def _cmd(workdir, shared, *extra):
    return [sys.executable, os.path.join(ROOT, "train.py"), f"workdir={workdir}", f"steps={STEPS}",
            f"checkpoint_every={EVERY}", "keep_checkpoints=10", "progress=false", "export_hf=false",
            f"compile_cache={shared / 'jax_cache'}", f"data.synthetic_dir={shared / 'synthetic'}",
            "data.synthetic_size=120", "data.batch_size=2", "data.window=8", "optim.warmup_steps=2",
            *extra]


def _env():
    return {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}


def _committed(workdir) -> list[int]:
    d = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(d):
        return []
    return sorted(int(x) for x in os.listdir(d) if re.fullmatch(r"\d+", x)
                  and os.path.exists(os.path.join(d, x, "commit_success.txt")))


def _losses(workdir) -> dict[int, float]:
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    steps = [r["step"] for r in rows]
    assert steps == sorted(set(steps)), f"steps logged more than once or out of order: {steps}"
    return {r["step"]: r["loss"] for r in rows}


@pytest.mark.parametrize("model", ["tiny", "qwen2_5_vl-tiny"])
def test_kill_and_resume_is_bit_identical(tmp_path, shared, model):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    cmd = lambda workdir: _cmd(workdir, shared, f"model={model}")
    r = subprocess.run(cmd(straight), env=_env(), capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]

    proc = subprocess.Popen(cmd(killed), env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 600
    while not _committed(killed) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be killed:\n" + proc.stderr.read()[-3000:]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    at_kill = _committed(killed)
    assert at_kill and at_kill[-1] < STEPS, at_kill

    r = subprocess.run(cmd(killed), env=_env(), capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stdout and json.loads(r.stdout.strip().splitlines()[-1])["start_step"] == at_kill[-1]

    _, a = restore_params(str(straight))
    _, b = restore_params(str(killed))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    la, lb = _losses(straight), _losses(killed)
    assert list(la) == list(range(1, STEPS + 1)) and la == lb   # every step once, the same batches


def test_sigterm_saves_and_stops(tmp_path, shared):
    workdir = tmp_path / "term"
    proc = subprocess.Popen(_cmd(workdir, shared, "steps=400", "checkpoint_every=1000"), env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 600
    while proc.poll() is None and time.time() < deadline:   # wait for training to be under way
        path = os.path.join(workdir, "metrics.jsonl")
        if os.path.exists(path) and sum(1 for _ in open(path)) >= 2:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["stopped"] == "SIGTERM" and 2 <= summary["end_step"] < 400
    assert _committed(workdir) == [summary["end_step"]]


def test_nan_stops_with_the_step_and_saves_nothing(tmp_path, shared):
    """A model whose loss is NaN from the start: the run stops at step 1, names it, writes no checkpoint."""
    from qwen2vl_jax.model.qwen2vl import Qwen2VLModule
    from qwen2vl_jax.train.checkpoint import export_hf
    from train_utils import random_params, tiny_config
    cfg = tiny_config()
    params = random_params(Qwen2VLModule(cfg))
    params["model"]["norm"]["scale"] = params["model"]["norm"]["scale"].at[3].set(np.nan)
    export_hf(params, cfg, str(tmp_path / "hf"))
    workdir = tmp_path / "nan"
    r = subprocess.run(_cmd(workdir, shared, f"init_from={tmp_path / 'hf'}", "checkpoint_every=1"), env=_env(),
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 1, r.stderr[-3000:]
    assert "stopped: step 1: loss nan" in r.stderr and "no checkpoint was written" in r.stderr, r.stderr[-2000:]
    assert _committed(workdir) == []


def test_resume_with_another_data_layout_warns_and_reshuffles(tmp_path, shared):
    """A saved iterator state only fits the same data layout; after a change the run says so and goes on."""
    workdir = tmp_path / "layout"
    r = subprocess.run(_cmd(workdir, shared, "steps=2"), env=_env(), capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    r = subprocess.run(_cmd(workdir, shared, "steps=3", "data.window=9"), env=_env(), capture_output=True,
                       text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "the data layout changed since step 2" in r.stdout
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert (summary["start_step"], summary["end_step"]) == (2, 3)
    # The reshuffled stream is what step 3 saved: resuming it again needs no second reshuffle.
    r = subprocess.run(_cmd(workdir, shared, "steps=4", "data.window=9"), env=_env(), capture_output=True,
                       text=True, timeout=900)
    assert r.returncode == 0 and "resumed from" in r.stdout and "layout changed" not in r.stdout, r.stderr[-3000:]
