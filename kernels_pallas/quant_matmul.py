"""Weight-only quantized matmul for decode (M <= 64) in Pallas Mosaic GPU: y[M, N] = x[M, K] @ dequant(W)[K, N].

Letters: M rows of x, K the contraction dim, N output features, Mp = M rounded up to 8, S the number of K splits,
G the int4 group size (a multiple of block_k = 128 for the kernel).

Decode reads every weight byte once, so the speed-up over bf16 is the byte ratio: 2x for int8, ~3.8x for int4
(with one f16 scale and one byte of zero point per G weights). The kernel keeps the skinny bf16 kernel's cut
(`skinny_matmul.py`): the product is computed transposed, y^T[N, Mp] = W^T[N, K] @ x^T[K, Mp], over a grid of
(column block, K split) CTAs, each streaming its contiguous K slab through a ring of `num_stages` TMA slots.
What changes is the A operand, the weight tile [block_n, block_k], K-major:

* It arrives quantized, int8 or signed int4 (two values per byte, the value minus 8), and is widened in registers
  by Mosaic's int8/int4 -> bf16 conversions (byte permutes and a bf16 subtract around a magic exponent: no
  integer-to-float instructions, which run at a fraction of the FMA rate). int8 needs only that: its per-channel
  scale factors out of the dot and is applied to the f32 result. int4 then takes a bf16 add and multiply,
  (q + 8 - zero) * scale, with the step's group scale and zero per output row (the sum is an exact integer).
* With `a_in_registers` the widened tile is wgmma's register A operand; otherwise it is stored to a bf16 SMEM tile
  first (the path the CPU interpreter runs, since it reads wgmma operands only from SMEM).
* Options (TuningConfig): `consumers=2` runs two warpgroups per CTA on alternate K steps, each with its own ring
  and f32 accumulator (summed through SMEM at the end), so one's widening overlaps the other's wait and wgmma;
  `int4_scale_after` feeds wgmma the raw int4 values and applies scale and zero point to each step's [block_n, Mp]
  f32 product instead of to every weight (the zero term through per-step sums of x).
* The formats' own arrays (Int8Weights, Int4Weights: [K, N], int4 one byte per value) are also read in place:
  their [block_k, block_n] tile is widened into SMEM and read M-major (slower: kept for comparison).

The packed layouts (`PackedInt8`, `PackedInt4`, made by `pack_int8` / `pack_int4` from ie_jax.quant's Int8Weights /
Int4Weights, and back by `unpack`) are what the quantized Linear holds, built once at load time.
`packed_matmul_xla` is XLA's dequantize-then-dot on them (any M); FP8 W8A8 lives in `fp8_matmul.py`.
`MEASURED_FASTER` records where the kernel beat XLA on the H200, which `ops.quant_matmul` follows. This module
knows those formats, nothing about layers or checkpoints.
"""
from __future__ import annotations

import dataclasses
import functools
import sys

import jax
import jax.numpy as jnp
from flax import struct
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from kernels_pallas.skinny_matmul import interpret_kwargs, split_count, store_tile

MAX_M = 64
_XS_COLS = MAX_M  # scale_after's per-step x sums, padded to 256-byte rows (TMA destinations are 128-byte aligned)
GROUP = 128  # the int4 group size of the benchmark's weights (the kernel takes any multiple of block_k)


@dataclasses.dataclass(frozen=True)
class TuningConfig:
    """block_n: output columns per CTA (wgmma M: 64 or 128). block_k: K per pipeline step (128: one int4 group).
    num_stages: TMA ring slots. num_splits: K splits (None: the most that fill at most ~ctas_per_sm CTAs per SM
    and leave every split at least min_k_steps steps). a_in_registers: feed the widened tile to wgmma from
    registers (GPU only; the interpreter always goes through SMEM). int4_fma: widen packed int4 as q * scale + bias
    (one FMA per value, bias rounded to bf16 per row) instead of (q + 8 - zero) * scale (an add and a multiply).
    consumers: warpgroups per CTA (1 or 2). With 2 they take alternate K steps of the CTA's slab, each through its
    own ring of `num_stages` slots (num_stages is per warpgroup) into its own f32 accumulator, so one warpgroup's
    widening overlaps the other's TMA wait and wgmma; the two partials are summed through SMEM at the end. Each
    split then needs an even step count (`splits_for` only picks such splits).
    int4_scale_after: packed int4 only: wgmma on the raw q - 8 values (a conversion per value, no FMA) into a
    per-step product, then scale and zero point per output row on that [block_n, Mp] product (the zero term
    through each step's sums of x)."""

    block_n: int = 128
    block_k: int = 128
    num_stages: int = 4
    num_splits: int | None = None
    ctas_per_sm: int = 2
    a_in_registers: bool = True
    min_k_steps: int = 1
    int4_fma: bool = True
    consumers: int = 1
    int4_scale_after: bool = False
    profile_dir: str | None = None  # Mosaic GPU's in-kernel profiler: a per-CTA trace of the named regions

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
        if not 1 <= self.min_k_steps <= 64:
            raise ValueError(f"{self.min_k_steps=} must be in [1, 64]")
        if self.consumers not in (1, 2):
            raise ValueError(f"{self.consumers=} must be 1 or 2")

    def splits_for(self, k: int, n: int) -> int:
        return split_count(k, n, self)


