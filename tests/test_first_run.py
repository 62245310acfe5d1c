"""A user's own data on the first try: bad records end both CLIs with one line naming the file:line, exit code
2, before any model is built and without touching the workdir; a minimal config of one's own trains on
pictures of ordinary sizes (no bucket settings) and evaluates."""

import hashlib
import importlib.util
import json
import os
import sys

import jax
import numpy as np
import pytest
from PIL import Image

import user_data
from qwen2vl_jax import config as C

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _script(name):
    spec = importlib.util.spec_from_file_location(f"{name}_cli", os.path.join(ROOT, f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[f"{name}_cli"] = mod     # dataclasses resolve string annotations through sys.modules
    spec.loader.exec_module(mod)
    return mod


def _snapshot(root) -> dict:
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            p = os.path.join(d, f)
            out[os.path.relpath(p, root)] = (os.stat(p).st_mtime_ns, hashlib.sha1(open(p, "rb").read()).hexdigest())
    return out


@pytest.fixture(scope="module")
def user_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("mydata")
    train, val = user_data.write_set(str(root))
    (root / "garbage.png").write_bytes(b"<html>404 not found</html>")
    Image.open(root / "images" / "scan.png").save(root / "cut.png")
    (root / "cut.png").write_bytes((root / "cut.png").read_bytes()[:2000])
    return root, train, val


BAD = {   # kind -> (line 3 of an otherwise good file, what the message says)
    "malformed line": ('{"messages": [{"role": "user", "content": "<image>Colour?"}', "not valid JSON"),
    "missing image": ({"images": ["images/nowhere.png"]}, "image file not found"),
    "corrupt image": ({"images": ["garbage.png"]}, "not an image"),
    "truncated image": ({"images": ["cut.png"]}, "truncated or corrupt image"),
    "tag/image count": ({"images": ["images/dot.png", "images/cat.jpg"]}, "1 <image> tag(s)"),
}


def _bad_file(root, kind):
    lines = [json.loads(x) for x in open(root / "val.jsonl")][:4]
    change, _ = BAD[kind]
    lines[2] = change if isinstance(change, str) else {**lines[0], **change}
    return user_data.write_jsonl(root / f"bad_{kind.replace(' ', '_').replace('/', '_')}.jsonl", lines)


@pytest.fixture
def no_model(monkeypatch):
    """Building or loading a model fails the test: bad data must end the run before that."""
    from qwen2vl_jax.train import loop

    def refuse(*a, **k):
        raise AssertionError("the model was set up before the data was checked")
    monkeypatch.setattr(loop, "init_state", refuse)
    monkeypatch.setattr(loop, "StepFn", refuse)
    return refuse


def _one_line_error(capsys, script, source):
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"{script}: {source}"), err
    return err


@pytest.mark.parametrize("where", ["data.train", "eval --data"])
def test_a_misspelt_data_path_is_one_line(where, tmp_path, capsys, no_model, orbax_run):
    missing = str(tmp_path / "trian.jsonl")
    if where == "data.train":
        assert _script("train").main([f"workdir={tmp_path / 'run'}", f"data.train={missing}", "progress=false"]) == 2
        err = _one_line_error(capsys, "train.py", f"{missing}: ")
    else:
        assert _script("eval").main(["--checkpoint", str(orbax_run), "--data", missing, "progress=false"]) == 2
        err = _one_line_error(capsys, "eval.py", "")
        assert missing in err
    assert "no such" in err.lower()
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_max_segment_len_is_checked_against_the_data(user_set, tmp_path, capsys, no_model):
    root, _, _ = user_set
    argv = [f"workdir={tmp_path / 'run'}", f"data.train={root / 'val.jsonl'}", "data.buckets=auto", "max_segment_len=8",
            "progress=false"]
    assert _script("train").main(argv) == 2
    err = _one_line_error(capsys, "train.py", "max_segment_len=8: ")
    assert "longest has" in err and "raise max_segment_len" in err


@pytest.mark.parametrize("kind", list(BAD) + ["too large for the buckets"])
def test_train_stops_on_bad_data_before_the_model(kind, user_set, tmp_path, capsys, no_model):
    root, _, _ = user_set
    workdir = tmp_path / "run"
    (workdir / "checkpoints").mkdir(parents=True)
    (workdir / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    before = _snapshot(workdir)
    if kind == "too large for the buckets":   # the 1000x700 picture of line 1, with the demo's buckets
        data, what, line = str(root / "val.jsonl"), "fit none of the buckets", 1
    else:
        data, what, line = _bad_file(root, kind), BAD[kind][1], 3
    config = tmp_path / "my.yaml"
    config.write_text(f"model: tiny\nworkdir: {workdir}\nsteps: 2\ndata:\n  train: {data}\n")
    buckets = ["data.buckets=[[768, 384]]"] if kind == "too large for the buckets" else []
    assert _script("train").main(["--config", str(config), "progress=false", *buckets]) == 2
    err = _one_line_error(capsys, "train.py", f"{data}:{line}: ")
    assert what in err and "data.skip_budget" in err
    assert _snapshot(workdir) == before


def test_train_lists_bad_records_within_the_budget_and_goes_on(user_set, tmp_path, capsys, no_model):
    root, _, _ = user_set
    data = _bad_file(root, "missing image")
    config = tmp_path / "my.yaml"
    config.write_text(f"model: tiny\nworkdir: {tmp_path / 'run'}\nsteps: 2\ndata:\n  train: {data}\n"
                      "  skip_budget: 1\n")
    with pytest.raises(AssertionError, match="the model was set up"):   # got past the check
        _script("train").main(["--config", str(config), "progress=false"])
    out = capsys.readouterr().out
    assert f"will skip {data}:3: image 1: image file not found" in out and "data.buckets: auto -> " in out


@pytest.fixture(scope="module")
def orbax_run(tmp_path_factory):
    """A training workdir with one checkpoint of random tiny params (nothing compiled)."""
    from train_utils import random_params
    from qwen2vl_jax.model.qwen2vl import Qwen2VLModule
    from qwen2vl_jax.train.checkpoint import Checkpoints
    from qwen2vl_jax.train.state import TrainState
    cfg = C.tiny()
    workdir = tmp_path_factory.mktemp("evalrun")
    ckpts = Checkpoints(str(workdir), async_save=False)
    params = random_params(Qwen2VLModule(cfg))
    ckpts.save(TrainState(jax.numpy.int32(3), params, {}, jax.numpy.zeros(2, "uint32")), 3, None, cfg, {})
    ckpts.close()
    return workdir


@pytest.mark.parametrize("kind", list(BAD))
def test_eval_stops_on_bad_data_before_the_model(kind, user_set, orbax_run, capsys, monkeypatch):
    root, _, _ = user_set
    cli = _script("eval")
    monkeypatch.setattr(cli, "load_model", lambda *a, **k: pytest.fail("the model was loaded before the check"))
    before = _snapshot(orbax_run)
    data = _bad_file(root, kind)
    assert cli.main(["--checkpoint", str(orbax_run), "--data", data, "progress=false"]) == 2
    err = _one_line_error(capsys, "eval.py", f"{data}:3: ")
    assert BAD[kind][1] in err and "skip_budget=0" in err
    assert _snapshot(orbax_run) == before


def test_command_line_values_are_blamed_on_the_command_line(orbax_run, capsys):
    demo = os.path.join(ROOT, "configs", "demo.yaml")
    assert _script("train").main(["--config", demo, "steps=abc"]) == 2
    err = capsys.readouterr().err
    assert "override 'steps=abc': steps = 'abc' is not a valid int" in err and "demo.yaml" not in err
    assert _script("eval").main(["--checkpoint", str(orbax_run), "batch_size=many"]) == 2
    err = capsys.readouterr().err
    assert "override 'batch_size=many': batch_size = 'many' is not a valid int" in err and "eval.yaml" not in err


def test_eval_outputs_are_kept_per_data_set(tmp_path):
    cli = _script("eval")
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first, other = str(tmp_path / "a" / "val.jsonl"), str(tmp_path / "b" / "val.jsonl")
    out = cli.output_dir(str(tmp_path / "eval" / "3"), first)
    assert out == str(tmp_path / "eval" / "3" / "val")
    os.makedirs(out)
    with open(os.path.join(out, "metrics.json"), "w") as f:
        json.dump({"data": first}, f)
    assert cli.output_dir(str(tmp_path / "eval" / "3"), first) == out            # the same set: its own dir
    second = cli.output_dir(str(tmp_path / "eval" / "3"), other)                  # another val.jsonl
    assert second != out and os.path.basename(second).startswith("val-")


def test_orbax_restore_logs_no_metadata_warning(orbax_run, caplog):
    from qwen2vl_jax.train import checkpoint
    with caplog.at_level("WARNING"):
        checkpoint.restore_params(str(orbax_run))
    assert not [r for r in caplog.records if "Metadata file does not exist" in r.getMessage()]


@pytest.mark.slow
def test_own_data_trains_and_evaluates_with_a_minimal_config(user_set, tmp_path, capsys):
    root, train, val = user_set
    workdir = tmp_path / "myrun"
    config = tmp_path / "my.yaml"
    config.write_text(f"model: tiny\nworkdir: {workdir}\nsteps: 2\ndata:\n  train: {train}\n  batch_size: 2\n")
    assert _script("train").main(["--config", str(config), "progress=false"]) == 0
    out = capsys.readouterr().out
    assert "data check: all 16 records" in out and "compute float32" in out
    buckets = json.loads(out.split("data.buckets: auto -> ")[1].split(" (")[0])
    assert any(L >= 982 and P >= 3600 for L, P in buckets)       # the 1000x700 picture's example fits
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["end_step"] == 2 and np.isfinite(summary["loss_last"])
    assert os.path.isfile(workdir / "hf" / "config.json")

    cli = _script("eval")
    for data in (val, train):
        assert cli.main(["--checkpoint", str(workdir), "--data", data, "max_new_tokens=4", "progress=false",
                         "limit=8"]) == 0
    for name in ("val", "train"):   # a second data set does not replace the first's results
        metrics = json.load(open(workdir / "eval" / "2" / name / "metrics.json"))
        assert metrics["count"] == 8 and metrics["data"].endswith(f"{name}.jsonl")
