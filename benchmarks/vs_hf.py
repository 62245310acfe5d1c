"""Ours vs transformers 4.57.6 on the same random ~0.5B Qwen2-VL, on the CPU, in one run.

Model: LLM hidden 896, 8 layers, 14 heads, 2 kv heads, intermediate 4864, mrope [8,12,12], vocab 151936;
ViT width 1280, depth 8. Input: one 448x448 image (1024 patches -> 256 merged tokens) + 64 text tokens.
Figures: forward time, train-step time (batch 2, AdamW), peak memory of the training process, decode
tokens/s (greedy, KV cache). Each side runs in its own subprocess so peak RSS is its own; ours trains with
the project's own path (StepFn, make_optimizer, donated state) once per setting in `--train`, each in its
own subprocess, and the figures name the fastest setting (train_step_ratio) and the leanest
(peak_train_memory_ratio). The reference trains as HF users do: model(labels=...).loss, backward,
torch.optim.AdamW.

    python benchmarks/vs_hf.py [--repeats 3] [--new-tokens 32] [--dtype float32|bfloat16] [--train SETTINGS]
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

def train_setup(ckpt, dtype, remat, loss_chunk, moments, attn_impl):
    """The project's own training path (what train.py runs): StepFn over a TrainState with donated buffers,
    make_optimizer (AdamW, project defaults but lr 1e-5 and no warmup), params loaded straight into place.
    Returns (step_fn, state, stacked batch of k=1 micro-batch of 2 rows, module, tx)."""
    import jax
    import jax.numpy as jnp

    from qwen2vl_jax import hf, sharding
    from qwen2vl_jax.api import MODEL_KEYS
    from qwen2vl_jax.config import Qwen2VLConfig
    from qwen2vl_jax.inputs import batch_from_hf
    from qwen2vl_jax.model.qwen2vl import Qwen2VLModule
    from qwen2vl_jax.train import optim, state as S
    from qwen2vl_jax.train.config import OptimConfig
    from qwen2vl_jax.train.step import StepFn

    cfg = Qwen2VLConfig.from_pretrained(ckpt)
    module = Qwen2VLModule(cfg, dtype=jnp.dtype(dtype), param_dtype=jnp.float32, remat=remat, attn_impl=attn_impl)
    parts = ("vit", "merger", "llm")
    ocfg = OptimConfig(lr=1e-5, warmup_steps=0, moments_dtype=moments)
    tx = optim.make_optimizer(ocfg, parts)
    mesh = sharding.make_mesh(1, -1, 1)
    shardings = S.state_shardings(module, tx, parts, mesh)
    params = hf.load_params(ckpt, cfg, dtype=np.float32, shardings=shardings.params)
    state = S.init_state(module, tx, parts, shardings, 0, params)
    del params   # the state owns them; the first step donates them

    ids, pv, grid = inputs(cfg)
    ids2 = np.repeat(ids, 2, 0)
    batch, _ = batch_from_hf(cfg, ids2, None, np.concatenate([pv, pv]), np.concatenate([grid, grid]))
    batch = {k: batch[k] for k in MODEL_KEYS if k in batch}
    # HF's labels=input_ids: every next token of the row is a target (the last position has none).
    batch["labels"] = np.concatenate([ids2[:, 1:], ids2[:, :1]], 1).astype(np.int32)
    batch["loss_mask"] = np.ones(ids2.shape, np.float32)
    batch["loss_mask"][:, -1] = 0.0
    batch = {k: jnp.asarray(v[None]) for k, v in batch.items()}   # k = 1 micro-batch
    step_fn = StepFn(mesh, shardings, module=module, tx=tx, parts=parts,
                     schedules=optim.schedules(ocfg, parts), loss_chunk=loss_chunk)
    return step_fn, state, batch, module, tx


def run_ours_train(ckpt, repeats, dtype, remat, loss_chunk, moments, attn_impl):
    """One training setting in its own process, so peak RSS is that setting's own."""
    import jax
    step_fn, state, batch, _, _ = train_setup(ckpt, dtype, remat, loss_chunk, moments, attn_impl)
    box = [state]

    def train():
        box[0], m = step_fn(box[0], batch)
        jax.block_until_ready(m["loss"])

    return {"train_step_s": timed(train, repeats), "peak_train_gb": peak_rss_gb()}


