"""Quantized Linear layers with the call contract of `ie_jax.models.layers.Linear`: x [..., in] -> [..., out].

    Int8Linear   W8A16  q int8 [out, in], scale f32 [out]                      (kernels_pallas PackedInt8)
    Int4Linear   W4A16  q int4 [out, in] (the 0..15 value minus 8), scales f16 / zeros uint8 [in/G, out],
                        perm int32 [in] (act-order)                             (kernels_pallas PackedInt4)
    Fp8Linear    W8A8   q e4m3 [out, in], scale f32 [out], input_scale f32 [] (static activation scale)

Every q is held K-major, [out, in]: the layout the decode kernel streams (kernels_pallas/quant_matmul.py: int4 two
values per byte) and cuBLASLt's fp8 GEMM reads. It is built once, when the layer is made (random init,
`quantize_model`) or loaded (ie_jax/quant/checkpoint.py's `repack`); calls never repack. The int4 scales and zero
points are the format's own, so the layer unpacks to Int4Weights exactly and exports the AWQ / GPTQ tensors it
was loaded from.

The quantized arrays are `QuantData` variables: frozen (never an `nnx.Param`, so no optimizer or LoRA transform
trains them) but carrying the same `axes` metadata as the dense kernel, so ie_jax/sharding.py places them the same
way (q carries the axes reversed; scales follow the out axis; `perm` is replicated). Stacked layers
hold every array with a leading layer axis [L, ...]; under the layer scan each layer sees its own slice. The bias,
when present, stays a dense `nnx.Param`. The matmul itself is `kernels_pallas.ops.quant_matmul`.

    make_linear(..., quant=cfg.quantization)    # ie_jax/models/layers.py: random weights in the format
    quantize_model(model, "int8" | "awq" | "fp8", group_size=128)   # a float model's projections, in place

Only the attention and MLP projections are quantized; the output projection (the layer with a "vocab" axis),
embeddings and norms stay in the model dtype, as AutoAWQ and GPTQ leave them. AWQ's activation-aware scaling is
folded into the float model before `quantize_model` (ie_jax/quant/awq.py); here int4 is round-to-nearest.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from ie_jax.config import QuantConfig
from ie_jax.quant.fp8 import Fp8Weights, dequantize_fp8, quantize_fp8
from ie_jax.quant.int4 import quantize_int4
from ie_jax.quant.int8 import quantize_int8
from kernels_pallas.ops import quant_matmul
from kernels_pallas.quant_matmul import PackedInt4, PackedInt8, dequantize_packed, pack_int4, pack_int8

# Names `quantize_model` accepts -> the checkpoint method they produce (int4 round-to-nearest is saved as AWQ GEMM).
METHODS = {"int8": "int8", "awq": "awq", "int4": "awq", "int4-rtn": "awq", "fp8": "fp8"}


class QuantData(nnx.Variable):
    """Frozen quantized storage (codes, scales, zero points, permutations): never a Param, never trained."""


def _per_layer(fn, kernel):
    """fn over each [K, N] matrix of kernel [..., K, N], one at a time (temporaries stay one layer large)."""
    if kernel.ndim == 2:
        return fn(kernel)
    lead = kernel.shape[:-2]
    flat = kernel.reshape(-1, *kernel.shape[-2:])
    parts = [fn(flat[i]) for i in range(flat.shape[0])]
    return jax.tree.map(lambda *xs: jnp.stack(xs).reshape(*lead, *xs[0].shape), *parts)


# One jitted quantizer per format, quantizing and packing one matrix (shared, so each matrix shape compiles once).
_quantize_int8 = jax.jit(lambda w: pack_int8(quantize_int8(w)))
_quantize_int4 = jax.jit(lambda w, group_size: pack_int4(quantize_int4(w, group_size)), static_argnames="group_size")
_quantize_fp8 = jax.jit(quantize_fp8)


def _random_kernel(rngs: nnx.Rngs, shape):
    return 0.02 * jax.random.normal(rngs.params(), shape, jnp.float32)  # the dense Linear's init


class QuantLinear(nnx.Module):
    """What the three formats share: bias, call, the LoRA-facing `kernel_shape` / `kernel_axes`, and `dense()`."""

    def _init_common(self, *, axes, dtype, bias: nnx.Param | None, quant: QuantConfig):
        self.kernel_axes = tuple(axes)
        self.dtype = dtype
        self.bias = bias
        self.quant = quant

    @property
    def kernel_shape(self) -> tuple[int, ...]:
        """[..., in, out] of the dense kernel (with the stacked layer axis when there is one); q is [..., out, in]."""
        *lead, out_features, in_features = self.q.shape
        return (*lead, in_features, out_features)

    def weights(self):
        raise NotImplementedError

    def dequantize(self, dtype=None) -> jax.Array:
        raise NotImplementedError

    def __call__(self, x, out_dtype=None):  # [..., in] -> [..., out]
        out_dtype = out_dtype or x.dtype
        if self.bias is None:
            return quant_matmul(x, self.weights(), out_dtype=out_dtype)
        y = quant_matmul(x, self.weights(), out_dtype=jnp.float32) + self.bias[...].astype(jnp.float32)
        return y.astype(out_dtype)

    def dense(self):
        """A plain Linear holding the dequantized kernel (the model dtype), sharing this layer's bias."""
        from ie_jax.models.layers import Linear
        lin = nnx.eval_shape(lambda: Linear(1, 1, bias=self.bias is not None, axes=self.kernel_axes,
                                            dtype=self.dtype, rngs=nnx.Rngs(0)))
        lin.kernel = nnx.Param(self.dequantize(self.dtype), axes=self.kernel_axes)
        lin.bias = self.bias
        return lin

    @classmethod
    def random(cls, in_features: int, out_features: int, *, bias: bool, axes, dtype, rngs: nnx.Rngs,
               quant: QuantConfig):
        """The dense Linear's N(0, 0.02) init, quantized (`--load-format dummy`)."""
        b = nnx.Param(jnp.zeros((out_features,), dtype), axes=tuple(axes)[1:]) if bias else None
        return cls.from_kernel(_random_kernel(rngs, (in_features, out_features)), axes=axes, dtype=dtype, bias=b,
                               quant=quant)

    @classmethod
    def from_linear(cls, linear, quant: QuantConfig):
        """Quantize a dense Linear (kernel [..., in, out]), sharing its bias."""
        kernel = linear.kernel[...]
        axes = linear.kernel.get_metadata().get("axes") or (None, None)
        return cls.from_kernel(kernel, axes=axes, dtype=kernel.dtype, bias=linear.bias, quant=quant)

    @classmethod
    def from_kernel(cls, kernel, *, axes, dtype, bias, quant: QuantConfig):
        raise NotImplementedError


