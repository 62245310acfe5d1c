"""LoRA against peft 0.21.2 on transformers 4.57.6 tiny random Qwen2-VL models (f32): adapters on the LLM's
attention and MLP, the ViT's qkv and fc2, and the merger, ranks 4 and 8, rslora on and off, with random
(non-zero) A and B. peft's adapter loads here with the same logits, ours loads in peft with the same logits,
the merged weights are peft's merge_and_unload, and the loss and the adapters' gradients are torch's."""

import copy
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import hf_models
import qwen2vl_jax as qv
from qwen2vl_jax import hf, lora, peft_io
from qwen2vl_jax.inputs import batch_from_hf
from qwen2vl_jax.api import MODEL_KEYS

# peft's regex (full match over transformers module names) and ours (search over our module paths).
PEFT_TARGETS = r".*(self_attn\.(q_proj|v_proj)|mlp\.down_proj|attn\.qkv|blocks\.\d+\.mlp\.fc2|merger\.mlp\.0)"
OUR_TARGETS = r"^(model/layers/(q|v|down)_proj|visual/blocks/(qkv|fc2)|visual/merger/mlp_0)$"
CASE = "two_images"


def _peft(hf_model, r, rslora, seed=0):
    from peft import LoraConfig, get_peft_model
    cfg = LoraConfig(r=r, lora_alpha=2 * r + 3, use_rslora=rslora, target_modules=PEFT_TARGETS, lora_dropout=0.0,
                     init_lora_weights=False)
    model = get_peft_model(copy.deepcopy(hf_model), cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()


def _logits(model, inputs):
    with torch.no_grad():
        return model(**hf_models.to_torch(inputs)).logits.numpy()


@pytest.fixture(scope="module")
def tiny(hf_checkpoints):
    return hf_checkpoints["tiny"]


@pytest.mark.parametrize("r,rslora", [(4, False), (8, True), pytest.param(4, True, marks=pytest.mark.slow),
                                      pytest.param(8, False, marks=pytest.mark.slow)])
def test_peft_adapter_both_ways(tiny, tmp_path, r, rslora):
    cfg, hf_model, path = tiny
    inputs = hf_models.cases(cfg)[CASE]
    pm = _peft(hf_model, r, rslora)
    ref = _logits(pm, inputs)
    assert np.abs(ref - _logits(hf_model, inputs)).max() > 0.05   # the adapter is not trivial
    pm.save_pretrained(str(tmp_path / "peft"))

    ours = qv.load_pretrained(path, adapter=str(tmp_path / "peft"))
    assert ours.adapter.r == r and ours.adapter.rslora == rslora
    np.testing.assert_allclose(np.asarray(ours(**inputs)), ref, rtol=0, atol=1e-4)

    # ours -> peft: the same logits from PeftModel.from_pretrained.
    from peft import PeftModel
    ours.save_adapter(str(tmp_path / "ours"))
    back = PeftModel.from_pretrained(copy.deepcopy(hf_model), str(tmp_path / "ours")).eval()
    np.testing.assert_allclose(_logits(back, inputs), ref, rtol=0, atol=1e-5)
    n_lora = sum("lora_" in n for n, _ in back.named_parameters())
    assert n_lora == sum("lora_" in n for n, _ in pm.named_parameters())

    # merge: the weights of peft's merge_and_unload, and a complete checkpoint with its logits.
    merged = ours.merge_adapter()
    assert merged.adapter is None and not lora.has_adapters(merged.params)
    want = {k: v.numpy() for k, v in copy.deepcopy(pm).merge_and_unload().state_dict().items()}
    want = {hf._canonical(k): v for k, v in want.items()}
    worst = 0.0
    for name, arr in hf.hf_tensors(merged.params, cfg):
        worst = max(worst, float(np.abs(arr - want[name]).max()))
    assert worst <= 1e-5, worst
    merged.save_pretrained(str(tmp_path / "merged"))
    again = qv.load_pretrained(str(tmp_path / "merged"))
    np.testing.assert_allclose(np.asarray(again(**inputs)), ref, rtol=0, atol=1e-4)


@pytest.mark.parametrize("rslora", [False, True])
def test_loss_and_adapter_gradients_match_torch(tiny, tmp_path, rslora):
    cfg, hf_model, path = tiny
    inputs = hf_models.cases(cfg)[CASE]
    pm = _peft(hf_model, 4, rslora, seed=1)
    pm.save_pretrained(str(tmp_path / "peft"))
    ours = qv.load_pretrained(path, adapter=str(tmp_path / "peft"))
    ids = np.asarray(inputs["input_ids"])
    targets = np.random.default_rng(0).integers(0, cfg.text.vocab_size, ids.shape)

    pm.train()
    out = pm(**hf_models.to_torch(inputs)).logits
    loss_t = torch.nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), torch.tensor(targets).reshape(-1))
    loss_t.backward()
    torch_grads = {n: p.grad.numpy() for n, p in pm.named_parameters() if "lora_" in n}

    batch, _ = batch_from_hf(cfg, **inputs)
    batch = {k: jnp.asarray(batch[k]) for k in MODEL_KEYS if batch.get(k) is not None}
    adapters = lora.adapter_params(ours.params)

    def loss_fn(ad):
        from qwen2vl_jax.train.optim import merge
        logits = ours.module.apply({"params": merge(ad, _without_adapters(ours.params))}, batch)
        logp = jax.nn.log_softmax(logits, -1)
        return -jnp.mean(jnp.take_along_axis(logp, jnp.asarray(targets)[..., None], -1))

    loss, grads = jax.jit(jax.value_and_grad(loss_fn))(adapters)
    assert abs(float(loss) - loss_t.item()) <= 1e-5 * abs(loss_t.item())
    # Our gradients written out in peft's layout (the same keys and shapes as torch's .grad).
    ours_as_peft = _as_peft_tensors(grads, cfg, ours.adapter, tmp_path / "grads")
    assert set(ours_as_peft) == {k.replace(".default", "") for k in torch_grads}
    scale = max(float(np.abs(g).max()) for g in torch_grads.values())
    for k, g in torch_grads.items():
        np.testing.assert_allclose(ours_as_peft[k.replace(".default", "")], g, rtol=0, atol=1e-5 * scale,
                                   err_msg=k)


