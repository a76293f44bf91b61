"""QLoRA's frozen base: linear layers stored in NF4 with double quantization (ie_jax/quant/nf4.py), computed in the
activation dtype (bf16 in training), with LoRA on top (`apply_lora` wraps an `NF4Linear` like a dense one).

    quantize_base(model)                 # dense Linear -> NF4Linear, in place (targets as in LoraConfig)
    apply_lora(model, LoraConfig(...))   # then train only the adapters

Each scanned layer dequantizes its own [in, out] slice right before the matmul; XLA fuses the unpack and scale into
the producer of the matmul operand, so a full-precision copy of the whole model never exists. (A Pallas kernel that
fuses dequantization into the matmul itself would plug in here; none exists yet.) The embedding and output layer
stay dense, as in QLoRA. This module knows nothing of optimizers or data.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from finetune.lora import LoRALinear, _get, _set, select_targets
from ie_jax.models import build_model
from ie_jax.models.layers import Linear
from ie_jax.quant.nf4 import NF4Array, dequantize_nf4, quantize_nf4


class NF4Data(nnx.Variable):
    """Frozen quantized storage (uint8 codes, int8 / f32 block scales): never a Param, never trained."""


class NF4Linear(nnx.Module):
    """y = x @ dequantize(kernel) (+ bias); the kernel [..., in, out] is held as NF4 + double quantization."""

    def __init__(self, q: NF4Array, *, axes: tuple, dtype, bias: nnx.Param | None = None):
        self.codes = NF4Data(q.codes)
        self.absmax_q = NF4Data(q.absmax_q)
        self.absmax_scale = NF4Data(q.absmax_scale)
        self.absmax_offset = NF4Data(q.absmax_offset)
        self.kernel_shape = tuple(q.codes.shape[:-1]) + q.shape  # [..., in, out] (with a stacked layer axis)
        self.kernel_axes = tuple(axes)
        self.matrix_shape, self.block_size, self.scale_block_size = q.shape, q.block_size, q.scale_block_size
        self.compute_dtype = dtype
        self.bias = bias  # frozen, dense

    @classmethod
    def from_linear(cls, base: Linear, *, block_size: int = 64) -> "NF4Linear":
        kernel = base.kernel[...]
        q = _quantize_per_layer(kernel, block_size) if kernel.ndim == 3 else quantize_nf4(kernel, block_size=block_size)
        return cls(q, axes=base.kernel.get_metadata().get("axes") or (None, None), dtype=kernel.dtype, bias=base.bias)

    def nf4(self) -> NF4Array:
        return NF4Array(self.codes[...], self.absmax_q[...], self.absmax_scale[...], self.absmax_offset[...],
                        self.matrix_shape, self.block_size, self.scale_block_size)

    def __call__(self, x, out_dtype=None):  # [..., in] -> [..., out]
        # The GEMM accumulates in f32 but hands out the output dtype, so its cotangent, and the backward pass's
        # x-gradient GEMM, stay in bf16 (an f32 output would make the backward an f32 GEMM on an f32 copy of w).
        out_dtype = out_dtype or x.dtype
        w = dequantize_nf4(self.nf4(), x.dtype)  # [in, out] (one scanned layer's slice)
        y = jnp.dot(x, w, preferred_element_type=out_dtype)
        if self.bias is not None:
            y = y + self.bias[...].astype(out_dtype)
        return y

    def dense(self) -> Linear:
        """A plain Linear holding the dequantized kernel (in the original dtype), sharing this layer's bias."""
        kernel = dequantize_nf4(self.nf4(), self.compute_dtype)
        lin = nnx.eval_shape(lambda: Linear(1, 1, bias=False, axes=self.kernel_axes, dtype=self.compute_dtype,
                                            rngs=nnx.Rngs(0)))
        lin.kernel = nnx.Param(kernel, axes=self.kernel_axes)
        lin.bias = self.bias
        return lin


@functools.partial(jax.jit, static_argnums=1)
def _quantize_one(w, block_size):
    return quantize_nf4(w, block_size=block_size)


