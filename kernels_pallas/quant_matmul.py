"""Weight-only quantized matmul for decode (M <= 64) in Pallas Mosaic GPU: y[M, N] = x[M, K] @ dequant(W)[K, N].

Letters: M rows of x, K the contraction dim, N output features, Mp = M rounded up to 8, S the number of K splits,
G the int4 group size (= block_k = 128 here).

Decode reads every weight byte once, so the speed-up over bf16 is the byte ratio: 2x for int8, ~3.8x for int4
(with one bf16 scale and bias per 128 weights). The kernel keeps the skinny bf16 kernel's cut
(`skinny_matmul.py`): the product is computed transposed, y^T[N, Mp] = W^T[N, K] @ x^T[K, Mp], over a grid of
(column block, K split) CTAs, each streaming its contiguous K slab through a ring of `num_stages` TMA slots.
What changes is the A operand, the weight tile [block_n, block_k], K-major:

* It arrives quantized, int8 or signed int4 (two values per byte, the value minus 8), and is widened in registers
  by Mosaic's int8/int4 -> bf16 conversions (byte permutes and a bf16 subtract around a magic exponent: no
  integer-to-float instructions, which run at a fraction of the FMA rate). int8 needs only that: its per-channel
  scale factors out of the dot and is applied to the f32 result. int4 then takes one bf16 FMA, q * scale + bias,
  with the step's group scale and bias (bias = (8 - zero) * scale) per output row.
* With `a_in_registers` the widened tile is wgmma's register A operand; otherwise it is stored to a bf16 SMEM tile
  first (the path the CPU interpreter runs, since it reads wgmma operands only from SMEM).
* The formats' own arrays (Int8Weights, Int4Weights: [K, N], int4 one byte per value, as the quantized Linear holds
  them) are also read in place: their [block_k, block_n] tile is widened into SMEM and read M-major.

Packed layouts (`pack_int8`, `pack_int4`) are made once at load time from ie_jax.quant's Int8Weights /
Int4Weights. `packed_matmul_xla` is XLA's dequantize-then-dot on them (any M); `fp8_matmul` is the W8A8 path:
XLA's fp8 dot (cuBLASLt on Hopper), not a Pallas kernel. `MEASURED_FASTER` records where the kernel beat XLA on
the H200, which `ops.quant_matmul` follows. This module knows those formats, nothing about layers or checkpoints.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
from flax import struct
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from kernels_pallas.skinny_matmul import interpret_kwargs, split_count

MAX_M = 64
GROUP = 128  # int4 group size the kernel supports (= block_k): one scale/bias row per pipeline step


@dataclasses.dataclass(frozen=True)
class TuningConfig:
    """block_n: output columns per CTA (wgmma M: 64 or 128). block_k: K per pipeline step (128: one int4 group).
    num_stages: TMA ring slots. num_splits: K splits (None: fill ~ctas_per_sm CTAs per SM). a_in_registers: feed
    the widened tile to wgmma from registers (GPU only; the interpreter always goes through SMEM)."""

    block_n: int = 128
    block_k: int = 128
    num_stages: int = 4
    num_splits: int | None = None
    ctas_per_sm: int = 2
    a_in_registers: bool = True

    def __post_init__(self):
        if self.block_n not in (64, 128):
            raise ValueError(f"{self.block_n=} must be 64 or 128")
        if self.block_k != 128:
            raise ValueError(f"{self.block_k=} must be 128 (one int4 group, one swizzle row of int8)")
        if not 1 <= self.num_stages <= 8:
            raise ValueError(f"{self.num_stages=} must be in [1, 8]")
        if self.num_splits is not None and not 1 <= self.num_splits <= 256:
            raise ValueError(f"{self.num_splits=} must be None or in [1, 256]")
        if not 1 <= self.ctas_per_sm <= 8:
            raise ValueError(f"{self.ctas_per_sm=} must be in [1, 8]")

    def splits_for(self, k: int, n: int) -> int:
        return split_count(k, n, self)


@struct.dataclass
class PackedInt8:
    q: jax.Array  # [N, K] int8 (W^T: K contiguous, the wgmma A operand's K-major layout)
    scale: jax.Array  # [N] f32


@struct.dataclass
class PackedInt4:
    q: jax.Array  # [N, K] int4 (W^T, two values per byte): the stored 0..15 value minus 8
    scale: jax.Array  # [K / G, N] bf16
    bias: jax.Array  # [K / G, N] bf16: (8 - zero) * scale, so w = q * scale + bias


def pack_int8(qw) -> PackedInt8:
    """ie_jax.quant.int8.Int8Weights (q [K, N]) -> the kernel's layout."""
    return PackedInt8(jnp.asarray(qw.q).T, jnp.asarray(qw.scale, jnp.float32))


