"""Does a weight matrix read into L2 beforehand make the batch-1 GEMM that follows faster? (H200, CUPTI)

    python scripts/bench_l2_prefetch.py --out benchmarks/results

At batch 1 a decode layer spends ~20 µs in latency-bound kernels (KV write, rope, attention, merge, norms) during
which HBM is idle. If idle SMs streamed the next projection's weights into L2 meanwhile, the GEMM would read them
from L2. This measures the parts: each projection's M = 1 GEMM (XLA's dot) with its weights cold (8 rotating
copies, none in L2), hot (the same copy every call), and right after a Pallas kernel that TMA-loads the first
`fraction` of the weights into shared memory and drops them (so they pass through L2); and that prefetch kernel's
own time by CTA count. Writes JSON to --out and prints a table.
"""
import argparse
import functools
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax import lax  # noqa: E402
from jax.experimental import pallas as pl  # noqa: E402
from jax.experimental.pallas import mosaic_gpu as plgpu  # noqa: E402

from kernels_pallas.skinny_matmul import interpret_kwargs  # noqa: E402

SHAPES = {"qkv": (4096, 6144), "o": (4096, 4096), "down": (14336, 4096), "gate_up": (4096, 28672)}
BOX_COLS = 128


def l2_prefetch(w, *, num_ctas: int, fraction: float = 1.0, box_rows: int = 256, stages: int = 3,
                interpret=False):
    """TMA-load the first `fraction` of w's bytes (in [box_rows, 128] boxes) into shared memory and drop them;
    returns a [num_ctas, 128] f32 token (zeros) for ordering."""
    boxes = w.reshape(-1, box_rows, BOX_COLS)  # a bitcast of the row-major array
    total = int(boxes.shape[0] * fraction)
    per_cta = -(-total // num_ctas)

    def body(w_ref, out_ref, smem, bars):
        c = lax.axis_index("c")
        first = c * per_cta
        n = jnp.clip(total - first, 0, per_cta)

        def issue(i, slot):
            plgpu.copy_gmem_to_smem(w_ref.at[first + i], smem.at[slot], bars.at[slot])

        for s in range(stages):
            pl.when(s < n)(functools.partial(issue, s, s))

        def step(i, carry):
            slot = lax.rem(i, stages)
            plgpu.barrier_wait(bars.at[slot])
            pl.when(i + stages < n)(lambda: issue(i + stages, slot))
            return carry

        lax.fori_loop(0, n, step, None)
        out_ref[c, :] = jnp.zeros((BOX_COLS,), jnp.float32)

    kernel = plgpu.kernel(
        body,
        out_type=jax.ShapeDtypeStruct((num_ctas, BOX_COLS), jnp.float32),
        scratch_types=[plgpu.SMEM((stages, box_rows, BOX_COLS), w.dtype),
                       plgpu.Barrier(num_arrivals=1, num_barriers=stages)],
        grid=(num_ctas,),
        grid_names=("c",),
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Lane),
        **interpret_kwargs(interpret),
    )
    return kernel(boxes)


def measure(fn, args, iterations, calls):
    """Median over iterations of (prefetch kernels, other kernels) device µs per call, CUPTI."""
    from jax.experimental.mosaic.gpu import profiler
    # no dot merger: the "hot" case's dots share one weight, which XLA would otherwise run as one GEMM
    step = jax.jit(fn, compiler_options={"xla_gpu_dot_merger_threshold_mb": 0})
    _, timings = profiler.measure(step, iterations=iterations, aggregate=False)(*args)
    pre = [sum(t for name, t in it if "mosaic" in name) / calls for it in timings]
    rest = [sum(t for name, t in it if "mosaic" not in name) / calls for it in timings]
    return statistics.median(pre) * 1e3, statistics.median(rest) * 1e3


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="o,qkv,down")
    ap.add_argument("--fractions", default="0.25,0.5,0.75,1.0")
    ap.add_argument("--ctas", default="16,64,116,132")
    ap.add_argument("--copies", type=int, default=8)
    ap.add_argument("--iterations", type=int, default=10)
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    args = ap.parse_args(argv)
    rows = []
    for name in args.shapes.split(","):
        K, N = SHAPES[name]
        xs = [jax.random.normal(jax.random.key(100 + i), (1, K), jnp.bfloat16) for i in range(args.copies)]
        ws = [jax.random.normal(jax.random.key(i + 1), (K, N), jnp.bfloat16) for i in range(args.copies)]
        mb = K * N * 2 / 1e6
        dot = lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.bfloat16)  # noqa: E731
        n = len(ws)
        _, cold = measure(lambda *a: [dot(x, w) for x, w in zip(a[:n], a[n:])], (*xs, *ws), args.iterations, n)
        # distinct inputs, one weight copy: XLA cannot merge the calls, and the weights stay in L2
        _, hot = measure(lambda w, *xs: [dot(x, w) for x in xs], (ws[0], *xs), args.iterations, n)
        rows.append(dict(shape=name, mb=mb, case="cold", gemm_us=cold, tbps=mb / cold))
        rows.append(dict(shape=name, mb=mb, case="hot (same copy)", gemm_us=hot, tbps=mb / hot))
        print(f"{name} {mb:.1f} MB: cold {cold:.1f} us ({mb / cold:.2f} TB/s), hot {hot:.1f} us ({mb / hot:.2f})")
        for ctas in [int(c) for c in args.ctas.split(",")]:
            for fraction in [float(f) for f in args.fractions.split(",")]:
                def fn(*a, ctas=ctas, fraction=fraction):
                    outs = []
                    for x, w in zip(a[:n], a[n:]):
                        token = l2_prefetch(w, num_ctas=ctas, fraction=fraction)
                        token, x = lax.optimization_barrier((token, x))  # the GEMM starts after the prefetch
                        outs.append((dot(x, w), token))
                    return outs
                try:
                    pre, gemm = measure(fn, (*xs, *ws), args.iterations, n)
                except Exception as e:  # noqa: BLE001
                    print(f"  {ctas} CTAs, {fraction}: failed {type(e).__name__}: {str(e)[:200]}")
                    continue
                rows.append(dict(shape=name, mb=mb, case="prefetched", ctas=ctas, fraction=fraction,
                                 prefetch_us=pre, prefetch_tbps=mb * fraction / pre, gemm_us=gemm,
                                 saved_us=cold - gemm))
                print(f"  {ctas:4d} CTAs, first {fraction:.0%}: prefetch {pre:6.1f} us "
                      f"({mb * fraction / pre:.2f} TB/s), then GEMM {gemm:6.1f} us (cold {cold:.1f}: "
                      f"{cold - gemm:+.1f} saved)")
        del ws
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"l2_prefetch_{time.strftime('%Y%m%d-%H%M%S')}.json")
    with open(path, "w") as f:
        json.dump(dict(device=jax.devices()[0].device_kind, commit=os.environ.get("IE_JAX_COMMIT", ""),
                       args=vars(args), rows=rows), f, indent=1)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
