"""Skinny-M matmul for Hopper in Pallas Mosaic GPU: y[M, N] = x[M, K] @ w[K, N] for decode (M <= 64).

Letters: M rows of x (tokens in the decode batch), K the contraction dim, N output features. Mp is M rounded up
to a multiple of 8, S the number of K splits.

Decode is weight-bandwidth bound: every weight byte is read once and used M times, so the kernel's only job is
to keep HBM busy. How the work is cut:

* The product is computed transposed, y^T[N, M] = w^T[N, K] @ x^T[K, M], so the *weights* are wgmma's A operand
  (64..256 rows of N, read M-major straight from the TMA tile of w, no copy) and the tiny x is the B operand with
  wgmma's N = Mp (8..64). Padding M to 8 instead of 64 keeps the x tiles and the partial sums small. It also
  makes the weights the operand that may come from registers, which is where an int8/int4 weight-only variant
  dequantizes (load the quantized tile, widen it in registers, feed wgmma's register A).
* N alone gives too few tiles to fill 132 SMs (4096 / 128 = 32), so K is split too (split-K): CTA (n, s)
  streams the contiguous slab w[s*K/S:(s+1)*K/S, n*bn:(n+1)*bn] through a ring of `num_stages` shared-memory
  slots filled by TMA, each slot one [block_k, block_n] tile of w plus its [Mp, block_k] tile of x.
* Each CTA writes f32 partials [S, N, Mp]; a fused jnp epilogue sums the splits, drops the padding, transposes
  and casts. Its traffic is S * N * Mp * 4 bytes written and read, small next to the weights for M <= 16.

This module knows nothing about models or quantization formats; it multiplies two bf16 matrices.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

MAX_M = 64
_NUM_SMS = 132  # H100/H200 SXM; only used to pick a default split count
_SWIZZLE = 128  # bytes; one swizzle atom is 64 bf16 columns
_SWIZZLE_ELEMS = 64


@dataclasses.dataclass(frozen=True)
class TuningConfig:
    """How the weight matrix is cut into CTAs and tiles.

    block_n: columns of w per CTA (wgmma M: 64, 128 or 256).
    block_k: rows of w per pipeline step (a multiple of 64, the 128-byte swizzle atom).
    num_stages: shared-memory slots in the TMA ring; bytes in flight per CTA = num_stages * block_k * block_n * 2.
    num_splits: K splits (split-K); None picks the largest that keeps about `ctas_per_sm` CTAs per SM.
    ctas_per_sm: target residency used only when num_splits is None.
    mma_depth: wgmmas left in flight when a slot is refilled: 0 waits for the current one and refills its slot,
      1 waits for the previous one and refills the previous slot (the current wgmma overlaps the refill).
    consumers: warpgroups per CTA (1 or 2). With 2 they take alternate K steps of the CTA's slab, each through its
      own ring of `num_stages` slots into its own accumulator, summed through SMEM at the end.
    """

    block_n: int = 128
    block_k: int = 128
    num_stages: int = 4
    num_splits: int | None = None
    ctas_per_sm: int = 2
    mma_depth: int = 0
    consumers: int = 1

    def __post_init__(self):
        if self.block_n not in (64, 128, 256):
            raise ValueError(f"{self.block_n=} must be 64, 128 or 256")
        if self.block_k % _SWIZZLE_ELEMS or not 64 <= self.block_k <= 512:
            raise ValueError(f"{self.block_k=} must be a multiple of 64 in [64, 512]")
        if not 1 <= self.num_stages <= 12:
            raise ValueError(f"{self.num_stages=} must be in [1, 12]")
        if self.num_splits is not None and not 1 <= self.num_splits <= 256:
            raise ValueError(f"{self.num_splits=} must be None or in [1, 256]")
        if not 1 <= self.ctas_per_sm <= 8:
            raise ValueError(f"{self.ctas_per_sm=} must be in [1, 8]")
        if self.mma_depth not in (0, 1):
            raise ValueError(f"{self.mma_depth=} must be 0 or 1")
        if self.mma_depth >= self.num_stages:
            raise ValueError(f"{self.mma_depth=} needs num_stages > mma_depth, got {self.num_stages=}")
        if self.consumers not in (1, 2):
            raise ValueError(f"{self.consumers=} must be 1 or 2")
        smem = self.consumers * self.num_stages * self.block_k * (self.block_n + MAX_M) * 2
        if smem > 220 * 1024:
            raise ValueError(f"{self.num_stages=} x {self.block_k=} x {self.block_n=} needs {smem} B of SMEM (> 220 KiB)")

    def splits_for(self, k: int, n: int) -> int:
        return split_count(k, n, self)


def split_count(k: int, n: int, config) -> int:
    """The K split count for a [K, N] weight under a config with block_k, block_n, num_splits, ctas_per_sm (and
    optionally min_k_steps and consumers): explicit, or the largest divisor of K / block_k whose grid fits
    `ctas_per_sm` CTAs on every SM and whose splits keep at least `min_k_steps` steps (the fewest splits when no
    divisor does). With `consumers` warpgroups per CTA every split's step count is a multiple of it."""
    if config.num_splits is not None:
        return config.num_splits
    k_steps, n_blocks = k // config.block_k, n // config.block_n
    target = max(1, config.ctas_per_sm * _NUM_SMS // n_blocks)
    min_steps = getattr(config, "min_k_steps", 1)
    per_cta = getattr(config, "consumers", 1)
    whole = [s for s in range(1, k_steps + 1) if k_steps % s == 0 and (k_steps // s) % per_cta == 0]
    fits = [s for s in whole if s <= target and k_steps // s >= min_steps]
    return max(fits) if fits else min(whole, default=1)


def interpret_kwargs(interpret) -> dict:
    """plgpu.kernel's `interpret` argument: False (compile), True (the interpreter) or InterpretGPUParams."""
    if not interpret:
        return {}
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
    return {"interpret": InterpretGPUParams() if interpret is True else interpret}


# ----------------------------------------------------------------------------------------------------------------
# Kernel


def _kernel(x_ref, w_ref, out_ref, x_smem, w_smem, o_smem, bars, *sum_bar, block_n, block_k, num_stages, k_steps,
            tiled, mma_depth, copy_only, consumers):
    # x_ref   [Mp, K]             activations, rows padded to Mp
    # w_ref   [K, N] or, tiled, [N / block_n, K / block_k, block_k, block_n] (each tile one contiguous block)
    # out_ref [S, N, Mp] f32      per-split partial sums of y^T
    # Slots are [C * num_stages], C = consumers: warpgroup c owns c * num_stages ... (c + 1) * num_stages - 1.
    # x_smem  [slots, Mp, block_k]       ring of x tiles (B operand, read transposed)
    # w_smem  [slots, block_k, block_n]  ring of w tiles (A operand, read transposed: M-major)
    # o_smem  [block_n, Mp] f32   the CTA's partial, staged for one TMA store (C = 2: warpgroup 1's first)
    # bars    [slots]             one barrier per slot, two arrivals' worth of bytes (x and w tiles)
    # sum_bar                     C = 2: warpgroup 1's partial is in o_smem
    n_idx = lax.axis_index("n")
    s_idx = lax.axis_index("s")
    wg = lax.axis_index("wg") if consumers > 1 else 0
    first_step = s_idx * k_steps
    wg_steps = k_steps // consumers  # warpgroup wg runs the slab's steps wg, wg + C, wg + 2C, ...
    n_cols = pl.ds(n_idx * block_n, block_n)

    def issue(step, slot):  # step: this warpgroup's own count; slot: in its own ring
        k_step = first_step + step * consumers + wg
        slot = wg * num_stages + slot
        k_rows = pl.ds(k_step * block_k, block_k)
        w_tile = w_ref.at[n_idx, k_step] if tiled else w_ref.at[k_rows, n_cols]
        plgpu.copy_gmem_to_smem(w_tile, w_smem.at[slot], bars.at[slot])
        plgpu.copy_gmem_to_smem(x_ref.at[:, k_rows], x_smem.at[slot], bars.at[slot])

    for step in range(min(num_stages, wg_steps)):  # fill the ring
        issue(step, step)

    def scope(acc_ref):  # acc_ref [block_n, Mp] f32
        def body(step, carry):
            slot = wg * num_stages + lax.rem(step, num_stages)
            plgpu.barrier_wait(bars.at[slot])
            if not copy_only:
                # acc[N, Mp] += w^T[N, bk] @ x^T[bk, Mp]
                plgpu.wgmma(acc_ref, w_smem.at[slot].transpose((1, 0)), x_smem.at[slot].transpose((1, 0)))
                plgpu.wgmma_wait(mma_depth)
            # The wgmma `mma_depth` steps back has read its slot: refill that slot.
            done = step - mma_depth

            @pl.when((done >= 0) & (done + num_stages < wg_steps))
            def _():
                issue(done + num_stages, lax.rem(done + num_stages, num_stages))

            return carry

        lax.fori_loop(0, wg_steps, body, None)
        if not copy_only:
            plgpu.wgmma_wait(0)
        if consumers == 1:
            o_smem[...] = acc_ref[...]
            return

        @pl.when(wg == 1)
        def _():
            o_smem[...] = acc_ref[...]
            plgpu.commit_smem()  # all 128 threads have stored before the one arrival
            plgpu.barrier_arrive(sum_bar[0])

        @pl.when(wg == 0)
        def _():
            plgpu.barrier_wait(sum_bar[0])
            o_smem[...] = plgpu.load(o_smem, layout=plgpu.Layout.WGMMA, optimized=False) + acc_ref[...]

    pl.run_scoped(scope, plgpu.ACC(o_smem.shape, jnp.float32))

    store_tile(o_smem, out_ref.at[s_idx, n_cols], wg, consumers)


def store_tile(o_smem, dst, wg, consumers: int) -> None:
    """The kernels' epilogue: the output tile from SMEM to its place in GMEM, by warpgroup 0 alone when several
    consumer warpgroups summed their partials into it."""
    def store():
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(o_smem, dst)
        plgpu.wait_smem_to_gmem(0)

    if consumers > 1:
        pl.when(wg == 0)(store)  # warpgroup 0 holds the sum
    else:
        store()


def _partials(x_padded, w, *, config, num_splits, interpret, copy_only=False):
    mp, k = x_padded.shape
    tiled = w.ndim == 4
    n = w.shape[0] * w.shape[3] if tiled else w.shape[1]
    k_steps = k // (config.block_k * num_splits)
    transforms = (plgpu.TilingTransform((8, _SWIZZLE_ELEMS)), plgpu.SwizzleTransform(_SWIZZLE))
    consumers, slots = config.consumers, config.consumers * config.num_stages
    body = functools.partial(_kernel, block_n=config.block_n, block_k=config.block_k, num_stages=config.num_stages,
                             k_steps=k_steps, tiled=tiled, mma_depth=config.mma_depth, copy_only=copy_only,
                             consumers=consumers)
    threads = dict(num_threads=consumers, thread_name="wg") if consumers > 1 else {}
    kernel = plgpu.kernel(
        body,
        out_type=jax.ShapeDtypeStruct((num_splits, n, mp), jnp.float32),
        scratch_types=[
            plgpu.SMEM((slots, mp, config.block_k), x_padded.dtype, transforms=transforms),
            plgpu.SMEM((slots, config.block_k, config.block_n), w.dtype, transforms=transforms),
            plgpu.SMEM((config.block_n, mp), jnp.float32),
            plgpu.Barrier(num_arrivals=2, num_barriers=slots),
            *([plgpu.Barrier(num_arrivals=1)] if consumers > 1 else []),  # sum_bar
        ],
        grid=(n // config.block_n, num_splits),
        grid_names=("n", "s"),
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Lane),
        **threads,
        **interpret_kwargs(interpret),
    )
    return kernel(x_padded, w)


def tile_weights(w, config: TuningConfig | None = None):
    """[K, N] -> [N / block_n, K / block_k, block_k, block_n]: every pipeline tile one contiguous block of HBM."""
    config = config or TuningConfig()
    k, n = w.shape
    if k % config.block_k or n % config.block_n:
        raise ValueError(f"{w.shape=} must be multiples of ({config.block_k=}, {config.block_n=})")
    return w.reshape(k // config.block_k, config.block_k, n // config.block_n, config.block_n).transpose(2, 0, 1, 3)


def untile_weights(w_tiled):
    """The inverse of `tile_weights`: [N / bn, K / bk, bk, bn] -> [K, N]."""
    nb, kb, bk, bn = w_tiled.shape
    return w_tiled.transpose(1, 2, 0, 3).reshape(kb * bk, nb * bn)


# ----------------------------------------------------------------------------------------------------------------
# Public wrapper


def _logical_kn(w):
    """(K, N) of a [K, N] or tiled [N / bn, K / bk, bk, bn] weight."""
    if w.ndim == 4:
        return w.shape[1] * w.shape[2], w.shape[0] * w.shape[3]
    return w.shape


def _check_args(x, w, config):
    if x.ndim != 2 or w.ndim not in (2, 4):
        raise ValueError(f"{x.shape=} and {w.shape=} must be [M, K] and [K, N] (or tiled [N/bn, K/bk, bk, bn])")
    if w.ndim == 4 and w.shape[2:] != (config.block_k, config.block_n):
        raise ValueError(f"tiled {w.shape=} must have tiles of ({config.block_k=}, {config.block_n=})")
    m, k = x.shape
    k_w, n = _logical_kn(w)
    if k_w != k:
        raise ValueError(f"{x.shape=} and {w.shape=} disagree on K")
    if not 1 <= m <= MAX_M:
        raise ValueError(f"{m=} (rows of x) must be in [1, {MAX_M}]; use a regular matmul above that")
    if x.dtype != jnp.bfloat16 or w.dtype != jnp.bfloat16:
        raise ValueError(f"{x.dtype=} and {w.dtype=} must both be bfloat16")
    if n % config.block_n:
        raise ValueError(f"{n=} must be a multiple of {config.block_n=}")
    if k % config.block_k:
        raise ValueError(f"{k=} must be a multiple of {config.block_k=}")
    splits = config.splits_for(k, n)
    if (k // config.block_k) % (splits * config.consumers):
        raise ValueError(f"{k=} must split into {splits=} slabs of whole {config.block_k=} steps, a multiple of "
                         f"{config.consumers=} each")


def skinny_matmul(x, w, *, config: TuningConfig | None = None, interpret=False):
    """y = x @ w for x [M, K] bf16 with M <= 64 and w [K, N] bf16; f32 accumulation, bf16 output.

    w may also come pre-tiled by `tile_weights(w, config)` (same config), which makes every TMA tile one
    contiguous block of memory. Needs K % config.block_k == 0 (128 by default), N % config.block_n == 0 (128 by
    default), and K / block_k divisible by the split count. Raises ValueError otherwise.
    """
    config = config or TuningConfig()
    _check_args(x, w, config)
    return _skinny_matmul(x, w, config=config, interpret=interpret)


@functools.partial(jax.jit, static_argnames=("config", "interpret", "copy_only"))
def _skinny_matmul(x, w, *, config, interpret, copy_only=False):
    m, k = x.shape
    n = _logical_kn(w)[1]
    mp = -(-m // 8) * 8
    x_padded = jnp.pad(x, ((0, mp - m), (0, 0)))  # [Mp, K]
    partials = _partials(x_padded, w, config=config, num_splits=config.splits_for(k, n), interpret=interpret,
                         copy_only=copy_only)
    return partials.sum(axis=0)[:, :m].T.astype(x.dtype)  # [S, N, Mp] -> [M, N]


def skinny_matmul_reference(x, w):
    """y = x @ w in f32 (no tiling), cast to x's dtype."""
    return jnp.dot(x.astype(jnp.float32), w.astype(jnp.float32)).astype(x.dtype)


# ----------------------------------------------------------------------------------------------------------------
# Benchmark

LLAMA3_8B_SHAPES = {"qkv": (4096, 6144), "o": (4096, 4096), "gate_up": (4096, 28672), "down": (14336, 4096)}
_HBM_TBPS = 4.14  # measured copy ceiling on the H200 (shared/GPU.md)
_L2_BYTES = 50 * 2**20


def _time_device(fn, x, ws, iterations):
    """Median device time per call (µs, CUPTI) of everything `fn` launches, and of its longest kernel alone.
    One executable calls `fn` once per weight copy, so consecutive calls read different weights."""
    from jax.experimental.mosaic.gpu import profiler
    _, timings = profiler.measure(jax.jit(lambda x, *ws: [fn(x, w) for w in ws]), iterations=iterations,
                                  aggregate=False)(x, *ws)
    per_op = len(timings[0]) // len(ws)
    totals = sorted(sum(t for _, t in it) / len(ws) for it in timings)
    longest = sorted(statistics.mean(sorted((t for _, t in it), reverse=True)[:len(ws)]) for it in timings)
    del per_op
    return statistics.median(totals) * 1e3, statistics.median(longest) * 1e3


def _time_torch(x, ws, reps):
    """cuBLAS via torch.nn.functional.linear on the same arrays (weights as contiguous [N, K]), CUDA-graph timed."""
    import torch
    from torch.utils import dlpack
    tx = dlpack.from_dlpack(x)
    tws = [dlpack.from_dlpack(w).t().contiguous() for w in ws]  # [N, K], torch's layout for linear
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        for w in tws:
            torch.nn.functional.linear(tx, w)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            outs = [torch.nn.functional.linear(tx, w) for w in tws]
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / len(tws))
    del outs, tws
    return statistics.median(times)


def _variants():
    """(label, config, tiled, copy_only). copy_only streams the same tiles with no wgmma: the TMA ceiling."""
    T = TuningConfig
    yield "v1 128x128x4", T(), False, False
    yield "v1 copy-only", T(), False, True
    yield "tiled 128x128x4", T(), True, False
    yield "tiled copy-only", T(), True, True
    yield "tiled 128x128x4 d1", T(mma_depth=1), True, False
    yield "tiled 128x64x6 d1", T(block_k=64, num_stages=6, mma_depth=1), True, False
    yield "tiled 128x64x4 d1 c3", T(block_k=64, num_stages=4, mma_depth=1, ctas_per_sm=3), True, False
    yield "tiled 256x64x4 d1 c1", T(block_n=256, block_k=64, num_stages=4, mma_depth=1, ctas_per_sm=1), True, False
    yield "tiled 64x256x3 d1", T(block_n=64, block_k=256, num_stages=3, mma_depth=1), True, False
    yield "tiled 128x64x4 c3 copy", T(block_k=64, num_stages=4, ctas_per_sm=3), True, True
    yield "kn 128x128x4 d1", T(mma_depth=1), False, False
    yield "tiled 256x64x2 d1 c1 2wg", T(256, 64, num_stages=2, ctas_per_sm=1, mma_depth=1, consumers=2), True, False
    yield "tiled 128x64x3 d1 2wg", T(block_k=64, num_stages=3, mma_depth=1, consumers=2), True, False


def main(argv=()):
    parser = argparse.ArgumentParser(prog="bench_kernels.py skinny")
    parser.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    parser.add_argument("--ms", default="1,16,64")
    parser.add_argument("--shapes", default=",".join(LLAMA3_8B_SHAPES))
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--quick", action="store_true", help="default config only")
    args = parser.parse_args(list(argv))
    try:
        import torch
        have_torch = torch.cuda.is_available()
    except ImportError:
        have_torch = False
    variants = list(_variants())[:1] if args.quick else list(_variants())
    rows = []
    for name in args.shapes.split(","):
        k, n = LLAMA3_8B_SHAPES[name]
        w_bytes = k * n * 2
        num_copies = max(2, -(-4 * _L2_BYTES // w_bytes))  # rotate > 4x the L2 so HBM serves the weights
        keys = jax.random.split(jax.random.key(k + n), num_copies + 1)
        ws = [jax.random.normal(kk, (k, n), jnp.bfloat16) for kk in keys[1:]]
        tiled_cache = {}
        tb = lambda us: w_bytes / (us * 1e-6) / 1e12  # noqa: E731
        for m in [int(v) for v in args.ms.split(",")]:
            x = jax.random.normal(jax.random.fold_in(keys[0], m), (m, k), jnp.bfloat16)
            expected = skinny_matmul_reference(x, ws[0]).astype(jnp.float32)
            scale = float(jnp.max(jnp.abs(expected)))
            xla_us, _ = _time_device(jnp.dot, x, ws, args.iterations)
            torch_us = _time_torch(x, ws, args.iterations) if have_torch else None
            line = f"{name} K={k} N={n} M={m}: XLA {xla_us:.1f} us ({tb(xla_us):.2f} TB/s)"
            if torch_us:
                line += f", cuBLAS {torch_us:.1f} us ({tb(torch_us):.2f} TB/s)"
            print(line, flush=True)
            for label, cfg, tiled, copy_only in variants:
                try:
                    if tiled:
                        key = (cfg.block_k, cfg.block_n)
                        if key not in tiled_cache:
                            tiled_cache.clear()  # one tiled set at a time: they are big
                            tiled_cache[key] = [tile_weights(w, cfg) for w in ws]
                        wl = tiled_cache[key]
                    else:
                        wl = ws
                    _check_args(x, wl[0], cfg)
                    fn = functools.partial(_skinny_matmul, config=cfg, interpret=False, copy_only=copy_only)
                    err = float("nan")
                    if not copy_only:
                        out = fn(x, wl[0]).astype(jnp.float32)
                        err = float(jnp.max(jnp.abs(out - expected))) / scale
                    us, kernel_us = _time_device(fn, x, wl, args.iterations)
                except Exception as e:  # a config that does not compile (e.g. SMEM) is reported, not fatal
                    print(f"  {label}: FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
                    continue
                ok = copy_only or err < 1e-2
                print(f"  {label:22s} S={cfg.splits_for(k, n):3d}: {us:6.1f} us (kernel {kernel_us:6.1f}) "
                      f"{tb(us):.2f} TB/s ({tb(us) / _HBM_TBPS:4.0%}) err {err:.1e}{'' if ok else ' WRONG'}",
                      flush=True)
                rows.append(dict(shape=name, k=k, n=n, m=m, variant=label, config=dataclasses.asdict(cfg),
                                 tiled=tiled, copy_only=copy_only, splits=cfg.splits_for(k, n), us=us,
                                 kernel_us=kernel_us, tbps=tb(us), rel_err=err, ok=ok, xla_us=xla_us,
                                 torch_us=torch_us))
        # Prefill-sized M through XLA on the tiled layout (what a tiled Linear would cost at large M).
        for m in (256, 4096):
            x = jax.random.normal(keys[0], (m, k), jnp.bfloat16)
            cfg = TuningConfig()
            wt = [tile_weights(w, cfg) for w in ws[:2]]
            dot_tiled = lambda x, w: jnp.einsum("mab,nabc->mnc", x.reshape(x.shape[0], w.shape[1], w.shape[2]),  # noqa: E731
                                                w, preferred_element_type=jnp.float32).reshape(x.shape[0], -1)
            plain_us, _ = _time_device(jnp.dot, x, ws[:2], 5)
            tiled_us, _ = _time_device(dot_tiled, x, wt, 5)
            torch_us = _time_torch(x, ws[:2], 5) if have_torch else None
            print(f"  XLA M={m}: plain {plain_us:.1f} us, on tiled layout {tiled_us:.1f} us"
                  + (f", cuBLAS {torch_us:.1f} us" if torch_us else ""), flush=True)
            rows.append(dict(shape=name, k=k, n=n, m=m, variant="xla-large-m", us=tiled_us, xla_us=plain_us,
                             torch_us=torch_us))
            del wt
        del ws, tiled_cache
    print("\nshape    M   best us   TB/s   vs XLA  vs cuBLAS  variant")
    for name in args.shapes.split(","):
        for m in [int(v) for v in args.ms.split(",")]:
            cand = [r for r in rows if r["shape"] == name and r["m"] == m and r.get("ok") and not r["copy_only"]]
            if not cand:
                continue
            b = min(cand, key=lambda r: r["us"])
            vs_t = f"{b['torch_us'] / b['us']:.2f}" if b["torch_us"] else "-"
            print(f"{name:8s} {m:3d} {b['us']:8.1f} {b['tbps']:6.2f} {b['xla_us'] / b['us']:7.2f} {vs_t:>9s}  "
                  f"{b['variant']} S={b['splits']}")
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"skinny_{time.strftime('%Y%m%d-%H%M%S')}.json")
    with open(path, "w") as f:
        json.dump({"device": str(jax.devices()[0]), "rows": rows}, f, indent=1)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
