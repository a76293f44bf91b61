"""Rotary embedding of q and k plus the paged KV write, one kernel (Pallas, Triton lowering), for decode steps.

In a batch-1 decode layer XLA runs two small kernels between the q/k/v GEMM and attention: the KV cache scatter
(k's rope fused into it, 3.0 µs on the H200) and q's rope (1.4 µs). Both move a few KiB; their cost is launch and
latency. Here one kernel does both: program (token, kv-head) rotates that kv-head's G query heads and its key, and
stores the rotated key and the value into the interleaved cache in place (the cache is aliased input to output,
so under the engine's donation nothing is copied). Padding tokens (slot -1) write nothing to the cache.
The kernel reads q, k and v straight from the fused q/k/v projection as one array, its split-K partials
[S, T, N + 2K, H] (f32, `add_norm.split_k_partials`; a bitcast of [S, T, (N + 2K) H]). It sums them and rounds to
the model's dtype (what the GEMM would have stored) before rotating. Taking q, k, v as three arrays made XLA
materialize each slice (three more kernels), and taking the GEMM's summed output left XLA's split-K reduction as
a kernel of its own (before, it was fused into the scatter and the q rope). A projection that cannot give
partials (bias, quantized, adapters) passes its output as S = 1.

The rotation is HF's "rotate_half" layout (pairs (i, i + H/2)), computed in f32 from f32 angles and rounded once.
An fp8 (e4m3) cache stores x / scale saturated to ±448, as `kv_cache.quantize` does.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from kernels_pallas.kv_cache import FP8, FP8_MAX

NUM_WARPS = 2  # per (token, kv-head) program: the fastest of 1/2/4/8 on the H200 (3.5 µs at batch 1)


def rope_reference(x, positions, inv_freq):
    """x [T, heads, H] rotated by positions [T] (HF rotate_half), in f32 and rounded once to x's dtype."""
    ang = positions.astype(jnp.float32)[:, None, None] * jnp.asarray(inv_freq, jnp.float32)  # [T, 1, H/2]
    cos, sin = jnp.cos(ang), jnp.sin(ang)
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def rope_write_kv_reference(parts, num_kv_heads, positions, inv_freq, cache, layer, slot_mapping, k_scale=None,
                            v_scale=None, *, dtype=None):
    """The same as jnp: (rotated q [T, N, H], the interleaved cache [2L, K, P, page_size, H] with layer `layer`'s
    rotated k and v written at slot_mapping). parts [S, T, N + 2K, H]: summed and rounded to `dtype` (default
    parts' dtype) first."""
    from kernels_pallas import ops
    qkv = parts.astype(jnp.float32).sum(0).astype(dtype or parts.dtype)
    N = qkv.shape[1] - 2 * num_kv_heads
    q, k, v = jnp.split(qkv, [N, N + num_kv_heads], axis=1)
    k = rope_reference(k, positions, inv_freq)
    cache, _ = ops.write_kv_reference(cache, None, layer, k, v, slot_mapping, k_scale=k_scale, v_scale=v_scale)
    return rope_reference(q, positions, inv_freq), cache


def supported(parts, num_kv_heads, cache, dtype) -> bool:
    """Shapes the kernel takes: parts [S, T, N + 2K, H] (S <= 16) rounded to a 16-bit `dtype`, the interleaved
    cache of that dtype or fp8, H a power of two of 32 to 256, and S and a kv-head's G = N / K query heads powers
    of two (Triton blocks)."""
    S, T, C, H = parts.shape
    K = num_kv_heads
    N = C - 2 * K
    G = N // K if K and N > 0 and N % K == 0 else 0
    return (cache.ndim == 5 and cache.shape[1] == K and cache.shape[4] == H and H & (H - 1) == 0
            and 32 <= H <= 256 and G > 0 and G & (G - 1) == 0 and S & (S - 1) == 0 and S <= 16
            and dtype in (jnp.bfloat16, jnp.float16) and cache.dtype in (dtype, FP8))


def check_args(parts, num_kv_heads, positions, slot_mapping, cache):
    if parts.ndim != 4:
        raise ValueError(f"{parts.shape=} must be [S, T, N + 2K, H]")
    S, T, C, H = parts.shape
    K = num_kv_heads
    if C <= 2 * K or (C - 2 * K) % K:
        raise ValueError(f"{parts.shape=} must be [S, T, N + 2K, H] with N a multiple of K = {K}")
    if positions.shape != (T,) or slot_mapping.shape != (T,) or slot_mapping.dtype != jnp.int32:
        raise ValueError(f"{positions.shape=} and {slot_mapping.shape=} {slot_mapping.dtype=} must be int32 [{T}]")
    if cache.ndim != 5 or cache.shape[1] != K or cache.shape[4] != H or cache.shape[0] % 2:
        raise ValueError(f"{cache.shape=} must be the interleaved [2L, {K}, P, page_size, {H}]")


