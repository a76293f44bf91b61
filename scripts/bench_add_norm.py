"""A decode layer's projection + residual add + RMSNorm: XLA's way against split-K partials + the fused kernel.

    python scripts/bench_add_norm.py --out benchmarks/results

For the o projection (K = 4096) and the down projection (K = 14336) of Llama-3-8B at M tokens (the engine's
8-token bucket by default), CUPTI device time per call of
  xla:    y = x + a @ W (XLA picks its split-K and sums the partials into the add), then RMSNorm(y);
  fused:  the same as an explicit S-way split-K batched dot (kernels_pallas/add_norm.split_k_partials) and one
          add + norm kernel (add_rmsnorm), for S in --splits and the kernel's warps per row in --warps.
The weights rotate over --copies copies so L2 does not hold them. Prints a table, writes JSON to --out, and with
--env-out writes the fastest (S, warps) summed over both projections as IE_JAX_ADD_NORM_* exports.
"""
import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from kernels_pallas.add_norm import add_rmsnorm, add_rmsnorm_reference, split_k_partials  # noqa: E402

SHAPES = {"o": 4096, "down": 14336}
D = 4096


def measure(fn, args, iterations, calls):
    """Median device µs per call: (all kernels, the GEMM kernels alone)."""
    from jax.experimental.mosaic.gpu import profiler
    _, timings = profiler.measure(jax.jit(fn), iterations=iterations, aggregate=False)(*args)
    total = statistics.median(sum(t for _, t in it) for it in timings) / calls * 1e3
    gemm = statistics.median(sum(t for n, t in it if "gemm" in n or "dot" in n) for it in timings) / calls * 1e3
    return total, gemm


def rmsnorm(x, w, eps=1e-5):
    x32 = x.astype(jnp.float32)
    return w * (x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)).astype(x.dtype)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--m", type=int, default=8)
    ap.add_argument("--splits", default="2,4,8")
    ap.add_argument("--warps", default="4,8,16,32")
    ap.add_argument("--copies", type=int, default=8)
    ap.add_argument("--iterations", type=int, default=10)
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    ap.add_argument("--env-out", default=None)
    args = ap.parse_args(argv)
    M, n = args.m, args.copies
    rows, best = [], {}
    for name, K in SHAPES.items():
        keys = jax.random.split(jax.random.key(K), 4)
        a = [jax.random.normal(jax.random.fold_in(keys[0], i), (M, K), jnp.bfloat16) for i in range(n)]
        ws = [(0.02 * jax.random.normal(jax.random.fold_in(keys[1], i), (K, D), jnp.float32)).astype(jnp.bfloat16)
              for i in range(n)]
        x = jax.random.normal(keys[2], (M, D), jnp.bfloat16)
        g = (1 + 0.1 * jax.random.normal(keys[3], (D,), jnp.float32)).astype(jnp.bfloat16)

        def xla(x, g, *aw):
            outs = []
            for a_, w_ in zip(aw[:n], aw[n:]):
                y = x + jnp.dot(a_, w_, preferred_element_type=jnp.bfloat16)
                outs.append((y, rmsnorm(y, g)))
            return outs

        total, gemm = measure(xla, (x, g, *a, *ws), args.iterations, n)
        rows.append(dict(shape=name, K=K, M=M, path="xla", total_us=total, gemm_us=gemm))
        print(f"{name} K={K} M={M}: xla {total:.1f} us (GEMM {gemm:.1f}, add + norm {total - gemm:.1f})", flush=True)
        for S in [int(s) for s in args.splits.split(",")]:
            want = add_rmsnorm_reference(x, split_k_partials(a[0], ws[0], S), g, 1e-5)
            for warps in [int(w) for w in args.warps.split(",")]:
                def fused(x, g, *aw, S=S, warps=warps):
                    return [add_rmsnorm(x, split_k_partials(a_, w_, S), g, eps=1e-5, num_warps=warps)
                            for a_, w_ in zip(aw[:n], aw[n:])]
                try:
                    got = jax.jit(fused)(x, g, *a, *ws)[0]
                    err = max(float(jnp.max(jnp.abs(u.astype(jnp.float32) - v.astype(jnp.float32))))
                              for u, v in zip(got, want))
                    total, gemm = measure(fused, (x, g, *a, *ws), args.iterations, n)
                except Exception as e:  # noqa: BLE001
                    print(f"  S={S} warps={warps}: failed {type(e).__name__}: {str(e)[:200]}", flush=True)
                    continue
                rows.append(dict(shape=name, K=K, M=M, path="fused", splits=S, warps=warps, total_us=total,
                                 gemm_us=gemm, max_abs_err=err))
                best.setdefault((S, warps), 0.0)
                best[(S, warps)] += total
                print(f"  S={S} warps={warps:2d}: {total:5.1f} us (GEMM {gemm:5.1f}, add + norm {total - gemm:4.1f})"
                      f"  err {err:.1e}", flush=True)
        del ws, a
    full = {k: v for k, v in best.items() if sum(r.get("splits") == k[0] and r.get("warps") == k[1]
                                                 for r in rows) == len(SHAPES)}
    choice = min(full, key=full.get) if full else None
    xla_sum = sum(r["total_us"] for r in rows if r["path"] == "xla")
    if choice:
        print(f"best: S={choice[0]} warps={choice[1]}: {full[choice]:.1f} us for o + down vs xla {xla_sum:.1f}")
        if args.env_out:
            with open(args.env_out, "w") as f:
                f.write(f"export IE_JAX_ADD_NORM_SPLITS={choice[0]} IE_JAX_ADD_NORM_WARPS={choice[1]}\n")
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"add_norm_{time.strftime('%Y%m%d-%H%M%S')}.json")
    with open(path, "w") as f:
        json.dump(dict(device=jax.devices()[0].device_kind, commit=os.environ.get("IE_JAX_COMMIT", ""),
                       args=vars(args), rows=rows, best=dict(splits=choice[0], warps=choice[1]) if choice else None),
                  f, indent=1)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
