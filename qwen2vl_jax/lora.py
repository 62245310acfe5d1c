"""LoRA adapters (and quantised frozen bases) on the model's Dense layers, as peft computes them.

An adapted Dense layer computes `base(x) + scale * dropout(x) @ A @ B` with A (in, r) and B (r, out): peft's
`lora_A.weight` and `lora_B.weight` transposed, `scale = alpha / r` (`alpha / sqrt(r)` with rslora), A
initialised as peft does (uniform +-1/sqrt(in), torch's kaiming_uniform with a=sqrt(5)) and B zero, so a new
adapter leaves the model as it was. The adapters live in the params tree beside the kernel they adapt
(`.../q_proj/lora_a`, `.../q_proj/lora_b`), so the scanned layers stay scanned: a stack's adapters are stacked
like its kernels, (layers, in, r) and (layers, r, out), and every tool that walks the params tree (sharding,
checkpoints, the parameter groups' regexes) sees them. A frozen base may be stored in bfloat16 or quantised
(`qwen2vl_jax.quant`: int8, nf4, int4; `kernel` is then replaced by `kernel_q` + `kernel_scale`) and is
dequantised on the fly, one layer at a time inside the scan.

`Adapter` describes an adaptation; `AdaptedModule` is `Qwen2VLModule` whose every `apply` routes the Dense
layers that hold adapters or quantised kernels through `_dense`. Layers without either run untouched.
"""

from __future__ import annotations

import dataclasses
import math
import re

import flax.linen as nn
import jax
import jax.numpy as jnp

from qwen2vl_jax import quant, target
from qwen2vl_jax.model.qwen2vl import Qwen2VLModule

# Dense layers that may take an adapter (paths in the params tree). The patch embedding is a Conv3d in the
# reference (peft adapts it as a convolution), the tied 2B head is the embedding: neither is a Linear there.
ADAPTABLE = re.compile(r"^(model/layers/(q|k|v|o|gate|up|down)_proj|visual/blocks/(qkv|proj|fc1|fc2)"
                       r"|visual/merger/mlp_[02]|lm_head)$")
# Short names for the target families, as LLaMA-Factory / ms-swift users write them.
TARGET_ALIASES = {
    "all-linear": r"^(model/layers/|visual/blocks/|visual/merger/)",
    "llm": r"^model/layers/", "vit": r"^visual/blocks/", "merger": r"^visual/merger/",
}
BASE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


class AdapterError(ValueError):
    """An adapter that does not fit the model, or an adapter config that cannot be used."""


@dataclasses.dataclass(frozen=True)
class Adapter:
    """A LoRA adaptation. `targets`: a regex searched in each adaptable Dense layer's path (e.g.
    `model/layers/.*(q|v)_proj`, `visual/blocks/qkv`) or an alias of TARGET_ALIASES. `quant`: how the frozen
    base kernels are stored (none | int8 | nf4 | int4, `quant_group` input rows per 4-bit scale)."""
    r: int = 8
    alpha: float = 16.0
    rslora: bool = False
    dropout: float = 0.0
    targets: str = "all-linear"
    quant: str = "none"
    quant_group: int = 64
    base_dtype: str = "bfloat16"   # storage of the frozen base's matrices when not quantised (float32 | bfloat16)

    def __post_init__(self):
        if self.r < 1:
            raise AdapterError(f"lora r must be >= 1, got {self.r}")
        if not 0.0 <= self.dropout < 1.0:
            raise AdapterError(f"lora dropout must be in [0, 1), got {self.dropout}")
        if self.base_dtype not in BASE_DTYPES:
            raise AdapterError(f"lora base_dtype must be one of {sorted(BASE_DTYPES)}, got {self.base_dtype!r}")
        if self.quant not in quant.FORMATS:
            raise AdapterError(f"lora quant must be one of {sorted(quant.FORMATS)}, got {self.quant!r}")
        try:
            re.compile(self.pattern)
        except re.error as e:
            raise AdapterError(f"lora targets {self.targets!r} is not a valid regex ({e})") from None

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.rslora else self.r)

    @property
    def pattern(self) -> str:
        return TARGET_ALIASES.get(self.targets, self.targets)

    def targets_in(self, params) -> list[tuple[str, ...]]:
        """Paths (module keys) of the Dense layers of `params` this adapter adapts; an error if none."""
        rx = re.compile(self.pattern)
        out = [m for m in dense_modules(params) if ADAPTABLE.match("/".join(m)) and rx.search("/".join(m))]
        if not out:
            raise AdapterError(f"lora targets {self.targets!r} match no adaptable layer; adaptable layers are "
                               f"{sorted({'/'.join(m) for m in dense_modules(params) if ADAPTABLE.match('/'.join(m))})}")
        return out