@struct.dataclass
class PackedInt8:
    """W8A16 in the kernel's layout (what Int8Linear holds). Leading axes [...] are stacked layers."""

    q: jax.Array  # [..., N, K] int8 (W^T: K contiguous, the wgmma A operand's K-major layout)
    scale: jax.Array  # [..., N] f32


@struct.dataclass
class PackedInt4:
    """W4A16 in the kernel's layout (what Int4Linear holds): w[k, n] = (q[n, k] + 8 - zeros[g, n]) * scales[g, n]
    with g = k // group_size. The scales and zeros are the format's own (f16, 0..15 or GPTQ's 16), so the layout
    unpacks to Int4Weights bit for bit. With `perm` (act-order) q's K is in the permuted order:
    y = x[..., perm] @ W_sorted. Leading axes [...] are stacked layers."""

    q: jax.Array  # [..., N, K] int4 (W^T, two values per byte): the stored 0..15 value minus 8
    scales: jax.Array  # [..., K/G, N] f16
    zeros: jax.Array  # [..., K/G, N] uint8
    group_size: int = struct.field(pytree_node=False)
    perm: jax.Array | None = None  # [..., K] int32

    @property
    def shape(self) -> tuple[int, ...]:
        """[..., K, N] of the weight."""
        *lead, n, k = self.q.shape
        return (*lead, k, n)


def pack_int8(qw) -> PackedInt8:
    """ie_jax.quant.int8.Int8Weights (q [..., K, N]) -> the kernel's layout."""
    return PackedInt8(jnp.swapaxes(jnp.asarray(qw.q), -1, -2), jnp.asarray(qw.scale, jnp.float32))


def pack_int4(qw) -> PackedInt4:
    """ie_jax.quant.int4.Int4Weights (q [..., K, N] 0..15, any group size, act-order or not) -> the kernel's
    layout. Lossless: `unpack_int4` gives the same arrays back."""
    q = jnp.swapaxes(jnp.asarray(qw.q).astype(jnp.int8) - 8, -1, -2).astype(jnp.int4)
    perm = None if qw.perm is None else jnp.asarray(qw.perm, jnp.int32)
    return PackedInt4(q, jnp.asarray(qw.scales), jnp.asarray(qw.zeros), qw.group_size, perm)


def unpack_int8(packed: PackedInt8):
    from ie_jax.quant.int8 import Int8Weights
    return Int8Weights(jnp.swapaxes(packed.q, -1, -2), packed.scale)


def unpack_int4(packed: PackedInt4):
    """The inverse of `pack_int4`: ie_jax.quant.int4.Int4Weights."""
    from ie_jax.quant.int4 import Int4Weights
    q = (jnp.swapaxes(packed.q, -1, -2).astype(jnp.int8) + 8).astype(jnp.uint8)
    return Int4Weights(q, packed.scales, packed.zeros, packed.group_size, packed.perm)


def packed_bytes(packed) -> int:
    """HBM bytes of a packed weight (int4 counts half a byte per value)."""
    bits = {jnp.dtype(jnp.int4): 4}
    return sum(a.size * bits.get(jnp.dtype(a.dtype), 8 * jnp.dtype(a.dtype).itemsize) // 8
               for a in jax.tree.leaves(packed))


# ----------------------------------------------------------------------------------------------------------------
# Kernel


