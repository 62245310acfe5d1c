"""Stage-1 assembly (issue 8): a Qwen2-VL from a CLIP ViT (HF or open_clip layout) and a Qwen2ForCausalLM.

Sources are tiny random models built with transformers 4.57.6, and an open_clip-layout ViT hand-built
from torch modules with open_clip's parameter names (`conv1`, `transformer.resblocks.N.attn` as an
`nn.MultiheadAttention`, `mlp.c_fc` / `c_proj`, ...). Norm weights and biases are perturbed away from their
1/0 init so a swapped or dropped one shows.
"""

import collections
import dataclasses
import functools
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import qwen2vl_jax as qv
from qwen2vl_jax import config as qconfig
from qwen2vl_jax.assemble import assemble_params
from qwen2vl_jax.hf import CheckpointError
from qwen2vl_jax.inputs import batch_from_hf
from qwen2vl_jax.model.qwen2vl import Qwen2VLModule
from qwen2vl_jax.model.vision import PatchMerger

W, DEPTH, HEADS, MLP, P = 32, 2, 4, 128, 14      # the ViT of qconfig.tiny()


def _perturb(module, seed):
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if re.search(r"norm|ln_|bias", name):
                p.add_(torch.randn_like(p) * 0.1)
    return module


def _hf_clip(path, act="quick_gelu", full_clip=False):
    from transformers import CLIPConfig, CLIPModel, CLIPVisionConfig, CLIPVisionModel
    # eps 1e-6 (CLIP's default is 1e-5) so the functional comparison below is exact in structure.
    vc = dict(hidden_size=W, intermediate_size=MLP, num_hidden_layers=DEPTH, num_attention_heads=HEADS,
              image_size=56, patch_size=P, hidden_act=act, layer_norm_eps=1e-6)
    torch.manual_seed(1)
    if full_clip:
        model = CLIPModel(CLIPConfig(vision_config=vc, projection_dim=16, text_config=dict(
            hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, vocab_size=50)))
    else:
        model = CLIPVisionModel(CLIPVisionConfig(**vc, attn_implementation="eager"))
    _perturb(model.eval(), 2).save_pretrained(path)
    return model


def _qwen2(path, tied=False, seed=3):
    from transformers import Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=1e6,
                      max_position_embeddings=4096, tie_word_embeddings=tied, attn_implementation="eager")
    model = _perturb(Qwen2ForCausalLM(cfg).eval(), seed + 1)
    model.save_pretrained(path)
    return model