def dense_modules(params) -> list[tuple[str, ...]]:
    """Paths of the Dense layers in a params tree (dicts holding a kernel, plain or quantised, or adapters)."""
    out = []

    def go(tree, path):
        if not isinstance(tree, dict):
            return
        if "kernel" in tree or "kernel_q" in tree or "lora_a" in tree:
            out.append(path)
        for k, v in tree.items():
            go(v, path + (k,))
    go(params, ())
    return out


def _at(tree, path):
    for k in path:
        tree = tree[k]
    return tree


def _replace(tree: dict, path, fn) -> dict:
    """A copy of `tree` with the dict at `path` replaced by fn(that dict); nothing else is copied."""
    if not path:
        return fn(tree)
    return {**tree, path[0]: _replace(tree[path[0]], path[1:], fn)}


def add_adapters(params: dict, adapter: Adapter, key) -> dict:
    """`params` with fresh adapters on the target layers: A as peft initialises it, B zero (in f32)."""
    for i, path in enumerate(adapter.targets_in(params)):
        def add(layer, k=jax.random.fold_in(key, i)):
            if "lora_a" in layer:
                raise AdapterError(f"{'/'.join(path)} already has an adapter")
            lead, (n_in, n_out) = kernel_shape(layer)
            bound = 1.0 / math.sqrt(n_in)
            a = jax.random.uniform(k, (*lead, n_in, adapter.r), jnp.float32, -bound, bound)
            return {**layer, "lora_a": a, "lora_b": jnp.zeros((*lead, adapter.r, n_out), jnp.float32)}
        params = _replace(params, path, add)
    return params


def kernel_shape(layer: dict) -> tuple[tuple[int, ...], tuple[int, int]]:
    """(leading stack axes, (in, out)) of a Dense layer's kernel, plain or quantised."""
    if "kernel" in layer:
        s = tuple(layer["kernel"].shape)
    else:
        s = quant.kernel_shape(layer["kernel_q"], layer["kernel_scale"])
    return s[:-2], (s[-2], s[-1])


def prepare_base(params: dict, adapter: Adapter) -> dict:
    """The frozen base for an adapted model: the adaptable Dense kernels but the head quantised as `adapter.quant` says,
    the other matrices (kernels, embeddings) cast to `adapter.base_dtype`; norms and biases (small, and often
    trained alongside an adapter) stay as they are."""
    dt = BASE_DTYPES[adapter.base_dtype]
    out = params
    for path in dense_modules(params):
        # The head stays unquantised, as bitsandbytes leaves it: its errors land straight on the logits.
        if (adapter.quant != "none" and ADAPTABLE.match("/".join(path)) and path != ("lm_head",)
                and "kernel" in _at(params, path)):
            def q(layer):
                rest = {k: v for k, v in layer.items() if k != "kernel"}
                return {**rest, **quant.quantize(layer["kernel"], adapter.quant, adapter.quant_group)}
            out = _replace(out, path, q)
    cast = lambda p, x: x.astype(dt) if p[-1].key in ("kernel", "embedding") else x
    return jax.tree_util.tree_map_with_path(cast, out)


def build(params: dict, adapter: Adapter, key) -> dict:
    """Base params -> the params of an adapted model: `prepare_base`, then fresh adapters."""
    return add_adapters(prepare_base(params, adapter), adapter, key)


def has_adapters(params) -> bool:
    return any("lora_a" in _at(params, m) for m in dense_modules(params))


def merge(params: dict, adapter: Adapter, dtype=jnp.float32) -> dict:
    """Plain params: every adapter folded into its kernel (`W + scale * A @ B`, in float32, then `dtype`),
    every quantised kernel dequantised; the adapter leaves are gone."""
    out = params
    for path in dense_modules(params):
        def fold(layer):
            rest = {k: v for k, v in layer.items() if k not in ("kernel", "kernel_q", "kernel_scale", "lora_a",
                                                                 "lora_b")}
            w = base_kernel(layer, jnp.float32, adapter.quant)
            if "lora_a" in layer:
                w = w + adapter.scale * jnp.matmul(layer["lora_a"].astype(jnp.float32),
                                                   layer["lora_b"].astype(jnp.float32),
                                                   precision=jax.lax.Precision.HIGHEST)
            return {**rest, "kernel": w.astype(dtype)}
        out = _replace(out, path, fold)
    return out


