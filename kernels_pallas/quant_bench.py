"""Benchmark of the weight-only quantized matmul (`python scripts/bench_kernels.py quant`, which calls
`kernels_pallas.quant_matmul.main`): every path at the Llama-3-8B layer shapes, M = 1..4096, checked against its
f32 reference and timed (CUPTI device time) against cuBLAS bf16 (torch) and XLA's bf16 dot in one process; JSON to
--out and a summary table last. The kernel itself is kernels_pallas/quant_matmul.py."""
from __future__ import annotations

import argparse
import functools
import json
import os
import time

import jax
import jax.numpy as jnp

from kernels_pallas.fp8_matmul import _fp8_skinny_matmul, fp8_matmul
from kernels_pallas.quant_matmul import (GROUP, LLAMA3_8B_SHAPES, MAX_M, MEASURED_FASTER, TuningConfig,
                                         _quant_matmul, chunked_quant_matmul, dequantize_packed, pack_int4, pack_int8,
                                         packed_bytes, packed_matmul_xla)
from kernels_pallas.skinny_matmul import TuningConfig as SkinnyConfig

_L2_BYTES = 50 * 2**20
_HBM_TBPS = 4.14  # measured copy ceiling on the H200 (shared/GPU.md)
_KERNEL_CONFIGS = {  # label -> config, for M <= 64 (docs/kernels/quant_matmul.md lists the ones dropped)
    "reg 128x3 c3": TuningConfig(num_stages=3, ctas_per_sm=3),  # gate_up: 224 CTAs (S = 1)
    "reg 128x4 s4": TuningConfig(num_splits=4),  # gate_up: 896 CTAs of 8 steps
    "reg 128x4 c8m8": TuningConfig(ctas_per_sm=8, min_k_steps=8),  # S up to 8 CTAs/SM, >= 8 steps per split
    "reg 128x3 c8m4": TuningConfig(num_stages=3, ctas_per_sm=8, min_k_steps=4),  # gate_up 896 CTAs of 8 steps
    "reg 128x3 c8m4 addmul": TuningConfig(num_stages=3, ctas_per_sm=8, min_k_steps=4, int4_fma=False),
    # two consumer warpgroups per CTA (num_stages slots each); "after": int4 scaled after the dot (int4 only)
    "2wg 128x3 c3": TuningConfig(num_stages=3, ctas_per_sm=3, consumers=2),  # gate_up: 224 CTAs, 16 steps per wg
    "2wg 128x2 c4m4": TuningConfig(num_stages=2, ctas_per_sm=4, min_k_steps=4, consumers=2),
    "2wg 128x2 c8m8": TuningConfig(num_stages=2, ctas_per_sm=8, min_k_steps=8, consumers=2),
    "after 128x3 c8m4": TuningConfig(num_stages=3, ctas_per_sm=8, min_k_steps=4, int4_scale_after=True),
    "after 2wg 128x2 c4m4": TuningConfig(num_stages=2, ctas_per_sm=4, min_k_steps=4, consumers=2,
                                         int4_scale_after=True),
    "after 2wg 128x2 c8m8": TuningConfig(num_stages=2, ctas_per_sm=8, min_k_steps=8, consumers=2,
                                         int4_scale_after=True),
}



_FP8_CONFIGS = {  # the fp8 decode kernel (W8A8, both operands e4m3 from SMEM)
    "128x4 c4m4": TuningConfig(num_stages=4, ctas_per_sm=4, min_k_steps=4),
    "128x4 c2": TuningConfig(num_stages=4),
    "128x6 c2m4": TuningConfig(num_stages=6, min_k_steps=4),
    "128x3 c8m4": TuningConfig(num_stages=3, ctas_per_sm=8, min_k_steps=4),
    "64x4 c8m4": TuningConfig(block_n=64, num_stages=4, ctas_per_sm=8, min_k_steps=4),
}

