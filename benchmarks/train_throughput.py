"""Training throughput on a realistic mix: ours with packed buckets vs transformers with pad-to-longest batches.

The number users feel: real (non-padding) text tokens per second of training, on the same examples, the same
random weights and the same optimizer (AdamW, global-norm clip 1.0), measured on the steps alone (data built
beforehand, compilation and the first step excluded).

Model ("small", random, saved by transformers 4.57.6 and loaded by ours from the same safetensors): LLM hidden
256, 4 layers, 4 heads (head dim 64), 2 KV heads, SwiGLU 1024, M-RoPE [8, 12, 12]; ViT width 128, depth 4,
4 heads; a 1024-entry byte-level vocabulary (`Processor.from_config`, one token per byte of text), so the LM
head does not dominate on a CPU.

Mix (`SyntheticConfig.realistic()` with smaller pictures so that a CPU run takes minutes): images from 28x28 to
448x448 (area at most 448x336, log-uniform, aspect up to 3:1, never downscaled), 10% text-only, 10% with 2-4
images, 5% videos of 4-8 frames of up to 140x140, 30% of the single-image questions asking for a description
of up to 16 shapes; at most 2048 patches per example.

- ours: `StreamingPacker` (the pipeline's packer) over a `--window` look-ahead into `--rows` rows per step at
  the buckets `suggest_buckets` fits to a held-out sample, then the project's jitted train step (`StepFn`,
  what train.py runs) in float32, attention `--attn-impl` (default auto, as train.py; on the CPU auto is the
  dense XLA kernel below 512 tokens, else `blockwise`, which skips the block pairs of different packed
  examples).
  Only the batches packed with a full window count (the drain at the end of a finite stream is not
  training's steady state); their examples are the benchmark's examples.
- reference: `Qwen2VLForConditionalGeneration` (default SDPA attention, float32, train mode), the same
  examples in file order, `--pad-batch` at a time, right-padded to the longest with `labels=-100` on padding
  and non-assistant tokens and the pixel values concatenated (the default collation of LLaMA-Factory /
  ms-swift), `torch.optim.AdamW` with the same hyper-parameters.

Each side runs in its own subprocess (its own threads and memory). On a shared machine the wall-time ratio
moves with the other jobs' load; the ratio of the two sides' CPU seconds over the timed steps
(`cpu_time_ratio`) is reported beside it as a steadier check.

    python benchmarks/train_throughput.py [--examples 240] [--window 64] [--rows 2] [--text-len 1024]
                                          [--pad-batch 8] [--isa native|avx2] [--pairs 1]

Ends with one JSON line, with the machine behind it (CPU model, AVX-512 or not, load; `machine.py`).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np


def bench_config():
    from qwen2vl_jax.config import TextConfig, VisionConfig, tiny
    # tiny() places the special tokens at the top of the vocabulary, where the byte tokenizer expects them.
    return tiny(1024).replace(
        vision=VisionConfig(depth=4, embed_dim=128, num_heads=4, hidden_size=256),
        text=TextConfig(vocab_size=1024, hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                        num_attention_heads=4, num_key_value_heads=2, mrope_section=(8, 12, 12),
                        max_position_embeddings=8192))


def bench_mix():
    from qwen2vl_jax.data.synthetic import SyntheticConfig
    return SyntheticConfig(min_side=28, max_side=448, max_area=448 * 336, max_patches=2048, p_text=0.10,
                           p_multi=0.10, p_video=0.05, p_caption=0.30, max_images=4, max_shapes=16,
                           video_frames=(4, 8), video_side=(56, 140), video_pixels=(3136, 140 * 140))


def encode(config, data_file: str, wanted=None) -> dict:
    """{source: processor output} for the records of `data_file` (all, or those in `wanted`)."""
    from qwen2vl_jax.data import Processor, read_jsonl
    proc = Processor.from_config(config)
    return {r.source: proc.encode_record(r) for r in read_jsonl(data_file) if wanted is None or r.source in wanted}


# -- the two sides ---------------------------------------------------------------------------------------

def run_ours(plan: dict) -> dict:
    import jax
    import jax.numpy as jnp

    import qwen2vl_jax as qv
    from qwen2vl_jax import sharding
    from qwen2vl_jax.data.packing import prepare_example, write_rows
    from qwen2vl_jax.model.qwen2vl import Qwen2VLModule
    from qwen2vl_jax.train import batches, optim
    from qwen2vl_jax.train.config import OptimConfig
    from qwen2vl_jax.train.state import init_state, state_shardings
    from qwen2vl_jax.train.step import StepFn

    model = qv.load_pretrained(plan["ckpt"], dtype="float32")
    config = model.config
    buckets = [tuple(b) for b in plan["buckets"]]
    examples = encode(config, plan["data"], {s for _, rows in plan["ours"] for r in rows for s in r})
    host = []
    for (L, P), rows in plan["ours"]:
        prepared = [[prepare_example(examples[s], config, source=s, buckets=buckets) for s in r] for r in rows]
        packed = write_rows(prepared, L, P, pad_id=config.pad_token_id, batch_size=plan["rows"])
        host.append(batches.stack_micro_batches([packed]))
    del examples

    mesh = sharding.make_mesh()
    module = Qwen2VLModule(config, dtype=jnp.float32, param_dtype=jnp.float32, remat=plan["remat"],
                          attn_impl=plan["attn_impl"])
    parts = ("vit", "merger", "llm")
    ocfg = OptimConfig(**plan["optim"])
    tx = optim.make_optimizer(ocfg, parts)
    shardings = state_shardings(module, tx, parts, mesh)
    state = init_state(module, tx, parts, shardings, seed=0, params=model.params)
    step = StepFn(mesh, shardings, module=module, tx=tx, parts=parts, schedules=optim.schedules(ocfg, parts))
    put = lambda b: batches.to_device(b, step.batch_shardings(b))

    # One step per bucket shape compiles it; those steps are not timed.
    t0 = time.perf_counter()
    seen, losses = set(), []
    for b in host:
        shape = (b["input_ids"].shape[-1], b["patches"].shape[-2])
        if shape not in seen:
            seen.add(shape)
            state, m = step(state, put(b))
            losses.append(float(m["loss"]))
    compile_s = time.perf_counter() - t0

    t0, c0 = time.perf_counter(), cpu_seconds()
    for b in host:
        state, m = step(state, put(b))
    jax.block_until_ready(state.params)
    wall, cpu = time.perf_counter() - t0, cpu_seconds() - c0
    return {"wall_s": wall, "cpu_s": cpu, "steps": len(host), "compile_s": compile_s, "first_loss": losses[0],
            "last_loss": float(m["loss"]), "shapes": len(seen)}


def run_ref(plan: dict) -> dict:
    import torch
    from transformers import Qwen2VLForConditionalGeneration

    from qwen2vl_jax.config import Qwen2VLConfig
    config = Qwen2VLConfig.from_pretrained(plan["ckpt"])
    examples = encode(config, plan["data"], {s for batch in plan["ref"] for s in batch})
    collated = [collate([examples[s] for s in batch], config.pad_token_id) for batch in plan["ref"]]
    del examples

    torch.manual_seed(0)
    model = Qwen2VLForConditionalGeneration.from_pretrained(plan["ckpt"], torch_dtype=torch.float32).train()
    o = plan["optim"]
    opt = torch.optim.AdamW(model.parameters(), lr=o["lr"], betas=(o["b1"], o["b2"]), eps=o["eps"],
                            weight_decay=o["weight_decay"])

    def train(batch):
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), o["clip_norm"])
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss)

    # The first step allocates optimizer state and warms the allocator; not timed.
    t0 = time.perf_counter()
    first_loss = train(collated[0])
    warm_s = time.perf_counter() - t0
    t0, c0 = time.perf_counter(), cpu_seconds()
    for batch in collated:
        last_loss = train(batch)
    wall, cpu = time.perf_counter() - t0, cpu_seconds() - c0
    return {"wall_s": wall, "cpu_s": cpu, "steps": len(collated), "compile_s": warm_s, "first_loss": first_loss,
            "last_loss": last_loss, "shapes": len({tuple(b["input_ids"].shape) for b in collated})}


def cpu_seconds() -> float:
    """CPU time of this process, all threads: steadier than wall time on a machine shared with other jobs."""
    import resource
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def collate(examples: list[dict], pad_id: int) -> dict:
    """Pad-to-longest on the right, as the PyTorch fine-tuning tools' default collators do."""
    import torch
    L = max(len(e["input_ids"]) for e in examples)
    ids = np.full((len(examples), L), pad_id, np.int64)
    mask = np.zeros((len(examples), L), np.int64)
    labels = np.full((len(examples), L), -100, np.int64)
    for b, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[b, :n], mask[b, :n], labels[b, :n] = e["input_ids"], 1, e["labels"]
    out = {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask),
           "labels": torch.from_numpy(labels)}
    for pix, grid in (("pixel_values", "image_grid_thw"), ("pixel_values_videos", "video_grid_thw")):
        parts = [e[pix] for e in examples if len(e[pix])]
        if parts:
            out[pix] = torch.from_numpy(np.concatenate(parts))
            out[grid] = torch.from_numpy(np.concatenate([e[grid] for e in examples if len(e[grid])]))
    return out


