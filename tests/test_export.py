"""A complete HF checkpoint out of `save_pretrained` and the training export, read back by transformers 4.57.6
(`AutoProcessor`, `Qwen2VLForConditionalGeneration`) with the same greedy answer as ours; and a config whose
`pad_token_id` is null on a vocabulary smaller than the Qwen2-VL pad id.

transformers 4.57's `AutoProcessor` always builds a video processor, and its only one imports torchvision,
which does not load here: the video processor is replaced by the PIL video path of the image processor read
from the same folder. The tokenizer and image processor are transformers' own, read from our files.
"""

import json
import os

import numpy as np
import pytest
from PIL import Image, ImageDraw

import qwen2vl_jax as qv
from qwen2vl_jax import config as qconfig
from qwen2vl_jax.data import Processor
from qwen2vl_jax.model.qwen2vl import Qwen2VLModule
from train_utils import random_params

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")


@pytest.fixture
def auto_processor(monkeypatch):
    import transformers.processing_utils as pu

    class PilVideoProcessor(transformers.BaseVideoProcessor):
        def __init__(self, path):
            self.image_processor = transformers.Qwen2VLImageProcessor.from_pretrained(path)
            self.merge_size = self.image_processor.merge_size

        def __call__(self, videos=None, **_):
            return self.image_processor.preprocess(images=None, videos=videos)

    class NoTorchvision:
        @staticmethod
        def from_pretrained(path, **_):
            return PilVideoProcessor(path)

    monkeypatch.setattr(pu.transformers_module, "AutoVideoProcessor", NoTorchvision)
    return transformers.AutoProcessor.from_pretrained


