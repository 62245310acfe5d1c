"""Ours vs transformers 4.57.6 on the same random ~0.5B Qwen2-VL, on the CPU, in one run.

Model: LLM hidden 896, 8 layers, 14 heads, 2 kv heads, intermediate 4864, mrope [8,12,12], vocab 151936;
ViT width 1280, depth 8. Input: one 448x448 image (1024 patches -> 256 merged tokens) + 64 text tokens.
Figures: forward time, train-step time (batch 2, AdamW), peak memory of the training process, decode
tokens/s (greedy, KV cache). Each side runs in its own subprocess so peak RSS is its own.

    python benchmarks/vs_hf.py [--repeats 3] [--new-tokens 32] [--dtype float32|bfloat16]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

from generate import bench_config, median_time as timed   # the same ~0.5B model as the generation benchmark

TEXT_TOKENS = 64
IMAGE = 448


def inputs(cfg):
    """HF-style inputs: [text 32] <vision_start> 256 image pads <vision_end> [text 32]."""
    from qwen2vl_jax.data.image import preprocess_image
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (IMAGE, IMAGE, 3), dtype=np.uint8)
    pv, grid = preprocess_image(img, max_pixels=IMAGE * IMAGE)
    n = int(grid.prod()) // 4
    text = rng.integers(100, 150000, TEXT_TOKENS).tolist()
    ids = text[:32] + [cfg.vision_start_token_id] + [cfg.image_token_id] * n + [cfg.vision_end_token_id] + text[32:]
    return np.asarray([ids], np.int64), pv, grid


def peak_rss_gb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


# -- the two sides ----------------------------------------------------------------------------------

def run_ours(ckpt, repeats, new_tokens, dtype):
    import jax
    import jax.numpy as jnp
    import optax

    import qwen2vl_jax as qv
    from qwen2vl_jax.api import MODEL_KEYS
    from qwen2vl_jax.inputs import batch_from_hf

    model = qv.load_pretrained(ckpt, dtype=dtype)
    cfg = model.config
    ids, pv, grid = inputs(cfg)
    out = {"forward_s": timed(lambda: jax.block_until_ready(model(ids, pixel_values=pv, image_grid_thw=grid)),
                              repeats)}

    ids2 = np.repeat(ids, 2, 0)
    batch, _ = batch_from_hf(cfg, ids2, None, np.concatenate([pv, pv]), np.concatenate([grid, grid]))
    batch = {k: jnp.asarray(batch[k]) for k in MODEL_KEYS if k in batch}
    labels = jnp.asarray(np.concatenate([ids2[:, 1:], ids2[:, :1]], 1), jnp.int32)
    weights = jnp.ones(labels.shape, jnp.float32).at[:, -1].set(0.0)
    tx = optax.adamw(1e-5)

    def loss_fn(params):
        logits = model.module.apply({"params": params}, batch).astype(jnp.float32)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
        return (ce * weights).sum() / weights.sum()

    @jax.jit
    def step(params, opt_state):
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    step = jax.jit(step.__wrapped__, donate_argnums=(0, 1))
    state = [model.params, tx.init(model.params)]

    def train():
        p, o, loss = step(*state)
        state[:] = [p, o]
        jax.block_until_ready(loss)

    out["train_step_s"] = timed(train, repeats)
    model.params = state[0]
    out["peak_train_gb"] = peak_rss_gb()

    def gen(n):   # no EOS: every call generates exactly n tokens
        return model.generate(ids, pixel_values=pv, image_grid_thw=grid, max_new_tokens=n, eos_token_id=())
    t1 = timed(lambda: gen(1), repeats)
    tn = timed(lambda: gen(new_tokens), repeats)
    out["prefill_s"] = t1
    out["decode_tokens_per_s"] = (new_tokens - 1) / (tn - t1)
    return out


def run_ref(ckpt, repeats, new_tokens, dtype):
    import torch
    from transformers import Qwen2VLForConditionalGeneration

    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    model = Qwen2VLForConditionalGeneration.from_pretrained(ckpt, torch_dtype=torch_dtype).eval()
    from qwen2vl_jax.config import Qwen2VLConfig
    ids, pv, grid = inputs(Qwen2VLConfig.from_pretrained(ckpt))
    t_ids, t_pv, t_grid = torch.tensor(ids), torch.from_numpy(pv).to(torch_dtype), torch.tensor(grid)
    out = {}
    with torch.no_grad():
        out["forward_s"] = timed(lambda: model(input_ids=t_ids, pixel_values=t_pv, image_grid_thw=t_grid), repeats)

    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    ids2, pv2, grid2 = t_ids.repeat(2, 1), torch.cat([t_pv, t_pv]), torch.cat([t_grid, t_grid])

    def train():
        loss = model(input_ids=ids2, pixel_values=pv2, image_grid_thw=grid2, labels=ids2).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    out["train_step_s"] = timed(train, repeats)
    out["peak_train_gb"] = peak_rss_gb()
    model.eval()

    def gen(n):
        with torch.no_grad():
            return model.generate(input_ids=t_ids, pixel_values=t_pv, image_grid_thw=t_grid, max_new_tokens=n,
                                  min_new_tokens=n, do_sample=False)
    t1 = timed(lambda: gen(1), repeats)
    tn = timed(lambda: gen(new_tokens), repeats)
    out["prefill_s"] = t1
    out["decode_tokens_per_s"] = (new_tokens - 1) / (tn - t1)
    return out


# -- driver -----------------------------------------------------------------------------------------

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--worker", choices=["ours", "ref"])
    ap.add_argument("--ckpt")
    args = ap.parse_args()
    if args.worker:
        fn = run_ours if args.worker == "ours" else run_ref
        print("RESULT " + json.dumps(fn(args.ckpt, args.repeats, args.new_tokens, args.dtype)))
        return

    import torch
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration
    cfg = bench_config()
    with tempfile.TemporaryDirectory() as ckpt:
        torch.manual_seed(0)
        ref = Qwen2VLForConditionalGeneration(Qwen2VLConfig(**cfg.to_hf_dict()))
        n_params = sum(p.numel() for p in ref.parameters())
        ref.save_pretrained(ckpt)
        del ref
        res = {}
        for side in ("ref", "ours"):
            cmd = [sys.executable, __file__, "--worker", side, "--ckpt", ckpt, "--repeats", str(args.repeats),
                   "--new-tokens", str(args.new_tokens), "--dtype", args.dtype]
            p = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
            line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
            if p.returncode or not line:
                sys.exit(f"{side} worker failed:\n{p.stderr[-4000:]}")
            res[side] = json.loads(line[-1][7:])
    o, r = res["ours"], res["ref"]
    fig = {
        "forward_ratio": o["forward_s"] / r["forward_s"],
        "train_step_ratio": o["train_step_s"] / r["train_step_s"],
        "peak_train_memory_ratio": o["peak_train_gb"] / r["peak_train_gb"],
        "decode_speedup": o["decode_tokens_per_s"] / r["decode_tokens_per_s"],
        "prefill_ratio": o["prefill_s"] / r["prefill_s"],
        **{f"ours_{k}": v for k, v in o.items()}, **{f"ref_{k}": v for k, v in r.items()},
        "params": n_params, "dtype": args.dtype,
    }
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in fig.items()}))


if __name__ == "__main__":
    main()
