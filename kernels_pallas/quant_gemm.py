"""Weight-only quantized GEMM for many rows (prefill, large decode batches) in Pallas Mosaic GPU (Hopper).

y[M, N] = x[M, K] @ dequant(W)[K, N] with W held as quant_matmul's packed layouts (PackedInt8: W^T [N, K] int8 and
a per-channel scale; PackedInt4: W^T [N, K] int4 with f16 scales and uint8 zeros per group of G >= 128 rows).
The decode kernel (quant_matmul.py) streams the weights for M <= 64; above that a step's widened tile has to feed
enough MMA work to amortize it, which is what this kernel is for.

Letters: tile_n rows of W^T per CTA (two compute warpgroups, tile_n / 2 each), tile_m rows of x per CTA, tile_k
(128: one int4 group; 64: half the shared memory per slot, two steps per group) per pipeline step.

How it is cut:
* The product is computed transposed, y^T[N, M] = W^T[N, K] x^T[K, M], so the widened weight tile is wgmma's A
  operand in registers (K-major, as the packed layouts hold it) and the x tile [tile_m, tile_k] is its B operand
  from shared memory (read transposed).
* CTA (n block, m block) runs a warp-specialized pipeline over K: one memory warpgroup issues the TMAs of each
  step's weight tile, x tile and (int4) scale/zero rows into a ring of `num_stages` slots; each of two compute
  warpgroups widens its tile_n / 2 rows of the weight tile (int8 -> bf16; int4 -> bf16 with one FMA per value,
  q * scale + (8 - zero) * scale) and runs wgmma into its own f32 accumulator [tile_n / 2, tile_m]. While one
  warpgroup widens, the other's wgmma runs.
* The epilogue applies int8's per-channel scale, stores the accumulator transposed into shared memory as y's
  [tile_m, tile_n / 2] tile and copies it out with TMA.

`gemm_config` says where `ops.quant_matmul` runs it: the cells where it measured faster than the path that ran
there before (H200, docs/kernels/quant_matmul.md v8).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from kernels_pallas.quant_matmul import PackedInt4, PackedInt8
from kernels_pallas.skinny_matmul import interpret_kwargs

GROUP_K = 128  # int4 group sizes must be a multiple of this (AWQ / GPTQ g128, g-1)
_BF16_TF = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))  # 16-bit tiles: 128-byte swizzled rows


@dataclasses.dataclass(frozen=True)
class GemmConfig:
    """tile_n: rows of W^T per CTA (two compute warpgroups of tile_n / 2 = 64 or 128 rows). tile_m: rows of x per
    CTA (wgmma N: 64..256). num_stages: ring slots. tile_k: K per step (64 or 128). a_in_registers: widen into
    registers and feed wgmma from there (GPU only; otherwise the widened tile goes through shared memory, as in
    the interpreter). splits: K ranges run by separate CTAs (a grid axis), each storing a bf16 partial that the
    wrapper sums in f32: for deep weights whose column blocks alone leave SMs idle (down: 32 blocks, 132 SMs)."""

    tile_n: int = 128
    tile_m: int = 256
    num_stages: int = 2
    tile_k: int = 128
    a_in_registers: bool = True
    splits: int = 1

    def __post_init__(self):
        check_tiles(self)

    def smem_bytes(self, int4: bool = False) -> int:
        """Shared memory of the ring (int8 weight tiles: the larger), the output tiles and the SMEM operand."""
        w = self.tile_n * self.tile_k // (2 if int4 else 1)
        ring = self.num_stages * (w + self.tile_m * self.tile_k * 2 + self.tile_n * 3)
        out = self.tile_m * self.tile_n * 2
        return ring + out + (0 if self.a_in_registers else self.tile_n * self.tile_k * 2)


def check_tiles(config) -> None:
    """The tile rules both many-row GEMMs (this one and fp8_gemm.py) share: two compute warpgroups of tile_n / 2
    rows, wgmma N = tile_m, their f32 accumulators in registers, and the whole config in 227 KiB of SMEM."""
    if config.tile_n not in (128, 256):
        raise ValueError(f"{config.tile_n=} must be 128 or 256 (two warpgroups of 64 or 128 rows)")
    if config.tile_m not in (64, 128, 256):
        raise ValueError(f"{config.tile_m=} must be 64, 128 or 256")
    if not 2 <= config.num_stages <= 8:
        raise ValueError(f"{config.num_stages=} must be in [2, 8]")
    if config.tile_k not in (64, 128):
        raise ValueError(f"{config.tile_k=} must be 64 or 128")
    if not 1 <= config.splits <= 16:
        raise ValueError(f"{config.splits=} must be in [1, 16]")
    acc_regs = config.tile_n // 2 * config.tile_m // 128  # f32 accumulator registers per thread
    if acc_regs > 128:
        raise ValueError(f"{config.tile_n=} x {config.tile_m=} needs {acc_regs} accumulator registers a thread")
    if config.smem_bytes() > 227 * 1024:
        raise ValueError(f"{config} needs {config.smem_bytes()} B of shared memory (> 227 KiB)")


# Where the GEMM beat the path that ran before (the decode kernel over 64-row chunks, or XLA's dequantize-then-dot)
# on the H200 (benchmarks/results/quant_20261205-050954_gate_up-down-qkv-o.json), by the weight's shape class:
# "wide" (N >= 16384: Llama's gate_up) and "deep" (K >= 8192, N < 16384: its down). (rows up to, config) in order.
# Shapes of neither class (qkv, o) were not measured and keep their path.
_WIDE = ((128, GemmConfig(256, 128, 2)),  # gate_up, 128 rows: int4 56.9 us (1.29x cuBLAS bf16), chunks ~117
         (1 << 30, GemmConfig(128, 256, 4, 64)))  # 256 rows: int4 95.6 (1.00x), XLA ~252; 4096: 0.89x, XLA 0.81x
# Deep: split-K over 4 ranges of K (quant_20261205-232041_down.json, H100, same run as cuBLAS): down at 128 rows int8
# 32.0 us (1.59x cuBLAS bf16), int4 30.1 (1.69x); at 256 rows 57.8 / 57.3 (1.06x / 1.07x). The unsplit 128x64x4 it
# replaces ran 71.7-80.5 us there (0.63-0.84x); above 256 rows nothing was measured (XLA stays).
_DEEP = ((256, GemmConfig(128, 128, 4, splits=4)),)
MIN_ROWS = 65  # below, the decode kernel (quant_matmul.MAX_M = 64)


def gemm_config(packed, m: int) -> GemmConfig | None:
    """The config `ops.quant_matmul` runs this GEMM with for packed weights at m rows, or None (another path)."""
    if m < MIN_ROWS or not isinstance(packed, (PackedInt8, PackedInt4)) or packed.q.ndim != 2:
        return None
    n, k = packed.q.shape
    table = _WIDE if n >= 16384 else _DEEP if k >= 8192 else ()
    config = next((c for up_to, c in table if m <= up_to), None)
    if config is None or n % config.tile_n or k % config.tile_k:
        return None
    if isinstance(packed, PackedInt4) and packed.group_size % GROUP_K:
        return None
    return config


def check_args(x, packed, config: GemmConfig):
    if not isinstance(packed, (PackedInt8, PackedInt4)):
        raise ValueError(f"weights of type {type(packed).__name__}; expected PackedInt8 or PackedInt4")
    if x.ndim != 2 or packed.q.ndim != 2:
        raise ValueError(f"{x.shape=} and the weights' {packed.q.shape=} must both be 2-D")
    n, k = packed.q.shape
    if x.shape[1] != k:
        raise ValueError(f"{x.shape=} and the weights' K={k} disagree")
    if x.dtype != jnp.bfloat16:
        raise ValueError(f"{x.dtype=} must be bfloat16")
    if n % config.tile_n or k % config.tile_k:
        raise ValueError(f"N={n} and K={k} must be multiples of {config.tile_n=} and {config.tile_k=}")
    if isinstance(packed, PackedInt4) and packed.group_size % GROUP_K:
        raise ValueError(f"the int4 GEMM needs group_size to be a multiple of {GROUP_K}, got {packed.group_size}")
    unit = packed.group_size if isinstance(packed, PackedInt4) else config.tile_k  # a split holds whole groups
    if k % (config.splits * unit):
        raise ValueError(f"K={k} must split into {config.splits=} ranges of whole {unit}-row steps or groups")


def _kernel(x_ref, w_ref, s_ref, z_ref, c_ref, y_ref, o_smem, c_smem, c_bar, *a_smem, int4, group_steps, config,
            registers):
    # x_ref [Mp, K] bf16; w_ref [N, K] int8 | int4; s_ref, z_ref [K/G, N] (int4: f16 scales, uint8 zeros; int8:
    # unused [1, N]); c_ref [1, N] f32 (int8's per-channel scale; int4: unused); y_ref [Mp, N] bf16
    # o_smem [2, tile_m, tile_n / 2] bf16: each compute warpgroup's output tile
    # c_smem [2, 1, tile_n / 2] f32, c_bar [2]: int8's channel scales of each warpgroup's rows (int4: unused)
    # a_smem [2, tile_n / 2, tile_k] bf16: the widened tiles when wgmma reads them from SMEM
    half = config.tile_n // 2
    n_idx, m_idx, s_idx = lax.axis_index("n"), lax.axis_index("m"), lax.axis_index("s")
    n_cols = pl.ds(n_idx * config.tile_n, config.tile_n)
    m_rows = pl.ds(m_idx * config.tile_m, config.tile_m)
    out_rows = pl.ds(s_idx * x_ref.shape[0] + m_idx * config.tile_m, config.tile_m)  # split s's partial rows
    tile_k = config.tile_k
    k_steps = w_ref.shape[1] // tile_k // config.splits  # this CTA's K range
    k_range = pl.ds(s_idx * k_steps * tile_k, k_steps * tile_k)
    row_bytes = tile_k // 2 if int4 else tile_k
    w_tf = (plgpu.TilingTransform((8, tile_k)), plgpu.SwizzleTransform(row_bytes))
    group = (lambda k: k) if group_steps == 1 else (lambda k: lax.div(k, group_steps))
    in_specs = [
        plgpu.BlockSpec((config.tile_n, tile_k), lambda k: (0, k), transforms=w_tf),
        plgpu.BlockSpec((config.tile_m, tile_k), lambda k: (0, k), transforms=_BF16_TF),
    ]
    if int4:
        in_specs += [plgpu.BlockSpec((1, config.tile_n), lambda k: (group(k), 0)),
                     plgpu.BlockSpec((1, config.tile_n), lambda k: (group(k), 0))]

    def widen(w_smem, s_smem, z_smem, wg):
        """This warpgroup's rows of the step's weight tile, in bf16 [half, tile_k]."""
        rows = pl.ds(wg * half, half)
        w = w_smem[rows, :].astype(jnp.bfloat16)  # exact small integers
        if not int4:
            return w
        scale = s_smem[0, rows].astype(jnp.float32).astype(jnp.bfloat16)  # [half]
        zero = lax.bitcast_convert_type(z_smem[0, rows], jnp.int8).astype(jnp.bfloat16)
        bias = (jnp.full_like(zero, 8) - zero) * scale  # packed q is the value - 8
        return w * scale[:, None] + bias[:, None]

    def body(_, w_smem, x_smem, *rest):
        *sz, acc_ref = rest
        s_smem, z_smem = sz if int4 else (None, None)
        wg = lax.axis_index("wg")
        w = widen(w_smem, s_smem, z_smem, wg)
        if registers:
            plgpu.wgmma(acc_ref, w, x_smem.T)
        else:
            a_tile = a_smem[0].at[wg]
            a_tile[...] = w
            plgpu.commit_smem()
            plgpu.wgmma(acc_ref, a_tile, x_smem.T)
        plgpu.wgmma_wait(0)  # the next step's widening reuses the registers this wgmma reads
        return acc_ref

    def compute_context(eval_pipeline):
        @functools.partial(pl.run_scoped, acc_ref=plgpu.ACC((half, config.tile_m), jnp.float32))
        def _(acc_ref):
            wg = lax.axis_index("wg")
            n_half = pl.ds(n_idx * config.tile_n + wg * half, half)
            if not int4:  # int8's per-channel scales, fetched while the pipeline runs
                plgpu.copy_gmem_to_smem(c_ref.at[:, n_half], c_smem.at[wg], c_bar.at[wg])
            eval_pipeline(acc_ref)
            acc = acc_ref[...]
            if not int4:  # int8's per-channel scale, per row of y^T
                plgpu.barrier_wait(c_bar.at[wg])
                scale = c_smem[wg, 0]
                acc = acc * lax.broadcast_in_dim(scale, acc.shape, [0])
            store_transposed(acc, o_smem.at[wg], y_ref.at[out_rows, n_half])

    pipeline = plgpu.emit_pipeline_warp_specialized(
        body, grid=(k_steps,), memory_registers=40, in_specs=in_specs, max_concurrent_steps=config.num_stages,
        wg_axis="wg", num_compute_wgs=2, compute_context=compute_context)
    operands = [w_ref.at[n_cols, k_range], x_ref.at[m_rows, k_range]]
    if int4:
        groups = pl.ds(s_idx * (k_steps // group_steps), k_steps // group_steps)
        operands += [s_ref.at[groups, n_cols], z_ref.at[groups, n_cols]]
    pipeline(*operands)


def store_transposed(acc, o_tile, y_tile):
    """A compute warpgroup's f32 accumulator [cols, rows] (y^T) as y's bf16 [rows, cols] tile: written transposed
    into its SMEM tile, then one TMA store."""
    o_tile.T[...] = acc.astype(o_tile.dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(o_tile, y_tile)
    plgpu.wait_smem_to_gmem(0)


def sum_splits(y, splits: int, m: int, out_dtype):
    """y [splits * Mp, N]: each K range's bf16 partial, summed in f32; the first m rows in out_dtype."""
    if splits > 1:
        y = y.reshape(splits, -1, y.shape[-1]).astype(jnp.float32).sum(0)
    return y[:m].astype(out_dtype)


