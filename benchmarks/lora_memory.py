"""LoRA fine-tuning step on the CPU: peak memory and step time, ours (bf16, int8 and nf4 bases) vs peft.

Model: the Qwen2-VL-2B architecture with random weights (`--model 2b`; `--model bench` is the ~0.5B model of
benchmarks/generate.py, for a quick run). Input: one 448x448 image (1024 patches -> 256 merged tokens) +
512 text tokens, one row, every next token a target. Adapters: rank 8, alpha 16, on the LLM's attention and
MLP projections, the ViT's qkv / proj / fc1 / fc2 and the merger; AdamW on the adapters only.
Ours: the project's training path (AdaptedModule, make_optimizer over the adapters, StepFn with the state
donated), the frozen base stored in bfloat16, int8 or nf4 (group 64), compute float32. Reference: peft 0.21.2
on transformers 4.57.6, the base in float32 (transformers' CPU default) and in bfloat16 (`--ref-dtypes`),
model(labels=...).loss, backward, torch.optim.AdamW over the adapters. Each setting runs in its own
subprocess, so its peak RSS (ru_maxrss: weights, compile, activations, everything) is its own; a setting's
random weights are made one layer (quantised) or one block of rows at a time, so the peak is the step's, not
a full-precision init's, and peft's bfloat16 model is built in bfloat16 throughout (LLM included).

    python benchmarks/lora_memory.py [--model 2b|bench] [--repeats 3] [--warmup 1] [--remat full|none]
        [--ours none,int8,nf4] [--ref-dtypes float32,bfloat16]

Prints one JSON line: memory and time ratios to the float32 and the bfloat16 peft step first, then each
setting's figures (ours also: RSS right after compiling the step, XLA's temp buffer for it, compile time).
`--remat full` (the default) rematerialises each block on both sides (ours `remat="full"`, transformers'
gradient checkpointing): without it the 2B's saved activations alone outgrow the memory of a small machine.

Measured (`--model 2b --repeats 1 --warmup 0`, AMD EPYC, 2 cores with AVX-512, shared: load average 4-10
from other work, so the times are loose; each setting alone in its subprocess): peak RSS ours int8 5.91 GB,
nf4 5.07 GB, bf16 11.30 GB; peft float32 15.24 GB, bfloat16 8.69 GB. Memory ratios to peft float32: int8
0.39, nf4 0.33, bf16 0.74; to peft bfloat16: 0.68, 0.58, 1.30. Steps at load ~5: int8 154 s, nf4 160 s, peft
float32 136 s, bfloat16 137 s (time ratios 1.13 and 1.17 to either); bf16 405 s at load ~10, when
peft float32 took 257 s (1.58). Ours after compiling: the base (int8 2.28 GB, nf4 1.47 GB, bf16 4.12 GB) +
~1.2 GB, and XLA's temp buffer of the step 2.25 GB (int8, nf4: mostly the tied head's float32 embedding, 0.93
GB, and the float32 logits over the 151,936-token vocabulary) or 5.86 GB (bf16: + the uint16 view of the
stacked bf16 kernels, which XLA:CPU cannot slice in the layer loop, 3.9 GB).
On idle cores (`--ours int8 --ref-dtypes float32,bfloat16`, load average 0.3 at the start): int8 81.2 s and
6.10 GB, peft float32 80.4 s and 14.86 GB, peft bfloat16 44.0 s and 8.42 GB: time ratios 1.01 and 1.85,
memory ratios 0.41 and 0.72. Under load the two peft bases had looked equally fast; idle, torch's bfloat16
matmuls (AVX-512 bf16) are nearly twice as fast as its float32 ones, and ours compute in float32.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
TEXT_TOKENS, IMAGE, RANK, ALPHA = 512, 448, 8, 16.0
LOSS_CHUNK = 0   # ours: the loss over whole rows (chunks of 154 positions measured 0.36 GB more XLA temp: the
#                 tied head's float32 embedding is then also kept transposed for the scanned chunks)
OUR_TARGETS = r"^(model/layers/|visual/blocks/|visual/merger/)"
PEFT_TARGETS = r".*(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj|attn\.(qkv|proj)|blocks\.\d+\.mlp\.fc[12]|merger\.mlp\.[02])"


def model_config(name):
    from qwen2vl_jax import config as C
    if name == "bench":
        from generate import bench_config
        return bench_config()
    return C.preset(name)


def inputs(cfg):
    from qwen2vl_jax.data.image import preprocess_image
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (IMAGE, IMAGE, 3), dtype=np.uint8)
    pv, grid = preprocess_image(img, max_pixels=IMAGE * IMAGE)
    n = int(grid.prod()) // 4
    text = rng.integers(100, min(150000, cfg.text.vocab_size - 100), TEXT_TOKENS).tolist()
    ids = text[:256] + [cfg.vision_start_token_id] + [cfg.image_token_id] * n + [cfg.vision_end_token_id] + text[256:]
    return np.asarray([ids], np.int64), pv, grid


def rss_now_gb():
    with open("/proc/self/status") as f:
        return int(f.read().split("VmRSS:")[1].split()[0]) / 2 ** 20


def peak_rss_gb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


def timed(fn, repeats, warmup=1):
    for _ in range(warmup):   # ours is compiled beforehand; a warm-up step is first-touch / allocator warm-up
        fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts))


def random_params(cfg, adapter, seed=0):
    """Random adapted params, one tensor at a time: kernels and embeddings normal(0.02) made in float32 one
    leaf at a time, then quantised or cast; norms 1, biases 0; adapters as lora.add_adapters makes them."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from qwen2vl_jax import api, lora, quant
    from qwen2vl_jax.model.qwen2vl import Qwen2VLModule
    shapes = nn.meta.unbox(api.abstract_params(Qwen2VLModule(cfg)))
    dt = lora.BASE_DTYPES[adapter.base_dtype]
    key = jax.random.key(seed)
    out: dict = {}
    flat = jax.tree_util.tree_flatten_with_path(shapes)[0]
    for i, (path, s) in enumerate(flat):
        keys = tuple(k.key for k in path)
        mod, name = keys[:-1], keys[-1]
        node = out
        for k in mod:
            node = node.setdefault(k, {})
        if name in ("kernel", "embedding"):
            q = (name == "kernel" and adapter.quant != "none" and lora.ADAPTABLE.match("/".join(mod))
                 and mod != ("lm_head",))
            if q:   # one layer of a stack at a time (each layer's codes and scales are its own)
                fn = jax.jit(lambda k: quant.quantize(jax.random.normal(k, s.shape[-2:], jnp.float32) * 0.02,
                                                      adapter.quant, adapter.quant_group))
                k0 = jax.random.fold_in(key, i)
                layers = [jax.block_until_ready(fn(jax.random.fold_in(k0, j)))
                          for j in range(math.prod(s.shape[:-2]))]
                node.update({n: jnp.stack([l[n] for l in layers]).reshape(*s.shape[:-2], *layers[0][n].shape)
                             for n in layers[0]})
                del layers
            else:   # in row blocks of <= 16M values: a float32 embedding and its random bits are never whole
                rows = max(1, min(s.shape[-2], (1 << 24) // max(1, s.shape[-1])))
                fn = jax.jit(lambda k, n: (jax.random.normal(k, (*s.shape[:-2], n, s.shape[-1]), jnp.float32)
                                           * 0.02).astype(dt), static_argnums=1)
                k0 = jax.random.fold_in(key, i)
                parts = [jax.block_until_ready(fn(jax.random.fold_in(k0, j), min(rows, s.shape[-2] - r)))
                         for j, r in enumerate(range(0, s.shape[-2], rows))]
                node[name] = parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=-2)
                del parts
        else:
            node[name] = (jnp.ones if name == "scale" else jnp.zeros)(s.shape, jnp.float32)
    return lora.add_adapters(out, adapter, jax.random.fold_in(key, 10 ** 6))


def run_ours(model, quant_fmt, repeats, remat, warmup=1):
    import jax
    import jax.numpy as jnp

    from qwen2vl_jax import lora, sharding
    from qwen2vl_jax.api import MODEL_KEYS
    from qwen2vl_jax.inputs import batch_from_hf
    from qwen2vl_jax.model.qwen2vl import Qwen2VLModule
    from qwen2vl_jax.train import optim, state as S
    from qwen2vl_jax.train.config import LORA_GROUPS, OptimConfig
    from qwen2vl_jax.train.step import StepFn

    cfg = model_config(model)
    adapter = lora.Adapter(r=RANK, alpha=ALPHA, targets=OUR_TARGETS, quant=quant_fmt, quant_group=64,
                           base_dtype="bfloat16")
    module = lora.adapted(Qwen2VLModule(cfg, dtype=jnp.float32, param_dtype=jnp.float32, remat=remat), adapter)
    groups = optim.Groups(LORA_GROUPS)
    tx = optim.make_optimizer(OptimConfig(lr=1e-4, warmup_steps=0), groups)
    mesh = sharding.make_mesh(1, -1, 1)
    shardings = S.state_shardings(module, tx, groups, mesh)
    params = random_params(cfg, adapter)
    state = S.init_state(module, tx, groups, shardings, 0, params)
    del params
    peak_init = peak_rss_gb()
    ids, pv, grid = inputs(cfg)
    batch, _ = batch_from_hf(cfg, ids, None, pv, grid)
    batch = {k: batch[k] for k in MODEL_KEYS if k in batch}
    batch["labels"] = np.concatenate([ids[:, 1:], ids[:, :1]], 1).astype(np.int32)
    batch["loss_mask"] = np.ones(ids.shape, np.float32)
    batch["loss_mask"][:, -1] = 0.0
    batch = {k: jnp.asarray(v[None]) for k, v in batch.items()}
    step_fn = StepFn(mesh, shardings, module=module, tx=tx, loss_chunk=LOSS_CHUNK)
    t0 = time.perf_counter()
    compiled = step_fn.lower(state, batch).compile()
    compile_s, rss_compiled, peak_compiled = time.perf_counter() - t0, rss_now_gb(), peak_rss_gb()
    temp_gb = compiled.memory_analysis().temp_size_in_bytes / 2 ** 30
    box = [state]

    def step():   # the compiled step itself (StepFn's jit would compile it again)
        box[0], m = compiled(box[0], batch)
        jax.block_until_ready(m["loss"])
    t = timed(step, repeats, warmup)
    n_base = sum(x.nbytes for x in jax.tree.leaves(optim.split(box[0].params, groups)[1]))
    return {"step_s": t, "peak_gb": peak_rss_gb(), "base_gb": n_base / 2 ** 30, "rss_after_compile_gb": rss_compiled,
            "peak_after_init_gb": peak_init, "peak_after_compile_gb": peak_compiled, "xla_temp_gb": temp_gb,
            "compile_s": compile_s}


def run_ref(model, dtype, repeats, remat, warmup=1):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2VLConfig as HFConfig, Qwen2VLForConditionalGeneration

    cfg = model_config(model)
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    torch.set_default_dtype(torch_dtype)   # random weights made straight in the run's dtype
    hfc = HFConfig(**cfg.to_hf_dict())
    hfc._attn_implementation = "sdpa"
    for sub in (hfc, hfc.text_config, hfc.vision_config):   # else transformers builds the LLM in float32
        sub.dtype = torch_dtype
    base = Qwen2VLForConditionalGeneration(hfc)
    torch.set_default_dtype(torch.float32)
    if remat == "full":   # the same rematerialisation as ours: each block's activations recomputed
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model_ = get_peft_model(base, LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=PEFT_TARGETS)).train()
    ids, pv, grid = inputs(cfg)
    ids_t, pv_t, grid_t = torch.tensor(ids), torch.from_numpy(pv).to(torch_dtype), torch.tensor(grid)
    opt = torch.optim.AdamW([p for p in model_.parameters() if p.requires_grad], lr=1e-4)

    def step():
        loss = model_(input_ids=ids_t, pixel_values=pv_t, image_grid_thw=grid_t, labels=ids_t).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    t = timed(step, repeats, warmup)
    return {"step_s": t, "peak_gb": peak_rss_gb(),
            "base_gb": sum(p.numel() * p.element_size() for p in base.parameters() if not p.requires_grad) / 2 ** 30}


