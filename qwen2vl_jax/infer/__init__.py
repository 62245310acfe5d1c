"""Generation: KV cache, jitted prefill and decode loop, sampling, batch generation."""

from __future__ import annotations

from jax.sharding import NamedSharding

from qwen2vl_jax.infer.config import GenerationConfig
from qwen2vl_jax.infer.generator import Generator, Output, Prompt


def mesh_of(params):
    """The mesh the params live on, or None for single-device params."""
    import jax
    leaves = jax.tree.leaves(params)
    sharding = getattr(leaves[0], "sharding", None) if leaves else None
    return sharding.mesh if isinstance(sharding, NamedSharding) and sharding.mesh.size > 1 else None


def generator_for(model) -> Generator:
    """The `Generator` of a `Qwen2VL`, built once per model object (it holds the compiled programs)."""
    mesh = mesh_of(model.params)
    gen = getattr(model, "_generator", None)
    if gen is None or gen.mesh is not mesh or gen.module is not model.module:
        gen = Generator(model.config, model.module, mesh=mesh)
        model._generator = gen
    return gen


def generate(model, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None,
             pixel_values_videos=None, video_grid_thw=None, max_new_tokens: int = 32, do_sample: bool = False,
             eos_token_id=None, seed=0, return_logits: bool = False, second_per_grid_ts=None, **sampling) -> Output:
    """HF-style generation with a `Qwen2VL`. `eos_token_id=None` uses the model config's EOS; `sampling`
    takes temperature, top_k, top_p, repetition_penalty, pad_token_id (GenerationConfig).
    `second_per_grid_ts`: seconds per temporal patch of each video (Qwen2.5-VL's absolute time)."""
    c = model.config
    sampling.setdefault("pad_token_id", c.pad_token_id)
    cfg = GenerationConfig.create(max_new_tokens=max_new_tokens, do_sample=do_sample,
                                  eos_token_id=c.eos_token_id if eos_token_id is None else eos_token_id, **sampling)
    gen = generator_for(model)
    prompt = gen.prepare(input_ids, attention_mask, pixel_values, image_grid_thw, pixel_values_videos,
                         video_grid_thw, second_per_grid_ts=second_per_grid_ts)
    return gen.generate(model.params, prompt, cfg, seed=seed, return_logits=return_logits)


__all__ = ["GenerationConfig", "Generator", "Output", "Prompt", "generate", "generator_for", "mesh_of"]