class Int8Linear(QuantLinear):
    def __init__(self, qw: PackedInt8, *, axes, dtype, bias: nnx.Param | None = None, quant: QuantConfig):
        self._init_common(axes=axes, dtype=dtype, bias=bias, quant=quant)
        self.q = QuantData(qw.q, axes=tuple(axes)[::-1])  # [..., out, in] int8
        self.scale = QuantData(qw.scale, axes=tuple(axes)[1:])  # [..., out] f32

    @classmethod
    def from_kernel(cls, kernel, *, axes, dtype, bias, quant):
        return cls(_per_layer(_quantize_int8, kernel), axes=axes, dtype=dtype, bias=bias, quant=quant)

    def weights(self) -> PackedInt8:
        return PackedInt8(self.q[...], self.scale[...])

    def dequantize(self, dtype=None):
        return dequantize_packed(self.weights(), dtype or self.dtype)

    @classmethod
    def concatenate(cls, parts: list["Int8Linear"]) -> "Int8Linear":
        """One layer over the parts' output columns side by side (serving's q/k/v and gate/up fusion)."""
        q = jnp.concatenate([p.q[...] for p in parts], axis=-2)  # [..., out, in]
        scale = jnp.concatenate([p.scale[...] for p in parts], axis=-1)
        return cls(PackedInt8(q, scale), **_fused_common(parts))