def profile_ours(ckpt, repeats, dtype, remat, loss_chunk, moments, attn_impl):
    """Where ours' train step goes: forward pieces (ViT, LLM, head + loss) timed on their own, forward+backward,
    the optimizer update (clip, AdamW, NaN guard) and the whole StepFn step; XLA's flop count of each."""
    import jax
    import optax

    from qwen2vl_jax.model.qwen2vl import Qwen2VLModule
    from qwen2vl_jax.train import optim
    from qwen2vl_jax.train.step import compute_grads, forward_sums
    step_fn, state, batch, module, tx = train_setup(ckpt, dtype, remat, loss_chunk, moments, attn_impl)
    parts = ("vit", "merger", "llm")
    mb = jax.tree.map(lambda x: x[0], batch)
    params = state.params
    out = {}

    def measure(name, fn, *a):
        f = jax.jit(fn)
        cost = f.lower(*a).compile().cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        out[name] = {"s": timed(lambda: jax.block_until_ready(f(*a)), repeats), "gflop": cost.get("flops", 0) / 1e9}

    vis = lambda p: module.apply({"params": p}, mb["patches"], mb["patch_segment_ids"], mb["patch_positions"],
                                 method=Qwen2VLModule.encode_vision)
    measure("fwd_vit", vis, params)
    measure("fwd_vit_llm", lambda p: module.apply({"params": p}, mb, method=Qwen2VLModule.hidden)[0], params)
    measure("fwd_all_loss", lambda p: forward_sums(module, p, mb, loss_chunk), params)
    measure("fwd_bwd", lambda p: compute_grads(module, p, batch, parts, loss_chunk=loss_chunk), params)
    grads = jax.jit(lambda p: compute_grads(module, p, batch, parts, loss_chunk=loss_chunk)[0])(params)

    def update(p, o, g):
        tr, _ = optim.split(p, parts)
        u, o = tx.update(g, o, tr)
        return optax.apply_updates(tr, u), o, optax.global_norm(g)
    measure("update", update, params, state.opt_state, grads)
    del grads
    box = [state]

    def step():
        box[0], m = step_fn(box[0], batch)
        jax.block_until_ready(m["loss"])
    out["step"] = {"s": timed(step, repeats)}
    return out


def profile_ref(ckpt, repeats, dtype):
    """The reference's train step split the same way: forward pieces, forward + loss, backward, AdamW step."""
    import torch
    from transformers import Qwen2VLForConditionalGeneration
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    model = Qwen2VLForConditionalGeneration.from_pretrained(ckpt, torch_dtype=torch_dtype).train()
    from qwen2vl_jax.config import Qwen2VLConfig
    ids, pv, grid = inputs(Qwen2VLConfig.from_pretrained(ckpt))
    ids2 = torch.tensor(ids).repeat(2, 1)
    pv2 = torch.from_numpy(np.concatenate([pv, pv])).to(torch_dtype)
    grid2 = torch.tensor(np.concatenate([grid, grid]))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    out = {}
    with torch.no_grad():
        out["fwd_vit"] = {"s": timed(lambda: model.model.visual(pv2, grid_thw=grid2), repeats)}
        out["fwd_vit_llm"] = {"s": timed(lambda: model.model(input_ids=ids2, pixel_values=pv2, image_grid_thw=grid2),
                                          repeats)}
        out["fwd_all_loss"] = {"s": timed(lambda: model(input_ids=ids2, pixel_values=pv2, image_grid_thw=grid2,
                                                        labels=ids2).loss, repeats)}
    fwd, bwd, upd = [], [], []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        loss = model(input_ids=ids2, pixel_values=pv2, image_grid_thw=grid2, labels=ids2).loss
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        t3 = time.perf_counter()
        fwd.append(t1 - t0), bwd.append(t2 - t1), upd.append(t3 - t2)
    med = lambda x: float(np.median(x[1:]))
    out["fwd_with_grad"], out["bwd"], out["update"] = {"s": med(fwd)}, {"s": med(bwd)}, {"s": med(upd)}
    out["step"] = {"s": med(fwd) + med(bwd) + med(upd)}
    return out


def run_ours(ckpt, repeats, new_tokens, dtype):
    """Forward and decode of the inference API (training runs in run_ours_train)."""
    import jax

    import qwen2vl_jax as qv

    model = qv.load_pretrained(ckpt, dtype=dtype)
    cfg = model.config
    ids, pv, grid = inputs(cfg)
    out = {"forward_s": timed(lambda: jax.block_until_ready(model(ids, pixel_values=pv, image_grid_thw=grid)),
                              repeats)}

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

# remat:loss_chunk:moments_dtype:attn_impl. loss_chunk must divide the 322-token row (2 * 7 * 23).
DEFAULT_TRAIN = "none:0:float32:auto,none:46:float32:auto,dots:46:float32:auto,full:46:bfloat16:auto"


