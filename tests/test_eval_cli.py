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


def _predictions(out_dir):
    return [json.loads(x)["prediction"] for x in open(os.path.join(out_dir, "predictions.jsonl"))]


def _scores(out_dir):
    m = json.load(open(os.path.join(out_dir, "metrics.json")))
    return {k: m[k] for k in ("exact_match", "vqa_accuracy", "anls", "relaxed_accuracy", "count")}


@pytest.mark.slow   # four evaluations: ~35 s on 2 cores (test_eval_with_a_peft_adapter covers the default run)
def test_eval_with_an_unmerged_adapter(tiny_hf, tmp_path):
    """`--adapter DIR` (ours, then peft's own) evaluates the base with the adapter unmerged: the answers and
    metrics of the merged model, not those of the base. The orbax checkpoint of a `lora:` run (adapters only)
    evaluates with its adapters over the base the run rebuilt."""
    cfg, path = tiny_hf
    base = qv.load_pretrained(path)
    model = base.add_adapter(r=4, alpha=8, targets="all-linear")
    keys = iter(jax.random.split(jax.random.key(3), 64))
    model.params = jax.tree_util.tree_map_with_path(   # B is zero at init: make the adapter change the answers
        lambda p, x: x + 0.3 * jax.random.normal(next(keys), x.shape) if p[-1].key == "lora_b" else x, model.params)
    ours = str(tmp_path / "ours")
    model.save_adapter(ours)
    merged = str(tmp_path / "merged")
    model.merge_adapter().save_pretrained(merged)

    cli = _cli()
    data = _write_set(tmp_path, ["x", "x", "x"])
    common = ["--data", data, "batch_size=2", "max_new_tokens=6", "prompt_style=lmms", "progress=false",
              f"processor={path}"]
    res = cli.run(["--checkpoint", path, "--adapter", ours, *common])
    assert res["adapter"] == os.path.abspath(ours)
    with_adapter = _predictions(os.path.join(ours, "eval", "set"))   # its own output dir by default
    cli.run(["--checkpoint", merged, *common, f"out={tmp_path / 'm'}"])
    cli.run(["--checkpoint", path, *common, f"out={tmp_path / 'b'}"])
    assert with_adapter == _predictions(tmp_path / "m")
    assert _scores(os.path.join(ours, "eval", "set")) == _scores(tmp_path / "m")
    assert any(with_adapter) and with_adapter != _predictions(tmp_path / "b"), with_adapter

    # The orbax checkpoint of a LoRA run holds the adapters only; its run config says how to rebuild the base.
    from qwen2vl_jax.train import optim
    from qwen2vl_jax.train.checkpoint import Checkpoints
    from qwen2vl_jax.train.config import load, param_groups
    from qwen2vl_jax.train.state import TrainState
    run_cfg = load(None, [f"init_from={path}", "lora.r=4", "lora.alpha=8", "lora.targets=all-linear",
                          "lora.base_dtype=float32"])
    workdir = tmp_path / "run"
    ckpts = Checkpoints(str(workdir), async_save=False)
    adapters = optim.split(model.params, param_groups(run_cfg))[0]
    assert {p[-1].key for p, _ in jax.tree_util.tree_flatten_with_path(adapters)[0]} == {"lora_a", "lora_b"}
    ckpts.save(TrainState(step=jax.numpy.int32(5), params=adapters, opt_state={}, rng=jax.numpy.zeros(2, "uint32")),
               5, None, cfg, run_cfg.to_dict())
    ckpts.close()
    cli.run(["--checkpoint", str(workdir), *common])
    assert _predictions(workdir / "eval" / "5" / "set") == with_adapter
    with pytest.raises(ValueError, match="checkpoint of a LoRA run"):
        cli.run(["--checkpoint", str(workdir), "--adapter", ours, *common])


def test_eval_with_a_peft_adapter(tiny_hf, tmp_path):
    """An adapter written by peft itself, unmerged here == peft's merge_and_unload checkpoint."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2VLForConditionalGeneration
    cfg, path = tiny_hf
    torch.manual_seed(0)
    hf = Qwen2VLForConditionalGeneration.from_pretrained(path, torch_dtype=torch.float32)
    peft_model = get_peft_model(hf, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "qkv", "fc1"],
                                               init_lora_weights=False))   # random B: a non-trivial adapter
    adapter = str(tmp_path / "peft")
    peft_model.save_pretrained(adapter)
    merged = str(tmp_path / "merged")
    peft_model.merge_and_unload().save_pretrained(merged)

    cli = _cli()
    common = ["--data", _write_set(tmp_path, ["x", "x", "x"]), "batch_size=2", "max_new_tokens=6",
              "prompt_style=lmms", "progress=false", f"processor={path}"]
    cli.run(["--checkpoint", path, "--adapter", adapter, *common, f"out={tmp_path / 'a'}"])
    cli.run(["--checkpoint", merged, *common, f"out={tmp_path / 'm'}"])
    cli.run(["--checkpoint", path, *common, f"out={tmp_path / 'b'}"])
    assert _predictions(tmp_path / "a") == _predictions(tmp_path / "m")
    assert _scores(tmp_path / "a") == _scores(tmp_path / "m")
    assert any(_predictions(tmp_path / "a")) and _predictions(tmp_path / "a") != _predictions(tmp_path / "b")