class Int4Linear(QuantLinear):
    def __init__(self, qw: PackedInt4, *, axes, dtype, bias: nnx.Param | None = None, quant: QuantConfig):
        self._init_common(axes=axes, dtype=dtype, bias=bias, quant=quant)
        if quant.desc_act != (qw.perm is not None):
            raise ValueError(f"desc_act={quant.desc_act} needs a row permutation exactly when it is set; got "
                             f"perm={'none' if qw.perm is None else 'one'}")
        self.group_size = qw.group_size
        self.q = QuantData(qw.q, axes=tuple(axes)[::-1])  # [..., out, in] int4, the 0..15 value minus 8
        self.scales = QuantData(qw.scales, axes=tuple(axes))  # [..., in/G, out] f16
        self.zeros = QuantData(qw.zeros, axes=tuple(axes))  # [..., in/G, out] uint8
        self.perm = QuantData(qw.perm, axes=(None,)) if qw.perm is not None else None  # [..., in] int32

    @classmethod
    def from_kernel(cls, kernel, *, axes, dtype, bias, quant):
        K = kernel.shape[-2]
        group_size = K if quant.group_size == -1 else quant.group_size
        qw = _per_layer(functools.partial(_quantize_int4, group_size=group_size), kernel)
        if quant.desc_act:  # round-to-nearest has no activation order: the identity permutation
            qw = qw.replace(perm=jnp.broadcast_to(jnp.arange(K, dtype=jnp.int32), kernel.shape[:-1]))
        return cls(qw, axes=axes, dtype=dtype, bias=bias, quant=quant)

    def weights(self) -> PackedInt4:
        perm = None if self.perm is None else self.perm[...]
        return PackedInt4(self.q[...], self.scales[...], self.zeros[...], self.group_size, perm)

    def dequantize(self, dtype=None):
        return dequantize_packed(self.weights(), dtype or self.dtype)

    @classmethod
    def concatenate(cls, parts: list["Int4Linear"]) -> "Int4Linear | None":
        """One layer over the parts' output columns side by side, or None (not fusable) when the parts' act-order
        permutations differ: each part gathers its input in its own order."""
        perms = [None if p.perm is None else p.perm[...] for p in parts]
        if perms[0] is not None and any(not bool(jnp.array_equal(perms[0], p)) for p in perms[1:]):
            return None
        if len({p.group_size for p in parts}) > 1:
            return None
        q = jnp.concatenate([p.q[...] for p in parts], axis=-2)  # [..., out, in]
        scales = jnp.concatenate([p.scales[...] for p in parts], axis=-1)
        zeros = jnp.concatenate([p.zeros[...] for p in parts], axis=-1)
        return cls(PackedInt4(q, scales, zeros, parts[0].group_size, perms[0]), **_fused_common(parts))


def _fused_common(parts) -> dict:
    """The constructor arguments (but the weights) of the fusion of `parts`. As for the dense Linear, the output
    axis loses its sharding name: a split of the concatenation is not a split of each part."""
    axes = parts[0].kernel_axes[:-1] + (None,)
    bias = None
    if parts[0].bias is not None:
        bias = nnx.Param(jnp.concatenate([p.bias[...] for p in parts], axis=-1), axes=(None,))
    return dict(axes=axes, dtype=parts[0].dtype, bias=bias, quant=parts[0].quant)


