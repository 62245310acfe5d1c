"""A run whose every path is in a bucket (the GCS emulator): `workdir=gs://...` and
`data.train=gs://.../train.jsonl` with its images beside it. Killed with SIGKILL after a checkpoint, it resumes
from the bucket and ends with the losses and params of a run that went straight through; its HF export in the
bucket loads back, and `eval.py` reads checkpoint and data from the bucket and writes its report there.
Nothing is written to the local disk except the compilation cache."""

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest

import qwen2vl_jax as qv
from qwen2vl_jax import storage
from qwen2vl_jax.data import synthetic
from qwen2vl_jax.train.checkpoint import restore_params

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS, EVERY = 12, 4
pytestmark = pytest.mark.slow   # four train.py runs and one eval.py: ~4-6 min on 2 cores


@pytest.fixture(scope="module")
def data(gcs):
    """The demo set generated straight into a bucket: (train.jsonl, heldout.jsonl) URLs."""
    root = gcs.create_bucket(f"cloud-train-data-{os.getpid()}") + "/data"
    synthetic.generate(root, size=120, heldout_size=16, config=synthetic.SyntheticConfig.demo())
    return synthetic.train_path(root), synthetic.heldout_path(root)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("jax_cache")


def _cmd(workdir, data, cache, *extra):
    return [sys.executable, os.path.join(ROOT, "train.py"), f"workdir={workdir}", f"steps={STEPS}",
            f"checkpoint_every={EVERY}", "keep_checkpoints=10", "progress=false", "export_hf=false",
            f"compile_cache={cache}", f"data.train={data}", "data.batch_size=2", "data.window=8",
            "optim.warmup_steps=2", *extra]


def _env():
    return {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}


def _committed(workdir) -> list[int]:
    root = f"{workdir}/checkpoints"
    return sorted(int(x) for x in storage.listdir(root) if re.fullmatch(r"\d+", x)
                  and storage.exists(f"{root}/{x}/commit_success.txt"))


def _losses(workdir) -> dict[int, float]:
    rows = [json.loads(line) for line in storage.read_text(f"{workdir}/metrics.jsonl").splitlines()]
    steps = [r["step"] for r in rows]
    assert steps == sorted(set(steps)), f"steps logged more than once or out of order: {steps}"
    return {r["step"]: r["loss"] for r in rows}


def test_train_kill_resume_export_and_eval_all_in_a_bucket(bucket, data, cache, tmp_path):
    train, heldout = data
    cwd = tmp_path / "cwd"   # stays empty: nothing lands on local disk (the compilation cache is elsewhere)
    cwd.mkdir()
    straight, killed = f"{bucket}/straight", f"{bucket}/killed"

    r = subprocess.run(_cmd(straight, train, cache), env=_env(), cwd=cwd, capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]

    proc = subprocess.Popen(_cmd(killed, train, cache), env=_env(), cwd=cwd, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 600
    while not _committed(killed) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed:\n" + proc.stderr.read()[-3000:]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    at_kill = _committed(killed)
    assert at_kill and at_kill[-1] < STEPS, at_kill

    r = subprocess.run(_cmd(killed, train, cache, "export_hf=true"), env=_env(), cwd=cwd, capture_output=True,
                       text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert "resumed from gs://" in r.stdout and summary["start_step"] == at_kill[-1]

    la, lb = _losses(straight), _losses(killed)
    assert list(la) == list(range(1, STEPS + 1)) and la == lb   # every step once, the same batches
    _, a = restore_params(straight)
    _, b = restore_params(killed)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    exported = qv.load_pretrained(f"{killed}/hf")
    for x, y in zip(jax.tree.leaves(b), jax.tree.leaves(exported.params)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert storage.listdir(f"{killed}/tensorboard")

    r = subprocess.run([sys.executable, os.path.join(ROOT, "eval.py"), "--checkpoint", killed, "--data", heldout,
                        "limit=8", "max_new_tokens=4", "progress=false"], env=_env(), cwd=cwd,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads(storage.read_text(f"{killed}/eval/{STEPS}/heldout/metrics.json"))
    assert report["count"] == 8 and report["data"] == heldout and report["checkpoint"].startswith(killed)
    assert len(storage.read_text(f"{killed}/eval/{STEPS}/heldout/predictions.jsonl").splitlines()) == 8
    assert os.listdir(cwd) == []


def test_sigterm_leaves_a_restorable_checkpoint_in_the_bucket(bucket, data, cache, tmp_path):
    workdir = f"{bucket}/term"
    cmd = [a for a in _cmd(workdir, data[0], cache, "steps=400", "checkpoint_every=1000") if a != "progress=false"]
    proc = subprocess.Popen(cmd, env=_env(), cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    err = bytearray()
    reader = threading.Thread(target=lambda: [err.extend(c) for c in iter(lambda: proc.stderr.read1(4096), b"")])
    reader.start()
    deadline = time.time() + 600
    while not re.search(rb"\| [1-9]\d*/400", bytes(err)) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.1)   # the progress bar shows a finished step: training is under way
    proc.send_signal(signal.SIGTERM)
    out = proc.stdout.read().decode()
    proc.wait(timeout=300)
    reader.join()
    err = err.decode(errors="replace")
    assert proc.returncode == 0, err[-3000:]
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["stopped"] == "SIGTERM" and 1 <= summary["end_step"] < 400
    assert _committed(workdir) == [summary["end_step"]]
    assert max(_losses(workdir)) == summary["end_step"]   # metrics flushed with the checkpoint
    config, params = restore_params(workdir)
    assert config == qv.config.tiny() and all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))
