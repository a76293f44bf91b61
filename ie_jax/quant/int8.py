"""W8A16: int8 weights with one symmetric f32 scale per output channel.

    qw = quantize_int8(w)                  # w [..., K, N] (in, out: our Linear's kernel layout)
    w_hat = dequantize_int8(qw, dtype)     # q * scale, [..., K, N]
    y = int8_matmul_reference(x, qw)       # x [..., K] -> [..., N]

scale[n] = max_k |w[k, n]| / 127 and q = round(w / scale), so |w - w_hat| <= scale / 2 everywhere (-128 is never
used; a column of zeros gets scale 1 and q = 0). Leading axes (a stacked layer axis) are batch axes.

Because the scale is per output channel it factors out of the dot product: the reference multiplies the int8
values (exact in bf16) by x with f32 accumulation and scales the result, which is also what a kernel does. This
module is pure jnp; it knows nothing about layers or checkpoints.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

INT8_MAX = 127


@struct.dataclass
class Int8Weights:
    q: jax.Array  # [..., K, N] int8
    scale: jax.Array  # [..., N] f32


def absmax_scale(x, axis: int, qmax: float, keepdims: bool = False) -> jax.Array:
    """Symmetric scale max|x| / qmax along `axis` (f32); an all-zero slice gets 1 so that it quantizes to 0."""
    absmax = jnp.max(jnp.abs(x), axis=axis, keepdims=keepdims)
    return jnp.where(absmax == 0, 1.0, absmax / qmax)


def quantize_int8(w) -> Int8Weights:
    """Symmetric round-to-nearest per output channel (the last axis)."""
    w = jnp.asarray(w, jnp.float32)
    if w.ndim < 2:
        raise ValueError(f"w.shape={w.shape}: expected [..., K, N]")
    scale = absmax_scale(w, -2, INT8_MAX)  # [..., N]
    q = jnp.clip(jnp.round(w / scale[..., None, :]), -INT8_MAX, INT8_MAX).astype(jnp.int8)
    return Int8Weights(q, scale.astype(jnp.float32))


def dequantize_int8(qw: Int8Weights, dtype=jnp.float32) -> jax.Array:
    """[..., K, N] in `dtype` (computed in f32)."""
    return (qw.q.astype(jnp.float32) * qw.scale[..., None, :]).astype(dtype)


def int8_matmul_reference(x, qw: Int8Weights, out_dtype=None) -> jax.Array:
    """x [..., K] @ dequantize(qw) -> [..., N]: int8 values in x's dtype, f32 accumulation, scale after the dot."""
    y = jnp.dot(x, qw.q.astype(x.dtype), preferred_element_type=jnp.float32) * qw.scale
    return y.astype(out_dtype or x.dtype)


def random_int8(key, shape, *, std: float = 0.02) -> Int8Weights:
    """Int8 of N(0, std) weights of `shape` [..., K, N]: dummy weights for benchmarks."""
    return quantize_int8(std * jax.random.normal(key, shape, jnp.float32))
