"""Tiny random reference models built with transformers 4.57.6 (the parity oracle), shared by tests."""

from __future__ import annotations

import numpy as np
import torch

from qwen2vl_jax import config as qconfig


def tied_config() -> qconfig.Qwen2VLConfig:
    """A second shape: tied head (2B-style), wider heads, GQA group 4, 3 layers, 3-block ViT."""
    v = 1200
    return qconfig.Qwen2VLConfig(
        vision=qconfig.VisionConfig(depth=3, embed_dim=48, num_heads=3, mlp_ratio=2.0, hidden_size=128),
        text=qconfig.TextConfig(vocab_size=v, hidden_size=128, intermediate_size=160, num_hidden_layers=3,
                                num_attention_heads=4, num_key_value_heads=1, mrope_section=(4, 6, 6),
                                max_position_embeddings=4096, rms_norm_eps=1e-6),
        tie_word_embeddings=True, bos_token_id=0, eos_token_id=1, pad_token_id=0,
        vision_start_token_id=v - 10, vision_end_token_id=v - 9, vision_token_id=v - 5,
        image_token_id=v - 8, video_token_id=v - 7)


CONFIGS = {"tiny": qconfig.tiny, "tied": tied_config}


def qwen2_5_config(window: int = 56, fullatt=(1,), tied: bool = False, depth: int = 4) -> qconfig.Qwen2VLConfig:
    """Tiny Qwen2.5-VL shapes: windows of `window` px (56 = 2x2 merged tokens, 84 = 3x3), full attention in
    `fullatt`."""
    c = qconfig.tiny_2_5()
    v = qconfig.qwen2_5_vision(64, depth=depth, width=32, heads=4, inter=48, window=window, fullatt=fullatt)
    return c.replace(vision=v, tie_word_embeddings=tied)


CONFIGS_2_5 = {
    "w56_mid": lambda: qwen2_5_config(56, (1,)),
    "w84_first_tied": lambda: qwen2_5_config(84, (0,), tied=True),
    "w112_last": lambda: qwen2_5_config(112, (3,)),
}


def build_hf(cfg: qconfig.Qwen2VLConfig, seed: int = 0, attn: str = "eager"):
    """A random transformers model of `cfg`'s family (Qwen2VL- or Qwen2_5_VLForConditionalGeneration; eager
    attention, f32).

    Norm weights and biases are perturbed away from their 1/0 init so a swapped or missing one shows.
    """
    import transformers
    arch = cfg.family.architecture
    hfc = getattr(transformers, arch.replace("ForConditionalGeneration", "Config"))(**cfg.to_hf_dict())
    hfc._attn_implementation = attn
    torch.manual_seed(seed)
    model = getattr(transformers, arch)(hfc).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "ln_q" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return model


