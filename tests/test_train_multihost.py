"""Two processes x 4 simulated CPU devices, as two hosts of a slice: `jax.distributed.initialize` from the
environment, each host loading its own rows, a (fsdp 2, tensor 4) mesh across both, orbax checkpoints
(with each host's own data-iterator state) and the HF export written together, the same global loss seen by
both, and a resume on both hosts; once on a local workdir and once on a shared gs:// workdir (the GCS
emulator), where the hosts share nothing but the bucket."""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

import qwen2vl_jax as qv
from qwen2vl_jax import storage
from qwen2vl_jax.train.checkpoint import restore_params

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _run(workdir, port, cache, steps):
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), f"workdir={workdir}", f"steps={steps}",
           "checkpoint_every=1", "progress=false", "data.synthetic_size=60", "data.batch_size=4", "data.window=8",
           "mesh.fsdp=2", "mesh.tensor=4", f"compile_cache={cache}"]
    procs = []
    for i in range(2):
        env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
               "JAX_COORDINATOR_ADDRESS": f"localhost:{port}", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": str(i),
               "JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo"}
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=900) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    return [out for out, _ in outs], [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]


@pytest.mark.slow   # two train.py processes over gloo collectives, started twice: ~3-5 min on 2 cores
@pytest.mark.parametrize("where", ["local", "gs"])
def test_two_hosts_train_checkpoint_resume_and_export(tmp_path, request, where):
    cache = tmp_path / "jax_cache"
    workdir = str(tmp_path / "run") if where == "local" else request.getfixturevalue("bucket") + "/run"
    outs, summaries = _run(workdir, _free_port(), cache, steps=2)
    assert summaries[0]["end_step"] == 2 and np.isfinite(summaries[0]["loss_last"])
    for key in ("loss_first", "loss_last"):
        assert summaries[0][key] == summaries[1][key]   # one global loss, computed once over both hosts' rows
    assert "mesh {'data': 1, 'fsdp': 2, 'tensor': 4} over 8 cpu devices, 2 process(es)" in outs[0]
    data_dir = storage.join(workdir, "checkpoints", "2", "data")
    hosts = [json.loads(storage.read_text(storage.join(data_dir, f"process_{i}-of-2.json"))) for i in range(2)]
    assert [h["layout"]["rows"] for h in hosts] == [[0, 2], [2, 4]]   # each host its own rows and state
    # A state counts positions in the host's own shard, so two hosts may hold equal ones; what matters is that
    # each saved its own and read examples (the resume below restores both without a warning).
    assert all(h["state"]["batches"] == 2 and h["state"]["examples"] > 0 for h in hosts)

    outs, summaries = _run(workdir, _free_port(), cache, steps=3)
    assert "resumed from" in outs[0] and "warning" not in outs[0]   # process 0 logs for both
    assert [s["start_step"] for s in summaries] == [2, 2] and [s["end_step"] for s in summaries] == [3, 3]
    assert summaries[0]["loss_last"] == summaries[1]["loss_last"]

    _, params = restore_params(workdir)
    exported = qv.load_pretrained(storage.join(workdir, "hf"))
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(exported.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _start(args, port, env_extra=None, host_args=((), ()), cwds=(None, None)):
    """Two train.py processes as hosts 0 and 1: `args` for both, `host_args[i]` added for host i only,
    host i started in `cwds[i]` (relative paths resolve there, as on a host's own disk)."""
    procs = []
    for i in range(2):
        env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
               "JAX_COORDINATOR_ADDRESS": f"localhost:{port}", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": str(i),
               "JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo", "PYTHONPATH": ROOT, **(env_extra or {})}
        procs.append(subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), *args, *host_args[i]],
                                      env=env, cwd=cwds[i], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    return procs


def _lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("train.py:")]


def _text_records(path, n, bad_line=None):
    lines = [json.dumps({"messages": [{"role": "user", "content": f"question {i}?"},
                                      {"role": "assistant", "content": f"answer {i}."}]}) for i in range(n)]
    if bad_line:
        lines[bad_line - 1] = '{"messages": [{"role": "user", "content": "cut'
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_bad_data_on_one_host_ends_both_with_the_same_line(tmp_path):
    """Line 4 is host 1's record (host i reads records i, i + 2, ...): host 0's shard is clean, yet both hosts
    exit 2 with the same line naming host 1 and the record, before anything is built (~20 s on 2 cores)."""
    import time
    data = _text_records(tmp_path / "train.jsonl", 16, bad_line=4)
    workdir = tmp_path / "run"
    args = [f"workdir={workdir}", f"data.train={data}", "model=tiny", "data.batch_size=4", "mesh.fsdp=2",
            "mesh.tensor=4", "data.buckets=[[256, 0]]", "steps=2", "progress=false"]
    t0 = time.monotonic()
    procs = _start(args, _free_port())
    outs = [p.communicate(timeout=300) for p in procs]
    took = time.monotonic() - t0
    assert [p.returncode for p in procs] == [2, 2], [e[-2000:] for _, e in outs]
    lines = [_lines(err) for _, err in outs]
    assert all(len(x) == 1 for x in lines) and lines[0] == lines[1], lines
    assert lines[0][0].startswith(f"train.py: host 1 of 2: {data}:4: ") and "not valid JSON" in lines[0][0]
    assert took < 90, took
    assert not (workdir / "checkpoints").exists() or not os.listdir(workdir / "checkpoints")