def _stack(parts: list[NF4Array]) -> NF4Array:
    return jax.tree.map(lambda *xs: jnp.stack(xs), *parts)


def _quantize_per_layer(kernel, block_size: int) -> NF4Array:
    """Quantize a stacked kernel [L, in, out] one layer at a time (temporaries stay one layer large)."""
    return _stack([_quantize_one(kernel[i], block_size) for i in range(kernel.shape[0])])


def random_nf4(key, shape, dtype, *, std: float = 0.02, block_size: int = 64) -> NF4Array:
    """NF4 of N(0, std) weights [L, in, out] made one layer at a time: dummy weights for benchmarks, without a
    dense copy of the model ever existing."""
    make = jax.jit(lambda k: quantize_nf4((std * jax.random.normal(k, shape[1:], jnp.float32)).astype(dtype),
                                          block_size=block_size))
    return _stack([make(k) for k in jax.random.split(key, shape[0])])


def quantize_base(model: nnx.Module, target_modules="all-linear", *, block_size: int = 64) -> list[str]:
    """Replace the targeted dense linear layers by NF4Linear, in place; returns their paths.

    Call this before `apply_lora` (an adapter wraps whatever base it finds).
    """
    if any(isinstance(m, LoRALinear) for _, m in nnx.iter_modules(model)):
        raise ValueError("quantize_base must run before apply_lora (the model already has adapters)")
    paths = select_targets(model, target_modules)
    for path in paths:
        base = _get(model, path)
        if not isinstance(base, Linear):
            raise ValueError(f"{'.'.join(path)} is a {type(base).__name__}, not a dense Linear; cannot quantize")
        _set(model, path, NF4Linear.from_linear(base, block_size=block_size))
    return [".".join(p) for p in paths]


def init_nf4_model(cfg, *, dtype=jnp.bfloat16, seed: int = 0, target_modules="all-linear") -> nnx.Module:
    """A model with random weights whose targeted linear layers are NF4 from the start (`--load-format dummy` for
    QLoRA benchmarks): only the embedding, norms and output layer are ever dense."""
    model = nnx.eval_shape(lambda: build_model(cfg, dtype=dtype, rngs=nnx.Rngs(seed)))
    key = jax.random.key(seed)
    for i, path in enumerate(select_targets(model, target_modules)):
        abstract = _get(model, path)
        shape = tuple(abstract.kernel.shape)
        q = random_nf4(jax.random.fold_in(key, i), shape, dtype) if len(shape) == 3 else \
            _quantize_one((0.02 * jax.random.normal(jax.random.fold_in(key, i), shape)).astype(dtype), 64)
        bias = None if abstract.bias is None else nnx.Param(jnp.zeros(abstract.bias.shape, dtype),
                                                            **abstract.bias.get_metadata())
        _set(model, path, NF4Linear(q, axes=abstract.kernel.get_metadata().get("axes") or (None, None),
                                    dtype=dtype, bias=bias))
    # Every remaining abstract parameter gets random values (norm weights: ones), one array at a time.
    graphdef, state = nnx.split(model)
    leaves, treedef = jax.tree.flatten(state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    filled = []
    for j, var in enumerate(leaves):
        value = var.get_value()
        if isinstance(value, jax.ShapeDtypeStruct):
            is_norm = var.get_metadata().get("axes") == ("norm",)
            make = jax.jit(lambda k, s=value.shape, d=value.dtype, n=is_norm: jnp.ones(s, d) if n else
                           (0.02 * jax.random.normal(k, s, jnp.float32)).astype(d))
            var = var.replace(make(jax.random.fold_in(key, 10_000 + j)))
        filled.append(var)
    return nnx.merge(graphdef, jax.tree.unflatten(treedef, filled))


def nf4_model_bytes(model: nnx.Module) -> int:
    """Bytes of the quantized storage in `model`."""
    return sum(int(v.size) * v.dtype.itemsize for v in jax.tree.leaves(nnx.state(model, NF4Data)))
