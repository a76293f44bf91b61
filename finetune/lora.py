"""LoRA as a transform on an ie_jax model: `apply_lora(model, LoraConfig(...))` wraps the chosen Linear layers in
place and `merge_lora(model)` folds the adapters back into the base kernels. The model classes never change.

A wrapped layer computes  y = base(x) + scaling * dropout(x) @ A @ B,  with A [in, r] (Kaiming-uniform, as PEFT
initialises it), B [r, out] (zeros, so a fresh adapter leaves the model exactly as it was) and scaling alpha / r
(alpha / sqrt(r) with rsLoRA). A and B are `LoRAParam`s, kept in f32 and cast to the activation dtype; they are the
only variables a LoRA run trains and hands to the optimizer.

Decoder layers are stacked (every variable has a leading layer axis [L, ...] and runs under `lax.scan`), so a
wrapper inside them holds stacked factors A [L, in, r], B [L, r, out] and each scanned layer sees its own slice.
Targets are chosen by HF module name (PEFT semantics: a list of names matches a module whose name equals or ends
with ".name"; a string is a regex that must match the whole name; "all-linear" is every attention and MLP linear
layer). A target that selects only some of the stacked layers is refused: the layers share one traced program.

Dropout needs a fresh key each step; the trainer writes per-step keys into the `LoRADropoutKey` variables
(`reseed_dropout`). This module does not know about optimizers, files or the PEFT format (see export.py).
"""
from __future__ import annotations

import dataclasses
import math
import re

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from ie_jax.config import ModelConfig
from ie_jax.models.layers import Linear
from ie_jax.weights import rules_for


class LoRAParam(nnx.Param):
    """A trainable low-rank factor."""


class LoRADropoutKey(nnx.Variable):
    """Raw PRNG key data [..., 2] uint32 for the adapter's dropout; rewritten by the trainer every step."""


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] | str = "all-linear"
    use_rslora: bool = False
    init_lora_weights: bool = True  # False: B is random too (PEFT's switch; tests use it to get a non-zero delta)
    seed: int = 0

    def __post_init__(self):
        if self.r <= 0:
            raise ValueError(f"r={self.r} must be a positive integer")
        if self.alpha <= 0:
            raise ValueError(f"alpha={self.alpha} must be > 0")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout={self.dropout} must be in [0, 1)")
        if isinstance(self.target_modules, list):
            object.__setattr__(self, "target_modules", tuple(self.target_modules))
        if not self.target_modules:
            raise ValueError(f"target_modules={self.target_modules!r} is empty")

    @property
    def scaling(self) -> float:
        return self.alpha / math.sqrt(self.r) if self.use_rslora else self.alpha / self.r


def kernel_shape(base: nnx.Module) -> tuple[int, ...]:
    """[..., in, out] of a dense or quantized linear layer."""
    return tuple(base.kernel.shape) if hasattr(base, "kernel") else tuple(base.kernel_shape)


def kernel_axes(base: nnx.Module) -> tuple:
    if hasattr(base, "kernel"):
        return tuple(base.kernel.get_metadata().get("axes") or (None, None))
    return tuple(base.kernel_axes)


def _frozen_output(base: nnx.Module, x, out_dtype):  # [..., in] -> [..., out]
    """The base layer's output, with the GEMM handing out `out_dtype` (f32 accumulation inside). Linear's own call
    returns an f32 product cast down; differentiated, that cast makes the cotangent f32 and the backward pass's
    x-gradient an f32 (TF32) GEMM on an f32 copy of the kernel. Here the cotangent stays bf16."""
    if type(base) is not Linear:
        return base(x, out_dtype=out_dtype)
    y = jnp.dot(x, base.kernel[...].astype(x.dtype), preferred_element_type=out_dtype)
    return y if base.bias is None else y + base.bias[...].astype(out_dtype)