# -- driver -----------------------------------------------------------------------------------------------

def make_plan(args, config, train_file: str, heldout_file: str) -> tuple[dict, dict]:
    """Buckets from the held-out sample, ours' batches (full-window ones only) and the reference's batches of
    the same examples in file order; plus the figures of padding both sides will carry."""
    from qwen2vl_jax.data.packing import StreamingPacker, prepare_example, suggest_buckets

    def sizes(encoded):
        return {s: (len(e["input_ids"]), len(e["pixel_values"]) + len(e["pixel_values_videos"]))
                for s, e in encoded.items()}
    encoded = encode(config, train_file)
    # Fitted to the held-out sample; the training set's largest examples join it so that every example fits
    # (the largest buckets scale up to hold them, at the sample's ratio).
    train_sizes = np.asarray(list(sizes(encoded).values()))
    sample = list(sizes(encode(config, heldout_file)).values()) + [tuple(train_sizes[train_sizes[:, k].argmax()])
                                                                   for k in (0, 1)]
    buckets = suggest_buckets(sample, [args.text_len // 2, args.text_len])
    if args.one_size:
        buckets = buckets[-1:]
    packer = StreamingPacker(buckets, args.rows, args.window)
    ours = []
    for source, e in encoded.items():
        packer.add(prepare_example(e, config, source=source, buckets=buckets))
        if packer.ready():
            bucket, rows = packer.pop_batch()
            ours.append((bucket, [[ex.source for ex in r] for r in rows]))
    used = {s for _, rows in ours for r in rows for s in r}
    in_order = [s for s in encoded if s in used]
    ref = [in_order[i:i + args.pad_batch] for i in range(0, len(in_order), args.pad_batch)]
    size = sizes({s: encoded[s] for s in used})
    text = sum(t for t, _ in size.values())
    patches = sum(p for _, p in size.values())
    ours_budget = sum(args.rows * L for (L, _), _ in ours)
    ours_patch_budget = sum(args.rows * P for (_, P), _ in ours)
    ref_budget = sum(len(b) * max(size[s][0] for s in b) for b in ref)
    figures = {"examples": len(used), "real_tokens": text, "real_patches": patches,
               "ours_fill": text / ours_budget, "ours_patch_fill": patches / ours_patch_budget,
               "ref_fill": text / ref_budget, "buckets": [list(b) for b in buckets]}
    optim = {"lr": 1e-4, "b1": 0.9, "b2": 0.95, "eps": 1e-8, "weight_decay": 0.1, "clip_norm": 1.0}
    plan = {"buckets": [list(b) for b in buckets], "ours": ours, "ref": ref, "rows": args.rows,
            "remat": args.remat, "attn_impl": args.attn_impl, "optim": optim, "data": train_file}
    return plan, figures


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--examples", type=int, default=240, help="examples generated; the drain is not measured")
    ap.add_argument("--heldout", type=int, default=100, help="held-out examples the buckets are fitted to")
    ap.add_argument("--window", type=int, default=64, help="look-ahead of the packer, in examples")
    ap.add_argument("--rows", type=int, default=2, help="rows per packed batch")
    ap.add_argument("--text-len", type=int, default=1024, help="text length of the large buckets")
    ap.add_argument("--one-size", action="store_true", help="only the largest bucket (one compiled shape)")
    ap.add_argument("--pad-batch", type=int, default=8, help="examples per pad-to-longest batch")
    ap.add_argument("--remat", default="none", help="ours: remat policy of the scanned blocks")
    ap.add_argument("--attn-impl", default="auto", help="ours: attention kernel (xla, blockwise, auto, ...)")
    ap.add_argument("--isa", choices=["native", "avx2"], default="native",
                    help="avx2: both sides limited to AVX2 (XLA's --xla_cpu_max_isa, PyTorch's ATEN_CPU_CAPABILITY), "
                         "as on a machine without AVX-512 (the libraries' own kernels may still dispatch wider)")
    ap.add_argument("--pairs", type=int, default=1, help="runs of the two sides, alternating; the ratio is the "
                    "median over the pairs (figures other than the ratio are the last pair's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--worker", choices=["ours", "ref"])
    ap.add_argument("--plan")
    args = ap.parse_args()
    if args.worker:
        with open(args.plan) as f:
            plan = json.load(f)
        print("RESULT " + json.dumps((run_ours if args.worker == "ours" else run_ref)(plan)), flush=True)
        return

    import torch
    from transformers import Qwen2VLConfig as HFConfig, Qwen2VLForConditionalGeneration

    from qwen2vl_jax.data import synthetic

    from machine import machine
    load_at_start = round(os.getloadavg()[0], 2)
    config = bench_config()
    data_dir = args.data_dir or os.path.join(tempfile.gettempdir(), f"qwen2vl_train_throughput_{args.seed}")
    t0 = time.perf_counter()
    train_file, heldout_file = synthetic.generate(data_dir, size=args.examples, heldout_size=args.heldout,
                                                  seed=args.seed, config=bench_mix(), workers=2)
    print(f"data: {args.examples} + {args.heldout} held-out examples in {data_dir} "
          f"({time.perf_counter() - t0:.0f} s)", flush=True)
    plan, figures = make_plan(args, config, train_file, heldout_file)
    print(f"plan: {figures['examples']} examples, {figures['real_tokens']} real tokens, "
          f"{figures['real_patches']} patches; ours {len(plan['ours'])} steps of {args.rows} rows at buckets "
          f"{figures['buckets']} (text fill {figures['ours_fill']:.3f}, patch fill "
          f"{figures['ours_patch_fill']:.3f}); reference {len(plan['ref'])} steps of {args.pad_batch} examples "
          f"(text fill {figures['ref_fill']:.3f})", flush=True)

    res = {}
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(args.seed)
        ref = Qwen2VLForConditionalGeneration(HFConfig(**config.to_hf_dict()))
        n_params = sum(p.numel() for p in ref.parameters())
        ref.save_pretrained(os.path.join(tmp, "ckpt"))
        del ref
        plan["ckpt"] = os.path.join(tmp, "ckpt")
        with open(os.path.join(tmp, "plan.json"), "w") as f:
            json.dump(plan, f)
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
        if args.isa == "avx2":
            env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_cpu_max_isa=AVX2").strip()
            env["ATEN_CPU_CAPABILITY"] = "avx2"
        pairs, loads = [], []
        for _ in range(args.pairs):   # sides alternate, so a load that drifts hits both sides of some pair
            for side in ("ours", "ref"):
                t0 = time.perf_counter()
                loads.append(round(os.getloadavg()[0], 2))
                p = subprocess.run([sys.executable, __file__, "--worker", side, "--plan",
                                    os.path.join(tmp, "plan.json")], capture_output=True, text=True, env=env)
                line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
                if p.returncode or not line:
                    sys.exit(f"{side} worker failed:\n{p.stderr[-4000:]}")
                res[side] = json.loads(line[-1][7:])
                r = res[side]
                print(f"{side}: {r['steps']} steps in {r['wall_s']:.1f} s ({figures['real_tokens'] / r['wall_s']:.0f} "
                      f"real tokens/s, {r['cpu_s']:.1f} CPU s) after {r['compile_s']:.1f} s of warm-up over "
                      f"{r['shapes']} shape(s); loss {r['first_loss']:.3f} -> {r['last_loss']:.3f}; "
                      f"{time.perf_counter() - t0:.0f} s in all; load {loads[-1]}", flush=True)
            pairs.append(res["ref"]["wall_s"] / res["ours"]["wall_s"])

    o, r = res["ours"], res["ref"]
    tokens = figures["real_tokens"]
    fig = {"tokens_per_s_ratio": float(np.median(pairs)), "pair_ratios": [round(x, 3) for x in pairs],
           "side_loads": loads,
           "ours_tokens_per_s": tokens / o["wall_s"], "ref_tokens_per_s": tokens / r["wall_s"],
           "cpu_time_ratio": r["cpu_s"] / o["cpu_s"],
           "ours_fill": figures["ours_fill"], "ours_patch_fill": figures["ours_patch_fill"],
           "ref_fill": figures["ref_fill"],
           "ours_steps": o["steps"], "ref_steps": r["steps"], "ours_wall_s": o["wall_s"], "ref_wall_s": r["wall_s"],
           "ours_cpu_s": o["cpu_s"], "ref_cpu_s": r["cpu_s"],
           "ours_shapes": o["shapes"], "ref_shapes": r["shapes"],
           "ours_first_loss": o["first_loss"], "ref_first_loss": r["first_loss"],
           "examples": figures["examples"], "real_tokens": tokens, "real_patches": figures["real_patches"],
           "rows": args.rows, "pad_batch": args.pad_batch, "window": args.window, "buckets": figures["buckets"],
           "params": n_params, "remat": args.remat, "attn_impl": args.attn_impl, "dtype": "float32",
           **machine(), "load_at_start": load_at_start, "isa": args.isa}
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in fig.items()}))


if __name__ == "__main__":
    main()