def _without_adapters(params):
    out = {}
    for k, v in params.items():
        if isinstance(v, dict):
            out[k] = _without_adapters(v)
        elif k not in ("lora_a", "lora_b"):
            out[k] = v
    return out


def _as_peft_tensors(tree, cfg, adapter, path):
    peft_io.save_adapter(tree, cfg, adapter, str(path))
    reader = hf.SafetensorsReader(str(path / peft_io.WEIGHTS_FILE))
    return {k: np.asarray(reader.get(k)) for k in reader.keys()}


def test_new_adapter_is_peft_init_and_changes_nothing(tiny, tmp_path):
    """add_adapter: A uniform(+-1/sqrt(in)) and B zero as peft, so the logits are the base model's; the saved
    adapter's config is what peft reads (regex targets in either transformers layout)."""
    cfg, hf_model, path = tiny
    inputs = hf_models.cases(cfg)["single_image"]
    base = qv.load_pretrained(path)
    model = base.add_adapter(r=8, alpha=16, targets=OUR_TARGETS, seed=3)
    np.testing.assert_array_equal(np.asarray(model(**inputs)), np.asarray(base(**inputs)))
    a = model.params["model"]["layers"]["q_proj"]["lora_a"]
    assert a.shape == (cfg.text.num_hidden_layers, cfg.text.hidden_size, 8)   # stacked like the kernel
    assert float(jnp.abs(a).max()) <= 1 / np.sqrt(cfg.text.hidden_size) and float(jnp.abs(a).std()) > 0
    assert not np.any(np.asarray(model.params["model"]["layers"]["q_proj"]["lora_b"]))
    assert "lora_a" not in model.params["model"]["layers"]["k_proj"]
    model.save_adapter(str(tmp_path / "a"))
    c = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    import re
    rx = re.compile(c["target_modules"])
    for name in ("model.language_model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.q_proj",
                 "model.visual.blocks.0.attn.qkv", "visual.blocks.0.attn.qkv", "model.visual.merger.mlp.0"):
        assert rx.fullmatch(name), name
    assert not rx.fullmatch("model.language_model.layers.1.self_attn.k_proj")
    with pytest.raises(ValueError, match="holds LoRA adapters"):
        model.save_pretrained(str(tmp_path / "x"))
    with pytest.raises(lora.AdapterError, match="match no adaptable layer"):
        base.add_adapter(targets="^nothing$")


def test_older_key_layout_loads(tiny, tmp_path):
    """An adapter saved against the older transformers layout (`base_model.model.model.layers...`,
    `base_model.model.visual...`) loads to the same params as the newer one."""
    cfg, hf_model, path = tiny
    pm = _peft(hf_model, 4, False, seed=2)
    pm.save_pretrained(str(tmp_path / "new"))
    reader = hf.SafetensorsReader(str(tmp_path / "new" / peft_io.WEIGHTS_FILE))
    old = {}
    for k in reader.keys():
        k2 = k.replace("base_model.model.model.language_model.", "base_model.model.model.")
        k2 = k2.replace("base_model.model.model.visual.", "base_model.model.visual.")
        old[k2] = np.asarray(reader.get(k))
    assert set(old) != set(reader.keys())
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "adapter_config.json").write_text((tmp_path / "new" / "adapter_config.json").read_text())
    hf.write_safetensors(str(tmp_path / "old" / peft_io.WEIGHTS_FILE), old)
    a = qv.load_pretrained(path, adapter=str(tmp_path / "new"))
    b = qv.load_pretrained(path, adapter=str(tmp_path / "old"))
    for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_generation_with_an_unmerged_adapter(tiny, tmp_path):
    """generate() runs the adapted layers in prefill and decode: the same tokens as the merged model."""
    cfg, hf_model, path = tiny
    pm = _peft(hf_model, 4, False, seed=4)
    pm.save_pretrained(str(tmp_path / "peft"))
    ours = qv.load_pretrained(path, adapter=str(tmp_path / "peft"))
    inputs = hf_models.cases(cfg)["single_image"]
    a = ours.generate(**inputs, max_new_tokens=6, eos_token_id=())
    b = ours.merge_adapter().generate(**inputs, max_new_tokens=6, eos_token_id=())
    c = qv.load_pretrained(path).generate(**inputs, max_new_tokens=6, eos_token_id=())
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