class LoRALinear(nnx.Module):
    """base(x) + scaling * dropout(x) @ A @ B; `base` is a Linear (or a quantized one with the same call)."""

    def __init__(self, base: nnx.Module, config: LoraConfig, *, rngs: nnx.Rngs):
        shape = kernel_shape(base)
        lead, d_in, d_out = shape[:-2], shape[-2], shape[-1]
        in_axis, out_axis = kernel_axes(base)
        # PEFT: kaiming_uniform_(a=sqrt(5)) on a [r, in] weight, i.e. U(-1/sqrt(in), 1/sqrt(in)).
        bound = 1.0 / math.sqrt(d_in)
        a = jax.random.uniform(rngs.params(), (*lead, d_in, config.r), jnp.float32, -bound, bound)
        if config.init_lora_weights:
            b = jnp.zeros((*lead, config.r, d_out), jnp.float32)
        else:
            b = jax.random.uniform(rngs.params(), (*lead, config.r, d_out), jnp.float32, -bound, bound)
        self.base = base
        self.lora_a = LoRAParam(a, axes=(in_axis, None))
        self.lora_b = LoRAParam(b, axes=(None, out_axis))
        self.scaling = config.scaling
        self.dropout = config.dropout
        if config.dropout > 0:
            keys = jax.random.split(rngs.dropout(), math.prod(lead) or 1)
            self.dropout_key = LoRADropoutKey(jax.random.key_data(keys).reshape(*lead, 2))

    def __call__(self, x, out_dtype=None):  # [..., in] -> [..., out]
        # Both low-rank matmuls run in the activation dtype (f32 accumulation inside the GEMM) with the scaling folded
        # into B, so the update comes out in the output dtype and its add is a plain bf16 add XLA can fold into the
        # base GEMM's epilogue; an f32 [..., out] delta would double the traffic of the widest outputs.
        # With B = 0 the delta is an exact 0, so y is unchanged.
        out_dtype = out_dtype or x.dtype
        y = _frozen_output(self.base, x, out_dtype)
        with jax.named_scope("lora"):
            h = x
            if self.dropout > 0:
                key = jax.random.wrap_key_data(self.dropout_key[...])
                keep = jax.random.bernoulli(key, 1.0 - self.dropout, x.shape)
                h = jnp.where(keep, x / (1.0 - self.dropout), 0).astype(x.dtype)
            down = jnp.dot(h, self.lora_a[...].astype(x.dtype), preferred_element_type=x.dtype)  # [..., r]
            down = checkpoint_name(down, "lora_down")  # r values per token: always worth keeping under remat
            b = (self.scaling * self.lora_b[...]).astype(out_dtype)  # [r, out]
            return y + jnp.dot(down.astype(out_dtype), b, preferred_element_type=out_dtype)


# ----------------------------------------------------------------------------------------------------------------
# Module names and targeting


def module_names(cfg: ModelConfig) -> dict[str, str]:
    """Our module path ("layers.self_attn.q_proj") -> its HF name template ("model.layers.{layer}.self_attn.q_proj"),
    for every linear layer of the family (read off the weight table, so names stay in one place)."""
    names = {}
    for rule in rules_for(cfg):
        for hf, path in rule.expand():
            if path.endswith(".kernel") and hf.endswith(".weight"):
                names[path.removesuffix(".kernel")] = hf.removesuffix(".weight")
    return names


def _is_output_layer(path: str) -> bool:
    return path in ("lm_head",)


def _matches(target, name: str) -> bool:
    if isinstance(target, str):
        return re.fullmatch(target, name) is not None
    return any(name == t or name.endswith("." + t) for t in target)