def pack_int4(qw) -> PackedInt4:
    """ie_jax.quant.int4.Int4Weights (q [K, N] 0..15, group 128, no act-order) -> the kernel's layout."""
    if qw.group_size != GROUP or qw.perm is not None:
        raise ValueError(f"the int4 kernel needs group_size={GROUP} and no act-order permutation, got "
                         f"group_size={qw.group_size}, perm={'set' if qw.perm is not None else None}")
    q = (jnp.asarray(qw.q).astype(jnp.int8) - 8).T.astype(jnp.int4)
    scale = jnp.asarray(qw.scales, jnp.float32)
    bias = (8.0 - jnp.asarray(qw.zeros, jnp.float32)) * scale
    return PackedInt4(q, scale.astype(jnp.bfloat16), bias.astype(jnp.bfloat16))


def packed_bytes(packed) -> int:
    """HBM bytes of a packed weight (int4 counts half a byte per value)."""
    bits = {jnp.dtype(jnp.int4): 4}
    return sum(a.size * bits.get(jnp.dtype(a.dtype), 8 * jnp.dtype(a.dtype).itemsize) // 8
               for a in jax.tree.leaves(packed))


# ----------------------------------------------------------------------------------------------------------------
# Kernel


def _kernel(x_ref, w_ref, s_ref, b_ref, out_ref, x_smem, w_smem, s_smem, b_smem, a_smem, o_smem, bars, *, int4, kn,
            block_n, block_k, num_stages, k_steps, a_in_registers):
    # x_ref   [Mp, K] bf16            activations, rows padded to Mp
    # w_ref   packed: [N, K] int8 | int4 (W^T, K-major); kn: the format's own [K, N] int8 | uint8 0..15
    # s_ref, b_ref  [K/G, N]          int4 per (group, column): packed bf16 scale, bias; kn f16 scale, uint8 zero
    # out_ref [S, N, Mp] f32          per-split partial sums of y^T
    # x_smem  [stages, Mp, block_k]   x tiles (wgmma B, read transposed)
    # w_smem  [stages, block_n, block_k] (kn: [stages, block_k, block_n])  quantized weight tiles
    # s_smem, b_smem [stages, block_n]  the step's int4 scale / bias (kn: zero) rows
    # a_smem  [block_n, block_k] (kn: [block_k, block_n]) bf16  the widened tile when wgmma reads it from SMEM
    # o_smem  [block_n, Mp] f32       the CTA's partial, staged for one TMA store
    # bars    [stages]                one barrier per slot for all of its copies
    n_idx = lax.axis_index("n")
    s_idx = lax.axis_index("s")
    first_step = s_idx * k_steps
    n_cols = pl.ds(n_idx * block_n, block_n)

    def issue(step, slot):
        k_step = first_step + step
        k_cols = pl.ds(k_step * block_k, block_k)
        w_tile = w_ref.at[k_cols, n_cols] if kn else w_ref.at[n_cols, k_cols]
        plgpu.copy_gmem_to_smem(w_tile, w_smem.at[slot], bars.at[slot])
        plgpu.copy_gmem_to_smem(x_ref.at[:, k_cols], x_smem.at[slot], bars.at[slot])
        if int4:
            plgpu.copy_gmem_to_smem(s_ref.at[k_step, n_cols], s_smem.at[slot], bars.at[slot])
            plgpu.copy_gmem_to_smem(b_ref.at[k_step, n_cols], b_smem.at[slot], bars.at[slot])

    for step in range(min(num_stages, k_steps)):  # fill the ring
        issue(step, step)

    def widen(slot):
        """The slot's weight tile in bf16: [block_n, block_k], or [block_k, block_n] for kn."""
        w = w_smem[slot]
        if not kn:
            w = w.astype(jnp.bfloat16)  # exact small integers
            return w * s_smem[slot][:, None] + b_smem[slot][:, None] if int4 else w
        if not int4:
            return w.astype(jnp.bfloat16)
        q = lax.bitcast_convert_type(w, jnp.int8).astype(jnp.bfloat16)  # 0..15 (the signed cast is the fast one)
        zero = lax.bitcast_convert_type(b_smem[slot], jnp.int8).astype(jnp.bfloat16)
        scale = s_smem[slot].astype(jnp.float32).astype(jnp.bfloat16)
        return (q - zero[None, :]) * scale[None, :]

    def scope(acc_ref):  # acc_ref [block_n, Mp] f32
        def body(step, carry):
            slot = lax.rem(step, num_stages)
            plgpu.barrier_wait(bars.at[slot])
            w = widen(slot)
            # acc[N, Mp] += W^T[N, bk] @ x^T[bk, Mp]
            if a_in_registers and not kn:
                plgpu.wgmma(acc_ref, w, x_smem.at[slot].T)
            else:
                a_smem[...] = w
                plgpu.commit_smem()
                plgpu.wgmma(acc_ref, a_smem.T if kn else a_smem, x_smem.at[slot].T)
            # Wait for this wgmma before the next step: leaving it in flight (wait 1) gave wrong results with the
            # register A operand on the H200 (the next step's widening reuses its registers).
            plgpu.wgmma_wait(0)

            @pl.when(step + num_stages < k_steps)
            def _():
                issue(step + num_stages, slot)  # the slot (and a_smem) are read: refill it

            return carry

        lax.fori_loop(0, k_steps, body, None)
        o_smem[...] = acc_ref[...]

    pl.run_scoped(scope, plgpu.ACC(o_smem.shape, jnp.float32))
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(o_smem, out_ref.at[s_idx, n_cols])
    plgpu.wait_smem_to_gmem(0)