def _kernel(x_ref, xs_ref, w_ref, s_ref, z_ref, out_ref, x_smem, xs_smem, w_smem, s_smem, z_smem, a_smem, o_smem,
            bars, *sum_bar, int4, kn, block_n, block_k, num_stages, k_steps, group_steps, a_in_registers, fma,
            consumers, scale_after):
    # x_ref   [Mp, K] bf16            activations, rows padded to Mp (act-order: already gathered by perm)
    # xs_ref  [K/block_k, _XS_COLS] f32  scale_after: each step's sums of x over its block_k columns, Mp used
    # w_ref   packed: [N, K] int8 | int4 (W^T, K-major, int4 = value - 8); kn: the format's [K, N] int8 | uint8
    # s_ref, z_ref  [K/G, N]          int4: the format's f16 scales and uint8 zero points (both layouts)
    # out_ref [S, N, Mp] f32          per-split partial sums of y^T
    # Slots are [C * stages] with C = consumers: warpgroup c owns slots c * stages ... (c + 1) * stages - 1.
    # x_smem  [slots, Mp, block_k]    x tiles (wgmma B, read transposed)
    # xs_smem [slots, _XS_COLS] f32   scale_after: the step's row of xs_ref (Mp used)
    # w_smem  [slots, block_n, block_k] (kn: [slots, block_k, block_n])  quantized weight tiles
    # s_smem, z_smem [slots, block_n]  the step's int4 scale / zero rows (one group covers group_steps steps)
    # a_smem  [C, block_n, block_k] (kn: [C, block_k, block_n]) bf16  the widened tile when wgmma reads SMEM
    # o_smem  [block_n, Mp] f32       the CTA's partial, staged for one TMA store (C = 2: warpgroup 1's first)
    # bars    [slots]                 one barrier per slot for all of its copies
    # sum_bar                         C = 2: warpgroup 1's partial is in o_smem
    n_idx = lax.axis_index("n")
    s_idx = lax.axis_index("s")
    wg = lax.axis_index("wg") if consumers > 1 else 0
    first_step = s_idx * k_steps
    wg_steps = k_steps // consumers  # warpgroup wg runs the slab's steps wg, wg + C, wg + 2C, ...
    n_cols = pl.ds(n_idx * block_n, block_n)

    def issue(step, slot):  # step: this warpgroup's own count; slot: in its own ring
        k_step = first_step + step * consumers + wg
        slot = wg * num_stages + slot
        k_cols = pl.ds(k_step * block_k, block_k)
        w_tile = w_ref.at[k_cols, n_cols] if kn else w_ref.at[n_cols, k_cols]
        plgpu.copy_gmem_to_smem(w_tile, w_smem.at[slot], bars.at[slot])
        plgpu.copy_gmem_to_smem(x_ref.at[:, k_cols], x_smem.at[slot], bars.at[slot])
        if int4:
            group = k_step if group_steps == 1 else lax.div(k_step, group_steps)
            plgpu.copy_gmem_to_smem(s_ref.at[group, n_cols], s_smem.at[slot], bars.at[slot])
            plgpu.copy_gmem_to_smem(z_ref.at[group, n_cols], z_smem.at[slot], bars.at[slot])
        if scale_after:
            plgpu.copy_gmem_to_smem(xs_ref.at[k_step], xs_smem.at[slot], bars.at[slot])

    for step in range(min(num_stages, wg_steps)):  # fill the ring
        issue(step, step)

    def widen(slot):
        """The slot's weight tile in bf16: [block_n, block_k], or [block_k, block_n] for kn."""
        w = w_smem[slot]
        if kn and int4:
            w = lax.bitcast_convert_type(w, jnp.int8)  # 0..15 (the signed cast is the fast one)
        w = w.astype(jnp.bfloat16)  # exact small integers
        if not int4 or scale_after:
            return w
        # w = (q - zero) * scale, per output column: packed q is the value - 8, so its offset is 8 - zero (an exact
        # small integer in bf16, as is q + offset).
        scale = s_smem[slot].astype(jnp.float32).astype(jnp.bfloat16)  # [block_n]
        zero = lax.bitcast_convert_type(z_smem[slot], jnp.int8).astype(jnp.bfloat16)  # [block_n]
        if kn:
            return (w - zero[None, :]) * scale[None, :]
        offset = jnp.full_like(zero, 8) - zero
        if fma:  # one fused multiply-add per value; the bias (8 - zero) * scale is rounded to bf16 once per row
            bias = offset * scale
            return w * scale[:, None] + bias[:, None]
        return (w + offset[:, None]) * scale[:, None]

    def product(slot, acc_ref):
        """acc[N, Mp] += W^T[N, bk] @ x^T[bk, Mp] for the slot's tiles, waited for."""
        with jax.named_scope("widen"):  # named scopes: the regions a `profile_dir` trace records
            w = widen(slot)
        with jax.named_scope("mma"):
            if a_in_registers and not kn:
                plgpu.wgmma(acc_ref, w, x_smem.at[slot].T)
            else:
                a_tile = a_smem.at[wg]
                a_tile[...] = w
                plgpu.commit_smem()
                plgpu.wgmma(acc_ref, a_tile.T if kn else a_tile, x_smem.at[slot].T)
            # Wait for this wgmma before the next step: leaving it in flight (wait 1) gave wrong results with the
            # register A operand on the H200 (the next step's widening reuses its registers).
            plgpu.wgmma_wait(0)
        return acc_ref[...] if scale_after else None

    def scaled(slot, total):
        """scale_after: total += scale[n] * (Q^T x^T [n, m] + (8 - zero[n]) * xs[m]) for the slot's step, Q^T the
        raw q - 8 values. The per-value widening is then a conversion only; the scale, zero and x sums are applied
        to the [block_n, Mp] f32 step product (Mp / 8 values per thread instead of block_k)."""
        # The slot's rows are read before the wgmma, which every thread of the warpgroup reaches before the
        # refill's TMA (issued by one thread after it) may overwrite them.
        rows = plgpu.Layout.WGMMA.reduce(1)  # a value per row n of the product
        scale = plgpu.load(s_smem.at[slot], layout=rows).astype(jnp.float32)
        zero = lax.bitcast_convert_type(plgpu.load(z_smem.at[slot], layout=rows), jnp.int8).astype(jnp.float32)
        # a value per column m
        xs = plgpu.load(xs_smem.at[slot, pl.ds(0, o_smem.shape[1])], layout=plgpu.Layout.WGMMA.reduce(0))
        step_product = pl.run_scoped(functools.partial(product, slot), plgpu.ACC(o_smem.shape, jnp.float32))
        shape = step_product.shape
        offset = lax.broadcast_in_dim(8.0 - zero, shape, [0]) * lax.broadcast_in_dim(xs, shape, [1])
        return total + lax.broadcast_in_dim(scale, shape, [0]) * (step_product + offset)

    def scope(acc_ref):  # acc_ref [block_n, Mp] f32 (None with scale_after: the sum is the loop's carry)
        def body(step, total):
            ring_slot = lax.rem(step, num_stages)
            slot = wg * num_stages + ring_slot
            with jax.named_scope("wait"):
                plgpu.barrier_wait(bars.at[slot])
            total = scaled(slot, total) if scale_after else product(slot, acc_ref)

            @pl.when(step + num_stages < wg_steps)
            def _():
                with jax.named_scope("refill"):
                    issue(step + num_stages, ring_slot)  # the slot (and a_smem) are read: refill it

            return total

        if not scale_after:
            lax.fori_loop(0, wg_steps, body, None)
            return acc_ref[...]
        zeros = plgpu.layout_cast(jnp.zeros(o_smem.shape, jnp.float32), plgpu.Layout.WGMMA)
        return lax.fori_loop(0, wg_steps, body, zeros)

    acc = scope(None) if scale_after else pl.run_scoped(scope, plgpu.ACC(o_smem.shape, jnp.float32))
    if consumers == 1:
        o_smem[...] = acc
    else:
        @pl.when(wg == 1)
        def _():
            o_smem[...] = acc
            plgpu.commit_smem()  # all 128 threads have stored before the one arrival
            plgpu.barrier_arrive(sum_bar[0])

        @pl.when(wg == 0)
        def _():
            plgpu.barrier_wait(sum_bar[0])
            o_smem[...] = o_smem[...] + acc

    store_tile(o_smem, out_ref.at[s_idx, n_cols], wg, consumers)