def vision_ids(cfg, grid, video=False) -> list[int]:
    """<|vision_start|> + t*h*w/4 pad tokens + <|vision_end|>."""
    t, h, w = grid
    pad = cfg.video_token_id if video else cfg.image_token_id
    return [cfg.vision_start_token_id] + [pad] * (t * h * w // 4) + [cfg.vision_end_token_id]


def pixels(grid_list, seed=0) -> np.ndarray:
    n = sum(t * h * w for t, h, w in grid_list)
    return np.random.default_rng(seed).standard_normal((n, 1176)).astype(np.float32)


def text(n, start=5, seed=None):
    if seed is None:
        return list(range(start, start + n))
    return list(np.random.default_rng(seed).integers(2, 900, n))


def cases(cfg):
    """name -> HF-style inputs (numpy). Covers the issue's list: one image, two images of different sizes,
    a video with grid_t >= 3 plus an image, a left-padded batch of two, text only."""
    out = {}
    g1 = (1, 4, 8)
    out["single_image"] = dict(input_ids=[text(3) + vision_ids(cfg, g1) + text(4, 20)],
                               pixel_values=pixels([g1]), image_grid_thw=[g1])
    g2, g3 = (1, 6, 4), (1, 2, 2)
    out["two_images"] = dict(input_ids=[text(2) + vision_ids(cfg, g2) + text(3, 30) + vision_ids(cfg, g3) + text(2, 40)],
                             pixel_values=pixels([g2, g3], 1), image_grid_thw=[g2, g3])
    gv, gi = (4, 4, 6), (1, 4, 4)
    out["video_and_image"] = dict(
        input_ids=[text(2) + vision_ids(cfg, gv, video=True) + text(3, 50) + vision_ids(cfg, gi) + text(3, 60)],
        pixel_values=pixels([gi], 2), image_grid_thw=[gi], pixel_values_videos=pixels([gv], 3), video_grid_thw=[gv])
    ga, gb = (1, 4, 4), (1, 6, 8)
    row_a = text(4) + vision_ids(cfg, ga) + text(3, 70)
    row_b = text(2) + vision_ids(cfg, gb) + text(5, 80)
    L = max(len(row_a), len(row_b))
    ids = np.zeros((2, L), np.int64)
    mask = np.zeros((2, L), np.int64)
    for r, row in enumerate((row_a, row_b)):
        ids[r, L - len(row):] = row
        mask[r, L - len(row):] = 1
    out["left_padded_batch"] = dict(input_ids=ids, attention_mask=mask, pixel_values=pixels([ga, gb], 4),
                                    image_grid_thw=[ga, gb])
    out["text_only"] = dict(input_ids=[text(12, seed=5)])
    return {k: {n: (np.asarray(v) if v is not None else None) for n, v in d.items()} for k, d in out.items()}


def logits_error(hf, ours, inputs: dict) -> float:
    """Largest |logits difference| between the reference `hf` and our model on the HF-style `inputs`, over the
    positions the attention mask keeps (shapes checked equal)."""
    with torch.no_grad():
        ref = hf(**to_torch(inputs)).logits.numpy()
    out = np.asarray(ours(**inputs))
    mask = inputs.get("attention_mask")
    valid = np.ones(ref.shape[:2], bool) if mask is None else mask.astype(bool)
    assert out.shape == ref.shape
    return float(np.abs(out - ref)[valid].max())


def to_torch(inputs: dict) -> dict:
    out = {}
    for k, v in inputs.items():
        if v is None:
            continue
        out[k] = torch.tensor(v) if v.dtype != np.float32 else torch.from_numpy(v)
    return out


def cases_2_5(cfg):
    """The Qwen2.5-VL cases: the shared ones, grids whose windows are cut at the right and bottom edges,
    videos at 1 fps (second_per_grid_t 2.0) and at 4 fps (0.5), mixed image + video, a left-padded batch."""
    out = cases(cfg)
    out["video_and_image"]["second_per_grid_ts"] = np.asarray([2.0])
    g1, g2 = (1, 10, 6), (1, 6, 14)
    out["edge_windows"] = dict(input_ids=[text(3) + vision_ids(cfg, g1) + text(2, 30) + vision_ids(cfg, g2) + text(3)],
                               pixel_values=pixels([g1, g2], 7), image_grid_thw=[g1, g2])
    gv1, gv2 = (3, 6, 10), (2, 4, 4)
    out["two_videos_fps"] = dict(
        input_ids=[text(2) + vision_ids(cfg, gv1, video=True) + text(2, 40) + vision_ids(cfg, gv2, video=True) + text(2)],
        pixel_values_videos=pixels([gv1, gv2], 8), video_grid_thw=[gv1, gv2], second_per_grid_ts=np.asarray([3.0, 0.5]))
    gi, gv = (1, 6, 6), (2, 6, 8)
    row_a = text(3) + vision_ids(cfg, gi) + text(3, 70)
    row_b = text(2) + vision_ids(cfg, gv, video=True) + text(4, 80)
    L = max(len(row_a), len(row_b))
    ids = np.zeros((2, L), np.int64)
    mask = np.zeros((2, L), np.int64)
    for r, row in enumerate((row_a, row_b)):
        ids[r, L - len(row):] = row
        mask[r, L - len(row):] = 1
    out["left_padded_mixed"] = dict(input_ids=ids, attention_mask=mask, pixel_values=pixels([gi], 9),
                                    image_grid_thw=[gi], pixel_values_videos=pixels([gv], 10), video_grid_thw=[gv],
                                    second_per_grid_ts=np.asarray([1.0]))
    return {k: {n: (np.asarray(v) if v is not None else None) for n, v in d.items()} for k, d in out.items()}


def qwen3_config(positions: int = 16, deepstack=(1, 2), tied: bool = False, depth: int = 4,
                 layers: int = 2) -> qconfig.Qwen2VLConfig:
    """Tiny Qwen3-VL shapes: a learned position table of `positions` entries (16 = 4x4, smaller than the test
    grids; 400 = 20x20, larger), DeepStack from the blocks in `deepstack`."""
    c = qconfig.tiny_3()
    v = qconfig.qwen3_vision(64, depth=depth, width=32, heads=4, inter=48, deepstack=deepstack, positions=positions)
    t = qconfig.qwen3_text(64, layers, 4, 2, 128, vocab=c.text.vocab_size, head_dim=16, section=(4, 2, 2),
                           max_pos=4096)
    return c.replace(vision=v, text=t, tie_word_embeddings=tied)


CONFIGS_3 = {
    "p16_two_levels": lambda: qwen3_config(16, (1, 2)),
    "p400_one_level_tied": lambda: qwen3_config(400, (0,), tied=True),
    "p36_three_levels": lambda: qwen3_config(36, (0, 2, 3), layers=3),
}


def build_hf_3(cfg, seed: int = 0):
    """`build_hf` for Qwen3-VL, with the learned position table drawn at unit scale so a wrong interpolation
    shows in the outputs."""
    model = build_hf(cfg, seed)
    with torch.no_grad():
        model.model.visual.pos_embed.weight.normal_()
    return model


def video_ids_3(cfg, grid, stamps=None) -> list[int]:
    """A Qwen3-VL video in the text: per temporal step a timestamp (text tokens) and its own vision span."""
    t, h, w = grid
    out = []
    for k in range(t):
        out += text(3, 100 + 5 * k) if stamps is None else list(stamps[k])
        out += [cfg.vision_start_token_id] + [cfg.video_token_id] * (h * w // 4) + [cfg.vision_end_token_id]
    return out


def cases_3(cfg):
    """The Qwen3-VL cases (16 px patches, patch_dim 1536): odd merged grids, two images, a video with per-frame
    spans and timestamps plus an image, a left-padded mixed batch, text only."""
    dim = cfg.vision.patch_dim

    def px(grids, seed):
        n = sum(t * h * w for t, h, w in grids)
        return np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    out = {}
    g1 = (1, 6, 10)
    out["odd_image"] = dict(input_ids=[text(3) + vision_ids(cfg, g1) + text(4, 20)], pixel_values=px([g1], 0),
                            image_grid_thw=[g1])
    g2, g3 = (1, 14, 6), (1, 2, 2)
    out["two_images"] = dict(input_ids=[text(2) + vision_ids(cfg, g2) + text(3, 30) + vision_ids(cfg, g3) + text(2, 40)],
                             pixel_values=px([g2, g3], 1), image_grid_thw=[g2, g3])
    gv, gi = (3, 6, 6), (1, 10, 10)
    out["video_and_image"] = dict(
        input_ids=[text(2) + video_ids_3(cfg, gv) + text(3, 50) + vision_ids(cfg, gi) + text(3, 60)],
        pixel_values=px([gi], 2), image_grid_thw=[gi], pixel_values_videos=px([gv], 3), video_grid_thw=[gv])
    gi, gv = (1, 6, 6), (2, 6, 10)
    row_a = text(3) + vision_ids(cfg, gi) + text(3, 70)
    row_b = text(2) + video_ids_3(cfg, gv) + text(4, 80)
    L = max(len(row_a), len(row_b))
    ids = np.zeros((2, L), np.int64)
    mask = np.zeros((2, L), np.int64)
    for r, row in enumerate((row_a, row_b)):
        ids[r, L - len(row):] = row
        mask[r, L - len(row):] = 1
    out["left_padded_mixed"] = dict(input_ids=ids, attention_mask=mask, pixel_values=px([gi], 9),
                                    image_grid_thw=[gi], pixel_values_videos=px([gv], 10), video_grid_thw=[gv])
    out["text_only"] = dict(input_ids=[text(12, seed=5)])
    return {k: {n: (np.asarray(v) if v is not None else None) for n, v in d.items()} for k, d in out.items()}