def _kernel(pos_ref, slot_ref, layer_ref, inv_ref, *refs, half, page_size, fp8):
    # q_ref [S, G, H], k_ref, v_ref [S, H]: blocks of the same partials array
    if fp8:
        ks_ref, vs_ref, q_ref, k_ref, v_ref, _, q_out_ref, cache_ref = refs
    else:
        q_ref, k_ref, v_ref, _, q_out_ref, cache_ref = refs
    kh = pl.program_id(1)
    ang = pos_ref[0].astype(jnp.float32) * inv_ref[...]  # [H/2]
    cos, sin = jnp.cos(ang), jnp.sin(ang)

    def value(x):  # [S, ...] partials -> their sum rounded to the model's dtype, in f32
        return jnp.sum(x.astype(jnp.float32), axis=0).astype(q_out_ref.dtype).astype(jnp.float32)

    def rotate(x1, x2):  # the two halves of [S, ..., H] -> the rotated halves in f32
        x1, x2 = value(x1), value(x2)
        return x1 * cos - x2 * sin, x2 * cos + x1 * sin

    q1, q2 = rotate(q_ref[:, :, :half], q_ref[:, :, half:])  # [G, H/2] each
    q_out_ref[:, :half] = q1.astype(q_out_ref.dtype)
    q_out_ref[:, half:] = q2.astype(q_out_ref.dtype)

    slot = slot_ref[0]

    @pl.when(slot >= 0)
    def _():
        page, offset, layer = slot // page_size, slot % page_size, layer_ref[0]

        def store(entry, lo, hi, scale_ref):
            if fp8:  # rounded to q's dtype first, as the model's k and v are, then x / scale saturated
                s = scale_ref[layer, kh]
                lo, hi = (jnp.clip(x.astype(q_out_ref.dtype).astype(jnp.float32) / s, -FP8_MAX, FP8_MAX)
                          for x in (lo, hi))
            cache_ref[entry, kh, page, offset, :half] = lo.astype(cache_ref.dtype)
            cache_ref[entry, kh, page, offset, half:] = hi.astype(cache_ref.dtype)

        k1, k2 = rotate(k_ref[:, :half], k_ref[:, half:])
        store(2 * layer, k1, k2, ks_ref if fp8 else None)
        v1, v2 = value(v_ref[:, :half]), value(v_ref[:, half:])
        store(2 * layer + 1, v1, v2, vs_ref if fp8 else None)


@functools.partial(jax.jit, static_argnames=("num_kv_heads", "dtype", "interpret", "num_warps"))
def rope_write_kv(parts, positions, inv_freq, cache, layer, slot_mapping, k_scale=None, v_scale=None, *,
                  num_kv_heads: int, dtype=None, interpret: bool = False, num_warps: int = NUM_WARPS):
    """parts [S, T, N + 2K, H]: the fused q/k/v projection before rope (q's N heads, then k's K, then v's K) as S
    split-K partials, summed and rounded to `dtype` (default parts' dtype) in the kernel; positions [T];
    inv_freq [H/2] f32; cache the interleaved [2L, K, P, page_size, H] buffer (aliased to the output: in place
    where the caller donates it); layer [] int32; slot_mapping [T] int32 (-1: padding)
    -> (rotated q [T, N, H] in `dtype`, cache). fp8 caches take k_scale, v_scale [L, K] f32 (None = 1)."""
    check_args(parts, num_kv_heads, positions, slot_mapping, cache)
    S, T, C, H = parts.shape
    dtype = jnp.dtype(dtype or parts.dtype)
    K, page_size = num_kv_heads, cache.shape[3]
    N = C - 2 * K
    G = N // K
    fp8 = cache.dtype == FP8
    scales = []
    if fp8:
        L = cache.shape[0] // 2
        ones = jnp.ones((L, K), jnp.float32)
        scales = [ones if s is None else jnp.asarray(s, jnp.float32) for s in (k_scale, v_scale)]
    elif k_scale is not None or v_scale is not None:
        raise ValueError("scales belong to an fp8 cache")
    whole = lambda x: pl.BlockSpec(x.shape, lambda t, h: (0,) * x.ndim)
    one = pl.BlockSpec((1,), lambda t, h: (t,))
    args = [positions.astype(jnp.int32), slot_mapping, jnp.reshape(layer, (1,)).astype(jnp.int32),
            jnp.asarray(inv_freq, jnp.float32), *scales, parts, parts, parts, cache]
    in_specs = [one, one, pl.BlockSpec((1,), lambda t, h: (0,)), whole(args[3]), *map(whole, scales),
                pl.BlockSpec((S, None, G, H), lambda t, h: (0, t, h, 0)),  # q heads [hG, (h+1)G): block h of G
                pl.BlockSpec((S, None, None, H), lambda t, h: (0, t, N + h, 0)),  # k head h
                pl.BlockSpec((S, None, None, H), lambda t, h: (0, t, N + K + h, 0)),  # v head h
                whole(cache)]
    params = {}
    if not interpret:
        from jax.experimental.pallas import triton as pltriton
        params = dict(compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=1))
    return pl.pallas_call(
        functools.partial(_kernel, half=H // 2, page_size=page_size, fp8=fp8),
        out_shape=(jax.ShapeDtypeStruct((T, N, H), dtype), jax.ShapeDtypeStruct(cache.shape, cache.dtype)),
        grid=(T, K),
        in_specs=in_specs,
        out_specs=(pl.BlockSpec((None, G, H), lambda t, h: (t, h, 0)), whole(cache)),
        input_output_aliases={len(args) - 1: 1},
        interpret=interpret,
        **params,
    )(*args)