@pytest.mark.slow   # two train.py processes, one killed: ~1-2 min on 2 cores
def test_a_killed_host_ends_the_other_with_a_line_naming_it(tmp_path):
    import signal
    import time
    data = _text_records(tmp_path / "train.jsonl", 400)
    workdir = tmp_path / "run"
    args = [f"workdir={workdir}", f"data.train={data}", "model=tiny", "data.batch_size=4", "mesh.fsdp=2",
            "mesh.tensor=4", "data.buckets=[[256, 0]]", "steps=100000", "checkpoint_every=2", "progress=false",
            "export_hf=false"]
    procs = _start(args, _free_port())
    deadline = time.monotonic() + 400
    while not (workdir / "checkpoints" / "2").exists():   # training, with a committed checkpoint
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), \
            [p.communicate()[1][-2000:] for p in procs if p.poll() is not None]
        time.sleep(1)
    procs[1].send_signal(signal.SIGKILL)
    t0 = time.monotonic()
    _, err = procs[0].communicate(timeout=120)
    took = time.monotonic() - t0
    assert procs[0].returncode != 0 and took < 60, (procs[0].returncode, took, err[-2000:])
    line = _lines(err)
    assert len(line) == 1 and "host 1 of 2 stopped responding" in line[0], err[-2000:]
    assert "the last committed checkpoint is intact" in line[0]
    procs[1].communicate()
    from qwen2vl_jax.train.checkpoint import step_dir
    assert int(os.path.basename(step_dir(str(workdir)))) >= 2


def _both_fail_alike(procs, code=2, within=90):
    """Both hosts' exit codes, their one `train.py:` line (the same), and the wall time to both exits."""
    import time
    t0 = time.monotonic()
    outs = [p.communicate(timeout=300) for p in procs]
    took = time.monotonic() - t0
    assert [p.returncode for p in procs] == [code, code], [e[-2000:] for _, e in outs]
    lines = [_lines(err) for _, err in outs]
    assert all(len(x) == 1 for x in lines) and lines[0] == lines[1], lines
    assert took < within, took
    return lines[0][0], outs


@pytest.mark.slow   # two train.py processes that stop at start-up: ~15-30 s on 2 cores
def test_a_config_value_only_one_host_has_ends_both_with_the_same_line(tmp_path):
    """Host 1 was started with another learning rate (a YAML edited on one host, an override typed on one):
    both hosts exit 2 with one line naming host 1 and the key, before anything is built."""
    data = _text_records(tmp_path / "train.jsonl", 16)
    args = [f"workdir={tmp_path / 'run'}", f"data.train={data}", "model=tiny", "data.batch_size=4", "mesh.fsdp=2",
            "mesh.tensor=4", "data.buckets=[[256, 0]]", "steps=2", "progress=false",
            f"compile_cache={tmp_path / 'cache0'}"]
    procs = _start(args, _free_port(), host_args=((), ("optim.lr=0.0005", f"compile_cache={tmp_path / 'cache1'}")))
    line, _ = _both_fail_alike(procs)
    assert line == ("train.py: host 1 of 2: its run config differs from host 0's: optim.lr=0.0005 (host 0: 0.002); "
                    "start every host with the same config file and overrides"), line   # configs/demo.yaml's lr
    assert not (tmp_path / "run").exists()


@pytest.mark.slow   # two train.py processes that stop at start-up: ~20-40 s on 2 cores
def test_an_init_from_dir_missing_on_one_host_ends_both_with_the_same_line(tmp_path):
    """`init_from=base` is on host 0's disk only (a relative path, each host started in its own dir): host 1
    cannot read its config, host 0 can and goes on to the data check; both exit 2 with host 1's line."""
    from qwen2vl_jax.config import preset
    data = _text_records(tmp_path / "train.jsonl", 16)
    (tmp_path / "h0" / "base").mkdir(parents=True)
    (tmp_path / "h1").mkdir()
    (tmp_path / "h0" / "base" / "config.json").write_text(json.dumps(preset("tiny").to_hf_dict()))
    workdir = tmp_path / "run"
    args = [f"workdir={workdir}", f"data.train={data}", "init_from=base", "data.batch_size=4", "mesh.fsdp=2",
            "mesh.tensor=4", "data.buckets=[[256, 0]]", "steps=2", "progress=false"]
    procs = _start(args, _free_port(), cwds=(tmp_path / "h0", tmp_path / "h1"))
    line, outs = _both_fail_alike(procs)
    assert line.startswith("train.py: host 1 of 2: base: no config.json; expected a Hugging Face"), line
    assert "Traceback" not in outs[0][1] + outs[1][1]
    assert not (workdir / "checkpoints").exists() or not os.listdir(workdir / "checkpoints")