class QuickGELU(torch.nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class OpenClipBlock(torch.nn.Module):
    """open_clip.transformer.ResidualAttentionBlock (no LayerScale), same parameter names."""

    def __init__(self, width, heads, mlp):
        super().__init__()
        self.ln_1 = torch.nn.LayerNorm(width, eps=1e-6)
        self.attn = torch.nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_2 = torch.nn.LayerNorm(width, eps=1e-6)
        self.mlp = torch.nn.Sequential(collections.OrderedDict([
            ("c_fc", torch.nn.Linear(width, mlp)), ("gelu", QuickGELU()), ("c_proj", torch.nn.Linear(mlp, width))]))

    def forward(self, x):
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class OpenClipVisual(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, W, P, P, bias=False)
        self.class_embedding = torch.nn.Parameter(torch.randn(W))
        self.positional_embedding = torch.nn.Parameter(torch.randn(9, W))
        self.ln_pre = torch.nn.LayerNorm(W)
        self.transformer = torch.nn.Module()
        self.transformer.resblocks = torch.nn.ModuleList(OpenClipBlock(W, HEADS, MLP) for _ in range(DEPTH))
        self.ln_post = torch.nn.LayerNorm(W)
        self.proj = torch.nn.Parameter(torch.randn(W, 16))

    def tokens(self, image):   # the patch tokens through the blocks: no class token, position or ln_pre
        x = self.conv1(image).flatten(2).transpose(1, 2)
        for block in self.transformer.resblocks:
            x = block(x)
        return x


class OpenClip(torch.nn.Module):
    """An open_clip CLIP: `visual.*` plus a one-block text tower and the contrastive head."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(5)
        self.visual = OpenClipVisual()
        self.token_embedding = torch.nn.Embedding(50, 16)
        self.positional_embedding = torch.nn.Parameter(torch.randn(8, 16))
        self.transformer = torch.nn.Module()
        self.transformer.resblocks = torch.nn.ModuleList([OpenClipBlock(16, 2, 32)])
        self.ln_final = torch.nn.LayerNorm(16)
        self.text_projection = torch.nn.Parameter(torch.randn(16, 16))
        self.logit_scale = torch.nn.Parameter(torch.ones([]))


def _open_clip(path, config=True, extra=None):
    model = _perturb(OpenClip().eval(), 6)
    os.makedirs(path, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file({**state, **(extra or {})}, os.path.join(path, "open_clip_model.safetensors"))
    if config:
        with open(os.path.join(path, "open_clip_config.json"), "w") as f:
            json.dump({"model_cfg": {"embed_dim": 16, "quick_gelu": True, "vision_cfg": {
                "image_size": [28, 56], "layers": DEPTH, "width": W, "head_width": W // HEADS, "patch_size": P}}}, f)
    return model


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    d = tmp_path_factory.mktemp("assemble")
    out = {"clip": (_hf_clip(d / "clip"), str(d / "clip")),
           "clip_model": (_hf_clip(d / "clip_model", full_clip=True), str(d / "clip_model")),
           "open_clip": (_open_clip(d / "open_clip"), str(d / "open_clip")),
           "qwen2": (_qwen2(d / "qwen2"), str(d / "qwen2")),
           "qwen2_tied": (_qwen2(d / "qwen2_tied", tied=True, seed=7), str(d / "qwen2_tied"))}
    out["dir"] = d
    return out


@pytest.fixture(scope="module")
def assembled(sources):
    cfg = qconfig.tiny()
    return {v: (cfg,) + assemble_params(cfg, sources[v][1], sources["qwen2"][1], seed=0)
            for v in ("clip", "open_clip")}


def _np(t):
    return t.detach().numpy()


def _flat(tree):
    return {"/".join(k.key for k in path): np.asarray(v) for path, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


# -- every mapped tensor equals its source -----------------------------------------------------------

def _clip_expected(model, layout):
    """Our param path -> the source tensor after the documented transpose / fuse (per layer, stacked)."""
    sd = {k: _np(v) for k, v in model.state_dict().items()}
    if layout == "clip":
        pre = "vision_model.encoder.layers.{}."
        names = {"norm1/scale": ["layer_norm1.weight"], "norm1/bias": ["layer_norm1.bias"],
                 "qkv/kernel": [f"self_attn.{x}_proj.weight" for x in "qkv"],
                 "qkv/bias": [f"self_attn.{x}_proj.bias" for x in "qkv"],
                 "proj/kernel": ["self_attn.out_proj.weight"], "proj/bias": ["self_attn.out_proj.bias"],
                 "norm2/scale": ["layer_norm2.weight"], "norm2/bias": ["layer_norm2.bias"],
                 "fc1/kernel": ["mlp.fc1.weight"], "fc1/bias": ["mlp.fc1.bias"],
                 "fc2/kernel": ["mlp.fc2.weight"], "fc2/bias": ["mlp.fc2.bias"]}
        conv = sd["vision_model.embeddings.patch_embedding.weight"]
    else:
        pre = "visual.transformer.resblocks.{}."
        names = {"norm1/scale": ["ln_1.weight"], "norm1/bias": ["ln_1.bias"],
                 "qkv/kernel": ["attn.in_proj_weight"], "qkv/bias": ["attn.in_proj_bias"],
                 "proj/kernel": ["attn.out_proj.weight"], "proj/bias": ["attn.out_proj.bias"],
                 "norm2/scale": ["ln_2.weight"], "norm2/bias": ["ln_2.bias"],
                 "fc1/kernel": ["mlp.c_fc.weight"], "fc1/bias": ["mlp.c_fc.bias"],
                 "fc2/kernel": ["mlp.c_proj.weight"], "fc2/bias": ["mlp.c_proj.bias"]}
        conv = sd["visual.conv1.weight"]
    out = {}
    for ours, src in names.items():
        layers = [np.concatenate([sd[pre.format(i) + s] for s in src], 0) for i in range(DEPTH)]
        out["visual/blocks/" + ours] = np.stack([x.T if ours.endswith("kernel") else x for x in layers])
    return out, conv


@pytest.mark.parametrize("layout", ["clip", "open_clip"])
def test_vision_tensors_equal_source(sources, assembled, layout):
    _, params, report = assembled[layout]
    flat = _flat(params)
    expected, conv = _clip_expected(sources[layout][0], layout)
    for path, want in expected.items():
        np.testing.assert_array_equal(flat[path], want, err_msg=path)
    # The patch kernel, unflattened to (E, C, t, p, p) with columns (c, t, py, px): each frame holds W/2,
    # so twice each frame is the source exactly (halving is exact in binary).
    k = flat["visual/patch_embed/kernel"].T.reshape(W, 3, 2, P, P)
    for t in range(2):
        np.testing.assert_array_equal(2 * k[:, :, t], conv)
    assert {e["param"] for e in report.loaded} >= set(expected) | {"visual/patch_embed/kernel"}


def _assert_llm_equals_source(flat, model, bitwise=False):
    """Every LLM param equals its Qwen2ForCausalLM tensor (transposed for kernels); returns how many."""
    n = 0
    for key, t in model.state_dict().items():
        want = _np(t)
        m = re.fullmatch(r"model\.layers\.(\d+)\.(self_attn|mlp)?\.?(\w+)\.(weight|bias)", key)
        if key == "lm_head.weight":
            # A tied source has no lm_head on disk (torch's state dict shows the embedding under this name):
            # the untied config's head then starts as the embedding.
            path, got = "lm_head/kernel", flat["lm_head/kernel"]
        elif m:
            path = f"model/layers/{m.group(3)}/" + {"weight": "kernel" if "proj" in m.group(3) else "scale",
                                                    "bias": "bias"}[m.group(4)]
            got = flat[path][int(m.group(1))]
        else:
            path = {"model.embed_tokens.weight": "model/embed_tokens/embedding",
                    "model.norm.weight": "model/norm/scale"}[key]
            got = flat[path]
        want = want.T if path.endswith("kernel") else want
        if bitwise:
            assert np.ascontiguousarray(got).tobytes() == np.ascontiguousarray(want).tobytes(), f"{key} changed"
        else:
            np.testing.assert_array_equal(got, want, err_msg=key)
        n += 1
    return n


@pytest.mark.parametrize("llm", ["qwen2", "qwen2_tied"])
def test_llm_tensors_equal_source(sources, llm):
    params, report = assemble_params(qconfig.tiny(), sources["clip"][1], sources[llm][1])
    assert _assert_llm_equals_source(_flat(params), sources[llm][0]) == 2 * 12 + 3
    head = next(e for e in report.loaded if e["param"] == "lm_head/kernel")
    assert head["from"] == (["model.embed_tokens.weight"] if llm == "qwen2_tied" else ["lm_head.weight"])


def test_assemble_returns_the_model_object(sources, assembled):
    cfg, params, _ = assembled["clip"]
    model, report = qv.assemble(cfg, sources["clip"][1], sources["qwen2"][1])
    assert isinstance(model, qv.Qwen2VL) and model.config == cfg and isinstance(report, qv.LoadReport)
    jax.tree.map(np.testing.assert_array_equal, model.params, params)


# -- functional checks ---------------------------------------------------------------------------------

def _duplicated_patches(image):
    """(3, H, W) image -> (N, 1176) rows, raster patch order, columns (c, t, py, px) with both frames = image."""
    c, h, w = image.shape
    x = image.reshape(c, h // P, P, w // P, P).transpose(1, 3, 0, 2, 4)      # (gh, gw, c, py, px)
    x = np.broadcast_to(x[:, :, :, None], (h // P, w // P, c, 2, P, P))
    return np.ascontiguousarray(x).reshape(-1, c * 2 * P * P)


@pytest.mark.parametrize("layout", ["clip", "open_clip"])
def test_inflated_patch_kernel_gives_2d_conv_on_duplicated_image(sources, assembled, layout):
    _, params, _ = assembled[layout]
    model = sources[layout][0]
    conv = model.vision_model.embeddings.patch_embedding if layout == "clip" else model.visual.conv1
    image = np.random.default_rng(0).standard_normal((3, 28, 56)).astype(np.float32)
    with torch.no_grad():
        ref = _np(conv(torch.from_numpy(image)[None]).flatten(2).transpose(1, 2)[0])   # (8, E)
    out = _duplicated_patches(image).astype(np.float64) @ np.asarray(params["visual"]["patch_embed"]["kernel"],
                                                                     np.float64)
    np.testing.assert_allclose(out, ref, atol=2e-6, rtol=0)


@functools.lru_cache
def _encode(cfg):
    """Jitted (params, patches (N, 1176)) -> (our ViT's output before the merger (N, E), merged (N/4, D)).

    The block output is taken at the PatchMerger's input. All patch positions are 0, so the 2D RoPE is the
    identity and the blocks compute exactly what CLIP's blocks do on the same tokens."""
    module = Qwen2VLModule(cfg)

    @jax.jit
    def run(params, patches):
        seen = {}

        def grab(next_fun, args, kwargs, context):
            if isinstance(context.module, PatchMerger) and context.method_name == "__call__":
                seen["x"] = args[0]
            return next_fun(*args, **kwargs)

        n = patches.shape[0]
        with nn.intercept_methods(grab):
            merged = module.apply({"params": params}, patches[None], jnp.ones((1, n), jnp.int32),
                                  jnp.zeros((1, n, 2), jnp.int32), method="encode_vision")
        return seen["x"][0], merged[0]
    return run


def _merger_reference(params, x):
    """Qwen2-VL's PatchMerger in torch: LayerNorm(1e-6), 4 rows -> 4E, Linear-GELU(erf)-Linear."""
    m = {k: torch.from_numpy(np.array(v)) for k, v in _flat(params["visual"]["merger"]).items()}
    h = torch.nn.functional.layer_norm(torch.from_numpy(x), (W,), m["ln_q/scale"], m["ln_q/bias"], 1e-6)
    h = h.reshape(-1, 4 * W) @ m["mlp_0/kernel"] + m["mlp_0/bias"]
    return _np(torch.nn.functional.gelu(h) @ m["mlp_2/kernel"] + m["mlp_2/bias"])


@pytest.mark.parametrize("layout", ["clip", "open_clip"])
def test_vision_tower_reproduces_source_blocks(sources, assembled, layout):
    cfg, params, _ = assembled[layout]
    model = sources[layout][0]
    image = np.random.default_rng(1).standard_normal((3, 28, 56)).astype(np.float32)
    with torch.no_grad():
        img = torch.from_numpy(image)[None]
        if layout == "clip":
            emb = model.vision_model.embeddings.patch_embedding(img).flatten(2).transpose(1, 2)
            ref = _np(model.vision_model.encoder(inputs_embeds=emb).last_hidden_state[0])
        else:
            ref = _np(model.visual.tokens(img)[0])
    blocks, merged = map(np.asarray, _encode(cfg)(params, _duplicated_patches(image)))
    assert np.abs(ref).max() > 1                                   # a real signal, not near zero
    np.testing.assert_allclose(blocks, ref, atol=1e-5, rtol=0)
    np.testing.assert_allclose(merged, _merger_reference(params, ref), atol=1e-6, rtol=0)


@functools.lru_cache
def _logits(cfg):
    return jax.jit(lambda params, batch: Qwen2VLModule(cfg).apply({"params": params}, batch))


@pytest.mark.parametrize("llm,tied", [("qwen2", False), ("qwen2_tied", True), ("qwen2_tied", False)])
def test_language_half_matches_qwen2_logits(sources, llm, tied):
    cfg = qconfig.tiny().replace(tie_word_embeddings=tied)
    params, _ = assemble_params(cfg, sources["clip"][1], sources[llm][1])
    ids = np.random.default_rng(2).integers(2, 900, (2, 11))
    with torch.no_grad():
        ref = _np(sources[llm][0](torch.from_numpy(ids)).logits)
    batch, _ = batch_from_hf(cfg, ids)     # text only: M-RoPE positions t = h = w = 0..L-1
    out = np.asarray(_logits(cfg)(params, batch))
    err = np.abs(out - ref).max()
    print(f"text-only logits vs Qwen2ForCausalLM ({llm}, config tied={tied}): max |diff| {err:.2e}")
    assert err <= 1e-4


def test_merger_is_freshly_initialised(sources, assembled):
    cfg, params, report = assembled["clip"]
    m = _flat(params["visual"]["merger"])
    assert set(m) == {"ln_q/scale", "ln_q/bias", "mlp_0/kernel", "mlp_0/bias", "mlp_2/kernel", "mlp_2/bias"}
    assert {e["param"] for e in report.initialised} == {"visual/merger/" + k for k in m}
    np.testing.assert_array_equal(m["ln_q/scale"], 1.0)
    for k in ("ln_q/bias", "mlp_0/bias", "mlp_2/bias"):
        np.testing.assert_array_equal(m[k], 0.0)
    for k in ("mlp_0/kernel", "mlp_2/kernel"):     # normal(0, 0.02): 8k-16k draws pin the std to ~1%
        assert abs(m[k].std() - 0.02) < 0.001 and abs(m[k].mean()) < 0.001, (k, m[k].std(), m[k].mean())
    other, _ = assemble_params(cfg, sources["clip"][1], sources["qwen2"][1], seed=1)
    assert not np.array_equal(_flat(other)["visual/merger/mlp_0/kernel"], m["mlp_0/kernel"])


@pytest.mark.slow
def test_merger_is_the_models_own_init(assembled):
    cfg, params, _ = assembled["clip"]
    fresh = qv.Qwen2VL.init(cfg, seed=0).params["visual"]["merger"]
    jax.tree.map(np.testing.assert_array_equal, params["visual"]["merger"], fresh)


# -- the load report ----------------------------------------------------------------------------------

def _source_names(path):
    from qwen2vl_jax.hf import SafetensorsReader
    return set(SafetensorsReader(path).keys())


@pytest.mark.parametrize("layout", ["clip", "clip_model", "open_clip"])
def test_report_accounts_for_every_tensor(sources, layout, tmp_path):
    cfg = qconfig.tiny()
    params, report = assemble_params(cfg, sources[layout][1], sources["qwen2"][1])
    used = [n.format(i=i) for e in report.loaded for n in e["from"] for i in range(e["layers"] or 1)]
    skipped = [e["tensor"] for e in report.skipped]
    everything = _source_names(sources[layout][1]) | _source_names(sources["qwen2"][1])
    assert len(used) == len(set(used)) and not set(used) & set(skipped)
    assert set(used) | set(skipped) == everything
    ours = set(_flat(params))
    assert {e["param"] for e in report.loaded} | {e["param"] for e in report.initialised} == ours
    reasons = {e["tensor"]: e["reason"] for e in report.skipped}
    cls = {"clip": "vision_model.embeddings.class_embedding", "clip_model": "vision_model.embeddings.class_embedding",
           "open_clip": "visual.class_embedding"}[layout]
    assert reasons[cls].startswith("class token")
    if layout != "clip":      # the CLIP text tower and contrastive head are named as such
        assert "logit_scale" in reasons and "outside the vision tower" in reasons["logit_scale"]
    txt, js = report.save(str(tmp_path))
    assert json.load(open(js)) == report.to_dict()
    text = open(txt).read()
    assert "visual/merger/mlp_0/kernel" in text and cls in text
    if layout != "open_clip":
        assert "self_attn.{q,k,v}_proj.weight" in text


def test_report_text_for_open_clip_folds_layers(sources):
    _, report = assemble_params(qconfig.tiny(), sources["open_clip"][1], sources["qwen2"][1])
    text = report.to_text()
    assert "visual/blocks/qkv/kernel (2, 32, 96) <- visual.transformer.resblocks.{0..1}.attn.in_proj_weight" in text
    assert "CLIP projection head" in text and "visual.proj" in text
    assert report.vision["heads"] == HEADS and report.vision["act"] == "quick_gelu"


# -- pairings that cannot work -------------------------------------------------------------------------

def _tiny(vision=None, text=None, **kw):
    base = qconfig.tiny()
    v = dataclasses.replace(base.vision, **(vision or {}))
    t = dataclasses.replace(base.text, **(text or {}))
    return base.replace(vision=v, text=t, **kw)


@pytest.mark.parametrize("cfg,llm,match", [
    (_tiny(vision=dict(depth=3)), "qwen2", r"vision depth is 2 .* needs 3"),
    (_tiny(vision=dict(embed_dim=48, num_heads=4)), "qwen2", r"vision width is 32 .* needs 48"),
    (_tiny(vision=dict(num_heads=8)), "qwen2", r"vision heads is 4 .* needs 8"),
    (_tiny(vision=dict(mlp_ratio=2.0)), "qwen2", r"vision MLP width is 128 .* needs 64"),
    (_tiny(vision=dict(hidden_size=128), text=dict(hidden_size=128, mrope_section=(4, 6, 6))), "qwen2",
     r"LLM hidden size 64 .* merger output config.vision.hidden_size 128"),
    (_tiny(text=dict(num_hidden_layers=3)), "qwen2", r"missing tensor model.layers.2"),
    (_tiny(text=dict(vocab_size=1200)), "qwen2", r"model.embed_tokens.weight has shape"),
    (_tiny(tie_word_embeddings=True), "qwen2", r"has its own lm_head .* ties"),
])
def test_wrong_pairing_stops_early(sources, cfg, llm, match):
    with pytest.raises(CheckpointError, match=match):
        assemble_params(cfg, sources["clip"][1], sources[llm][1])


def test_activation_mismatch_is_reported(sources, tmp_path):
    gelu = tmp_path / "gelu"
    shutil.copytree(sources["clip"][1], gelu)
    d = json.load(open(gelu / "config.json"))
    json.dump({**d, "hidden_act": "gelu"}, open(gelu / "config.json", "w"))
    _, report = assemble_params(qconfig.tiny(), str(gelu), sources["qwen2"][1])
    assert any("activation mismatch" in w and "gelu" in w for w in report.warnings), report.warnings
    _, ok = assemble_params(qconfig.tiny(), sources["clip"][1], sources["qwen2"][1])
    assert not any("activation" in w for w in ok.warnings)


def test_open_clip_without_config_warns(sources, tmp_path):
    bare = tmp_path / "bare"
    os.makedirs(bare)
    shutil.copy(os.path.join(sources["open_clip"][1], "open_clip_model.safetensors"), bare)
    _, report = assemble_params(qconfig.tiny(), str(bare), sources["qwen2"][1])
    text = " ".join(report.warnings)
    assert "head count not checked" in text and "activation unknown" in text and "eps" in text


@pytest.mark.parametrize("extra,match", [
    ({"visual.conv1.bias": torch.zeros(W)}, "patch conv has a bias"),
    ({"visual.transformer.resblocks.0.ls_1.gamma": torch.ones(W)}, "no Qwen2-VL counterpart"),
])
def test_unmappable_vision_tensors_are_refused(tmp_path, extra, match, sources):
    _open_clip(tmp_path / "v", extra=extra)
    with pytest.raises(CheckpointError, match=match):
        assemble_params(qconfig.tiny(), str(tmp_path / "v"), sources["qwen2"][1])


def test_not_a_clip_checkpoint(sources, tmp_path):
    with pytest.raises(CheckpointError, match="not a CLIP ViT checkpoint"):
        assemble_params(qconfig.tiny(), sources["qwen2"][1], sources["qwen2"][1])
    torch.save({}, tmp_path / "open_clip_pytorch_model.bin")
    with pytest.raises(CheckpointError, match="must be converted first"):
        assemble_params(qconfig.tiny(), str(tmp_path), sources["qwen2"][1])


# -- stage 1 from the assembly --------------------------------------------------------------------------

def test_stage1_trains_vit_and_merger_and_keeps_llm_bit_identical(sources, assembled):
    """A few steps of the project's own train step under the stage-1 mask (train.config STAGE_PARTS[1]:
    ViT + merger, LLM frozen): every ViT and merger param moves, every LLM param still equals its source
    tensor in the Qwen2 checkpoint bit for bit."""
    from qwen2vl_jax import sharding
    from qwen2vl_jax.train import optim, state as S
    from qwen2vl_jax.train.config import STAGE_PARTS, OptimConfig
    from qwen2vl_jax.train.step import train_step
    cfg, params, _ = assembled["clip"]
    parts = STAGE_PARTS[1]
    module = Qwen2VLModule(cfg)
    ocfg = OptimConfig(lr=1e-2, warmup_steps=1, decay_steps=10)
    tx = optim.make_optimizer(ocfg, parts)
    shardings = S.state_shardings(module, tx, parts, sharding.make_mesh(1, 1, 1))
    st = S.init_state(module, tx, parts, shardings, seed=0, params=params)

    ids = [5, 6, cfg.vision_start_token_id] + [cfg.image_token_id] * 4 + [cfg.vision_end_token_id, 7, 8, 9, 10]
    pixels = np.random.default_rng(3).standard_normal((16, 1176)).astype(np.float32)
    batch, _ = batch_from_hf(cfg, np.asarray([ids]), pixel_values=pixels, image_grid_thw=[(1, 4, 4)])
    batch["labels"] = np.concatenate([batch["input_ids"][:, 1:], np.zeros((1, 1), np.int32)], 1)
    batch["loss_mask"] = np.ones(batch["labels"].shape, np.float32)
    batch["loss_mask"][:, -1] = 0
    batch = {k: v[None] for k, v in batch.items()}       # one micro-batch: (k=1, B, ...)
    step = jax.jit(functools.partial(train_step, module=module, tx=tx, parts=parts,
                                     schedules=optim.schedules(ocfg, parts)))
    losses = []
    for _ in range(4):      # step 0 runs at lr 0 (warmup), the rest at the peak
        st, m = step(st, batch)
        losses.append(float(m["loss"]))
    assert losses[-1] < losses[0], losses

    after, before = _flat(st.params), _flat(params)
    for k in before:
        if k.startswith("visual/"):
            assert not np.array_equal(before[k], after[k]), f"{k} did not train"
    _assert_llm_equals_source(after, sources["qwen2"][0], bitwise=True)


def test_bfloat16_params_are_the_float32_ones_rounded(sources, assembled):
    _, f32, _ = assembled["clip"]
    bf16, report = assemble_params(qconfig.tiny(), sources["clip"][1], sources["qwen2"][1], dtype="bfloat16")
    assert report.dtype == "bfloat16"
    a, b = _flat(f32), _flat(bf16)
    for k in a:
        assert b[k].dtype == jnp.bfloat16, k
        if not k.startswith("visual/merger/"):     # loaded tensors: one rounding of the same value
            np.testing.assert_array_equal(b[k], a[k].astype(jnp.bfloat16), err_msg=k)


SHARDED = textwrap.dedent("""
    import numpy as np, jax
    import qwen2vl_jax as qv
    from qwen2vl_jax import config as qconfig, sharding
    from qwen2vl_jax.api import logical_specs
    from qwen2vl_jax.model.qwen2vl import Qwen2VLModule
    assert jax.device_count() == 8
    cfg = qconfig.tiny()
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    shardings = sharding.tree_shardings(logical_specs(Qwen2VLModule(cfg)), mesh)
    sharded, _ = qv.assemble_params(cfg, {vision!r}, {llm!r}, shardings=shardings)
    plain, _ = qv.assemble_params(cfg, {vision!r}, {llm!r})
    qkv = sharded["visual"]["blocks"]["qkv"]["kernel"]                  # (depth, E, 3E)
    assert qkv.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor"), qkv.sharding.spec
    assert {{s.data.shape for s in qkv.addressable_shards}} == {{(2, 16, 48)}}
    leaves = zip(jax.tree_util.tree_flatten_with_path(sharded)[0], jax.tree.leaves(plain), jax.tree.leaves(shardings))
    for (path, a), b, want in leaves:        # loaded and fresh (merger) params alike sit where asked
        assert a.sharding.spec == want.spec, (jax.tree_util.keystr(path), a.sharding.spec, want.spec)
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=jax.tree_util.keystr(path))
    print("OK")
""")


def test_assemble_onto_mesh(sources):
    """Each device reads only its slice (jax.make_array_from_callback), and the values are the plain ones."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    script = SHARDED.format(vision=sources["clip"][1], llm=sources["qwen2"][1])
    r = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "OK" in r.stdout, r.stderr[-3000:]