class Fp8Linear(QuantLinear):
    """q is held [out, in] (see ie_jax/quant/fp8.py), so its axes are the dense kernel's reversed."""

    def __init__(self, qw: Fp8Weights, *, axes, dtype, bias: nnx.Param | None = None, quant: QuantConfig):
        self._init_common(axes=axes, dtype=dtype, bias=bias, quant=quant)
        if (quant.activation_scheme == "static") != (qw.input_scale is not None):
            raise ValueError(f"activation_scheme={quant.activation_scheme!r} needs an input_scale exactly when it is "
                             f"'static'")
        self.q = QuantData(qw.q, axes=tuple(axes)[::-1])  # [..., out, in] e4m3
        self.scale = QuantData(qw.scale, axes=tuple(axes)[1:])  # [..., out] f32
        self.input_scale = QuantData(qw.input_scale, axes=()) if qw.input_scale is not None else None  # [...]

    @classmethod
    def from_kernel(cls, kernel, *, axes, dtype, bias, quant):
        qw = _per_layer(_quantize_fp8, kernel)
        if quant.activation_scheme == "static":  # no calibration here: a unit scale (activations within +-448)
            qw = qw.replace(input_scale=jnp.ones(kernel.shape[:-2], jnp.float32))
        return cls(qw, axes=axes, dtype=dtype, bias=bias, quant=quant)

    def weights(self) -> Fp8Weights:
        return Fp8Weights(self.q[...], self.scale[...], None if self.input_scale is None else self.input_scale[...])

    def dequantize(self, dtype=None):
        return dequantize_fp8(self.weights(), dtype or self.dtype)

    @classmethod
    def concatenate(cls, parts: list["Fp8Linear"]) -> "Fp8Linear | None":
        """One layer over the parts' output columns side by side, or None (not fusable) when their static input
        scales differ: one fused GEMM quantizes its input once."""
        scales = [None if p.input_scale is None else p.input_scale[...] for p in parts]
        if scales[0] is not None and any(not bool(jnp.array_equal(scales[0], s)) for s in scales[1:]):
            return None
        q = jnp.concatenate([p.q[...] for p in parts], axis=-2)  # [..., out, in]
        scale = jnp.concatenate([p.scale[...] for p in parts], axis=-1)
        return cls(Fp8Weights(q, scale, scales[0]), **_fused_common(parts))


LINEAR_CLASSES = {"int8": Int8Linear, "awq": Int4Linear, "gptq": Int4Linear, "fp8": Fp8Linear}


def linear_class(quant: QuantConfig) -> type[QuantLinear]:
    return LINEAR_CLASSES[quant.method]


# ----------------------------------------------------------------------------------------------------------------
# Whole models


def quant_config(method: str, group_size: int = 128) -> QuantConfig:
    """The QuantConfig `quantize_model` produces for a method name (see METHODS)."""
    if method not in METHODS:
        raise ValueError(f"{method=} is not supported; expected one of {sorted(METHODS)} (GPTQ checkpoints load but "
                         f"are not produced here)")
    m = METHODS[method]
    return QuantConfig(m, 4 if m == "awq" else 8, group_size if m == "awq" else None)


def _is_quantizable(module) -> bool:
    from ie_jax.models.layers import Linear
    return type(module) is Linear and "vocab" not in (module.kernel.get_metadata().get("axes") or ())


def convert_linears(model: nnx.Module, quant: QuantConfig) -> list[str]:
    """Replace every dense projection Linear of `model` by its quantized class, in place, and record `quant` in
    model.config. Projections that are already quantized are left alone. Returns the converted paths."""
    config = dataclasses.replace(model.config, quantization=quant)  # validates (e.g. refuses gpt2)
    converted = []
    for path, module in list(nnx.iter_modules(model)):
        if not path or not _is_quantizable(module):
            continue
        parent = model
        for p in path[:-1]:
            parent = getattr(parent, p)
        setattr(parent, path[-1], linear_class(quant).from_linear(module, quant))
        converted.append(".".join(map(str, path)))
    model.config = config
    return converted


def quantize_model(model: nnx.Module, method: str | QuantConfig, group_size: int = 128) -> nnx.Module:
    """Quantize a float model's attention/MLP projections in place (round-to-nearest); returns the model.

    `method`: "int8", "awq" (int4, asymmetric groups of `group_size` rows; also "int4" / "int4-rtn"), "fp8", or a
    QuantConfig. AWQ's scale search and folding, when wanted, happen before this on the float model.
    """
    if model.config.quantization is not None:
        raise ValueError(f"the model is already quantized ({model.config.quantization.method}); quantize a float "
                         f"model")
    quant = method if isinstance(method, QuantConfig) else quant_config(method, group_size)
    if quant.method == "gptq":
        raise ValueError("method='gptq' is a checkpoint format that loads but is not produced here; use 'awq'")
    if not convert_linears(model, quant):
        raise ValueError("the model has no dense projection Linear to quantize")
    return model