def quant_gemm(x, packed, *, config: GemmConfig | None = None, interpret=False, out_dtype=None):
    """y = x @ dequant(W) for x [M, K] bf16 (any M; rows padded to tile_m) and W packed by quant_matmul's
    `pack_int8` / `pack_int4` (int4 groups of a multiple of 128 rows, act-order gathers x)."""
    config = config or GemmConfig()
    check_args(x, packed, config)
    return _quant_gemm(x, packed, config=config, interpret=interpret, out_dtype=out_dtype)


@functools.partial(jax.jit, static_argnames=("config", "interpret", "out_dtype"))
def _quant_gemm(x, packed, *, config, interpret, out_dtype=None):
    m, k = x.shape
    n = packed.q.shape[0]
    int4 = isinstance(packed, PackedInt4)
    if int4 and packed.perm is not None:  # act-order: q's K is in perm's order
        x = jnp.take(x, packed.perm, axis=-1)
    mp = -(-m // config.tile_m) * config.tile_m
    x_padded = jnp.pad(x, ((0, mp - m), (0, 0)))
    if int4:
        scales, zeros, channel = packed.scales, packed.zeros, jnp.zeros((1, n), jnp.float32)
        group_steps = packed.group_size // config.tile_k
    else:
        scales = zeros = jnp.zeros((1, n), jnp.float16)
        channel, group_steps = packed.scale.reshape(1, n).astype(jnp.float32), 1
    registers = config.a_in_registers and not interpret
    half = config.tile_n // 2
    scratch = [plgpu.SMEM((2, config.tile_m, half), jnp.bfloat16, transforms=_BF16_TF),
               plgpu.SMEM((2, 1, half), jnp.float32), plgpu.Barrier(num_arrivals=1, num_barriers=2)]
    if not registers:
        scratch.append(plgpu.SMEM((2, half, config.tile_k), jnp.bfloat16, transforms=_BF16_TF))
    kernel = plgpu.kernel(
        functools.partial(_kernel, int4=int4, group_steps=group_steps, config=config, registers=registers),
        out_type=jax.ShapeDtypeStruct((config.splits * mp, n), jnp.bfloat16),
        scratch_types=scratch,
        grid=(n // config.tile_n, mp // config.tile_m, config.splits),
        grid_names=("n", "m", "s"),
        num_threads=3,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
        **interpret_kwargs(interpret),
    )
    return sum_splits(kernel(x_padded, packed.q, scales, zeros, channel), config.splits, m, out_dtype or x.dtype)
