"""Per-(token, kv-head) fp8 quantization of the decode queries, one kernel (Pallas, Triton lowering).

For an fp8 (e4m3) cache the decode-tile attention (paged_decode.py) takes q in e4m3 with one scale per token and
kv-head. As jnp, XLA runs that as three small kernels (the amax reduction, the scale's select, the scaled
convert), each a launch for a few KiB. Here one kernel does all of it: program (token t, kv-head k) loads that
kv-head's G = N / K query heads [G, H], scales them by q_scale[k] in f32, takes the amax of the block, and stores
the e4m3 block and its scale amax / 448 (1 for an all-zero block).

The arithmetic is the reference's, in its order (x = q * q_scale in f32; s = amax / 448 or 1; x / s rounded to
e4m3, round to nearest even), so the interpreter reproduces it bit for bit; the `gpu` test asks the same of the
H200.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from kernels_pallas.kv_cache import FP8, FP8_MAX

NUM_WARPS = 1  # per (token, kv-head) program: a [G, H] block of a few KiB


def quantize_queries_reference(q, num_kv_heads, q_scale):
    """fp8 cache: q [T, N, H] times q_scale [K] (softmax scale x k_scale) in f32, quantized to e4m3 with one scale
    per (token, kv-head): amax / 448. Returns (q8 [T * N, H], scales [T, K] f32)."""
    T, N, H = q.shape
    K = num_kv_heads
    x = q.reshape(T, K, N // K, H).astype(jnp.float32) * q_scale[None, :, None, None]
    amax = jnp.max(jnp.abs(x), axis=(2, 3))  # [T, K]
    s = jnp.where(amax > 0, amax / FP8_MAX, 1.0)
    q8 = (x / s[:, :, None, None]).astype(FP8)
    return q8.reshape(T * N, H), s


def _kernel(qs_ref, q_ref, q8_ref, s_ref):
    # qs_ref [1] f32: q_scale[k]; q_ref [G, H] (q's dtype): token t's heads of kv-head k; q8_ref [G, H] e4m3;
    # s_ref [1] f32: scales[t, k]
    x = q_ref[...].astype(jnp.float32) * qs_ref[0]
    amax = jnp.max(jnp.abs(x))
    s = jnp.where(amax > 0, amax / FP8_MAX, 1.0)
    q8_ref[...] = (x / s).astype(q8_ref.dtype)
    s_ref[...] = jnp.full(s_ref.shape, s, s_ref.dtype)


def supported(q, num_kv_heads) -> bool:
    """Shapes the kernel takes: q [T, N, H] with a kv-head's G = N / K query heads and H powers of two (Triton
    blocks are powers of two), G * H at most 16384 (one program's block)."""
    if q.ndim != 3 or num_kv_heads <= 0 or q.shape[1] % num_kv_heads:
        return False
    G, H = q.shape[1] // num_kv_heads, q.shape[2]
    return G & (G - 1) == 0 and H & (H - 1) == 0 and G * H <= 16384


def check_args(q, num_kv_heads, q_scale):
    if q.ndim != 3:
        raise ValueError(f"{q.shape=} must be [T, N, H]")
    if num_kv_heads <= 0 or q.shape[1] % num_kv_heads:
        raise ValueError(f"{q.shape=}: N must be a multiple of num_kv_heads = {num_kv_heads}")
    if q_scale.shape != (num_kv_heads,):
        raise ValueError(f"{q_scale.shape=} must be [{num_kv_heads}]")


@functools.partial(jax.jit, static_argnames=("num_kv_heads", "interpret", "num_warps"))
def quantize_queries(q, num_kv_heads, q_scale, *, interpret: bool = False, num_warps: int = NUM_WARPS):
    """q [T, N, H] times q_scale [K] in f32, quantized to e4m3 with one scale per (token, kv-head): amax / 448
    (1 where the block is all zeros). Returns (q8 [T * N, H] e4m3, scales [T, K] f32), as
    `quantize_queries_reference`, which shapes the kernel does not take (`supported`) fall back to."""
    q_scale = jnp.asarray(q_scale, jnp.float32)
    check_args(q, num_kv_heads, q_scale)
    if not supported(q, num_kv_heads):
        return quantize_queries_reference(q, num_kv_heads, q_scale)
    T, N, H = q.shape
    K = num_kv_heads
    G = N // K
    heads = pl.BlockSpec((None, G, H), lambda t, k: (t, k, 0))  # q heads [kG, (k+1)G) of token t
    params = {}
    if not interpret:
        from jax.experimental.pallas import triton as pltriton
        params = {"compiler_params": pltriton.CompilerParams(num_warps=num_warps, num_stages=1)}
    q8, s = pl.pallas_call(
        _kernel,
        out_shape=(jax.ShapeDtypeStruct((T, N, H), FP8), jax.ShapeDtypeStruct((T, K), jnp.float32)),
        grid=(T, K),
        in_specs=[pl.BlockSpec((1,), lambda t, k: (k,)), heads],
        out_specs=(heads, pl.BlockSpec((None, 1), lambda t, k: (t, k))),
        interpret=interpret,
        **params,
    )(q_scale, q)
    return q8.reshape(T * N, H), s
