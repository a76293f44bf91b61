"""FP8 W8A8: e4m3 weights with per-output-channel f32 scales, activations quantized to e4m3 at run time.

    qw = quantize_fp8(w)                   # w [..., K, N] -> Fp8Weights(q e4m3 [..., N, K], scale f32 [..., N])
    w_hat = dequantize_fp8(qw, dtype)      # (q * scale)^T: the [..., K, N] kernel back
    y = fp8_matmul_reference(x, qw)        # x [..., K] -> [..., N]

q is stored K-major, [N, K] (W^T), unlike the int8/int4 formats' [K, N]: the fp8 GEMM (cuBLASLt on Hopper) reads
both operands with K contiguous, so XLA's fp8 dot on a [K, N] weight transposes it on every call, and HF FP8
checkpoints already store `weight` as [out, in] = [N, K], so loading and saving copy bytes without a transpose.

Weights: scale[n] = max_k |w[k, n]| / 448 (e4m3's largest finite value), q[n, k] = e4m3(w[k, n] / scale[n]).
e4m3 keeps 3 mantissa bits, so a normal value is off by at most 2^-4 of itself; values below 2^-6 * scale are
subnormal and off by at most 2^-10 * scale.

Activations: each token (row of x) gets its own scale max|x| / 448 ("dynamic"), or one calibrated `input_scale`
when the checkpoint carries it ("static"; values beyond 448 * input_scale saturate). The e4m3 x e4m3 products are
exact in f32, so the reference upcasts both operands to bf16 (exactly) and accumulates in f32, as fp8 tensor cores
do, then multiplies by the two scales.

HF FP8 checkpoints store `weight` float8_e4m3fn [out, in], `weight_scale` (a scalar, [out] or [out, 1]) and
optionally `input_scale` (a scalar); `from_hf_fp8` broadcasts the scale to [out] and keeps `weight` as it is.
This module is pure jnp; the fast paths live in kernels_pallas/fp8_matmul.py (XLA's fp8 dot and a decode kernel).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from ie_jax.quant.int8 import absmax_scale

FP8_DTYPE = jnp.float8_e4m3fn
FP8_MAX = float(jnp.finfo(FP8_DTYPE).max)  # 448


@struct.dataclass
class Fp8Weights:
    q: jax.Array  # [..., N, K] float8_e4m3fn (K-major: W^T)
    scale: jax.Array  # [..., N] f32
    input_scale: jax.Array | None = None  # [...] f32: static activation scale; None = per token


def _to_fp8(x):
    """Saturating cast to e4m3 (a plain cast would turn |x| > 448 into NaN)."""
    return jnp.clip(x, -FP8_MAX, FP8_MAX).astype(FP8_DTYPE)


def quantize_fp8(w) -> Fp8Weights:
    w = jnp.asarray(w, jnp.float32)
    if w.ndim < 2:
        raise ValueError(f"w.shape={w.shape}: expected [..., K, N]")
    scale = absmax_scale(w, -2, FP8_MAX)  # [..., N]
    return Fp8Weights(_to_fp8(jnp.swapaxes(w, -1, -2) / scale[..., None]), scale)  # q [..., N, K]


def dequantize_fp8(qw: Fp8Weights, dtype=jnp.float32) -> jax.Array:
    """The [..., K, N] kernel (as the dense Linear holds it) from q [..., N, K]."""
    return jnp.swapaxes(qw.q.astype(jnp.float32) * qw.scale[..., None], -1, -2).astype(dtype)


def quantize_activations(x, input_scale=None):
    """x [..., K] -> (e4m3 [..., K], f32 scale [..., 1]): per token, or the static `input_scale` (a scalar)."""
    x32 = x.astype(jnp.float32)
    if input_scale is None:
        scale = absmax_scale(x32, -1, FP8_MAX, keepdims=True)
    else:
        scale = jnp.broadcast_to(jnp.asarray(input_scale, jnp.float32), (*x.shape[:-1], 1))
    return _to_fp8(x32 / scale), scale


def fp8_matmul_reference(x, qw: Fp8Weights, out_dtype=None) -> jax.Array:
    """x [..., K] -> [..., N]: quantize x to e4m3, e4m3 dot with f32 accumulation, rescale."""
    xq, x_scale = quantize_activations(x, qw.input_scale)
    dims = (((x.ndim - 1,), (1,)), ((), ()))  # x's K against q's K (q one [N, K] matrix)
    acc = jax.lax.dot_general(xq.astype(jnp.bfloat16), qw.q.astype(jnp.bfloat16), dims,
                              preferred_element_type=jnp.float32)  # [..., N]
    return (acc * x_scale * qw.scale).astype(out_dtype or x.dtype)


def fp8_error_bound(w, qw: Fp8Weights) -> jax.Array:
    """An upper bound on |w - dequantize_fp8(qw)| per value of w [..., K, N]: half an e4m3 ulp (relative 2^-4,
    subnormal 2^-10)."""
    w = jnp.asarray(w, jnp.float32)
    scale = qw.scale[..., None, :]  # [..., 1, N] against w's [..., K, N]
    return jnp.maximum(jnp.abs(w) * 2.0 ** -4, scale * 2.0 ** -10) * (1 + 1e-6)


def from_hf_fp8(weight, weight_scale, input_scale=None) -> Fp8Weights:
    """One HF FP8 module (numpy, one layer): weight e4m3 [out, in]; weight_scale scalar, [out] or [out, 1]."""
    weight = np.asarray(weight)
    if weight.dtype != np.dtype(FP8_DTYPE):
        raise ValueError(f"FP8 weight has dtype {weight.dtype}; expected float8_e4m3fn")
    if weight.ndim != 2:
        raise ValueError(f"FP8 weight.shape={weight.shape}: expected one [out, in] matrix")
    N = weight.shape[0]
    ws = np.asarray(weight_scale, np.float32)
    if ws.size not in (1, N):
        raise ValueError(f"FP8 weight_scale.shape={ws.shape} must be a scalar, [{N}] or [{N}, 1] for a weight of "
                         f"shape {weight.shape}")
    scale = np.broadcast_to(ws.reshape(-1), (N,)).astype(np.float32)
    s_in = None if input_scale is None else np.asarray(input_scale, np.float32).reshape(())
    if s_in is not None and np.asarray(input_scale).size != 1:
        raise ValueError(f"FP8 input_scale.shape={np.shape(input_scale)} must be a scalar")
    return Fp8Weights(np.ascontiguousarray(weight), np.ascontiguousarray(scale), s_in)  # [out, in] is our [N, K]


def to_hf_fp8(qw: Fp8Weights) -> dict[str, np.ndarray]:
    """One layer's Fp8Weights -> HF tensors (weight [out, in], weight_scale [out], input_scale when static)."""
    out = {"weight": np.ascontiguousarray(np.asarray(qw.q)), "weight_scale": np.asarray(qw.scale, np.float32)}
    if qw.input_scale is not None:
        out["input_scale"] = np.asarray(qw.input_scale, np.float32).reshape(())
    return out
