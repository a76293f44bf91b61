"""Weight-only quantized matmul for decode (M <= 64) in Pallas Mosaic GPU: y[M, N] = x[M, K] @ dequant(W)[K, N].

Letters: M rows of x, K the contraction dim, N output features, Mp = M rounded up to 8, S the number of K splits,
G the int4 group size (= block_k = 128 here).

Decode reads every weight byte once, so the speed-up over bf16 is the byte ratio: 2x for int8, ~3.9x for int4
(with one f32 scale and bias per 128 weights). The kernel keeps the skinny bf16 kernel's cut
(`skinny_matmul.py`): the product is computed transposed, y^T[N, Mp] = W^T[N, K] @ x^T[K, Mp], over a grid of
(column block, K split) CTAs, each streaming its contiguous K slab through a ring of `num_stages` TMA slots.
What changes is the A operand, the weight tile:

* It arrives quantized: int8 [block_n, block_k], or int4 as uint8 [block_n, block_k / 2] where byte j of a
  128-column K tile holds column j in its low nibble and column j + 64 in its high nibble. That pairing (instead of
  adjacent columns) lets the unpacked halves feed two 64-deep wgmmas without any shuffle of registers.
* It is widened in registers and written to a bf16 SMEM tile that the wgmma reads. int8 needs only the cast (the
  per-channel scale factors out of the dot and is applied to the f32 result); int4 computes q * scale + bias
  with the group's scale and bias (bias = -zero * scale) per output row, so the math is one FMA per weight.

Packed layouts (`pack_int8`, `pack_int4`) are made once at load time from ie_jax.quant's Int8Weights /
Int4Weights. This module knows those two formats, nothing about layers or checkpoints.
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
_SWIZZLE = 128  # bytes


@dataclasses.dataclass(frozen=True)
class TuningConfig:
    """block_n: output columns per CTA (wgmma M: 64 or 128). block_k: K per pipeline step (128: one int4 group,
    one 128-byte swizzle row of int8). num_stages: TMA ring slots. num_splits: K splits (None: fill ~ctas_per_sm
    CTAs per SM)."""

    block_n: int = 128
    block_k: int = 128
    num_stages: int = 4
    num_splits: int | None = None
    ctas_per_sm: int = 2

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
    q: jax.Array  # [N, K / 2] uint8: per 128-column K tile, byte j = column j (low nibble) | column j + 64 (high)
    scale: jax.Array  # [K / G, N] f32
    bias: jax.Array  # [K / G, N] f32: -zero * scale


def pack_int8(qw) -> PackedInt8:
    """ie_jax.quant.int8.Int8Weights (q [K, N]) -> the kernel's layout."""
    return PackedInt8(jnp.asarray(qw.q).T, jnp.asarray(qw.scale, jnp.float32))


