"""Generation speed, ours vs transformers 4.57.6, on the same random ~0.5B Qwen2-VL with one 448x448 image.

Model: LLM hidden 896, 8 layers, 14 heads, 2 KV heads, intermediate 4864, mrope [8, 12, 12], vocab 151936
(untied head); ViT width 1280, depth 8. Built once in transformers, saved, and loaded by both sides, so the
weights are identical. Prompt: the Qwen2-VL chat template around one 448x448 image (1024 patches -> 256
merged tokens) and a question. Greedy decoding with EOS disabled, so both sides generate every token.

Figures, measured the same way for both sides: prefill = time of `generate(max_new_tokens=1)` (vision tower,
prompt forward, first token); decode tokens/s = (N - 1) / (t(N tokens) - t(1 token)). Medians of `--repeats`
runs after a warm-up (which compiles ours). Ours also reports its own split of one call (prefill program,
decode loop). transformers runs with its default (SDPA) attention. Ratios come first: > 1 means ours is
faster. `greedy_tokens_equal` counts the leading new tokens on which both sides agree.

`--dtype bfloat16` loads and runs both sides in bfloat16.

    python benchmarks/generate.py [--new-tokens 32] [--repeats 3] [--threads N] [--dtype float32|bfloat16]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import numpy as np

IMAGE = 448


def bench_config():
    from qwen2vl_jax.config import Qwen2VLConfig, TextConfig, VisionConfig
    return Qwen2VLConfig(
        vision=VisionConfig(depth=8, hidden_size=896),
        text=TextConfig(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=8,
                        num_attention_heads=14, num_key_value_heads=2, mrope_section=(8, 12, 12)))


def prompt(cfg):
    """input_ids (1, L) of a chat prompt with one image, pixel_values, image_grid_thw (random pixels)."""
    from qwen2vl_jax.data import Processor
    proc = Processor.default()
    text = proc.apply_chat_template([{"role": "user", "content": [
        {"type": "image"}, {"type": "text", "text": "Describe the picture in detail."}]}])
    img = np.random.default_rng(0).integers(0, 256, (IMAGE, IMAGE, 3), dtype=np.uint8)
    enc = proc(text=[text], images=[img], images_kwargs={"max_pixels": IMAGE * IMAGE})
    assert proc.image_token_id == cfg.image_token_id
    return enc["input_ids"], enc["pixel_values"], enc["image_grid_thw"]


def median_time(fn, repeats):
    fn()   # warm-up (compiles ours)
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return float(np.median(ts))


def bench_ours(path, ids, pv, grid, n, repeats, dtype="float32"):
    import jax
    import qwen2vl_jax as qv
    from qwen2vl_jax import infer

    model = qv.load_pretrained(path, dtype=dtype)
    kw = dict(pixel_values=pv, image_grid_thw=grid, eos_token_id=())

    def gen(k):
        return model.generate(ids, max_new_tokens=k, **kw)
    t1, tn = median_time(lambda: gen(1), repeats), median_time(lambda: gen(n), repeats)
    # Our own split of one call: the prefill program, then the on-device decode loop.
    g = infer.generator_for(model)
    cfg = infer.GenerationConfig(max_new_tokens=n, pad_token_id=model.config.pad_token_id)
    p = g.prepare(ids, pixel_values=pv, image_grid_thw=grid)
    starts, loops = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        state = jax.block_until_ready(g.start(model.params, p, cfg))
        starts.append(time.perf_counter() - t)
        t = time.perf_counter()
        jax.block_until_ready(g.finish(model.params, p, state, cfg, jax.random.key(0)))
        loops.append(time.perf_counter() - t)
    tokens = gen(n)[0, ids.shape[1]:]
    return {"prefill_s": t1, "decode_tokens_per_s": (n - 1) / (tn - t1),
            "prefill_program_s": float(np.median(starts)),
            "decode_loop_tokens_per_s": (n - 1) / float(np.median(loops))}, tokens


def bench_hf(path, ids, pv, grid, n, repeats, threads, dtype="float32"):
    import torch
    from transformers import Qwen2VLForConditionalGeneration

    torch.set_num_threads(threads)
    # transformers' default attention (SDPA), its fastest on the CPU; eager is only for bitwise parity tests.
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    model = Qwen2VLForConditionalGeneration.from_pretrained(path, dtype=torch_dtype).eval()
    model.generation_config.eos_token_id = None     # generate every token, as ours does with eos_token_id=()
    model.generation_config.pad_token_id = 0
    t_ids, t_pv, t_grid = torch.tensor(ids, dtype=torch.long), torch.from_numpy(pv).to(torch_dtype), torch.tensor(grid)

    def gen(k):
        with torch.no_grad():
            return model.generate(input_ids=t_ids, pixel_values=t_pv, image_grid_thw=t_grid, max_new_tokens=k,
                                  do_sample=False)
    t1, tn = median_time(lambda: gen(1), repeats), median_time(lambda: gen(n), repeats)
    tokens = gen(n)[0, ids.shape[1]:].numpy()
    return {"prefill_s": t1, "decode_tokens_per_s": (n - 1) / (tn - t1)}, tokens


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="both sides' dtype")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch intra-op threads")
    args = ap.parse_args()

    import jax
    import torch
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    cfg = bench_config()
    ids, pv, grid = prompt(cfg)
    with tempfile.TemporaryDirectory() as path:
        torch.manual_seed(0)
        ref = Qwen2VLForConditionalGeneration(Qwen2VLConfig(**cfg.to_hf_dict()))
        n_params = sum(p.numel() for p in ref.parameters())
        ref.save_pretrained(path)
        del ref
        r, r_tok = bench_hf(path, ids, pv, grid, args.new_tokens, args.repeats, args.threads, args.dtype)
        o, o_tok = bench_ours(path, ids, pv, grid, args.new_tokens, args.repeats, args.dtype)
    same = int(np.argmin(np.append(o_tok == r_tok, False)))   # length of the common greedy prefix
    fig = {
        "decode_speedup": o["decode_tokens_per_s"] / r["decode_tokens_per_s"],
        "prefill_speedup": r["prefill_s"] / o["prefill_s"],
        **{f"ours_{k}": v for k, v in o.items()}, **{f"hf_{k}": v for k, v in r.items()},
        "greedy_tokens_equal": f"{same}/{args.new_tokens}",
        "prompt_tokens": int(ids.shape[1]), "new_tokens": args.new_tokens, "params": n_params,
        "dtype": args.dtype, "backend": jax.default_backend(), "torch_threads": args.threads,
        "hf_attention": "sdpa",
    }
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in fig.items()}))


if __name__ == "__main__":
    main()