def child(argv):
    side, model, what, repeats, remat, warmup = argv
    run = run_ours if side == "ours" else run_ref
    out = run(model, what, int(repeats), remat, int(warmup))
    print("RESULT " + json.dumps(out), flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="2b")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps before the timed ones")
    ap.add_argument("--ours", default="none,int8,nf4")
    ap.add_argument("--ref-dtypes", default="float32,bfloat16")
    ap.add_argument("--remat", default="full", choices=["none", "full"],
                    help="both sides: blocks rematerialised (ours remat=full, transformers' gradient checkpointing)")
    a = ap.parse_args()
    from machine import machine
    runs = [("ours", q) for q in a.ours.split(",") if q] + [("peft", d) for d in a.ref_dtypes.split(",") if d]
    res = {}
    for side, what in runs:
        p = subprocess.run([sys.executable, __file__, "--child", side, a.model, what, str(a.repeats), a.remat,
                            str(a.warmup)],
                           capture_output=True, text=True)
        line = [l for l in p.stdout.splitlines() if l.startswith("RESULT ")]
        if p.returncode or not line:
            res[f"{side}_{what}"] = {"error": (p.stderr or p.stdout).strip().splitlines()[-1:]}
            continue
        res[f"{side}_{what}"] = json.loads(line[0][len("RESULT "):])
        print(f"{side} {what}: {res[f'{side}_{what}']}", file=sys.stderr, flush=True)
    ratios = {}
    for rname in ("float32", "bfloat16"):
        ref = res.get(f"peft_{rname}", {})
        for k, v in res.items():
            if k.startswith("ours") and "peak_gb" in v and "peak_gb" in ref:
                name = {"ours_none": "bf16", "ours_int8": "int8", "ours_nf4": "nf4"}.get(k, k)
                tag = {"float32": "f32", "bfloat16": "bf16"}[rname]
                ratios[f"memory_ratio_{name}_vs_peft_{tag}"] = round(v["peak_gb"] / ref["peak_gb"], 3)
                ratios[f"time_ratio_{name}_vs_peft_{tag}"] = round(v["step_s"] / ref["step_s"], 3)
    print(json.dumps({**ratios, "model": a.model, "text_tokens": TEXT_TOKENS, "image": IMAGE, "rank": RANK,
                      "remat": a.remat, "repeats": a.repeats, "warmup": a.warmup, "loss_chunk": LOSS_CHUNK,
                      "settings": res, **machine()}))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2:])
    else:
        main()