def pack_int4(qw) -> PackedInt4:
    """ie_jax.quant.int4.Int4Weights (q [K, N] 0..15, group 128, no act-order) -> the kernel's layout."""
    if qw.group_size != GROUP or qw.perm is not None:
        raise ValueError(f"the int4 kernel needs group_size={GROUP} and no act-order permutation, got "
                         f"group_size={qw.group_size}, perm={'set' if qw.perm is not None else None}")
    K, N = qw.q.shape
    tiles = qw.q.T.reshape(N, K // GROUP, 2, GROUP // 2).astype(jnp.uint8)  # [N, K/G, half, 64]
    q = (tiles[:, :, 0] | (tiles[:, :, 1] << 4)).reshape(N, K // 2)
    scale = qw.scales.astype(jnp.float32)
    bias = -qw.zeros.astype(jnp.float32) * scale
    return PackedInt4(q, scale, bias)


# ----------------------------------------------------------------------------------------------------------------
# Kernel


def _kernel(x_ref, w_ref, s_ref, b_ref, out_ref, x_smem, w_smem, s_smem, b_smem, a_smem, o_smem, bars, *, int4,
            block_n, block_k, num_stages, k_steps):
    # x_ref   [Mp, K] bf16            activations, rows padded to Mp
    # w_ref   [N, K] int8 | [N, K/2] uint8 (int4 pairs, see pack_int4)
    # s_ref, b_ref  [K/G, N] f32      int4 scale and bias per (group, column); unused for int8
    # out_ref [S, N, Mp] f32          per-split partial sums of y^T
    # x_smem  [stages, Mp, block_k]   x tiles (wgmma B, read transposed)
    # w_smem  [stages, block_n, kw]   quantized weight tiles, kw = block_k (int8) or block_k / 2 (int4)
    # s_smem, b_smem [stages, block_n]  the step's int4 scale / bias rows
    # a_smem  [block_n, block_k] bf16 the widened weight tile (wgmma A, K-major)
    # o_smem  [block_n, Mp] f32       the CTA's partial, staged for one TMA store
    # bars    [stages]                one barrier per slot for all of its copies
    n_idx = lax.axis_index("n")
    s_idx = lax.axis_index("s")
    first_step = s_idx * k_steps
    n_cols = pl.ds(n_idx * block_n, block_n)
    kw = block_k // 2 if int4 else block_k
    half = block_k // 2

    def issue(step, slot):
        k_step = first_step + step
        plgpu.copy_gmem_to_smem(w_ref.at[n_cols, pl.ds(k_step * kw, kw)], w_smem.at[slot], bars.at[slot])
        plgpu.copy_gmem_to_smem(x_ref.at[:, pl.ds(k_step * block_k, block_k)], x_smem.at[slot], bars.at[slot])
        if int4:
            plgpu.copy_gmem_to_smem(s_ref.at[k_step, n_cols], s_smem.at[slot], bars.at[slot])
            plgpu.copy_gmem_to_smem(b_ref.at[k_step, n_cols], b_smem.at[slot], bars.at[slot])

    for step in range(min(num_stages, k_steps)):  # fill the ring
        issue(step, step)

    def scope(acc_ref):  # acc_ref [block_n, Mp] f32
        def body(step, carry):
            slot = lax.rem(step, num_stages)
            plgpu.barrier_wait(bars.at[slot])
            w = w_smem[slot]  # [block_n, kw] in registers
            if int4:
                scale = s_smem[slot][:, None]  # [block_n, 1] f32
                bias = b_smem[slot][:, None]
                w = w.astype(jnp.int32)  # 8-bit registers allow no arithmetic
                lo = (w & 15).astype(jnp.float32) * scale + bias  # columns [0, 64) of the tile
                hi = (w >> 4).astype(jnp.float32) * scale + bias  # columns [64, 128)
                a_smem[:, :half] = lo.astype(jnp.bfloat16)
                a_smem[:, half:] = hi.astype(jnp.bfloat16)
            else:
                a_smem[...] = w.astype(jnp.bfloat16)
            plgpu.commit_smem()
            # acc[N, Mp] += W^T[N, bk] @ x^T[bk, Mp]
            plgpu.wgmma(acc_ref, a_smem, x_smem.at[slot].T)
            plgpu.wgmma_wait(0)  # a_smem and the slot are read: both may be overwritten

            @pl.when(step + num_stages < k_steps)
            def _():
                issue(step + num_stages, slot)

            return carry

        lax.fori_loop(0, k_steps, body, None)
        o_smem[...] = acc_ref[...]

    pl.run_scoped(scope, plgpu.ACC(o_smem.shape, jnp.float32))
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(o_smem, out_ref.at[s_idx, n_cols])
    plgpu.wait_smem_to_gmem(0)


def _partials(x_padded, packed, *, config, num_splits, interpret):
    int4 = isinstance(packed, PackedInt4)
    mp, k = x_padded.shape
    n = packed.q.shape[0]
    k_steps = k // (config.block_k * num_splits)
    kw = config.block_k // 2 if int4 else config.block_k
    bf16_tf = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(_SWIZZLE))
    byte_tf = (plgpu.TilingTransform((8, kw)), plgpu.SwizzleTransform(kw))  # a weight-tile row is kw bytes
    scale_ref = packed.scale if int4 else jnp.zeros((1, n), jnp.float32)
    bias_ref = packed.bias if int4 else jnp.zeros((1, n), jnp.float32)
    body = functools.partial(_kernel, int4=int4, block_n=config.block_n, block_k=config.block_k,
                             num_stages=config.num_stages, k_steps=k_steps)
    kernel = plgpu.kernel(
        body,
        out_type=jax.ShapeDtypeStruct((num_splits, n, mp), jnp.float32),
        scratch_types=[
            plgpu.SMEM((config.num_stages, mp, config.block_k), jnp.bfloat16, transforms=bf16_tf),
            plgpu.SMEM((config.num_stages, config.block_n, kw), packed.q.dtype, transforms=byte_tf),
            plgpu.SMEM((config.num_stages, config.block_n), jnp.float32),
            plgpu.SMEM((config.num_stages, config.block_n), jnp.float32),
            plgpu.SMEM((config.block_n, config.block_k), jnp.bfloat16, transforms=bf16_tf),
            plgpu.SMEM((config.block_n, mp), jnp.float32),
            plgpu.Barrier(num_arrivals=4 if int4 else 2, num_barriers=config.num_stages),
        ],
        grid=(n // config.block_n, num_splits),
        grid_names=("n", "s"),
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
        **interpret_kwargs(interpret),
    )
    return kernel(x_padded, packed.q, scale_ref, bias_ref)


# ----------------------------------------------------------------------------------------------------------------
# Public wrapper


def _check_args(x, packed, config):
    if not isinstance(packed, (PackedInt8, PackedInt4)):
        raise ValueError(f"packed is a {type(packed).__name__}; expected PackedInt8 or PackedInt4 (pack_int8/4)")
    if x.ndim != 2:
        raise ValueError(f"{x.shape=} must be [M, K]")
    m, k = x.shape
    n = packed.q.shape[0]
    k_w = packed.q.shape[1] * (2 if isinstance(packed, PackedInt4) else 1)
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


def quant_matmul(x, packed, *, config: TuningConfig | None = None, interpret=False):
    """y = x @ dequant(W) for x [M, K] bf16 (M <= 64) and W packed by `pack_int8` / `pack_int4`; bf16 out."""
    config = config or TuningConfig()
    _check_args(x, packed, config)
    return _quant_matmul(x, packed, config=config, interpret=interpret)


@functools.partial(jax.jit, static_argnames=("config", "interpret"))
def _quant_matmul(x, packed, *, config, interpret):
    m, k = x.shape
    mp = -(-m // 8) * 8
    x_padded = jnp.pad(x, ((0, mp - m), (0, 0)))  # [Mp, K]
    n = packed.q.shape[0]
    partials = _partials(x_padded, packed, config=config, num_splits=config.splits_for(k, n), interpret=interpret)
    y = partials.sum(axis=0)  # [N, Mp] f32
    if isinstance(packed, PackedInt8):
        y = y * packed.scale[:, None]
    return y[:, :m].T.astype(x.dtype)


def quant_matmul_reference(x, packed):
    """Dequantize the packed weights in f32 and multiply (no tiling), cast to x's dtype."""
    if isinstance(packed, PackedInt8):
        w = packed.q.astype(jnp.float32).T * packed.scale  # [K, N]
    else:
        n, kh = packed.q.shape
        q = packed.q.reshape(n, kh // (GROUP // 2), GROUP // 2)
        cols = jnp.stack([q & 15, q >> 4], axis=2).reshape(n, kh // (GROUP // 2), GROUP)  # [N, K/G, G]
        w = cols.astype(jnp.float32) * packed.scale.T[..., None] + packed.bias.T[..., None]
        w = w.reshape(n, -1).T
    return jnp.dot(x.astype(jnp.float32), w).astype(x.dtype)


# ----------------------------------------------------------------------------------------------------------------
# Benchmark

LLAMA3_8B_SHAPES = {"qkv": (4096, 6144), "o": (4096, 4096), "gate_up": (4096, 28672), "down": (14336, 4096)}
_L2_BYTES = 50 * 2**20


def _random_packed(key, fmt, k, n):
    from ie_jax.quant.int4 import quantize_int4
    from ie_jax.quant.int8 import quantize_int8
    w = 0.02 * jax.random.normal(key, (k, n), jnp.float32)
    return pack_int8(quantize_int8(w)) if fmt == "int8" else pack_int4(quantize_int4(w, GROUP))


def _bytes(packed) -> int:
    return sum(a.nbytes for a in jax.tree.leaves(packed))


def main(argv=()):
    """Sweep W8A16 / W4A16 at Llama-3-8B layer shapes against XLA's bf16 dot, XLA's dequantize-then-dot and (when
    torch is importable) cuBLAS bf16, all in one process; CUPTI device time (skinny_matmul's timing helpers)."""
    from kernels_pallas.skinny_matmul import _time_device, _time_torch
    parser = argparse.ArgumentParser(prog="bench_kernels.py quant")
    parser.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    parser.add_argument("--ms", default="1,16,64")
    parser.add_argument("--shapes", default=",".join(LLAMA3_8B_SHAPES))
    parser.add_argument("--formats", default="int8,int4")
    parser.add_argument("--iterations", type=int, default=10)
    args = parser.parse_args(list(argv))
    try:
        import torch
        have_torch = torch.cuda.is_available()
    except ImportError:
        have_torch = False
    configs = [TuningConfig(), TuningConfig(num_stages=6, ctas_per_sm=1), TuningConfig(block_n=64, num_stages=6)]
    rows = []
    for name in args.shapes.split(","):
        k, n = LLAMA3_8B_SHAPES[name]
        copies = max(2, -(-4 * _L2_BYTES // (k * n * 2)))
        keys = jax.random.split(jax.random.key(k + n), copies + 1)
        ws = [(0.02 * jax.random.normal(kk, (k, n), jnp.float32)).astype(jnp.bfloat16) for kk in keys[1:]]
        for m in [int(v) for v in args.ms.split(",")]:
            x = jax.random.normal(jax.random.fold_in(keys[0], m), (m, k), jnp.bfloat16)
            bf16_us, _ = _time_device(jnp.dot, x, ws, args.iterations)
            torch_us = _time_torch(x, ws, args.iterations) if have_torch else None
            print(f"{name} K={k} N={n} M={m}: XLA bf16 {bf16_us:.1f} us"
                  + (f", cuBLAS bf16 {torch_us:.1f} us" if torch_us else ""), flush=True)
            for fmt in args.formats.split(","):
                packs = [_random_packed(kk, fmt, k, n) for kk in keys[1:]]
                expected = quant_matmul_reference(x, packs[0]).astype(jnp.float32)
                scale = float(jnp.max(jnp.abs(expected)))
                xla_us, _ = _time_device(quant_matmul_reference, x, packs, args.iterations)
                for cfg in configs:
                    try:
                        _check_args(x, packs[0], cfg)
                        fn = functools.partial(_quant_matmul, config=cfg, interpret=False)
                        err = float(jnp.max(jnp.abs(fn(x, packs[0]).astype(jnp.float32) - expected))) / scale
                        us, kernel_us = _time_device(fn, x, packs, args.iterations)
                    except Exception as e:  # a config that does not compile is reported, not fatal
                        print(f"  {fmt} {cfg}: FAILED {type(e).__name__}: {str(e)[:200]}", flush=True)
                        continue
                    tbps = _bytes(packs[0]) / (us * 1e-6) / 1e12
                    base = torch_us or bf16_us
                    print(f"  {fmt} bn={cfg.block_n} st={cfg.num_stages} S={cfg.splits_for(k, n)}: {us:.1f} us "
                          f"(kernel {kernel_us:.1f}) {tbps:.2f} TB/s of packed weights, x{base / us:.2f} vs "
                          f"{'cuBLAS' if torch_us else 'XLA'} bf16, XLA dequant+dot {xla_us:.1f} us, err {err:.1e}",
                          flush=True)
                    rows.append(dict(shape=name, k=k, n=n, m=m, fmt=fmt, config=dataclasses.asdict(cfg), us=us,
                                     kernel_us=kernel_us, tbps=tbps, rel_err=err, bf16_xla_us=bf16_us,
                                     bf16_cublas_us=torch_us, dequant_xla_us=xla_us, ok=err < 2e-2))
                del packs
        del ws
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"quant_{time.strftime('%Y%m%d-%H%M%S')}.json")
    with open(path, "w") as f:
        json.dump({"device": str(jax.devices()[0]), "rows": rows}, f, indent=1)
    print(f"wrote {path}")
    best = {}
    for r in rows:
        if r["ok"]:
            key = (r["shape"], r["m"], r["fmt"])
            best[key] = min(best.get(key, r), r, key=lambda v: v["us"])
    print("\nshape    M  fmt    best us   TB/s  vs cuBLAS/XLA bf16")
    for (shape, m, fmt), r in best.items():
        base = r["bf16_cublas_us"] or r["bf16_xla_us"]
        print(f"{shape:8s} {m:3d} {fmt:5s} {r['us']:8.1f} {r['tbps']:6.2f} {base / r['us']:8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
