"""How long XLA takes to compile (and how fast it then runs) the FP8 W8A8 projections of a serving step, under a
few XLA options, each variant in a fresh process so that no autotuning result carries over.

    python scripts/bench_compile.py --out benchmarks/results        # GPU; prints a table, writes JSON

`-q fp8` engine start-up spent 10-30 s compiling each step bucket (bf16 weights: ~1 s). This times one fp8 dot
(`fp8_matmul.fp8_matmul`, the path above the decode kernel's rows) per Llama-3-8B projection and row count, and
the bf16 dot beside it, with XLA's defaults, with its Triton GEMMs off (cuBLASLt only), and with autotuning off.
At 16,384 rows (a prefill step) the bf16 rows also say what TFLOP/s XLA's GEMMs reach per option.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPES = {"qkv": (4096, 6144), "o": (4096, 4096), "gate_up": (4096, 28672), "down": (14336, 4096)}
VARIANTS = {"default": {}, "no_triton_gemm": {"xla_gpu_enable_triton_gemm": False},
            "autotune_0": {"xla_gpu_autotune_level": 0}}


def measure(variant: str, rows: list[int], shapes: list[str], iters: int) -> list[dict]:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from kernels_pallas.fp8_matmul import fp8_matmul

    options = VARIANTS[variant]
    out = []
    key = jax.random.key(0)
    for name in shapes:
        K, N = SHAPES[name]
        kw, kx, key = jax.random.split(key, 3)
        w = jax.random.normal(kw, (N, K), jnp.float32)
        q = (w / 2).astype(jnp.float8_e4m3fn)  # K-major, as Fp8Weights holds it
        scale = jnp.full((N,), 2.0, jnp.float32)  # q holds w / 2
        wb = w.T.astype(jnp.bfloat16)
        for M in rows:
            x = jax.random.normal(kx, (M, K), jnp.bfloat16)
            for kind, fn, args in (("fp8", lambda x, q, s: fp8_matmul(x, q, s, n_major=True), (x, q, scale)),
                                   ("bf16", lambda x, w: x @ w, (x, wb))):
                t0 = time.perf_counter()
                exe = jax.jit(fn).lower(*args).compile(compiler_options=options or None)
                compile_s = time.perf_counter() - t0
                y = exe(*args)
                y.block_until_ready()
                t0 = time.perf_counter()
                for _ in range(iters):
                    y = exe(*args)
                y.block_until_ready()
                us = 1e6 * (time.perf_counter() - t0) / iters
                row = dict(variant=variant, shape=name, M=M, kind=kind, compile_s=round(compile_s, 2),
                           us=round(us, 1), tflops=round(2 * M * K * N / us / 1e6, 1),
                           finite=bool(np.isfinite(np.asarray(y[:4].astype(jnp.float32))).all()))
                print(json.dumps(row), flush=True)
                out.append(row)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="1024,16384", help="row counts (M), comma separated")
    ap.add_argument("--shapes", default="qkv,o,gate_up,down")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--out", default=None, help="JSON path or folder (default: $OUT or benchmarks/results/)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)  # one variant, JSON lines on stdout
    args = ap.parse_args(argv)
    rows, shapes = [int(r) for r in args.rows.split(",")], args.shapes.split(",")
    if args.child:
        measure(args.child, rows, shapes, args.iters)
        return
    import jax
    dest = Path(args.out or os.environ.get("OUT") or Path(__file__).resolve().parents[1] / "benchmarks" / "results")
    if dest.suffix != ".json":
        dest = dest / f"compile_fp8_{time.strftime('%Y%m%d-%H%M%S')}.json"
    dest.parent.mkdir(parents=True, exist_ok=True)
    print(f"{'variant':<15} {'shape':<8} {'M':>6} {'kind':<5} {'compile s':>9} {'us':>9} {'TFLOP/s':>8}", flush=True)
    results = []
    for variant in args.variants.split(","):  # a process each; the JSON is rewritten after each
        if variant not in VARIANTS:
            ap.error(f"unknown variant {variant!r}; known: {', '.join(VARIANTS)}")
        proc = subprocess.Popen([sys.executable, __file__, "--child", variant, "--rows", args.rows, "--shapes",
                                 args.shapes, "--iters", str(args.iters)], stdout=subprocess.PIPE, text=True)
        for line in proc.stdout:  # row by row, so that a run cut short keeps what it measured
            if not line.startswith("{"):
                continue
            r = json.loads(line)
            print(f"{r['variant']:<15} {r['shape']:<8} {r['M']:>6} {r['kind']:<5} {r['compile_s']:>9} {r['us']:>9} "
                  f"{r['tflops']:>8}", flush=True)
            results.append(r)
            dest.write_text(json.dumps(dict(device=jax.devices()[0].device_kind, jax=jax.__version__,
                                            commit=os.environ.get("IE_JAX_COMMIT"), rows=results), indent=1))
        if proc.wait():
            print(f"{variant}: exit {proc.returncode}", file=sys.stderr)
    print(f"wrote {dest}")


if __name__ == "__main__":
    main()
