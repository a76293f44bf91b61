"""FP8 W8A8 matmul: x [..., K] bf16 quantized to e4m3 per row (or by a static input scale), times e4m3 weights held
K-major as W^T [N, K] (Fp8Weights' own layout), f32 accumulation, both scales applied to the output.

Two paths with the same arithmetic as `ie_jax.quant.fp8.fp8_matmul_reference`:
* `fp8_matmul`: XLA's fp8 dot (cuBLASLt on Hopper), any M.
* `fp8_skinny_matmul`: a Pallas Mosaic GPU kernel for decode (M <= 64) on the skinny kernel's cut
  (`skinny_matmul.py`): y^T = W^T x^T over (column block, K split) CTAs, each streaming its K slab through a TMA ring.
  Both wgmma operands are e4m3 tiles straight from the ring (an 8-bit operand must be K-major, and both are), so
  unlike the int8/int4 kernel (`quant_matmul.py`) nothing is widened.
`fp8_kernel_config` records where the kernel was measured faster than XLA's dot on the H200; `ops.quant_matmul`
follows it.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from kernels_pallas.quant_matmul import MAX_M, TuningConfig
from kernels_pallas.skinny_matmul import interpret_kwargs


# XLA's fp8 dot on the Linear's K-major e4m3 q [N, K] (fp8_matmul's n_major; on a [K, N] weight XLA transposes it
# every call, 0.08-0.45x cuBLAS bf16), H200: >= 1.28x cuBLAS bf16 at M = 1 and 4096 on all four shapes and at
# M = 16 and 64 on gate_up (1.66, 1.70); at M = 16 o is level (1.02x) and down / qkv are 0.61-0.81x, still above
# the bf16-upcast reference there (0.44-0.50x). M = 256, and M = 64 beyond gate_up, were not measured.
FP8_XLA_DOT = True


def fp8_matmul(x, q, scale, input_scale=None, *, out_dtype=None, n_major=False):
    """W8A8: x [..., K] quantized to e4m3 per token (or by the static `input_scale`), one e4m3 x e4m3 dot with f32
    accumulation (cuBLASLt's fp8 GEMM on Hopper), both scales applied to the output. q is e4m3 [K, N], or [N, K]
    with n_major (the K-major layout cuBLASLt wants for both operands, and what Fp8Weights holds); scale [N] f32."""
    from ie_jax.quant.fp8 import quantize_activations
    xq, x_scale = quantize_activations(x, input_scale)
    dims = (((x.ndim - 1,), (1 if n_major else 0,)), ((), ()))
    acc = lax.dot_general(xq, q, dims, preferred_element_type=jnp.float32)
    return (acc * x_scale * scale).astype(out_dtype or x.dtype)


def _fp8_kernel(x_ref, w_ref, out_ref, x_smem, w_smem, o_smem, bars, *, block_n, block_k, num_stages, k_steps):
    # x_ref   [Mp, K] e4m3        x / its per-row scale, rows padded to Mp (zeros)
    # w_ref   [N, K] e4m3         W^T as Fp8Weights holds it: K-major, the layout an 8-bit wgmma operand needs
    # out_ref [S, N, Mp] f32      per-split partial sums of (W^T x^T) before the two scales
    # x_smem  [stages, Mp, block_k], w_smem [stages, block_n, block_k]: the TMA ring (one barrier per slot)
    # o_smem  [block_n, Mp] f32   the CTA's partial, staged for one TMA store
    # Unlike the int8/int4 kernel nothing is widened: the tiles are the wgmma's operands as they land, so one
    # wgmma may stay in flight while the slot before it is refilled.
    n_idx, s_idx = lax.axis_index("n"), lax.axis_index("s")
    first_step = s_idx * k_steps
    n_rows = pl.ds(n_idx * block_n, block_n)

    def issue(step, slot):
        k_cols = pl.ds((first_step + step) * block_k, block_k)
        plgpu.copy_gmem_to_smem(w_ref.at[n_rows, k_cols], w_smem.at[slot], bars.at[slot])
        plgpu.copy_gmem_to_smem(x_ref.at[:, k_cols], x_smem.at[slot], bars.at[slot])

    for step in range(min(num_stages, k_steps)):
        issue(step, step)

    def scope(acc_ref):  # acc [block_n, Mp] += W^T[block_n, bk] . x^T[bk, Mp]
        def body(step, carry):
            slot = lax.rem(step, num_stages)
            plgpu.barrier_wait(bars.at[slot])
            plgpu.wgmma(acc_ref, w_smem.at[slot], x_smem.at[slot].T)
            plgpu.wgmma_wait(1)  # the previous step's wgmma has read its slot
            done = step - 1

            @pl.when((done >= 0) & (done + num_stages < k_steps))
            def _():
                issue(done + num_stages, lax.rem(done + num_stages, num_stages))

            return carry

        lax.fori_loop(0, k_steps, body, None)
        plgpu.wgmma_wait(0)
        o_smem[...] = acc_ref[...]

    pl.run_scoped(scope, plgpu.ACC(o_smem.shape, jnp.float32))
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(o_smem, out_ref.at[s_idx, n_rows])
    plgpu.wait_smem_to_gmem(0)


FP8_E4M3 = jnp.float8_e4m3fn


def check_fp8_args(x, q, scale, config: TuningConfig):
    """Raise ValueError unless the fp8 decode kernel takes x [M, K] bf16 and q [N, K] e4m3 with scale [N]."""
    if x.ndim != 2 or q.ndim != 2:
        raise ValueError(f"{x.shape=} and {q.shape=} must be [M, K] and one [N, K] matrix")
    m, k = x.shape
    n, k_w = q.shape
    if k_w != k:
        raise ValueError(f"{x.shape=} and {q.shape=} disagree on K")
    if scale.shape != (n,):
        raise ValueError(f"{scale.shape=} must be [{n}]")
    if not 1 <= m <= MAX_M:
        raise ValueError(f"{m=} (rows of x) must be in [1, {MAX_M}]; use XLA's fp8 dot above that")
    if x.dtype != jnp.bfloat16 or q.dtype != FP8_E4M3:
        raise ValueError(f"{x.dtype=} and {q.dtype=} must be bfloat16 and float8_e4m3fn")
    if n % config.block_n or k % config.block_k:
        raise ValueError(f"N={n} and K={k} must be multiples of {config.block_n=} and {config.block_k=}")
    if config.num_stages < 2:
        raise ValueError(f"{config.num_stages=} must be >= 2 (one wgmma stays in flight)")
    if (k // config.block_k) % config.splits_for(k, n):
        raise ValueError(f"{k=} must split into {config.splits_for(k, n)} slabs of whole {config.block_k=} steps")


FP8_CONFIG = TuningConfig(num_stages=4)  # H200: the best or within 3% of it at M <= 16 on all four 8B shapes


def fp8_kernel_config(m: int, k: int, n: int) -> TuningConfig | None:
    """The config `ops.quant_matmul` (backend auto) runs the fp8 kernel with at M = m rows for a [K, N] weight, or
    None for XLA's fp8 dot. Measured on the H200 (benchmarks/results/quant_20261203-092239_gate_up-down-qkv-o.json,
    docs/kernels/quant_matmul.md, v5): at M <= 16 the kernel beat XLA on every Llama-3-8B shape (down M = 16: 23.5
    against 54.8 us) but gate_up (level); at M = 64 XLA's dot wins on gate_up (38.9 against 44.9 us), the kernel
    elsewhere with more stages (o with more CTAs)."""
    if m <= 16:
        return FP8_CONFIG
    if m > MAX_M or n >= 16384:
        return None
    if k * n <= 4096 * 4096:
        return TuningConfig(num_stages=3, ctas_per_sm=8, min_k_steps=4)
    return TuningConfig(num_stages=6, min_k_steps=4)


def kernel_supports_fp8(x, q, scale, config: TuningConfig | None = None) -> bool:
    try:
        check_fp8_args(x, q, scale, config or FP8_CONFIG)
    except ValueError:
        return False
    return True


def fp8_skinny_matmul(x, q, scale, input_scale=None, *, config: TuningConfig | None = None, interpret=False,
                      out_dtype=None):
    """W8A8 for decode, x [M, K] bf16 (M <= 64) -> [M, N]: x quantized to e4m3 per row (or by the static
    `input_scale`), an e4m3 x e4m3 wgmma with f32 accumulation against q [N, K] e4m3 (Fp8Weights' own layout),
    then both scales. The arithmetic of `fp8_matmul` and `ie_jax.quant.fp8.fp8_matmul_reference`."""
    config = config or FP8_CONFIG
    check_fp8_args(x, q, scale, config)
    return _fp8_skinny_matmul(x, q, scale, input_scale, config=config, interpret=interpret, out_dtype=out_dtype)


@functools.partial(jax.jit, static_argnames=("config", "interpret", "out_dtype"))
def _fp8_skinny_matmul(x, q, scale, input_scale=None, *, config, interpret, out_dtype=None):
    from ie_jax.quant.fp8 import quantize_activations
    m, k = x.shape
    n = q.shape[0]
    mp = -(-m // 8) * 8
    xq, x_scale = quantize_activations(x, input_scale)  # [M, K] e4m3, [M, 1] f32
    xq = jnp.pad(xq, ((0, mp - m), (0, 0)))
    num_splits = config.splits_for(k, n)
    tf = (plgpu.TilingTransform((8, config.block_k)), plgpu.SwizzleTransform(config.block_k))  # 1 byte a value
    kernel = plgpu.kernel(
        functools.partial(_fp8_kernel, block_n=config.block_n, block_k=config.block_k,
                          num_stages=config.num_stages, k_steps=k // (config.block_k * num_splits)),
        out_type=jax.ShapeDtypeStruct((num_splits, n, mp), jnp.float32),
        scratch_types=[
            plgpu.SMEM((config.num_stages, mp, config.block_k), FP8_E4M3, transforms=tf),
            plgpu.SMEM((config.num_stages, config.block_n, config.block_k), FP8_E4M3, transforms=tf),
            plgpu.SMEM((config.block_n, mp), jnp.float32),
            plgpu.Barrier(num_arrivals=2, num_barriers=config.num_stages),
        ],
        grid=(n // config.block_n, num_splits),
        grid_names=("n", "s"),
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Lane),
        **interpret_kwargs(interpret),
    )
    y = kernel(xq, q).sum(axis=0)[:, :m] * scale[:, None]  # [N, M]
    return (y.T * x_scale).astype(out_dtype or x.dtype)