def base_kernel(layer: dict, dtype, fmt: str) -> jax.Array:
    if "kernel" in layer:
        return layer["kernel"].astype(dtype)
    return quant.dequantize(layer["kernel_q"], layer["kernel_scale"], fmt, dtype)


def adapter_params(params: dict) -> dict:
    """Only the adapters of `params` (the tree peft's adapter_model.safetensors holds)."""
    out: dict = {}
    for path in dense_modules(params):
        layer = _at(params, path)
        if "lora_a" in layer:
            node = out
            for k in path:
                node = node.setdefault(k, {})
            node["lora_a"], node["lora_b"] = layer["lora_a"], layer["lora_b"]
    return out


def logical_axes(params: dict, base_axes: dict) -> dict:
    """Logical axis names for every leaf of an adapted params tree, from those of the base (`base_axes`:
    the model's tree of PartitionSpecs / axis tuples): A takes the kernel's input axis, B its output axis, the
    rank is never split; a quantised kernel keeps the kernel's axes; its scales the output axis and, for 4-bit
    kernels (one scale per group of input rows: shape (..., in / group, out)), the input axis on the group
    axis too, so they split over FSDP as the codes do (where the mesh divides the group count:
    `sharding.fit_spec`). int8's one row of scales per column stays whole."""
    def axes_of(path, leaf):
        *mod, name = path
        if name in ("lora_a", "lora_b", "kernel_q", "kernel_scale"):
            k = tuple(_at(base_axes, tuple(mod) + ("kernel",)))
            lead, (ax_in, ax_out) = k[:-2], k[-2:]
            groups = ax_in if name == "kernel_scale" and leaf.shape[-2] > 1 else None
            return {"lora_a": (*lead, ax_in, None), "lora_b": (*lead, None, ax_out), "kernel_q": k,
                    "kernel_scale": (*lead, groups, ax_out)}[name]
        return tuple(_at(base_axes, tuple(path)))
    return jax.tree_util.tree_map_with_path(lambda p, x: axes_of(tuple(k.key for k in p), x), params)


# -- the forward pass ---------------------------------------------------------------------------------

def _frozen_dot(x, stored: dict, fmt: str, dtype, precision, dot):
    # dtype: the module's compute dtype (None: the inputs' common type, as nn.Dense promotes)
    """x @ the kernel that `stored` holds ({"kernel"} in its storage dtype, or {"kernel_q", "kernel_scale"}),
    the kernel cast / dequantised to `dtype` here. Under `jax.checkpoint`, so what the backward pass keeps is
    x and the kernel as stored (the scanned layer's own slice), never its float copy: left to autodiff, the
    float kernel of every layer was saved for the backward pass, a float32 copy of the whole base stacked
    over the layers. The backward pass casts / dequantises the kernel again for dx; a frozen kernel gets no
    gradient (nothing asks for one), a trained one gets its own."""
    def f(x, stored):
        if "kernel" in stored:
            kernel = stored["kernel"]
            if kernel.dtype == jnp.uint16:   # a bfloat16 kernel's bits (`_bf16_bits`)
                kernel = jax.lax.bitcast_convert_type(kernel, jnp.bfloat16)
        else:
            kernel = quant.dequantize(stored["kernel_q"], stored["kernel_scale"], fmt, dtype or x.dtype)
        h, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=dtype)
        return dot(h, kernel, (((h.ndim - 1,), (0,)), ((), ())), precision=precision)
    return jax.checkpoint(f, policy=jax.checkpoint_policies.nothing_saveable)(x, stored)