def picture(height=700, width=1000) -> Image.Image:
    """An ordinary photo-sized picture: a gradient with a few shapes."""
    y, x = np.mgrid[:height, :width]
    rgb = np.stack([x * 255 // width, y * 255 // height, (x + y) * 127 // (width + height)], -1).astype(np.uint8)
    im = Image.fromarray(rgb)
    draw = ImageDraw.Draw(im)
    draw.ellipse((100, 80, 420, 400), fill=(220, 30, 30))
    draw.rectangle((600, 300, 900, 650), fill=(30, 40, 220))
    return im


MESSAGES = [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in the picture?"}]}],
            [{"role": "user", "content": "Say hi."}]]


def _greedy_both(path, auto_processor, max_new_tokens=8):
    """Our greedy tokens and transformers' for a left-padded batch of an image prompt and a text prompt,
    each side with its own processor read from `path`; both processors' inputs must agree first."""
    hf_proc = auto_processor(path)
    ours = Processor.from_pretrained(path)
    texts = [hf_proc.apply_chat_template(m, add_generation_prompt=True) for m in MESSAGES]
    assert texts == [ours.apply_chat_template(m) for m in MESSAGES]
    image = picture(350, 500)
    hf_in = hf_proc(text=texts, images=[image], padding=True, return_tensors="pt")
    our_in = ours(text=texts, images=[image])
    for key in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw"):
        np.testing.assert_array_equal(hf_in[key].numpy(), our_in[key], err_msg=key)
    with open(os.path.join(path, "config.json")) as f:
        hf_class = getattr(transformers, json.load(f)["architectures"][0])
    hf_model = hf_class.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        hf_out = hf_model.generate(**hf_in, max_new_tokens=max_new_tokens, do_sample=False).numpy()
    model = qv.load_pretrained(path)
    out = model.generate(**our_in, max_new_tokens=max_new_tokens)
    return out, hf_out, ours


def test_save_pretrained_writes_a_checkpoint_transformers_loads(tmp_path, auto_processor, capfd):
    model = qv.Qwen2VL(qconfig.tiny(), random_params(Qwen2VLModule(qconfig.tiny()), seed=3))
    path = str(tmp_path / "export")
    capfd.readouterr()
    model.save_pretrained(path)
    assert "holes" not in capfd.readouterr().out   # tokenizers' alarm for a vocabulary with unused ids
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "chat_template.json",
            "preprocessor_config.json", "generation_config.json"} <= set(os.listdir(path))
    out, hf_out, proc = _greedy_both(path, auto_processor)
    np.testing.assert_array_equal(out, hf_out)
    assert proc.pad_token_id == model.config.pad_token_id and proc.eos_token_id == model.config.eos_token_id


def test_qwen2_5_vl_save_pretrained_loads_in_transformers(tmp_path, auto_processor):
    """A Qwen2.5-VL export: `Qwen2_5_VLForConditionalGeneration` and `AutoProcessor` (a `Qwen2_5_VLProcessor`)
    load it, and greedy decoding of an image prompt and a text prompt agrees with ours token for token."""
    config = qconfig.tiny_2_5()
    model = qv.Qwen2VL(config, random_params(Qwen2VLModule(config), seed=4))
    path = str(tmp_path / "export25")
    model.save_pretrained(path)
    with open(os.path.join(path, "config.json")) as f:
        d = json.load(f)
    assert d["architectures"] == ["Qwen2_5_VLForConditionalGeneration"] and d["model_type"] == "qwen2_5_vl"
    assert type(auto_processor(path)).__name__ == "Qwen2_5_VLProcessor"
    assert qv.load_pretrained(path).config == config
    out, hf_out, proc = _greedy_both(path, auto_processor)
    np.testing.assert_array_equal(out, hf_out)
    assert proc.absolute_time and proc.processor_class == "Qwen2_5_VLProcessor"


def test_qwen3_vl_save_pretrained_loads_in_transformers(tmp_path, auto_processor):
    """A Qwen3-VL export (nested text_config, `model.visual.*` / `model.language_model.*` tensors):
    `Qwen3VLForConditionalGeneration` and `AutoProcessor` (a `Qwen3VLProcessor`) load it, and greedy decoding
    of an image prompt and a text prompt agrees with ours token for token."""
    config = qconfig.tiny_3()
    model = qv.Qwen2VL(config, random_params(Qwen2VLModule(config), seed=5))
    path = str(tmp_path / "export3")
    model.save_pretrained(path)
    with open(os.path.join(path, "config.json")) as f:
        d = json.load(f)
    assert d["architectures"] == ["Qwen3VLForConditionalGeneration"] and d["model_type"] == "qwen3_vl"
    assert d["text_config"]["head_dim"] == 16 and d["text_config"]["rope_scaling"]["mrope_interleaved"]
    assert type(auto_processor(path)).__name__ == "Qwen3VLProcessor"
    assert qv.load_pretrained(path).config == config
    out, hf_out, proc = _greedy_both(path, auto_processor)
    np.testing.assert_array_equal(out, hf_out)
    assert proc.frame_timestamps and proc.processor_class == "Qwen3VLProcessor"


def test_training_export_is_complete(tmp_path, auto_processor):
    """The export the training loop writes (the run's processor and image settings) reads back the same in
    transformers and here, on an ordinary 1000x700 picture."""
    from qwen2vl_jax.train import checkpoint, data as data_lib
    from qwen2vl_jax.train.config import load
    cfg = load(None, ["model=tiny", f"workdir={tmp_path}", "data.image_max_pixels=50176"])
    config = qconfig.tiny()
    path = str(tmp_path / "hf")
    checkpoint.export_hf(random_params(Qwen2VLModule(config), seed=1), config, path,
                         processor=data_lib.processor(cfg, config), generation=data_lib.generation(cfg))
    with open(os.path.join(path, "preprocessor_config.json")) as f:
        assert json.load(f)["max_pixels"] == 50176
    assert Processor.from_pretrained(path).image_max_pixels == 50176
    hf_proc = auto_processor(path)
    assert hf_proc.image_processor.max_pixels == 50176
    texts = [hf_proc.apply_chat_template(m, add_generation_prompt=True) for m in MESSAGES]
    hf_in = hf_proc(text=texts, images=[picture()], padding=True, return_tensors="np")
    our_in = Processor.from_pretrained(path)(text=texts, images=[picture()])
    for key in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw"):
        np.testing.assert_array_equal(hf_in[key], our_in[key], err_msg=key)
    assert our_in["image_grid_thw"].tolist() == [[1, 12, 18]]   # 700x1000 -> 168x252 fits 50176 pixels


def test_default_vocabulary_export_has_the_qwen2vl_tokenizer(tmp_path):
    """A model with the Qwen2-VL vocabulary exports the real tokenizer with the hub's special-token setup."""
    config = qconfig.tiny(151936).replace(bos_token_id=151643, eos_token_id=151645, pad_token_id=151643,
                                          vision_start_token_id=151652, vision_end_token_id=151653,
                                          vision_token_id=151654, image_token_id=151655, video_token_id=151656)
    from qwen2vl_jax import hf
    hf.save_processing(config, str(tmp_path))
    tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert (tok.eos_token, tok.pad_token, tok.bos_token, len(tok)) == ("<|im_end|>", "<|endoftext|>", None, 151657)
    text = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Hello world!<|im_end|>\n"
    assert tok(text)["input_ids"] == Processor.default().tokenizer.encode(text).ids
    with open(tmp_path / "generation_config.json") as f:
        assert json.load(f)["eos_token_id"] == 151645


def _null_pad_checkpoint(tmp_path):
    """A random transformers model whose config.json says `pad_token_id: null` over a 1000-token vocabulary."""
    d = qconfig.tiny().to_hf_dict()
    d["pad_token_id"] = None
    hfc = transformers.Qwen2VLConfig(**d)
    hfc._attn_implementation = "eager"
    torch.manual_seed(0)
    model = transformers.Qwen2VLForConditionalGeneration(hfc).eval()
    path = tmp_path / "null_pad"
    model.save_pretrained(path)
    with open(path / "config.json") as f:   # transformers leaves the key out; some published configs say null
        d = json.load(f)
    assert d.get("pad_token_id") is None
    with open(path / "config.json", "w") as f:
        json.dump({**d, "pad_token_id": None}, f)
    return str(path), model


def test_null_pad_id_generates_like_transformers_and_exports(tmp_path, auto_processor):
    path, hf_model = _null_pad_checkpoint(tmp_path)
    model = qv.load_pretrained(path)
    assert model.config.pad_token_id == model.config.bos_token_id == 0   # inside the vocabulary
    proc = Processor.for_model(model.config)
    texts = [proc.apply_chat_template(m) for m in MESSAGES]
    inputs = proc(text=texts, images=[picture(350, 500)])
    assert (inputs["attention_mask"] == 0).any()   # the text prompt is left-padded
    out = model.generate(**inputs, max_new_tokens=8)
    with torch.no_grad():   # transformers pads finished rows with the EOS id when it has no pad id: name ours
        hf_in = {k: torch.as_tensor(v.astype(np.int64) if v.dtype.kind == "i" else v) for k, v in inputs.items()}
        hf_out = hf_model.generate(**hf_in, max_new_tokens=8,
                                   do_sample=False, pad_token_id=model.config.pad_token_id).numpy()
    np.testing.assert_array_equal(out, hf_out)
    assert not (out[:, inputs["input_ids"].shape[1]:] == model.config.pad_token_id).all()

    export = str(tmp_path / "export")
    model.save_pretrained(export)
    with open(os.path.join(export, "config.json")) as f:
        assert json.load(f)["pad_token_id"] == 0
    out2, hf_out2, _ = _greedy_both(export, auto_processor)
    np.testing.assert_array_equal(out2, hf_out2)


def test_padding_slots_never_reach_real_tokens():
    """Whatever id a padding slot holds (even one outside the vocabulary, which embeds to NaN), the real
    tokens' logits are the same, bit for bit, and finite."""
    model = qv.Qwen2VL(qconfig.tiny(), random_params(Qwen2VLModule(qconfig.tiny()), seed=2))
    ids = np.array([[0, 0, 0, 5, 6, 7, 8], [9, 10, 11, 12, 13, 14, 15]])
    mask = (np.arange(7) >= np.array([[3], [0]])).astype(np.int32)
    clean = np.asarray(model(ids, mask))
    ids[0, :3] = [model.config.text.vocab_size + 7, -3, 2 ** 30]
    dirty = np.asarray(model(ids, mask))
    real = mask == 1
    assert np.isfinite(dirty[real]).all()
    np.testing.assert_array_equal(dirty[real], clean[real])
    with pytest.raises(qv.inputs.InputError, match=r"input_ids\[0, 3\] = 1005 is outside the vocabulary"):
        model(np.where(real, ids, 0) + np.eye(1, 7, 3, dtype=int) * 1000, mask)


def test_pad_id_outside_the_vocabulary_is_refused():
    with pytest.raises(qv.ConfigError, match="pad_token_id 151643 is outside the vocabulary"):
        qconfig.tiny().replace(pad_token_id=151643)
    d = qconfig.tiny().to_hf_dict()
    del d["pad_token_id"], d["bos_token_id"]   # no pad and a BOS outside the vocabulary: the lowest free id
    assert qconfig.from_hf_dict(d).pad_token_id == 0


def test_a_processor_of_another_model_is_refused_before_anything_is_written(tmp_path):
    model = qv.Qwen2VL(qconfig.tiny(), random_params(Qwen2VLModule(qconfig.tiny())))
    with pytest.raises(ValueError, match=r"does not belong to this model .*image_token_id 151655 != 992"):
        model.save_pretrained(str(tmp_path / "out"), processor=Processor.default())
    assert not os.path.exists(tmp_path / "out" / "model.safetensors")


@pytest.mark.slow
def test_the_demo_export_answers_like_transformers(tmp_path, auto_processor):
    """`python train.py` (the demo, cut to 3 steps) exports a checkpoint that transformers runs to our answer."""
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, os.path.join(root, "train.py"), f"workdir={tmp_path}", "steps=3",
                        "checkpoint_every=3", "data.synthetic_size=40", "progress=false"],
                       env={**os.environ, "JAX_PLATFORMS": "cpu"}, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "holes" not in r.stdout
    out, hf_out, _ = _greedy_both(str(tmp_path / "hf"), auto_processor)
    np.testing.assert_array_equal(out, hf_out)


def test_processor_settings_round_trip(tmp_path):
    proc = Processor.from_config(qconfig.tiny(), image_min_pixels=784, image_max_pixels=28 * 28 * 64,
                                 video_min_pixels=4 * 28 * 28, video_max_pixels=48 * 28 * 28)
    proc.save_pretrained(str(tmp_path))
    back = Processor.from_pretrained(str(tmp_path))
    settings = ("image_min_pixels", "image_max_pixels", "video_min_pixels", "video_max_pixels", "patch_size",
                "merge_size", "temporal_patch_size", "chat_template", "pad_token_id", "eos_token_id",
                "image_token_id", "video_token_id")
    assert [getattr(back, k) for k in settings] == [getattr(proc, k) for k in settings]
    assert back.tokenizer.get_vocab() == proc.tokenizer.get_vocab()
    Processor.default().save_pretrained(str(tmp_path / "default"))
    assert os.path.exists(tmp_path / "default" / "video_preprocessor_config.json")   # the video budget, always
