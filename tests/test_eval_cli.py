"""eval.py end to end on a tiny random model: HF and orbax checkpoints, batched answers equal to one-at-a-time
generation, metrics equal to the per-example scores, lmms prompt style, bad-record budget."""

import importlib.util
import json
import os
import sys

import jax
import numpy as np
import pytest
from PIL import Image

import qwen2vl_jax as qv
from qwen2vl_jax.data import DataError, Processor
from qwen2vl_jax.infer import evaluate as ev

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Different image grids and question lengths, so rows of a batch are left-padded differently; every row has
# 24 patches, so one-at-a-time generation compiles one prompt shape.
SIZES = [(56, 84), (84, 56), (56, 84)]
QUESTIONS = ["What colour is the square?", "Colour?", "What colour is the square?"]


def _cli():
    spec = importlib.util.spec_from_file_location("eval_cli", os.path.join(ROOT, "eval.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules["eval_cli"] = mod     # dataclasses resolve string annotations through sys.modules
    spec.loader.exec_module(mod)
    return mod


def _write_set(tmp_path, answers):
    rng = np.random.default_rng(0)
    lines = []
    for i, ((h, w), q, ans) in enumerate(zip(SIZES, QUESTIONS, answers)):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
        lines.append({"id": f"q{i}", "images": [f"{i}.png"], "meta": {"task": "colour" if i != 1 else "other"},
                      "messages": [{"role": "user", "content": "<image>" + q},
                                   {"role": "assistant", "content": ans}]})
    path = tmp_path / "set.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return str(path)


def _alone(model, proc, example, max_new):
    """One prompt, unbatched: the answer `eval.py` must reproduce whatever the batch around it."""
    enc = proc.encode_example(example.prompt, require_assistant=False, add_generation_prompt=True)
    eos = [proc.eos_token_id, proc.pad_token_id]
    out = model.generate(enc["input_ids"][None], pixel_values=enc["pixel_values"],
                         image_grid_thw=enc["image_grid_thw"], max_new_tokens=max_new, eos_token_id=eos,
                         pad_token_id=proc.pad_token_id)
    return ev.answer(out[0, len(enc["input_ids"]):], eos, proc)[0]


@pytest.fixture(scope="module")
def tiny_hf(hf_checkpoints, tmp_path_factory):
    """The tiny random model with its head restricted to the byte tokenizer's ids (zero logits elsewhere, below
    the best byte's), so that its answers decode to text rather than to ids the tokenizer does not know."""
    cfg, _, path = hf_checkpoints["tiny"]
    model = qv.load_pretrained(path)
    unknown = np.setdiff1d(np.arange(cfg.text.vocab_size), list(Processor.from_config(cfg).tokenizer.get_vocab().values()))
    kernel = model.params["lm_head"]["kernel"]
    model.params["lm_head"]["kernel"] = kernel.at[:, unknown].set(0.0)
    out = str(tmp_path_factory.mktemp("tiny_bytes"))
    model.save_pretrained(out)
    return cfg, out


def test_eval_hf_and_orbax_checkpoints(tiny_hf, tmp_path):
    cfg, path = tiny_hf
    model = qv.load_pretrained(path)
    proc = Processor.from_config(cfg)
    # Make example 0's reference the model's own answer, so one score must be 1 and the others 0.
    probe = ev.read_examples(_write_set(tmp_path, ["x", "x", "x"]), prompt_style="lmms")
    assert probe[0].prompt[-1]["content"][-1]["text"].endswith("\n" + ev.LMMS_POST_PROMPT)
    own = [_alone(model, proc, ex, 6) for ex in probe]
    assert own[0], "the model's answer to example 0 must be non-empty for the exact-match check"
    data = _write_set(tmp_path, [own[0], "zebra", "giraffe"])

    cli = _cli()
    common = ["--data", data, "batch_size=2", "max_new_tokens=6", "prompt_style=lmms", "progress=false"]
    res = cli.run(["--checkpoint", path, *common, f"out={tmp_path / 'hf_eval'}"])
    preds = [json.loads(x) for x in open(tmp_path / "hf_eval" / "predictions.jsonl")]
    metrics = json.load(open(tmp_path / "hf_eval" / "metrics.json"))
    # Batched (left-padded, padded last batch, different image sizes) == one prompt at a time.
    assert [p["prediction"] for p in preds] == own
    assert [p["id"] for p in preds] == ["q0", "q1", "q2"]
    assert [p["exact_match"] for p in preds] == [1.0, 0.0, 0.0]
    for name in ("exact_match", "vqa_accuracy", "anls", "relaxed_accuracy"):
        assert metrics[name] == pytest.approx(np.mean([p[name] for p in preds]))
    assert metrics["count"] == 3 and res["count"] == 3
    # Blind guesses per task: "colour" gets its first-seen answer (right for q0, wrong for q2), "other" its only one.
    assert metrics["majority_baseline"]["exact_match"] == pytest.approx(2 / 3)
    assert metrics["by_task"]["colour"]["exact_match"] == 0.5 and metrics["by_task"]["other"]["count"] == 1

    # The same params as an orbax training checkpoint give the same answers.
    from qwen2vl_jax.train.checkpoint import Checkpoints
    from qwen2vl_jax.train.state import TrainState
    workdir = tmp_path / "run"
    ckpts = Checkpoints(str(workdir), async_save=False)
    state = TrainState(step=jax.numpy.int32(7), params=model.params, opt_state={}, rng=jax.numpy.zeros(2, "uint32"))
    ckpts.save(state, 7, None, cfg, {"note": "test"})
    ckpts.close()
    cli.run(["--checkpoint", str(workdir), *common])
    orbax_preds = [json.loads(x) for x in open(workdir / "eval" / "7" / "set" / "predictions.jsonl")]
    assert [p["prediction"] for p in orbax_preds] == own


def test_bad_records_and_budget(tiny_hf, tmp_path):
    cfg, path = tiny_hf
    data = _write_set(tmp_path, ["a", "b", "c"])
    good = open(data).read()
    (tmp_path / "garbage.png").write_bytes(b"not an image at all")
    jpeg = tmp_path / "cut.jpg"   # cut short: its header reads, its pixels do not decode
    Image.fromarray(np.zeros((56, 56, 3), np.uint8)).save(jpeg, quality=95)
    jpeg.write_bytes(jpeg.read_bytes()[:400])

    def record(image):
        return json.dumps({"images": [image], "messages": [{"role": "user", "content": "<image>Colour?"},
                                                            {"role": "assistant", "content": "x"}]}) + "\n"
    with open(data, "w") as f:   # a record whose <image> tag has no image, first; then three bad images
        f.write('{"messages": [{"role": "user", "content": "<image>no image given"},'
                ' {"role": "assistant", "content": "x"}]}\n' + record("missing.png") + record("garbage.png")
                + record("cut.jpg") + good)
    with pytest.raises(DataError, match=r"set.jsonl:1: .*<image>"):
        ev.read_examples(data)
    cli = _cli()
    # The settings of the test above, so the compiled programs are reused. Every kind of bad record counts
    # against the one budget: found when parsing, when checking image headers, or only when decoding.
    res = cli.run(["--checkpoint", path, "--data", data, "skip_budget=4", "limit=5", "max_new_tokens=6",
                    "batch_size=2", "progress=false", f"out={tmp_path / 'out'}"])
    assert res["count"] == 2 and res["skipped"] == 4
    with pytest.raises(DataError, match=r"set.jsonl:4: .*cut.jpg.*truncated.*skip_budget=3"):
        cli.run(["--checkpoint", path, "--data", data, "skip_budget=3", "limit=5", "max_new_tokens=6",
                 "batch_size=2", "progress=false", f"out={tmp_path / 'out'}"])
    with pytest.raises(DataError, match="skip_budget=0"):
        cli.run(["--checkpoint", path, "--data", data, "progress=false"])
    with pytest.raises(Exception, match="unknown key batchsize; did you mean batch_size"):
        cli.run(["--checkpoint", path, "--data", data, "batchsize=2"])
    assert cli.main(["--checkpoint", str(tmp_path / "nowhere"), "--data", data]) == 2   # a message, no traceback
