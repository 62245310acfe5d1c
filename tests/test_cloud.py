"""Every user-given path in a bucket (the GCS emulator, real clients): data JSONL with images beside it,
HF checkpoints read by ranged reads and exported back, the processor's files, metrics and TensorBoard events
that survive a resume, and orbax checkpoints."""

import json

import jax
import numpy as np
import pytest

import qwen2vl_jax as qv
from qwen2vl_jax import hf, storage
from qwen2vl_jax.data import Processor, synthetic
from qwen2vl_jax.data.pipeline import PipelineConfig, make_loader
from qwen2vl_jax.data.records import read_jsonl
from qwen2vl_jax.train import metrics


def test_jsonl_and_images_in_a_bucket_train_the_same_as_on_disk(bucket, tmp_path):
    cfg = qv.config.tiny()
    local, remote = str(tmp_path / "data"), f"{bucket}/data"
    synthetic.generate(local, size=12, heldout_size=2, config=synthetic.SyntheticConfig.demo())
    synthetic.generate(remote, size=12, heldout_size=2, config=synthetic.SyntheticConfig.demo())
    recs = list(read_jsonl(synthetic.train_path(remote)))
    first = recs[0].images[0]["image"]
    assert first.startswith(f"{bucket}/data/") and storage.exists(first)   # relative to the JSONL's folder
    pipe = PipelineConfig(buckets=((256, 256),), batch_size=2, window=4, shard_index=0, shard_count=1)
    proc = Processor.from_config(cfg)
    with make_loader(synthetic.train_path(local), proc, cfg, pipe) as a, \
            make_loader(synthetic.train_path(remote), proc, cfg, pipe) as b:
        for _ in range(2):
            x, y = next(a), next(b)
            for k in x:
                np.testing.assert_array_equal(x[k], y[k], err_msg=k)
    with pytest.raises(ValueError, match=f"image file not found: {bucket}/data/nope.png"):
        qv.load_image(f"{bucket}/data/nope.png")