# The many-row GEMM (quant_gemm.GemmConfig): tile_n x tile_m x stages [x tile_k] [sK: K splits]; 128x128x3x64 fits
# two CTAs per SM; the split configs are for deep weights (down: 32 column blocks for 132 SMs)
_GEMM_CONFIGS = ("128x256x2", "256x128x2", "128x128x4", "128x64x4", "128x256x4x64", "128x128x3x64",
                 "128x128x4s4", "128x64x4s2", "128x128x3x64s4", "128x256x4x64s2")
# The fp8 many-row GEMM (fp8_gemm.Fp8GemmConfig): tile_n x tile_m x stages [sK: K splits]
_FP8_GEMM_CONFIGS = ("256x128x3", "128x256x3", "256x64x4", "128x128x4", "128x128x4s2", "128x128x4s4")
_SKINNY_2WG = {  # the bf16 skinny kernel with two consumer warpgroups (docs/kernels/quant_matmul.md)
    "2wg 256x64x2 d1 c1": SkinnyConfig(256, 64, num_stages=2, ctas_per_sm=1, mma_depth=1, consumers=2),
    "2wg 128x64x3 d1": SkinnyConfig(block_k=64, num_stages=3, mma_depth=1, consumers=2),
    "2wg 128x128x2 c1": SkinnyConfig(num_stages=2, ctas_per_sm=1, consumers=2),
}


def _gemm_configs():
    from kernels_pallas.quant_gemm import GemmConfig
    def parse(label):
        tiles, _, splits = label.partition("s")
        return GemmConfig(*map(int, tiles.split("x")), splits=int(splits or 1))
    return {label: parse(label) for label in _GEMM_CONFIGS}  # all fit 227 KiB


def _weights(key, k, n, copies):
    """`copies` random [K, N] weights in every format the bench times (N(0, 0.02) before quantization)."""
    from ie_jax.quant.fp8 import quantize_fp8
    from ie_jax.quant.int4 import quantize_int4
    from ie_jax.quant.int8 import quantize_int8
    out = {"bf16": [], "bf16_nk": [], "int8": [], "int4": [], "int8_kn": [], "int4_kn": [], "fp8_kn": [],
           "fp8_nk": []}
    for kk in jax.random.split(key, copies):
        w = 0.02 * jax.random.normal(kk, (k, n), jnp.float32)
        out["bf16"].append(w.astype(jnp.bfloat16))
        out["bf16_nk"].append(w.T.astype(jnp.bfloat16))
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
        for label, cfg in _SKINNY_2WG.items():
            yield f"bf16 skinny {label}", "bf16", functools.partial(sm._skinny_matmul, config=cfg, interpret=False)
        for fmt in ("int8", "int4"):
            for label, cfg in _KERNEL_CONFIGS.items():
                if fmt == "int8" and (cfg.int4_scale_after or not cfg.int4_fma):  # int4-only options
                    continue
                yield f"{fmt} kernel {label}", fmt, functools.partial(_quant_matmul, config=cfg, interpret=False)
            yield f"{fmt} kernel kn 128x4 c2", f"{fmt}_kn", functools.partial(_quant_matmul, config=TuningConfig(),
                                                                            interpret=False)
        for label, cfg in _FP8_CONFIGS.items():
            yield f"fp8 kernel {label}", "fp8_nk", functools.partial(_fp8_path, config=cfg)
    for fmt in ("int8", "int4"):  # what ops.quant_matmul runs on the Linear's packed weights (kernel or XLA)
        yield f"{fmt} linear", fmt, _linear_path
    yield "fp8 linear", "fp8_nk", lambda x, w: _linear_path(x, Fp8Weights(*w))
    yield "int8 ref", "int8_kn", int8_matmul_reference  # the format layout's reference ([K, N], int4 a byte each)
    yield "int4 ref", "int4_kn", int4_matmul_reference
    yield "fp8 xla nk", "fp8_nk", lambda x, w: fp8_matmul(x, *w, n_major=True)
    yield "fp8 ref", "fp8_nk", lambda x, w: fp8_matmul_reference(x, Fp8Weights(*w))
    yield "int8 xla", "int8", packed_matmul_xla
    yield "int4 xla", "int4", packed_matmul_xla
    if m > MAX_M:  # the many-row GEMM (kernels_pallas/quant_gemm.py)
        from kernels_pallas import quant_gemm as qg
        for label, cfg in _gemm_configs().items():
            for fmt in ("int8", "int4"):
                yield f"{fmt} gemm {label}", fmt, functools.partial(qg._quant_gemm, config=cfg, interpret=False)
    if m > MAX_M:  # the fp8 many-row GEMM (kernels_pallas/fp8_gemm.py), against "fp8 xla nk" (what runs there now)
        from kernels_pallas import fp8_gemm as fg
        for label in _FP8_GEMM_CONFIGS:
            cfg = fg.Fp8GemmConfig.parse(label)
            yield f"fp8 gemm {label}", "fp8_nk", lambda x, w, cfg=cfg: fg._fp8_gemm(x, *w, config=cfg, interpret=False)
    if m > MAX_M:  # dequantize once, then XLA's bf16 dot: which weight layout XLA's dot is fast on (docs v10)
        yield "bf16 xla nk", "bf16_nk", _dot_nk
        for fmt in ("int8", "int4"):
            yield f"{fmt} deq nk", fmt, functools.partial(_dequant_dot, transpose=False)
            yield f"{fmt} deq kn", fmt, functools.partial(_dequant_dot, transpose=True)
    if MAX_M < m <= 4 * MAX_M:  # the decode kernel over 64-row chunks, each format under its shipped config
        for fmt, int4 in (("int8", False), ("int4", True)):
            cfg = MEASURED_FASTER[(int4, False)][1]
            yield f"{fmt} chunked c64", fmt, functools.partial(chunked_quant_matmul, config=cfg)
    yield "fp8 xla kn", "fp8_kn", lambda x, w: fp8_matmul(x, *w)