def _operands(packed):
    """(int4, kn, w [..], scale-or-None, bias/zero-or-None) of a packed weight or a format's own arrays."""
    from ie_jax.quant.int4 import Int4Weights
    from ie_jax.quant.int8 import Int8Weights
    if isinstance(packed, PackedInt8):
        return False, False, packed.q, None, None
    if isinstance(packed, PackedInt4):
        return True, False, packed.q, packed.scale, packed.bias
    if isinstance(packed, Int8Weights):
        return False, True, packed.q, None, None
    if isinstance(packed, Int4Weights):
        return True, True, packed.q, packed.scales, packed.zeros
    raise ValueError(f"weights of type {type(packed).__name__}; expected PackedInt8, PackedInt4, Int8Weights or "
                     f"Int4Weights")


def _partials(x_padded, packed, *, config, num_splits, interpret):
    int4, kn, w, scale, bias = _operands(packed)
    mp, k = x_padded.shape
    n = w.shape[1] if kn else w.shape[0]
    k_steps = k // (config.block_k * num_splits)
    bf16_tf = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
    if kn:  # [block_k, block_n] tiles, a row is block_n bytes
        w_shape, a_shape = (config.block_k, config.block_n), (config.block_k, config.block_n)
        w_tf = (plgpu.TilingTransform((8, config.block_n)), plgpu.SwizzleTransform(config.block_n))
    else:
        w_shape, a_shape = (config.block_n, config.block_k), (config.block_n, config.block_k)
        if config.a_in_registers and not interpret:
            a_shape = (8, 64)  # unused: wgmma reads the widened tile from registers
        row_bytes = config.block_k // 2 if int4 else config.block_k
        w_tf = (plgpu.TilingTransform((8, config.block_k)), plgpu.SwizzleTransform(row_bytes))
    if not int4:
        scale = bias = jnp.zeros((1, n), jnp.bfloat16)
    registers = config.a_in_registers and not interpret and not kn
    body = functools.partial(_kernel, int4=int4, kn=kn, block_n=config.block_n, block_k=config.block_k,
                             num_stages=config.num_stages, k_steps=k_steps, a_in_registers=registers)
    kernel = plgpu.kernel(
        body,
        out_type=jax.ShapeDtypeStruct((num_splits, n, mp), jnp.float32),
        scratch_types=[
            plgpu.SMEM((config.num_stages, mp, config.block_k), jnp.bfloat16, transforms=bf16_tf),
            plgpu.SMEM((config.num_stages, *w_shape), w.dtype, transforms=w_tf),
            plgpu.SMEM((config.num_stages, config.block_n), scale.dtype),
            plgpu.SMEM((config.num_stages, config.block_n), bias.dtype),
            plgpu.SMEM(a_shape, jnp.bfloat16, transforms=bf16_tf),
            plgpu.SMEM((config.block_n, mp), jnp.float32),
            plgpu.Barrier(num_arrivals=4 if int4 else 2, num_barriers=config.num_stages),
        ],
        grid=(n // config.block_n, num_splits),
        grid_names=("n", "s"),
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
        **interpret_kwargs(interpret),
    )
    return kernel(x_padded, w, scale, bias)


# ----------------------------------------------------------------------------------------------------------------
# Public wrapper


# Where the kernel was measured faster than XLA's path for the same weights on the H200
# (benchmarks/results/quant_20261123_h200.json, docs/kernels/quant_matmul.md): (int4?, format layout?) -> (the
# largest M measured faster, the config). A layout missing here stays on XLA's dequantize-then-dot. Int8Weights
# ([K, N], SMEM path) is missing: XLA's int8 dot was as fast or faster at M = 16.
_C3 = TuningConfig(num_stages=3, ctas_per_sm=3)
MEASURED_FASTER: dict[tuple[bool, bool], tuple[int, TuningConfig]] = {
    (False, False): (16, _C3),  # PackedInt8: 1.5-1.6x cuBLAS at M <= 16; level with XLA's int8 dot at 64
    (True, False): (64, _C3),  # PackedInt4: 1.7-1.9x cuBLAS at M <= 16; 4.7x XLA's int4 path at 64
    (True, True): (64, TuningConfig()),  # Int4Weights (uint8 [K, N]): 2.0-3.8x XLA's int4 path, M = 1..64
}
# XLA's fp8 dot on the Linear's K-major e4m3 q [N, K] (fp8_matmul's n_major; on a [K, N] weight XLA transposes it
# every call, 0.08-0.45x cuBLAS bf16), H200: >= 1.28x cuBLAS bf16 at M = 1 and 4096 on all four shapes and at
# M = 16 and 64 on gate_up (1.66, 1.70); at M = 16 o is level (1.02x) and down / qkv are 0.61-0.81x, still above
# the bf16-upcast reference there (0.44-0.50x). M = 256, and M = 64 beyond gate_up, were not measured.
FP8_XLA_DOT = True


def kernel_config(packed, m: int, *, forced: bool = False) -> TuningConfig | None:
    """The config `ops.quant_matmul` runs for these weights at M = m rows, or None for the XLA path. `forced`
    (backend pallas / interpret) takes the kernel wherever it applies, measured faster or not."""
    if m > MAX_M:
        return None
    try:
        int4, kn, _, _, _ = _operands(packed)
    except ValueError:
        return None
    max_m, config = MEASURED_FASTER.get((int4, kn), (0, None))
    if forced:
        return config or TuningConfig()
    return config if m <= max_m else None


def _kn(packed) -> tuple[int, int]:
    """(K, N) of the weights."""
    _, kn, w, _, _ = _operands(packed)
    return tuple(w.shape) if kn else tuple(w.shape[::-1])


def kernel_supports(x, packed, config: TuningConfig | None = None) -> bool:
    """Whether the kernel takes x [M, K] and these weights under `config` (`check_args` without the message)."""
    try:
        check_args(x, packed, config)
    except ValueError:
        return False
    return True


def check_args(x, packed, config: TuningConfig | None = None):
    """Raise ValueError unless the kernel takes x [M, K] and these weights (packed, or a format's own
    Int8Weights / Int4Weights of one matrix) under `config`."""
    config = config or TuningConfig()
    int4, kn, w, _, _ = _operands(packed)
    if w.ndim != 2 or x.ndim != 2:
        raise ValueError(f"{x.shape=} and the weights' {w.shape=} must both be 2-D")
    if kn and int4 and (packed.group_size != GROUP or packed.perm is not None):
        raise ValueError(f"the int4 kernel needs group_size={GROUP} and no act-order permutation, got "
                         f"group_size={packed.group_size}, perm={'set' if packed.perm is not None else None}")
    if kn and int4 and config.block_n < 128:  # a ring slot's uint8 zero row must fill a 128-byte TMA box
        raise ValueError(f"{config.block_n=} must be 128 for Int4Weights (the zero-point rows are bytes)")
    m, k = x.shape
    k_w, n = _kn(packed)
    if k_w != k:
        raise ValueError(f"{x.shape=} and the weights' K={k_w} disagree")
    if not 1 <= m <= MAX_M:
        raise ValueError(f"{m=} (rows of x) must be in [1, {MAX_M}]; use the dequantize-then-dot path above that")
    if x.dtype != jnp.bfloat16:
        raise ValueError(f"{x.dtype=} must be bfloat16")
    if n % config.block_n or k % config.block_k:
        raise ValueError(f"N={n} and K={k} must be multiples of {config.block_n=} and {config.block_k=}")
    splits = config.splits_for(k, n)
    if (k // config.block_k) % splits:
        raise ValueError(f"{k=} must split into {splits=} slabs of whole {config.block_k=} steps")


def quant_matmul(x, packed, *, config: TuningConfig | None = None, interpret=False, out_dtype=None):
    """y = x @ dequant(W) for x [M, K] bf16 (M <= 64) and W packed by `pack_int8` / `pack_int4`, or held in the
    format's own layout (Int8Weights, Int4Weights with group 128: read in place, int4 at a byte per value);
    `out_dtype` (default bf16) out."""
    config = config or TuningConfig()
    check_args(x, packed, config)
    return _quant_matmul(x, packed, config=config, interpret=interpret, out_dtype=out_dtype)


@functools.partial(jax.jit, static_argnames=("config", "interpret", "out_dtype"))
def _quant_matmul(x, packed, *, config, interpret, out_dtype=None):
    m, k = x.shape
    mp = -(-m // 8) * 8
    x_padded = jnp.pad(x, ((0, mp - m), (0, 0)))  # [Mp, K]
    n = _kn(packed)[1]
    partials = _partials(x_padded, packed, config=config, num_splits=config.splits_for(k, n), interpret=interpret)
    y = partials.sum(axis=0)  # [N, Mp] f32
    if not _operands(packed)[0]:  # int8: the per-channel scale after the dot
        y = y * packed.scale[:, None]
    return y[:, :m].T.astype(out_dtype or x.dtype)


def dequantize_packed(packed, dtype=jnp.float32):
    """W [K, N] from a packed weight, computed in f32."""
    w = packed.q.astype(jnp.float32)  # [N, K]
    if isinstance(packed, PackedInt8):
        return (w * packed.scale[:, None]).T.astype(dtype)
    n, k = w.shape
    w = w.reshape(n, k // GROUP, GROUP) * packed.scale.T[..., None].astype(jnp.float32)
    w = w + packed.bias.T[..., None].astype(jnp.float32)
    return w.reshape(n, k).T.astype(dtype)


def quant_matmul_reference(x, packed):
    """Dequantize the packed weights in f32 and multiply (no tiling), cast to x's dtype."""
    return jnp.dot(x.astype(jnp.float32), dequantize_packed(packed)).astype(x.dtype)


def packed_matmul_xla(x, packed, out_dtype=None):
    """The dequantize-then-dot path on the packed layout, x [..., K] -> [..., N], any M: the weight widened to x's
    dtype, one dot with f32 accumulation (int8's scale after the dot). What runs where the kernel does not."""
    if isinstance(packed, PackedInt8):
        y = lax.dot_general(x, packed.q.astype(x.dtype), (((x.ndim - 1,), (1,)), ((), ())),
                            preferred_element_type=jnp.float32) * packed.scale
    else:
        n, k = packed.q.shape
        w = packed.q.astype(x.dtype).reshape(n, k // GROUP, GROUP) * packed.scale.T[..., None].astype(x.dtype)
        w = (w + packed.bias.T[..., None].astype(x.dtype)).reshape(n, k)
        y = lax.dot_general(x, w, (((x.ndim - 1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    return y.astype(out_dtype or x.dtype)


def fp8_matmul(x, q, scale, input_scale=None, *, out_dtype=None, n_major=False):
    """W8A8: x [..., K] quantized to e4m3 per token (or by the static `input_scale`), one e4m3 x e4m3 dot with f32
    accumulation (cuBLASLt's fp8 GEMM on Hopper), both scales applied to the output. q is e4m3 [K, N], or [N, K]
    with n_major (the K-major layout cuBLASLt wants for both operands, and what Fp8Weights holds); scale [N] f32."""
    from ie_jax.quant.fp8 import quantize_activations
    xq, x_scale = quantize_activations(x, input_scale)
    dims = (((x.ndim - 1,), (1 if n_major else 0,)), ((), ()))
    acc = lax.dot_general(xq, q, dims, preferred_element_type=jnp.float32)
    return (acc * x_scale * scale).astype(out_dtype or x.dtype)


# ----------------------------------------------------------------------------------------------------------------
# Benchmark

LLAMA3_8B_SHAPES = {"qkv": (4096, 6144), "o": (4096, 4096), "gate_up": (4096, 28672), "down": (14336, 4096)}
_L2_BYTES = 50 * 2**20
_HBM_TBPS = 4.14  # measured copy ceiling on the H200 (shared/GPU.md)
_KERNEL_CONFIGS = {  # label -> config, for M <= 64 (docs/kernels/quant_matmul.md lists the ones dropped)
    "reg 128x4 c2": TuningConfig(),
    "reg 128x3 c3": TuningConfig(num_stages=3, ctas_per_sm=3),
}


def _weights(key, k, n, copies):
    """`copies` random [K, N] weights in every format the bench times (N(0, 0.02) before quantization)."""
    from ie_jax.quant.fp8 import quantize_fp8
    from ie_jax.quant.int4 import quantize_int4
    from ie_jax.quant.int8 import quantize_int8
    out = {"bf16": [], "int8": [], "int4": [], "int8_kn": [], "int4_kn": [], "fp8_kn": [], "fp8_nk": []}
    for kk in jax.random.split(key, copies):
        w = 0.02 * jax.random.normal(kk, (k, n), jnp.float32)
        out["bf16"].append(w.astype(jnp.bfloat16))
        q8, q4 = quantize_int8(w), quantize_int4(w, GROUP)
        out["int8"].append(pack_int8(q8))
        out["int4"].append(pack_int4(q4))
        out["int8_kn"].append(q8)
        out["int4_kn"].append(q4)
        f8 = quantize_fp8(w)  # q [N, K]
        out["fp8_kn"].append((f8.q.T, f8.scale))
        out["fp8_nk"].append((f8.q, f8.scale))
    return jax.block_until_ready(out)


def _paths(m):
    """(label, weight set, fn(x, w)) of every path timed at M = m, the most telling first."""
    from ie_jax.quant.fp8 import Fp8Weights, fp8_matmul_reference
    from ie_jax.quant.int4 import int4_matmul_reference
    from ie_jax.quant.int8 import int8_matmul_reference
    from kernels_pallas import skinny_matmul as sm
    yield "bf16 xla", "bf16", jnp.dot
    if m <= MAX_M:
        cfg = sm.TuningConfig(block_n=256, block_k=64, mma_depth=1, ctas_per_sm=1)
        yield "bf16 skinny 256x64x4", "bf16", functools.partial(sm._skinny_matmul, config=cfg, interpret=False)
        for fmt in ("int8", "int4"):
            for label, cfg in _KERNEL_CONFIGS.items():
                yield f"{fmt} kernel {label}", fmt, functools.partial(_quant_matmul, config=cfg, interpret=False)
            yield f"{fmt} kernel kn 128x4 c2", f"{fmt}_kn", functools.partial(_quant_matmul, config=TuningConfig(),
                                                                            interpret=False)
    yield "int8 ref", "int8_kn", int8_matmul_reference  # what the Linear runs on XLA, on its own layout
    yield "int4 ref", "int4_kn", int4_matmul_reference
    yield "fp8 xla nk", "fp8_nk", lambda x, w: fp8_matmul(x, *w, n_major=True)
    yield "fp8 ref", "fp8_nk", lambda x, w: fp8_matmul_reference(x, Fp8Weights(*w))
    yield "int8 xla", "int8", packed_matmul_xla
    yield "int4 xla", "int4", packed_matmul_xla
    yield "fp8 xla kn", "fp8_kn", lambda x, w: fp8_matmul(x, *w)


def _reference(fmt, x, w):
    from ie_jax.quant.fp8 import Fp8Weights, fp8_matmul_reference
    if fmt == "bf16":
        return jnp.dot(x.astype(jnp.float32), w.astype(jnp.float32))
    if fmt.startswith("fp8"):
        q = w[0].T if fmt == "fp8_kn" else w[0]  # Fp8Weights holds q [N, K]
        return fp8_matmul_reference(x, Fp8Weights(q, w[1]), jnp.float32)
    if fmt == "int8_kn":
        return jnp.dot(x.astype(jnp.float32), w.q.astype(jnp.float32) * w.scale)
    if fmt == "int4_kn":
        from ie_jax.quant.int4 import dequantize_int4
        return jnp.dot(x.astype(jnp.float32), dequantize_int4(w))
    return jnp.dot(x.astype(jnp.float32), dequantize_packed(w))


def _rel_err(out, expected) -> float:
    out = out.astype(jnp.float32)
    return float(jnp.max(jnp.abs(out - expected)) / jnp.max(jnp.abs(expected)))


def main(argv=()):
    """Time every path at the Llama-3-8B layer shapes, M = 1..4096, against cuBLAS bf16 (torch) and XLA bf16 in
    one process (CUPTI device time; cuBLAS as a CUDA graph of the same calls). Each path is checked against its
    f32 reference on the first weight copy. Writes JSON after every shape; stops starting new shapes after
    --deadline seconds."""
    from kernels_pallas.skinny_matmul import _time_device, _time_torch
    parser = argparse.ArgumentParser(prog="bench_kernels.py quant")
    parser.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    parser.add_argument("--ms", default="1,4096,16,256,64")
    parser.add_argument("--shapes", default="gate_up,down,qkv,o")
    parser.add_argument("--only", default="", help="comma-separated label prefixes to time (default: all)")
    parser.add_argument("--skip", default="", help="comma-separated label prefixes not to time")
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--deadline", type=float, default=1e9, help="seconds after which no new case starts")
    args = parser.parse_args(list(argv))
    start = time.time()
    try:
        import torch
        have_torch = torch.cuda.is_available()
    except ImportError:
        have_torch = False
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"quant_{time.strftime('%Y%m%d-%H%M%S')}_{args.shapes.replace(',', '-')}.json")
    only = [p for p in args.only.split(",") if p]
    rows = []
    for name in args.shapes.split(","):
        k, n = LLAMA3_8B_SHAPES[name]
        copies = max(2, -(-4 * _L2_BYTES // (k * n)))  # > 4x the L2 of int8 weights
        weights = _weights(jax.random.key(k + n), k, n, copies)
        for m in [int(v) for v in args.ms.split(",")]:
            if time.time() - start > args.deadline:
                break
            x = jax.random.normal(jax.random.key(m), (m, k), jnp.bfloat16)
            ws_big = copies if m <= 256 else 2  # large M is compute-bound: two copies keep compile time short
            cublas_us = _time_torch(x, weights["bf16"][:ws_big], args.iterations) if have_torch else None
            base = dict(shape=name, k=k, n=n, m=m, cublas_us=cublas_us)
            if cublas_us:
                rows.append(_row(dict(base, path="bf16 cublas", us=cublas_us, bytes=k * n * 2, rel_err=0.0)))
            for label, fmt, fn in _paths(m):
                if only and not any(label.startswith(p) for p in only):
                    continue
                if any(label.startswith(p) for p in args.skip.split(",") if p):
                    continue
                if time.time() - start > args.deadline:
                    break
                ws = weights[fmt][:ws_big]
                try:
                    err = _rel_err(jax.jit(fn)(x, ws[0]), _reference(fmt, x, ws[0]))
                    us, _ = _time_device(fn, x, ws, args.iterations)
                except Exception as e:  # a config that does not compile is reported, not fatal
                    print(f"  {name} M={m} {label}: FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
                    continue
                rows.append(_row(dict(base, path=label, us=us, bytes=packed_bytes(ws[0]), rel_err=err)))
                with open(path, "w") as f:  # after every row: a crash loses nothing measured
                    json.dump({"device": str(jax.devices()[0]), "rows": rows}, f, indent=1)
        del weights
    print(f"wrote {path}")
    _summary(rows)
    return 0


def _row(r):
    """Add the rates to a timed row and print it."""
    r.update(tbps=r["bytes"] / r["us"] / 1e6, tflops=2 * r["m"] * r["k"] * r["n"] / r["us"] / 1e6,
             vs_cublas=(r["cublas_us"] / r["us"]) if r["cublas_us"] else None)
    print(f"{r['shape']:8s} M={r['m']:4d} {r['path']:26s} {r['us']:8.1f} us {r['tbps']:5.2f} TB/s "
          f"{r['tflops']:6.1f} TFLOP/s x{r['vs_cublas'] or 0:5.2f} err {r['rel_err']:.1e}", flush=True)
    return r


def _summary(rows):
    """The best correct row per (shape, M, format) and its ratio to cuBLAS bf16."""
    best = {}
    for r in rows:
        ok = r["rel_err"] < (6e-2 if r["path"].startswith("fp8") else 2e-2)
        fmt = r["path"].split()[0] + (" kernel" if "skinny" in r["path"] else "")
        fmt = "cublas" if r["path"] == "bf16 cublas" else fmt
        key = (r["shape"], r["m"], fmt)
        if ok and (key not in best or r["us"] < best[key]["us"]):
            best[key] = r
    print("\nshape     M    cuBLAS us | best us and x cuBLAS: bf16 XLA | bf16 kernel | int8 | int4 | fp8")
    for shape, m in sorted({k[:2] for k in best}, key=lambda v: (v[0], v[1])):
        cells = []
        for fmt in ("bf16", "bf16 kernel", "int8", "int4", "fp8"):
            r = best.get((shape, m, fmt))
            cells.append(f"{r['us']:7.1f} x{r['vs_cublas'] or 0:4.2f}" if r else "      -      ")
        c = next(r["cublas_us"] for r in rows if r["shape"] == shape and r["m"] == m)
        print(f"{shape:8s} {m:4d} {c or 0:8.1f} | " + " | ".join(cells))
    print("(best path per cell is in the JSON; bf16 XLA's row excludes the kernel)")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
