"""FP8 W8A8 GEMM for many rows (prefill, large decode batches) in Pallas Mosaic GPU (Hopper).

y[M, N] = (e4m3(x / x_scale) @ W^T_e4m3^T) * x_scale[:, None] * scale[None, :], the arithmetic of
`ie_jax.quant.fp8.fp8_matmul_reference`, for Fp8Weights' q [N, K] (K-major) and any M.

Why a kernel when XLA has an fp8 dot: XLA's (cuBLASLt) fp8 GEMM takes only scalar scales, so with per-token and
per-channel scales it writes an f32 [M, N] product and rescales it in a second pass, and at 256 rows its algorithm
is slower than cuBLAS's bf16 GEMM on down and qkv (0.90x / 0.88x, H200) and at 1,024 rows on o (0.88x, H100).
Here both scales are applied to the accumulator before one bf16 store.

How it is cut (as quant_gemm.py, with nothing to widen):
* y^T[N, M] = W^T[N, K] x^T[K, M]: both wgmma operands are e4m3 tiles straight from shared memory, K-major as an
  8-bit wgmma operand must be (W^T's rows as the A operand, x's tile read transposed as B).
* CTA (m block, n block, K split) runs a warp-specialized pipeline over K: one memory warpgroup issues each step's
  weight and x tiles into a ring of `num_stages` slots; two compute warpgroups each own tile_n / 2 rows of W^T and
  their own f32 accumulator [tile_n / 2, tile_m].
* Epilogue: the accumulator times the channel scales (rows) and the token scales (columns), stored transposed as
  y's bf16 [tile_m, tile_n / 2] tile by TMA. With `splits` > 1 each K range stores a bf16 partial that the wrapper
  sums in f32 (for deep weights whose column blocks alone leave SMs idle).
* m is the fastest grid axis, so the CTAs that read one weight tile run side by side and share it through L2.

`gemm_config` is where `ops.quant_matmul` runs it: the cells it measured faster than XLA's fp8 dot (65 to 1,024
rows; gate_up to 256), from `scripts/bench_kernels.py quant` rows "fp8 gemm ...".
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from kernels_pallas.quant_gemm import check_tiles, store_transposed, sum_splits
from kernels_pallas.skinny_matmul import interpret_kwargs

FP8 = jnp.float8_e4m3fn
_FP8_TF = (plgpu.TilingTransform((8, 128)), plgpu.SwizzleTransform(128))  # 128 e4m3 values: one swizzled row
_BF16_TF = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))  # 64 bf16 values: one swizzled row


@dataclasses.dataclass(frozen=True)
class Fp8GemmConfig:
    """tile_n: rows of W^T per CTA (two compute warpgroups of tile_n / 2 = 64 or 128 rows). tile_m: rows of x per
    CTA (wgmma N: 64, 128 or 256). num_stages: ring slots. splits: K ranges run by separate CTAs (a grid axis).
    K per step is 128 (one 128-byte swizzled row of e4m3)."""

    tile_n: int = 256
    tile_m: int = 128
    num_stages: int = 3
    splits: int = 1

    tile_k = 128

    def __post_init__(self):
        check_tiles(self)

    @classmethod
    def parse(cls, label: str) -> Fp8GemmConfig:
        """'256x128x3' or '128x256x2s4': tile_n x tile_m x num_stages [s splits]."""
        dims, _, splits = label.partition("s")
        tile_n, tile_m, stages = (int(v) for v in dims.split("x"))
        return cls(tile_n, tile_m, stages, int(splits or 1))

    def smem_bytes(self) -> int:
        """The ring (e4m3 weight and x tiles), the bf16 output tiles and the scales."""
        ring = self.num_stages * (self.tile_n + self.tile_m) * self.tile_k
        return ring + self.tile_m * self.tile_n * 2 + 4 * (self.tile_n + 2 * self.tile_m)


# Where the GEMM measured faster than XLA's fp8 dot (what those rows ran before) and than cuBLAS bf16, by the weight's
# shape class, (rows up to, config) in order (H100, benchmarks/results/quant_20261206-042848_h100_fp8_gemm.json,
# same process; docs/kernels/quant_matmul.md v12). Above 1,024 rows, and gate_up above 256 (XLA's dot: 228 against
# 235 us at 1,024), XLA's dot stays.
_P = Fp8GemmConfig.parse
_WIDE = ((128, _P("256x128x3")),  # gate_up (N >= 16384), 128 rows: 51.1 us, XLA 59.2, cuBLAS bf16 93.0 (1.82x)
         (256, _P("128x256x3")))  # 256: 64.7, XLA 74.0, bf16 107.9 (1.67x)
_DEEP = ((128, _P("128x128x4s4")),  # down (K >= 8192), 128 rows: 30.6 us, XLA 69.0, bf16 55.6 (1.82x)
         (256, _P("128x128x4s2")),  # 256: 36.1, XLA 72.4, bf16 60.6 (1.68x)
         (1024, _P("128x256x3")))  # 1,024: 93.1, XLA 103.1, bf16 157.4 (1.69x)
_SQUARE = ((128, _P("128x128x4s2")),  # qkv / o, 128 rows: 15.2 / 12.5 us, XLA 30.1 / 19.0, bf16 22.2 / 16.5
           (256, _P("128x128x4")),  # 256: 17.3 / 15.0, XLA 33.1 / 21.6, bf16 25.5 / 19.7
           (1024, _P("128x256x3")))  # 1,024: 54.7 / 31.2, XLA 74.0 / 49.6, bf16 73.5 / 50.0
MIN_ROWS = 65  # below, the fp8 decode kernel (fp8_matmul.fp8_skinny_matmul)


def gemm_config(m: int, k: int, n: int) -> Fp8GemmConfig | None:
    """The config `ops.quant_matmul` runs this GEMM with at m rows for q [N, K], or None (XLA's fp8 dot)."""
    if m < MIN_ROWS:
        return None
    table = _WIDE if n >= 16384 else _DEEP if k >= 8192 else _SQUARE
    config = next((c for up_to, c in table if m <= up_to), None)
    return config if config is not None and supports(k, n, config) else None


def supports(k: int, n: int, config: Fp8GemmConfig) -> bool:
    return n % config.tile_n == 0 and k % (config.tile_k * config.splits) == 0


def check_args(x, q, scale, config: Fp8GemmConfig):
    """Raise ValueError unless the GEMM takes x [M, K] bf16, q [N, K] e4m3 and scale [N] under config."""
    if x.ndim != 2 or q.ndim != 2:
        raise ValueError(f"{x.shape=} and {q.shape=} must be [M, K] and one [N, K] matrix")
    n, k = q.shape
    if x.shape[1] != k:
        raise ValueError(f"{x.shape=} and {q.shape=} disagree on K")
    if scale.shape != (n,):
        raise ValueError(f"{scale.shape=} must be [{n}]")
    if x.dtype != jnp.bfloat16 or q.dtype != FP8:
        raise ValueError(f"{x.dtype=} and {q.dtype=} must be bfloat16 and float8_e4m3fn")
    if not supports(k, n, config):
        raise ValueError(f"N={n} must be a multiple of {config.tile_n=} and K={k} split into {config.splits=} "
                         f"ranges of whole {config.tile_k}-value steps")


def _kernel(x_ref, w_ref, xs_ref, ws_ref, y_ref, o_smem, xs_smem, ws_smem, bar, *, config):
    # x_ref [Mp, K] e4m3 (x / x_scale, rows padded to Mp); w_ref [N, K] e4m3; xs_ref [1, Mp] f32 token scales;
    # ws_ref [1, N] f32 channel scales; y_ref [splits * Mp, N] bf16 (split s's rows at s * Mp)
    # o_smem [2, tile_m, tile_n / 2] bf16: each compute warpgroup's output tile
    # xs_smem [2, 1, tile_m], ws_smem [2, 1, tile_n / 2] f32, bar [2]: each warpgroup's scales
    half, tile_k = config.tile_n // 2, config.tile_k
    m_idx, n_idx, s_idx = lax.axis_index("m"), lax.axis_index("n"), lax.axis_index("s")
    n_cols = pl.ds(n_idx * config.tile_n, config.tile_n)
    m_rows = pl.ds(m_idx * config.tile_m, config.tile_m)
    out_rows = pl.ds(s_idx * x_ref.shape[0] + m_idx * config.tile_m, config.tile_m)
    k_steps = w_ref.shape[1] // tile_k // config.splits
    k_range = pl.ds(s_idx * k_steps * tile_k, k_steps * tile_k)
    in_specs = [plgpu.BlockSpec((config.tile_n, tile_k), lambda k: (0, k), transforms=_FP8_TF),
                plgpu.BlockSpec((config.tile_m, tile_k), lambda k: (0, k), transforms=_FP8_TF)]

    def body(_, w_smem, x_smem, acc_ref):
        wg = lax.axis_index("wg")
        plgpu.wgmma(acc_ref, w_smem.at[pl.ds(wg * half, half)], x_smem.T)
        plgpu.wgmma_wait(0)  # the slot goes back to the memory warpgroup when this step returns
        return acc_ref

    def compute_context(eval_pipeline):
        @functools.partial(pl.run_scoped, acc_ref=plgpu.ACC((half, config.tile_m), jnp.float32))
        def _(acc_ref):
            wg = lax.axis_index("wg")
            n_half = pl.ds(n_idx * config.tile_n + wg * half, half)
            plgpu.copy_gmem_to_smem(ws_ref.at[:, n_half], ws_smem.at[wg], bar.at[wg])  # fetched while it runs
            plgpu.copy_gmem_to_smem(xs_ref.at[:, m_rows], xs_smem.at[wg], bar.at[wg])
            eval_pipeline(acc_ref)
            plgpu.barrier_wait(bar.at[wg])
            acc = acc_ref[...]
            acc = acc * lax.broadcast_in_dim(ws_smem[wg, 0], acc.shape, [0])  # channel scale per row of y^T
            acc = acc * lax.broadcast_in_dim(xs_smem[wg, 0], acc.shape, [1])  # token scale per column
            store_transposed(acc, o_smem.at[wg], y_ref.at[out_rows, n_half])

    pipeline = plgpu.emit_pipeline_warp_specialized(
        body, grid=(k_steps,), memory_registers=40, in_specs=in_specs, max_concurrent_steps=config.num_stages,
        wg_axis="wg", num_compute_wgs=2, compute_context=compute_context)
    pipeline(w_ref.at[n_cols, k_range], x_ref.at[m_rows, k_range])


def fp8_gemm(x, q, scale, input_scale=None, *, config: Fp8GemmConfig | None = None, interpret=False,
             out_dtype=None):
    """W8A8 for x [M, K] bf16 (any M; rows padded to tile_m) against Fp8Weights' q [N, K] e4m3 and scale [N] f32:
    x quantized to e4m3 per row (or by the static `input_scale`), e4m3 x e4m3 wgmma with f32 accumulation, both
    scales applied before the bf16 store."""
    config = config or Fp8GemmConfig()
    check_args(x, q, scale, config)
    return _fp8_gemm(x, q, scale, input_scale, config=config, interpret=interpret, out_dtype=out_dtype)


@functools.partial(jax.jit, static_argnames=("config", "interpret", "out_dtype"))
def _fp8_gemm(x, q, scale, input_scale=None, *, config, interpret, out_dtype=None):
    from ie_jax.quant.fp8 import quantize_activations
    m, _ = x.shape
    n = q.shape[0]
    mp = -(-m // config.tile_m) * config.tile_m
    xq, x_scale = quantize_activations(x, input_scale)  # [M, K] e4m3, [M, 1] f32
    xq = jnp.pad(xq, ((0, mp - m), (0, 0)))
    xs = jnp.pad(x_scale[:, 0], (0, mp - m)).reshape(1, mp)
    half = config.tile_n // 2
    kernel = plgpu.kernel(
        functools.partial(_kernel, config=config),
        out_type=jax.ShapeDtypeStruct((config.splits * mp, n), jnp.bfloat16),
        scratch_types=[plgpu.SMEM((2, config.tile_m, half), jnp.bfloat16, transforms=_BF16_TF),
                       plgpu.SMEM((2, 1, config.tile_m), jnp.float32), plgpu.SMEM((2, 1, half), jnp.float32),
                       plgpu.Barrier(num_arrivals=2, num_barriers=2)],
        grid=(mp // config.tile_m, n // config.tile_n, config.splits),
        grid_names=("m", "n", "s"),
        num_threads=3,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
        **interpret_kwargs(interpret),
    )
    y = kernel(xq, q, xs, scale.reshape(1, n).astype(jnp.float32))
    return sum_splits(y, config.splits, m, out_dtype or x.dtype)