def _dense(mod: nn.Dense, x, adapter: Adapter):
    """nn.Dense.__call__ with the kernel dequantised when it is stored quantised, plus the adapter's term."""
    if mod.has_variable("params", "kernel"):
        stored = {"kernel": mod.get_variable("params", "kernel")}
    else:
        stored = {k: mod.get_variable("params", k) for k in ("kernel_q", "kernel_scale")}
    bias = mod.get_variable("params", "bias") if mod.use_bias else None
    y = _frozen_dot(x, stored, adapter.quant, mod.dtype, mod.precision,
                    mod.dot_general or jax.lax.dot_general)
    if bias is not None:
        _, bias = mod.promote_dtype(x, bias, dtype=mod.dtype)
        y += jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,))
    if mod.has_variable("params", "lora_a"):
        a, b = mod.get_variable("params", "lora_a"), mod.get_variable("params", "lora_b")
        xa, a, b = mod.promote_dtype(x, a, b, dtype=mod.dtype)
        if adapter.dropout > 0 and mod.has_rng("dropout"):
            keep = jax.random.bernoulli(mod.make_rng("dropout"), 1.0 - adapter.dropout, xa.shape)
            xa = jnp.where(keep, xa / (1.0 - adapter.dropout), 0).astype(xa.dtype)
        low = jax.lax.dot_general(xa, a, (((xa.ndim - 1,), (0,)), ((), ())), precision=mod.precision)
        up = jax.lax.dot_general(low, b, (((low.ndim - 1,), (0,)), ((), ())), precision=mod.precision)
        y = y + up * jnp.asarray(adapter.scale, y.dtype)
    return y


def _bf16_bits(params: dict) -> dict:
    """`params` with the bfloat16 kernels of the adapted Dense layers viewed as their uint16 bits
    (`_frozen_dot` views them back). XLA:CPU does not slice a bfloat16 stack inside the layer loop: it converts
    the whole stack to float32 and hoists that out of the loop (measured at the 2B's widths: the LLM's and the
    ViT's MLP stacks, 6.3 GB at 28 / 32 layers). Integers are sliced as they are. The view is itself one copy
    of the bf16 stacks on XLA:CPU (3.9 GB at the 2B), half the float32 one. Only frozen kernels are stored in
    bfloat16 (the trained params are float32 master weights), so no gradient is lost to the integer view."""
    out = params
    for path in dense_modules(params):
        layer = _at(params, path)
        if "lora_a" in layer and "kernel" in layer and layer["kernel"].dtype == jnp.bfloat16:
            bits = lambda l: {**l, "kernel": jax.lax.bitcast_convert_type(l["kernel"], jnp.uint16)}
            out = _replace(out, path, bits)
    return out


def _interceptor(adapter: Adapter):
    def intercept(next_fun, args, kwargs, context):
        mod = context.module
        if (isinstance(mod, nn.Dense) and context.method_name == "__call__"
                and (mod.has_variable("params", "lora_a") or mod.has_variable("params", "kernel_q"))):
            return _dense(mod, *args, adapter=adapter)
        return next_fun(*args, **kwargs)
    return intercept


class AdaptedModule(Qwen2VLModule):
    """Qwen2VLModule over params that hold adapters and/or quantised kernels: the same params paths, the same
    methods; every `apply` (training, evaluation, generation) runs the adapted Dense layers through `_dense`."""
    adapter: Adapter = Adapter()

    def apply(self, variables, *args, **kwargs):
        if target.platform() == "cpu" and "params" in variables:
            variables = {**variables, "params": _bf16_bits(variables["params"])}
        with nn.intercept_methods(_interceptor(self.adapter)):
            return super().apply(variables, *args, **kwargs)

    def init(self, rngs, *args, **kwargs):
        """The base model's init, then `build`: the params tree an adapted model trains (boxed with logical
        axes, so the sharding and train-state code handles it as any params tree)."""
        variables = super().init(rngs, *args, **kwargs)
        boxed = variables["params"]
        is_box = lambda x: isinstance(x, nn.LogicallyPartitioned)
        axes = jax.tree.map(lambda x: x.names if is_box(x) else (None,) * x.ndim, boxed, is_leaf=is_box)
        key = rngs if not isinstance(rngs, dict) else rngs["params"]
        new = build(nn.meta.unbox(boxed), self.adapter, jax.random.fold_in(key, 0x10AA))
        new_axes = logical_axes(new, axes)
        rebox = lambda p, v: nn.LogicallyPartitioned(v, tuple(_at(new_axes, tuple(k.key for k in p))))
        return {**variables, "params": jax.tree_util.tree_map_with_path(rebox, new)}


def adapted(module: Qwen2VLModule, adapter: Adapter | None) -> Qwen2VLModule:
    """`module` as an AdaptedModule carrying `adapter` (or the plain module back for None)."""
    fields = {f.name: getattr(module, f.name) for f in dataclasses.fields(Qwen2VLModule)
              if f.name not in ("parent", "name")}
    if adapter is None:
        return Qwen2VLModule(**fields)
    return AdaptedModule(**fields, adapter=adapter)


__all__ = ["Adapter", "AdaptedModule", "AdapterError", "add_adapters", "adapted", "adapter_params", "merge",
           "prepare_base"]