def select_targets(model: nnx.Module, target_modules) -> list[tuple[str, ...]]:
    """Paths (attribute tuples) of the linear layers that `target_modules` selects; raises if none."""
    cfg = model.config
    names = module_names(cfg)
    linears = [(path, m) for path, m in nnx.iter_modules(model)
               if isinstance(m, Linear) or hasattr(m, "kernel_shape")]
    if any(isinstance(m, LoRALinear) for _, m in nnx.iter_modules(model)):
        raise ValueError("the model already carries LoRA adapters; merge or drop them before adding new ones")
    selected, available = [], []
    for path, module in linears:
        key = ".".join(path)
        if key not in names:
            continue
        template = names[key]
        num_layers = kernel_shape(module)[0] if "{layer}" in template else None
        available.append(template.format(layer=0) if num_layers else template)
        if target_modules == "all-linear":
            if not _is_output_layer(key):
                selected.append(path)
            continue
        layer_names = [template.format(layer=i) for i in range(num_layers)] if num_layers else [template]
        hits = [i for i, n in enumerate(layer_names) if _matches(target_modules, n)]
        if hits and len(hits) != len(layer_names):
            raise ValueError(f"target_modules={target_modules!r} selects layers {hits} of {template!r} but not all "
                             f"{len(layer_names)}; stacked layers take an adapter on every layer or none")
        if hits:
            selected.append(path)
    if not selected:
        raise ValueError(f"target_modules={target_modules!r} matched no linear layer; the model's linear layers "
                         f"are {available}")
    return selected


def _get(model, path):
    for p in path:
        model = getattr(model, p)
    return model


def _set(model, path, value):
    setattr(_get(model, path[:-1]), path[-1], value)


def apply_lora(model: nnx.Module, config: LoraConfig) -> list[str]:
    """Wrap the targeted linear layers of `model` in place; returns the wrapped module paths."""
    rngs = nnx.Rngs(params=config.seed, dropout=config.seed + 1)
    paths = select_targets(model, config.target_modules)
    for path in paths:
        _set(model, path, LoRALinear(_get(model, path), config, rngs=rngs))
    return [".".join(p) for p in paths]


def lora_modules(model: nnx.Module) -> list[tuple[str, LoRALinear]]:
    """(module path, wrapper) for every adapter in the model, in a stable order."""
    return sorted(((".".join(p), m) for p, m in nnx.iter_modules(model) if isinstance(m, LoRALinear)),
                  key=lambda t: t[0])


def lora_delta(module: LoRALinear) -> jax.Array:
    """scaling * A @ B in f32: [..., in, out], the update the adapter adds to the kernel."""
    return module.scaling * jnp.einsum("...ir,...ro->...io", module.lora_a[...], module.lora_b[...])


def merge_lora(model: nnx.Module) -> nnx.Module:
    """Fold every adapter into its base kernel (in the base dtype) and unwrap it, in place. A quantized base is
    dequantized first (`dense()`), so the merged model is plain dense."""
    for path, module in lora_modules(model):
        base = module.base if hasattr(module.base, "kernel") else module.base.dense()
        kernel = base.kernel[...]
        base.kernel.set_value((kernel.astype(jnp.float32) + lora_delta(module)).astype(kernel.dtype))
        _set(model, tuple(path.split(".")), base)
    return model


def set_dropout(model: nnx.Module, rate: float) -> None:
    """Set the dropout rate of every adapter that has a dropout key (0 for evaluation)."""
    for _, module in lora_modules(model):
        if hasattr(module, "dropout_key"):
            module.dropout = rate


def reseed_dropout(state: nnx.State, key: jax.Array) -> nnx.State:
    """Fresh dropout keys for every `LoRADropoutKey` in `state` (one per module and stacked layer), from `key`."""
    leaves, treedef = jax.tree.flatten(state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    out = []
    for i, var in enumerate(leaves):
        if isinstance(var, LoRADropoutKey):
            shape = var.shape[:-1]
            keys = jax.random.split(jax.random.fold_in(key, i), math.prod(shape) or 1)
            var = var.replace(jax.random.key_data(keys).reshape(*shape, 2))
        out.append(var)
    return jax.tree.unflatten(treedef, out)