def _operands(packed):
    """(int4, kn, w [..], scales-or-None, zeros-or-None) of a packed weight or a format's own arrays."""
    from ie_jax.quant.int4 import Int4Weights
    from ie_jax.quant.int8 import Int8Weights
    if isinstance(packed, PackedInt8):
        return False, False, packed.q, None, None
    if isinstance(packed, PackedInt4):
        return True, False, packed.q, packed.scales, packed.zeros
    if isinstance(packed, Int8Weights):
        return False, True, packed.q, None, None
    if isinstance(packed, Int4Weights):
        return True, True, packed.q, packed.scales, packed.zeros
    raise ValueError(f"weights of type {type(packed).__name__}; expected PackedInt8, PackedInt4, Int8Weights or "
                     f"Int4Weights")


def _partials(x_padded, packed, *, config, num_splits, interpret):
    int4, kn, w, scales, zeros = _operands(packed)
    mp, k = x_padded.shape
    n = w.shape[1] if kn else w.shape[0]
    k_steps = k // (config.block_k * num_splits)
    bf16_tf = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
    consumers, slots = config.consumers, config.consumers * config.num_stages
    if kn:  # [block_k, block_n] tiles, a row is block_n bytes
        w_shape, a_shape = (config.block_k, config.block_n), (consumers, config.block_k, config.block_n)
        w_tf = (plgpu.TilingTransform((8, config.block_n)), plgpu.SwizzleTransform(config.block_n))
    else:
        w_shape, a_shape = (config.block_n, config.block_k), (consumers, config.block_n, config.block_k)
        if config.a_in_registers and not interpret:
            a_shape = (consumers, 8, 64)  # unused: wgmma reads the widened tile from registers
        row_bytes = config.block_k // 2 if int4 else config.block_k
        w_tf = (plgpu.TilingTransform((8, config.block_k)), plgpu.SwizzleTransform(row_bytes))
    group_steps = 1
    if int4:
        group_steps = packed.group_size // config.block_k
    else:
        scales = zeros = jnp.zeros((1, n), jnp.bfloat16)  # unused by int8
    registers = config.a_in_registers and not interpret and not kn
    scale_after = int4 and not kn and config.int4_scale_after
    if scale_after:  # [K/block_k, Mp]: each step's sums of x, for the zero-point term
        xs = x_padded.astype(jnp.float32).reshape(mp, k // config.block_k, config.block_k).sum(-1).T
        xs = jnp.pad(xs, ((0, 0), (0, _XS_COLS - mp)))  # each step's row lands 128-byte aligned in SMEM
    else:
        xs = jnp.zeros((1, _XS_COLS), jnp.float32)  # unused
    body = functools.partial(_kernel, int4=int4, kn=kn, block_n=config.block_n, block_k=config.block_k,
                             num_stages=config.num_stages, k_steps=k_steps, group_steps=group_steps,
                             a_in_registers=registers, fma=config.int4_fma, consumers=consumers,
                             scale_after=scale_after)
    threads = dict(num_threads=consumers, thread_name="wg") if consumers > 1 else {}
    params = dict(lowering_semantics=plgpu.LoweringSemantics.Warpgroup)
    if config.profile_dir:
        params.update(profile_space=1024, profile_dir=config.profile_dir, profile_bounds_check=True)
    kernel = plgpu.kernel(
        body,
        out_type=jax.ShapeDtypeStruct((num_splits, n, mp), jnp.float32),
        scratch_types=[
            plgpu.SMEM((slots, mp, config.block_k), jnp.bfloat16, transforms=bf16_tf),
            plgpu.SMEM((slots, _XS_COLS), jnp.float32),
            plgpu.SMEM((slots, *w_shape), w.dtype, transforms=w_tf),
            plgpu.SMEM((slots, config.block_n), scales.dtype),
            plgpu.SMEM((slots, config.block_n), zeros.dtype),
            plgpu.SMEM(a_shape, jnp.bfloat16, transforms=bf16_tf),
            plgpu.SMEM((config.block_n, mp), jnp.float32),
            plgpu.Barrier(num_arrivals=(4 + scale_after) if int4 else 2, num_barriers=slots),
            *([plgpu.Barrier(num_arrivals=1)] if consumers > 1 else []),  # sum_bar
        ],
        grid=(n // config.block_n, num_splits),
        grid_names=("n", "s"),
        compiler_params=plgpu.CompilerParams(**params),
        **threads,
        **interpret_kwargs(interpret),
    )
    return kernel(x_padded, xs, w, scales, zeros)


# ----------------------------------------------------------------------------------------------------------------
# Public wrapper


# Where the kernel was measured faster than XLA's path for the same weights on the H200
# (benchmarks/results/quant_20261123_s4_*.json, docs/kernels/quant_matmul.md): (int4?, format layout?) -> (the
# largest M measured faster, the config). A layout missing here stays on XLA's dequantize-then-dot. Int8Weights
# ([K, N], SMEM path) is missing: XLA's int8 dot was as fast or faster at M = 16.
_C3 = TuningConfig(num_stages=3, ctas_per_sm=3)
_C8M4 = TuningConfig(num_stages=3, ctas_per_sm=8, min_k_steps=4)  # gate_up 896 CTAs of 8 steps, down 896 of 4
MEASURED_FASTER: dict[tuple[bool, bool], tuple[int, TuningConfig]] = {
    # PackedInt8 (what Int8Linear holds): 1.49-1.73x cuBLAS at M <= 16 (c3 beat s4 / c8m8 / c8m4 by 5-20%);
    # at M = 64 XLA's int8 dot on the same [N, K] weight is as fast (gate_up 57.9 us both).
    (False, False): (16, _C3),
    # PackedInt4 (what Int4Linear holds), one FMA per value: 1.68-2.04x cuBLAS at M <= 16 (c3 was 7-12% slower on
    # gate_up); 1.06-1.17x at M = 64, where XLA's int4 path is 0.31-0.34x.
    (True, False): (64, _C8M4),
    (True, True): (64, TuningConfig()),  # Int4Weights (uint8 [K, N]): 2.0-3.8x XLA's int4 path, M = 1..64
}


# Above MAX_M rows the kernel runs over 64-row chunks where that measured faster than XLA's path for the same
# weights (quant_20261204-211536_large_m_candidates.json, ..._213602_warp_mma_bytes_chunked.json): PackedInt4 up to
# 128 rows, 1.5-1.8x XLA's int4 path on gate_up / down (at 256 rows it lost on down). int8 stays on XLA's int8 dot,
# which fuses the widening into its GEMM (1.07x cuBLAS bf16 on gate_up at 128 rows).
CHUNKED_UP_TO: dict[tuple[bool, bool], int] = {(True, False): 2 * MAX_M}


def kernel_config(packed, m: int, *, forced: bool = False) -> TuningConfig | None:
    """The config `ops.quant_matmul` runs for these weights at M = m rows, or None for the XLA path. `forced`
    (backend pallas / interpret) takes the kernel wherever it applies up to MAX_M rows, measured faster or not.
    Above MAX_M the config is for `chunked_quant_matmul`, where CHUNKED_UP_TO says."""
    try:
        int4, kn, _, _, _ = _operands(packed)
    except ValueError:
        return None
    max_m, config = MEASURED_FASTER.get((int4, kn), (0, None))
    if m > MAX_M:  # 64-row chunks (`chunked_quant_matmul`), forced or not, only where measured
        return config if m <= CHUNKED_UP_TO.get((int4, kn), 0) else None
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
    if int4 and packed.group_size % config.block_k:  # one scale/zero row per pipeline step
        raise ValueError(f"the int4 kernel needs group_size to be a multiple of {config.block_k=}, got "
                         f"group_size={packed.group_size}")
    if int4 and config.block_n < 128:  # a ring slot's uint8 zero row must fill a 128-byte TMA box
        raise ValueError(f"{config.block_n=} must be 128 for int4 weights (the zero-point rows are bytes)")
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
    if (k // config.block_k) % (splits * config.consumers):
        raise ValueError(f"{k=} must split into {splits=} slabs of whole {config.block_k=} steps, a multiple of "
                         f"{config.consumers=} each")


def quant_matmul(x, packed, *, config: TuningConfig | None = None, interpret=False, out_dtype=None):
    """y = x @ dequant(W) for x [M, K] bf16 (M <= 64) and W packed by `pack_int8` / `pack_int4`, or held in the
    format's own layout (Int8Weights, Int4Weights: read in place, int4 at a byte per value); int4 groups of a
    multiple of 128 rows, act-order included (x is gathered by perm). `out_dtype` (default bf16) out."""
    config = config or TuningConfig()
    check_args(x, packed, config)
    return _quant_matmul(x, packed, config=config, interpret=interpret, out_dtype=out_dtype)


@functools.partial(jax.jit, static_argnames=("config", "interpret", "out_dtype"))
def _quant_matmul(x, packed, *, config, interpret, out_dtype=None):
    m, k = x.shape
    mp = -(-m // 8) * 8
    if getattr(packed, "perm", None) is not None:  # act-order: q's rows are in perm's order
        x = jnp.take(x, packed.perm, axis=-1)
    x_padded = jnp.pad(x, ((0, mp - m), (0, 0)))  # [Mp, K]
    n = _kn(packed)[1]
    partials = _partials(x_padded, packed, config=config, num_splits=config.splits_for(k, n), interpret=interpret)
    y = partials.sum(axis=0)  # [N, Mp] f32
    if not _operands(packed)[0]:  # int8: the per-channel scale after the dot
        y = y * packed.scale[:, None]
    return y[:, :m].T.astype(out_dtype or x.dtype)


def unpack(packed):
    """The format's own weights (Int8Weights / Int4Weights, [..., K, N]) of a packed weight."""
    return unpack_int8(packed) if isinstance(packed, PackedInt8) else unpack_int4(packed)


def dequantize_packed(packed, dtype=jnp.float32):
    """W [..., K, N] from a packed weight (computed in f32, rows in the original order), by the format's own
    dequantization."""
    from ie_jax.quant.int4 import dequantize_int4
    from ie_jax.quant.int8 import dequantize_int8
    if isinstance(packed, PackedInt8):
        return dequantize_int8(unpack_int8(packed), dtype)
    return dequantize_int4(unpack_int4(packed), dtype)


def quant_matmul_reference(x, packed):
    """Dequantize the packed weights in f32 and multiply (no tiling), cast to x's dtype."""
    return jnp.dot(x.astype(jnp.float32), dequantize_packed(packed)).astype(x.dtype)


def packed_matmul_xla(x, packed, out_dtype=None):
    """The dequantize-then-dot path on the packed layout, x [..., K] -> [..., N], any M, one matrix: the weight
    dequantized in f32 and rounded to x's dtype (the format references' arithmetic, transposed), one dot with f32
    accumulation (int8's scale after the dot). What runs where the kernel does not."""
    contract = (((x.ndim - 1,), (1,)), ((), ()))  # x's K against W^T's K
    if isinstance(packed, PackedInt8):
        y = lax.dot_general(x, packed.q.astype(x.dtype), contract, preferred_element_type=jnp.float32)
        return (y * packed.scale).astype(out_dtype or x.dtype)
    if packed.perm is not None:
        x = jnp.take(x, packed.perm, axis=-1)
    y = lax.dot_general(x, dequantize_int4_nk(packed, x.dtype), contract, preferred_element_type=jnp.float32)
    return y.astype(out_dtype or x.dtype)


def dequantize_int4_nk(packed, dtype):
    """A packed int4 weight as W^T [N, K] in `dtype`, in its stored order (act-order rows stay permuted), computed
    in f32: (q + 8 - zero) * scale per group."""
    n, k = packed.q.shape
    g = packed.group_size
    offset = 8.0 - packed.zeros.T.astype(jnp.float32)  # [N, K/G]: q is the value - 8
    w = packed.q.astype(jnp.float32).reshape(n, k // g, g) + offset[..., None]
    return (w * packed.scales.T.astype(jnp.float32)[..., None]).reshape(n, k).astype(dtype)


def chunked_quant_matmul(x, packed, *, config, rows=MAX_M, interpret=False, out_dtype=None):
    """The kernel over x [M, K] in chunks of `rows` rows (M above the kernel's MAX_M): each chunk re-reads the
    weights, so this only pays where the kernel's rate beats XLA's dequantize-then-dot."""
    m = x.shape[0]
    parts = [_quant_matmul(x[i:i + rows], packed, config=config, interpret=interpret, out_dtype=out_dtype)
             for i in range(0, m, rows)]
    return jnp.concatenate(parts, axis=0)


# ----------------------------------------------------------------------------------------------------------------
# Benchmark (kernels_pallas/quant_bench.py: the sweep, its baselines and the table)

LLAMA3_8B_SHAPES = {"qkv": (4096, 6144), "o": (4096, 4096), "gate_up": (4096, 28672), "down": (14336, 4096)}


def main(argv=()):
    """`scripts/bench_kernels.py quant`: see kernels_pallas/quant_bench.py."""
    from kernels_pallas import quant_bench
    return quant_bench.main(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