def worker(args, side, *extra):
    cmd = [sys.executable, __file__, "--worker", side, "--ckpt", args.ckpt, "--repeats", str(args.repeats),
           "--new-tokens", str(args.new_tokens), "--dtype", args.dtype, *extra]
    p = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
    if p.returncode or not line:
        sys.exit(f"{side} {extra} worker failed:\n{p.stderr[-4000:]}")
    print(f"# {side} {' '.join(extra)}: {line[-1][7:]}", file=sys.stderr, flush=True)
    return json.loads(line[-1][7:])


def profile(args):
    extra = ["--profile", "--train", args.train.split(",")[0]]
    return {"ours": worker(args, "ours", *extra), "ref": worker(args, "ref", *extra), "ours_setting": extra[-1]}


def compare(args):
    res = {"ref": worker(args, "ref"), "ours": worker(args, "ours")}
    train = {c: worker(args, "ours-train", "--train", c) for c in args.train.split(",")}
    o, r = res["ours"], res["ref"]
    fastest = min(train, key=lambda c: train[c]["train_step_s"])
    leanest = min(train, key=lambda c: train[c]["peak_train_gb"])
    fig = {
        "forward_ratio": o["forward_s"] / r["forward_s"],
        "train_step_ratio": train[fastest]["train_step_s"] / r["train_step_s"],
        "train_step_config": fastest,
        "peak_train_memory_ratio": train[leanest]["peak_train_gb"] / r["peak_train_gb"],
        "peak_train_config": leanest,
        "decode_speedup": o["decode_tokens_per_s"] / r["decode_tokens_per_s"],
        "prefill_ratio": o["prefill_s"] / r["prefill_s"],
        **{f"ours_{k}": v for k, v in o.items()}, **{f"ref_{k}": v for k, v in r.items()},
        "ours_train": {c: {**v, "time_ratio": v["train_step_s"] / r["train_step_s"],
                           "memory_ratio": v["peak_train_gb"] / r["peak_train_gb"]} for c, v in train.items()},
        "dtype": args.dtype,
    }
    rnd = lambda v: {k: rnd(x) for k, x in v.items()} if isinstance(v, dict) else round(v, 4) if isinstance(v, float) else v
    return rnd(fig)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--train", default=DEFAULT_TRAIN,
                    help="comma-separated training settings of ours, each remat:loss_chunk:moments_dtype:attn_impl "
                         f"(default {DEFAULT_TRAIN})")
    ap.add_argument("--ckpt", help="an HF dir of the benchmark model to reuse (default: a fresh one in a temp dir)")
    ap.add_argument("--worker", choices=["ours", "ref", "ours-train"])
    ap.add_argument("--profile", action="store_true",
                    help="instead: split each side's train step (first --train setting for ours) into forward "
                         "pieces, backward and optimizer update; one JSON line")
    args = ap.parse_args()
    if args.profile and args.worker:
        if args.worker == "ref":
            res = profile_ref(args.ckpt, args.repeats, args.dtype)
        else:
            remat, chunk, moments, attn = args.train.split(",")[0].split(":")
            res = profile_ours(args.ckpt, args.repeats, args.dtype, remat, int(chunk), moments, attn)
        print("RESULT " + json.dumps(res))
        return
    if args.worker == "ours-train":
        remat, chunk, moments, attn = args.train.split(":")
        res = run_ours_train(args.ckpt, args.repeats, args.dtype, remat, int(chunk), moments, attn)
        print("RESULT " + json.dumps(res))
        return
    if args.worker:
        fn = run_ours if args.worker == "ours" else run_ref
        print("RESULT " + json.dumps(fn(args.ckpt, args.repeats, args.new_tokens, args.dtype)))
        return

    go = profile if args.profile else compare
    if args.ckpt and os.path.exists(os.path.join(args.ckpt, "config.json")):
        fig = go(args)
    else:
        import torch
        from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration
        with tempfile.TemporaryDirectory() as tmp:
            args.ckpt = args.ckpt or tmp
            torch.manual_seed(0)
            ref = Qwen2VLForConditionalGeneration(Qwen2VLConfig(**bench_config().to_hf_dict()))
            n_params = sum(p.numel() for p in ref.parameters())
            ref.save_pretrained(args.ckpt)
            del ref
            fig = go(args)
        fig["params"] = n_params
    from machine import machine
    print(json.dumps({**fig, **machine()}))


if __name__ == "__main__":
    main()
