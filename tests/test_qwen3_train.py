"""The tiny Qwen3-VL preset through `train.py`: the generated demo set's loss halves, a run killed -9 after a
checkpoint and resumed ends bit-identical to one that went straight through, and the run's HF export loads in
transformers with the same greedy tokens as ours."""

import json
import os
import signal
import subprocess
import time

import jax
import numpy as np
import pytest

from qwen2vl_jax.train.checkpoint import restore_params
from test_train_resume import STEPS, _cmd, _committed, _env, _losses

pytestmark = pytest.mark.slow
QWEN3 = "model=qwen3_vl-tiny"


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    return tmp_path_factory.mktemp("shared3")


def test_qwen3_demo_loss_halves_and_export_generates_like_transformers(tmp_path, shared):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    import qwen2vl_jax as qv
    workdir = tmp_path / "demo"
    r = subprocess.run(_cmd(workdir, shared, QWEN3, "steps=60", "export_hf=true", "optim.decay_steps=60"),
                       env=_env(), capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["loss_last10_mean"] < summary["loss_first10_mean"] / 2, summary
    hf_dir = str(workdir / "hf")
    ours = qv.load_pretrained(hf_dir)
    assert ours.config.model_type == "qwen3_vl"
    hf = transformers.Qwen3VLForConditionalGeneration.from_pretrained(hf_dir, dtype=torch.float32,
                                                                      attn_implementation="eager").eval()
    ids = np.asarray([[5, 6, 7, 8, 9, 10]])
    with torch.no_grad():
        ref = hf.generate(torch.tensor(ids), max_new_tokens=8, do_sample=False, eos_token_id=None,
                          pad_token_id=ours.config.pad_token_id).numpy()
    np.testing.assert_array_equal(ours.generate(ids, max_new_tokens=8), ref)


def test_qwen3_kill_and_resume_is_bit_identical(tmp_path, shared):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    r = subprocess.run(_cmd(straight, shared, QWEN3), env=_env(), capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    proc = subprocess.Popen(_cmd(killed, shared, QWEN3), env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 600
    while not _committed(killed) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be killed:\n" + proc.stderr.read()[-3000:]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    at_kill = _committed(killed)
    assert at_kill and at_kill[-1] < STEPS, at_kill
    r = subprocess.run(_cmd(killed, shared, QWEN3), env=_env(), capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(r.stdout.strip().splitlines()[-1])["start_step"] == at_kill[-1]
    _, a = restore_params(str(straight))
    _, b = restore_params(str(killed))
    assert any("deepstack" in jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(a)[0])
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    la, lb = _losses(straight), _losses(killed)
    assert list(la) == list(range(1, STEPS + 1)) and la == lb