def test_hf_checkpoint_in_a_bucket_loads_by_ranged_reads(hf_checkpoints, bucket, monkeypatch):
    cfg, _, local = hf_checkpoints["tied"]
    model = qv.load_pretrained(local)
    model.save_pretrained(f"{bucket}/hf")
    assert storage.listdir(f"{bucket}/hf") == [   # a complete HF checkpoint, written to the bucket
        "chat_template.json", "config.json", "generation_config.json", "model.safetensors",
        "preprocessor_config.json", "tokenizer.json", "tokenizer_config.json", "video_preprocessor_config.json"]
    reads = []
    real = storage.read_range
    monkeypatch.setattr(storage, "read_range", lambda p, a, b: reads.append(b - a) or real(p, a, b))
    back = qv.load_pretrained(f"{bucket}/hf")
    for x, y in zip(jax.tree.leaves(model.params), jax.tree.leaves(back.params)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    size = storage.size(f"{bucket}/hf/model.safetensors")
    assert sum(reads) <= size and max(reads) < size / 4   # tensor by tensor, never the whole file at once
    # A slice reads only the stored rows it needs.
    reader = hf.SafetensorsReader(f"{bucket}/hf")
    reads.clear()
    full = reader.get("model.embed_tokens.weight")
    part = reader.get("model.embed_tokens.weight", slice(3, 7))
    np.testing.assert_array_equal(part, full[3:7])
    assert reads[-1] == 4 * full.shape[1] * full.dtype.itemsize


def test_sharded_export_to_a_bucket_and_processor_files(hf_checkpoints, bucket, tmp_path):
    cfg, _, local = hf_checkpoints["tiny"]
    model = qv.load_pretrained(local)
    model.save_pretrained(f"{bucket}/sharded", max_shard_bytes=200_000)
    names = storage.listdir(f"{bucket}/sharded")
    assert "model.safetensors.index.json" in names and sum(n.endswith(".safetensors") for n in names) > 1
    back = qv.load_pretrained(f"{bucket}/sharded")
    for x, y in zip(jax.tree.leaves(model.params), jax.tree.leaves(back.params)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    tok = Processor.default().tokenizer.to_str()
    storage.write_text(f"{bucket}/sharded/tokenizer.json", tok)
    storage.write_text(f"{bucket}/sharded/preprocessor_config.json", json.dumps({"max_pixels": 200704}))
    proc = Processor.from_pretrained(f"{bucket}/sharded")
    assert proc.image_max_pixels == 200704 and proc.tokenizer.to_str() == tok


def test_metrics_and_tensorboard_in_a_bucket_read_as_one_run_after_resume(bucket):
    workdir = f"{bucket}/run"
    log = metrics.MetricsLog(workdir, flush_secs=3600)
    for s in range(1, 4):
        log.write(s, {"loss": float(10 - s)})
    log.flush()                          # what a checkpoint at step 3 does
    log.write(4, {"loss": 6.0})          # then the process dies: step 4 was never flushed
    log.tb.close()                       # (only so that no writer of this process outlives the emulator)
    log = metrics.MetricsLog(workdir, resume_step=3)
    for s in (4, 5):
        log.write(s, {"loss": float(s)})
    log.close()
    rows = [json.loads(line) for line in storage.read_text(f"{workdir}/metrics.jsonl").splitlines()]
    assert [(r["step"], r["loss"]) for r in rows] == [(1, 9.0), (2, 8.0), (3, 7.0), (4, 4.0), (5, 5.0)]
    events = storage.listdir(f"{workdir}/tensorboard")
    assert len(events) == 2 and all(e.startswith("events.out.tfevents") for e in events)
    assert all(storage.size(f"{workdir}/tensorboard/{e}") > 0 for e in events)


def test_orbax_checkpoints_in_a_bucket(bucket):
    from qwen2vl_jax.model.qwen2vl import Qwen2VLModule
    from qwen2vl_jax.train.checkpoint import Checkpoints, export_hf, restore_params, step_dir
    from qwen2vl_jax.train.state import TrainState
    from train_utils import random_params
    cfg = qv.config.tiny()
    params = random_params(Qwen2VLModule(cfg))
    state = TrainState(step=jax.numpy.asarray(5), params=params, opt_state={}, rng=jax.random.key_data(
        jax.random.key(0)))
    ckpts = Checkpoints(f"{bucket}/run", keep=2)
    ckpts.save(state, 5, {"pos": 5}, cfg, {"note": "test"})
    ckpts.wait()
    assert ckpts.latest_step() == 5 and step_dir(f"{bucket}/run") == f"{bucket}/run/checkpoints/5"
    assert storage.exists(f"{bucket}/run/checkpoints/5/data/process_0-of-1.json")
    ckpts.close()
    _, restored = restore_params(f"{bucket}/run")
    for x, y in zip(jax.tree.leaves(params), jax.tree.leaves(restored)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    export_hf(restored, cfg, f"{bucket}/run/hf")
    back = qv.load_pretrained(f"{bucket}/run/hf")
    for x, y in zip(jax.tree.leaves(params), jax.tree.leaves(back.params)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


SHARDED_LOAD = """
import os, sys, numpy as np
sys.path.insert(0, {tests!r})
import jax, qwen2vl_jax as qv
from qwen2vl_jax import storage
from qwen2vl_jax.sharding import make_mesh
reads = []
real = storage.read_range
storage.read_range = lambda p, a, b: reads.append((p, b - a)) or real(p, a, b)
sharded = qv.load_pretrained({remote!r}, mesh=make_mesh(data=2, fsdp=2, tensor=2))
q = sharded.params["model"]["layers"]["q_proj"]["kernel"]
assert {{s.data.shape for s in q.addressable_shards}} == {{(q.shape[0], q.shape[1] // 2, q.shape[2] // 2)}}
plain = qv.load_pretrained({local!r})
for a, b in zip(jax.tree.leaves(sharded.params), jax.tree.leaves(plain.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
size = storage.size({remote!r} + "/model.safetensors")
total = sum(n for _, n in reads)
# Replicas share a read; a slice reads only its stored rows (an fsdp split of the inner axis re-reads rows).
assert max(n for _, n in reads) < size / 4 and total <= 2 * size, (total, size)
print("OK", total / size)
"""


def test_hf_checkpoint_in_a_bucket_loads_onto_a_mesh_slice_by_slice(hf_checkpoints, bucket):
    import os
    import subprocess
    import sys
    _, _, local = hf_checkpoints["tiny"]
    qv.load_pretrained(local).save_pretrained(f"{bucket}/mesh")
    tests = os.path.dirname(os.path.abspath(__file__))
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    r = subprocess.run([sys.executable, "-c", SHARDED_LOAD.format(tests=tests, remote=f"{bucket}/mesh",
                                                                  local=local)],
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and r.stdout.startswith("OK"), r.stderr[-3000:]
    print(r.stdout.strip())   # OK <bytes read / file size>
