"""The user-facing model object: `load_pretrained`, `Qwen2VL(...)`, HF-compatible calls, `save_pretrained`."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from qwen2vl_jax import hf, schema
from qwen2vl_jax.config import ConfigError, Qwen2VLConfig
from qwen2vl_jax.inputs import batch_from_hf
from qwen2vl_jax.model.qwen2vl import Qwen2VLModule

# Keys of the packed batch format the model reads (the rest — labels, loss_mask, example_index — are not).
MODEL_KEYS = schema.MODEL_KEYS


def _dtype(d) -> Any:
    if isinstance(d, str):
        try:
            return {"float32": jnp.float32, "f32": jnp.float32, "bfloat16": jnp.bfloat16, "bf16": jnp.bfloat16,
                    "float16": jnp.float16}[d]
        except KeyError:
            raise ValueError(f"unknown dtype {d!r}; use 'float32' or 'bfloat16'") from None
    return d


def dummy_batch(config: Qwen2VLConfig, batch: int = 1, text_len: int = 8, patch_len: int = 4) -> dict:
    """Smallest packed batch that touches every parameter (used for init and shape inference)."""
    return {
        "input_ids": jnp.zeros((batch, text_len), jnp.int32),
        "positions": jnp.zeros((3, batch, text_len), jnp.int32),
        "segment_ids": jnp.ones((batch, text_len), jnp.int32),
        "patches": jnp.zeros((batch, patch_len, config.vision.patch_dim), jnp.float32),
        "patch_segment_ids": jnp.ones((batch, patch_len), jnp.int32),
        "patch_positions": jnp.zeros((batch, patch_len, 2), jnp.int32),
        "vision_index": jnp.full((batch, text_len), -1, jnp.int32),
        **({"patch_window_ids": jnp.ones((batch, patch_len), jnp.int32)} if config.vision.window_size else {}),
    }


def abstract_params(module: Qwen2VLModule):
    """Boxed (LogicallyPartitioned) param shapes, without allocating anything."""
    return jax.eval_shape(lambda: module.init(jax.random.key(0), dummy_batch(module.config))["params"])


def logical_specs(module: Qwen2VLModule):
    """Pytree of logical PartitionSpecs matching the params."""
    return nn.get_partition_spec(abstract_params(module))


class Qwen2VL:
    """A model of a supported family (Qwen2-VL, Qwen2.5-VL): config + params + the jitted functions that use them.

    `dtype` is the compute dtype; params keep whatever dtype they were created or loaded in.
    """

    def __init__(self, config: Qwen2VLConfig, params, dtype="float32", remat: str | None = None,
                 attn_impl: str = "auto", adapter=None):
        self.config = config
        self.params = params
        self.dtype = _dtype(dtype)
        self.adapter = adapter   # a lora.Adapter when params hold LoRA adapters / quantised kernels
        param_dtype = jax.tree.leaves(params)[0].dtype if params is not None else jnp.float32
        self.module = Qwen2VLModule(config, dtype=self.dtype, param_dtype=param_dtype, remat=remat,
                                    attn_impl=attn_impl)
        if adapter is not None:
            from qwen2vl_jax import lora
            self.module = lora.adapted(self.module, adapter)

    # -- construction ---------------------------------------------------------------------------

    @classmethod
    def init(cls, config: Qwen2VLConfig, seed: int = 0, dtype="float32", param_dtype="float32", **kw) -> "Qwen2VL":
        """Random init (normal(0.02) kernels, unit norms), e.g. for tests and training from scratch."""
        module = Qwen2VLModule(config, dtype=_dtype(dtype), param_dtype=_dtype(param_dtype))
        params = jax.jit(lambda k: nn.meta.unbox(module.init(k, dummy_batch(config))["params"]))(
            jax.random.key(seed))
        return cls(config, params, dtype=dtype, **kw)

    # -- forward --------------------------------------------------------------------------------

    @functools.cached_property
    def _logits_fn(self):
        return jax.jit(lambda params, batch: self.module.apply({"params": params}, batch))

    def packed_logits(self, rows: dict) -> jax.Array:
        """Logits (B, L, vocab) of a packed batch (docs/design.md format; extra keys are ignored)."""
        batch = {k: jnp.asarray(rows[k]) for k in MODEL_KEYS if rows.get(k) is not None}
        return self._logits_fn(self.params, batch)

    def __call__(self, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None,
                 pixel_values_videos=None, video_grid_thw=None, second_per_grid_ts=None) -> jax.Array:
        """HF-compatible forward: logits (B, L, vocab). Inputs are numpy/torch-like arrays.
        `second_per_grid_ts`: seconds per temporal patch of each video (Qwen2.5-VL)."""
        batch, _ = batch_from_hf(self.config, _np(input_ids), _np(attention_mask), _np(pixel_values),
                                 _np(image_grid_thw), _np(pixel_values_videos), _np(video_grid_thw),
                                 second_per_grid_ts=_np(second_per_grid_ts))
        return self.packed_logits(batch)

    def generate(self, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None,
                 pixel_values_videos=None, video_grid_thw=None, max_new_tokens=32, do_sample=False,
                 eos_token_id=None, second_per_grid_ts=None, **sampling) -> np.ndarray:
        """HF-style generation: (B, L + new) int32 = the prompt, then the new tokens, with pad_token_id after
        a row's EOS. Prompts must be left-padded. `sampling`: temperature, top_k, top_p, repetition_penalty,
        pad_token_id, seed (see `qwen2vl_jax.infer`)."""
        from qwen2vl_jax import infer
        return infer.generate(self, _np(input_ids), _np(attention_mask), _np(pixel_values), _np(image_grid_thw),
                              _np(pixel_values_videos), _np(video_grid_thw), max_new_tokens=max_new_tokens,
                              do_sample=do_sample, eos_token_id=eos_token_id,
                              second_per_grid_ts=_np(second_per_grid_ts), **sampling).sequences

    # -- export ---------------------------------------------------------------------------------

    def save_pretrained(self, path: str, max_shard_bytes: int = 5 * 2 ** 30, processor=None,
                        generation_config=None) -> None:
        """Write a complete HF checkpoint that transformers (`AutoProcessor` and the family's class:
        `Qwen2VLForConditionalGeneration` or `Qwen2_5_VLForConditionalGeneration`)
        and `load_pretrained` / `Processor.from_pretrained` load: config.json, safetensors, the tokenizer and
        chat template of `processor` (default `Processor.for_model(config)`), preprocessor_config.json,
        video_preprocessor_config.json and generation_config.json (default: greedy, the config's EOS and pad
        ids)."""
        if self.adapter is not None:
            raise ValueError("this model holds LoRA adapters: save_adapter(path) writes them for peft, "
                             "merge_adapter().save_pretrained(path) a complete checkpoint with them folded in")
        hf.save_processing(self.config, path, processor, generation_config)   # checks the processor first
        hf.save_params(self.params, self.config, path, max_shard_bytes)

    # -- adapters -------------------------------------------------------------------------------

    def add_adapter(self, adapter=None, seed: int = 0, **kw) -> "Qwen2VL":
        """A model with fresh LoRA adapters (`lora.Adapter(**kw)` unless given: r, alpha, rslora, dropout,
        targets, quant, base_dtype), initialised as peft does (B zero: the same outputs as this model until
        trained). The frozen base is quantised as `adapter.quant` says, else its matrices are stored in
        `adapter.base_dtype` (default: this model's param dtype)."""
        from qwen2vl_jax import lora
        if self.adapter is not None:
            raise ValueError("this model already holds adapters; merge_adapter() first to stack another")
        if adapter is None:
            kw.setdefault("base_dtype", str(jnp.dtype(jax.tree.leaves(self.params)[0].dtype)))
            adapter = lora.Adapter(**kw)
        params = lora.build(self.params, adapter, jax.random.key(seed))
        return Qwen2VL(self.config, params, dtype=self.dtype, remat=self.module.remat,
                       attn_impl=self.module.attn_impl, adapter=adapter)

    def save_adapter(self, path: str, base_model_name_or_path: str = "") -> None:
        """Write the adapters as a peft LoRA adapter dir (adapter_config.json + adapter_model.safetensors) that
        `peft.PeftModel.from_pretrained(transformers_model, path)` and `load_pretrained(base, adapter=path)` load."""
        from qwen2vl_jax import peft_io
        if self.adapter is None:
            raise ValueError("this model holds no adapters (add_adapter() or load_pretrained(..., adapter=DIR))")
        peft_io.save_adapter(self.params, self.config, self.adapter, path, base_model_name_or_path)

    def merge_adapter(self, dtype=None) -> "Qwen2VL":
        """A plain model with every adapter folded into its kernel (`W + scale * B A`, as peft's
        `merge_and_unload`) and quantised kernels dequantised; its `save_pretrained` is a complete checkpoint."""
        from qwen2vl_jax import lora
        if self.adapter is None:
            return self
        dt = _dtype(dtype) if dtype is not None else jnp.float32
        params = lora.merge(self.params, self.adapter, dt)
        params = jax.tree.map(lambda x: x.astype(dt) if jnp.issubdtype(x.dtype, jnp.floating) else x, params)
        return Qwen2VL(self.config, params, dtype=self.dtype, remat=self.module.remat,
                       attn_impl=self.module.attn_impl)


def _np(x):
    if x is None:
        return None
    if hasattr(x, "detach"):   # a torch tensor
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def load_pretrained(path: str, dtype="float32", mesh=None, rules=None, adapter: str | None = None,
                    base_quant: str | None = None, **kw) -> Qwen2VL:
    """Load an HF Qwen2-VL or Qwen2.5-VL checkpoint directory (config.json + *.safetensors, optionally sharded).

    `dtype` sets both the param and compute dtype. With a `mesh`, every tensor is created directly in its
    sharding (logical axes mapped by `rules`, default `qwen2vl_jax.sharding.RULES`; a dim the mesh does not
    divide stays whole). `adapter`: a peft LoRA adapter dir to apply, unmerged (`merge_adapter()` folds it
    in; adapters are float32), with a mesh too: the adapters split as `lora.logical_axes` says (A over its
    kernel's input axis, B over its output axis). When the adapter was trained over a quantised base (its
    dir has `base_quant.json`, as `save_adapter` and `train.py` write for `lora.quant`), the base is
    quantised the same way (the head stays unquantised, as in training); its codes and scales split as the
    kernel's do, and its other matrices (embeddings, head) are stored as the file says (`lora.base_dtype`).
    `base_quant` overrides that: "none" keeps the base unquantised in `dtype` (as peft loads the adapter),
    "int8" / "nf4" / "int4" quantise it so.
    """
    from qwen2vl_jax import storage
    if not storage.isdir(path):
        raise FileNotFoundError(f"{path}: not a directory; expected an HF checkpoint dir with config.json "
                                "(a local path or a URL such as gs://bucket/model)")
    config = Qwen2VLConfig.from_pretrained(path)
    dt = _dtype(dtype)
    if adapter is not None:   # read (and checked) before the weights
        from qwen2vl_jax import peft_io
        if not storage.isdir(adapter):
            raise FileNotFoundError(f"adapter {adapter}: not a directory; expected a peft LoRA adapter dir "
                                    "(adapter_config.json + adapter_model.safetensors)")
        peft_io.read_config(adapter)
    shardings = None
    if mesh is not None:
        from qwen2vl_jax import sharding
        boxed = abstract_params(Qwen2VLModule(config, dtype=dt, param_dtype=dt))
        shardings = sharding.tree_shardings(nn.get_partition_spec(boxed), mesh, rules or sharding.RULES,
                                            shapes=nn.meta.unbox(boxed))
    params = hf.load_params(path, config, dtype=np.dtype(dt), shardings=shardings)
    if adapter is None:
        return Qwen2VL(config, params, dtype=dt, **kw)
    spec, params = attach_adapter(config, params, adapter, dt, mesh, rules, base_quant)
    return Qwen2VL(config, params, dtype=dt, adapter=spec, **kw)


def attach_adapter(config: Qwen2VLConfig, params: dict, adapter: str, dtype=jnp.float32, mesh=None, rules=None,
                   base_quant: str | None = None):
    """(the lora.Adapter, the params of base `params` with the peft adapter dir `adapter` on them), the base
    quantised as `base_quant` or else the adapter's `base_quant.json` says (its other matrices stored as that
    file says, else in `dtype`), everything placed on `mesh` when given (`adapted_shardings`)."""
    from qwen2vl_jax import lora, peft_io
    if lora.has_adapters(params):
        raise lora.AdapterError(f"adapter {adapter}: the model already holds adapters; merge them first "
                                "(merge_adapter()) or load the base without them")
    spec, params = peft_io.load_adapter(adapter, config, params)
    dt = _dtype(dtype)
    if base_quant is not None and base_quant != spec.quant:   # the unquantised matrices stay in `dtype`
        spec = dataclasses.replace(spec, quant=base_quant, base_dtype=str(jnp.dtype(dt)))
    if not peft_io.base_storage(adapter) and spec.quant != "none":
        spec = dataclasses.replace(spec, base_dtype=str(jnp.dtype(dt)))
    prepare = lambda p: lora.prepare_base(p, spec) if spec.quant != "none" else p
    out_shardings = None
    if mesh is not None:
        out_shardings = adapted_shardings(config, jax.eval_shape(prepare, params), mesh, rules, dt)
    if spec.quant != "none":   # the base as training stored it: quantised Dense kernels, the head as it is
        params = jax.jit(prepare, out_shardings=out_shardings)(params)
    elif out_shardings is not None:   # the base is in place already; the adapters go to their shards
        params = jax.device_put(params, out_shardings)
    else:
        params = jax.tree.map(jnp.asarray, params)
    return spec, params


def adapted_shardings(config: Qwen2VLConfig, shapes, mesh, rules=None, dtype=jnp.float32):
    """NamedShardings of an adapted params tree of `shapes` on `mesh`: the base's logical axes, the adapters'
    and quantised kernels' from `lora.logical_axes`, each dim split only where the mesh divides it."""
    from qwen2vl_jax import lora, sharding
    base_axes = logical_specs(Qwen2VLModule(config, dtype=dtype, param_dtype=dtype))
    axes = lora.logical_axes(shapes, base_axes)
    specs = jax.tree.map(lambda a: jax.sharding.PartitionSpec(*a), axes, is_leaf=lambda x: isinstance(x, tuple))
    return sharding.tree_shardings(specs, mesh, rules or sharding.RULES, shapes=shapes)


__all__ = ["Qwen2VL", "load_pretrained", "ConfigError"]