@pytest.mark.slow   # two train.py processes, one step: ~1-2 min on 2 cores
def test_auto_buckets_are_the_same_on_both_hosts_and_fit_both_hosts_data(tmp_path):
    """Host 1's records (the odd ones) are long, host 0's short: sized from one host's records alone the
    buckets would differ. Both hosts train with the same buckets, sized from both hosts' records."""
    long_answer = "a long answer " * 10   # 140 characters: the tiny model's byte-level tokens
    lines = [json.dumps({"messages": [{"role": "user", "content": f"question {i}?"},
                                      {"role": "assistant", "content": long_answer if i % 2 else f"answer {i}."}]})
             for i in range(16)]
    (tmp_path / "train.jsonl").write_text("\n".join(lines) + "\n")
    workdir = tmp_path / "run"
    args = [f"workdir={workdir}", f"data.train={tmp_path / 'train.jsonl'}", "model=tiny", "data.batch_size=4",
            "mesh.fsdp=2", "mesh.tensor=4", "data.buckets=auto", "steps=1", "checkpoint_every=1", "progress=false",
            "export_hf=false", f"compile_cache={tmp_path / 'cache'}"]
    procs = _start(args, _free_port())
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [e[-2000:] for _, e in outs]
    logged = [line for line in outs[0][0].splitlines() if line.startswith("data.buckets: auto -> ")]
    assert len(logged) == 1 and "from 16 examples" in logged[0], outs[0][0][-2000:]
    buckets = json.loads(logged[0].split(" -> ")[1].split(" (")[0])
    data_dir = workdir / "checkpoints" / "1" / "data"
    layouts = [json.loads((data_dir / f"process_{i}-of-2.json").read_text())["layout"] for i in range(2)]
    assert [x["buckets"] for x in layouts] == [buckets, buckets]   # what each host trained with
    # what host 0 sized them from: both hosts' records; from either host's own records alone they differ
    from qwen2vl_jax.config import preset
    from qwen2vl_jax.data import Processor
    from qwen2vl_jax.data.check import check_records
    from qwen2vl_jax.data.sources import open_source
    from qwen2vl_jax.train.data import HostRecords, auto_buckets
    proc = Processor.for_model(preset("tiny"))
    sizes = [check_records(HostRecords([open_source(str(tmp_path / "train.jsonl"))], i, 2), proc, limit=100).sizes
             for i in range(2)]
    as_lists = lambda b: [list(map(int, x)) for x in b]
    assert buckets == as_lists(auto_buckets(np.concatenate(sizes), sampled=True))
    assert buckets != as_lists(auto_buckets(sizes[0], sampled=True))
    assert buckets != as_lists(auto_buckets(sizes[1], sampled=True))


@pytest.mark.slow   # two train.py processes that stop at their first batch: ~30-60 s on 2 cores
def test_a_bad_record_past_the_check_ends_both_hosts_with_its_line(tmp_path):
    """With `data.check: 0` host 1 meets its bad record (line 4) in its first batch, while host 0 waits for it
    in the first step's collectives: host 0's watcher ends it with host 1's line and exit 2, well before the
    30 s after which host 1 would count as lost; nothing was checkpointed."""
    data = _text_records(tmp_path / "train.jsonl", 16, bad_line=4)
    workdir = tmp_path / "run"
    args = [f"workdir={workdir}", f"data.train={data}", "model=tiny", "data.batch_size=4", "mesh.fsdp=2",
            "mesh.tensor=4", "data.buckets=[[256, 0]]", "data.check=0", "steps=2", "progress=false",
            f"compile_cache={tmp_path / 'cache'}"]
    line, outs = _both_fail_alike(_start(args, _free_port()), within=120)
    assert line.startswith("train.py: host 1 of 2: 1 bad records met, more than the skip budget of 0"), line
    assert f"raise the skip budget: {data}:4: not valid JSON" in line, line
    assert "stopped responding" not in outs[0][1] + outs[1][1]
    assert not (workdir / "checkpoints").exists() or not os.listdir(workdir / "checkpoints")