def _dot_nk(x, w_nk):
    """XLA's bf16 dot with the weight stored [N, K] (K contiguous), as the packed formats store it."""
    return jax.lax.dot_general(x, w_nk, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32).astype(x.dtype)


def _dequant_dot(x, packed, transpose):
    """The packed weight dequantized to bf16 in one pass, materialized (an optimization barrier keeps XLA from
    fusing it into the dot) as [N, K] or transposed to [K, N], then XLA's bf16 dot."""
    from kernels_pallas.quant_matmul import PackedInt8, dequantize_int4_nk
    if isinstance(packed, PackedInt8):  # the per-channel scale stays after the dot, as the shipped path has it
        w, scale = packed.q.astype(x.dtype), packed.scale
    else:
        w, scale = dequantize_int4_nk(packed, x.dtype), None  # [N, K]
    w = jax.lax.optimization_barrier(w.T if transpose else w)
    dims = (((1,), (0,)), ((), ())) if transpose else (((1,), (1,)), ((), ()))
    y = jax.lax.dot_general(x, w, dims, preferred_element_type=jnp.float32)
    return (y if scale is None else y * scale).astype(x.dtype)


def _fp8_path(x, w, config):
    return _fp8_skinny_matmul(x, *w, config=config, interpret=False)


def _linear_path(x, w):
    from kernels_pallas.ops import quant_matmul as dispatch
    return dispatch(x, w)


def _reference(fmt, x, w):
    from ie_jax.quant.fp8 import Fp8Weights, fp8_matmul_reference
    if fmt == "bf16":
        return jnp.dot(x.astype(jnp.float32), w.astype(jnp.float32))
    if fmt == "bf16_nk":
        return jnp.dot(x.astype(jnp.float32), w.T.astype(jnp.float32))
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
                    json.dump({"device": str(jax.devices()[0]), "commit": os.environ.get("IE_JAX_COMMIT"),
                               "rows": rows}, f, indent=1)
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
