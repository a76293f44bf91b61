"""HBM ceilings of this GPU, measured the way the kernels are (CUPTI device time, median of the iterations).

    python scripts/bench_hbm.py [--gib 4] [--out benchmarks/results]

- copy: y = x + 1 over a bf16 array (bytes read + written, the figure GPU.md quotes);
- read: a row sum of the same array to a small f32 vector (bytes read; the output is 1/1024 of the input);
- read_pages: the same sum over 4 KiB chunks taken in a random order (a paged KV cache's access pattern at
  page 16, H 128, bf16), through a gather fused into the reduction.
Writes JSON to --out and prints a short table.
"""
import argparse
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--gib", type=float, default=4.0)
    ap.add_argument("--iterations", type=int, default=10)
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    args = ap.parse_args(argv)
    from jax.experimental.mosaic.gpu import profiler

    rows = int(args.gib * 2**30) // (2048 * 2)  # rows of 2048 bf16 = 4 KiB
    x = jax.random.normal(jax.random.key(0), (rows, 2048), jnp.bfloat16)
    perm = jax.random.permutation(jax.random.key(1), rows).astype(jnp.int32)
    nbytes = x.nbytes
    cases = {
        "copy": (lambda x, p: x + 1, 2 * nbytes),
        "read": (lambda x, p: x.reshape(-1, 1024, 2048).astype(jnp.float32).sum(axis=(1,)), nbytes),
        "read_pages": (lambda x, p: jnp.take(x, p, axis=0).reshape(-1, 1024, 2048).astype(jnp.float32).sum(axis=1),
                       nbytes),
    }
    results = {}
    for name, (fn, moved) in cases.items():
        f = jax.jit(fn)
        jax.block_until_ready(f(x, perm))
        _, timings = profiler.measure(f, iterations=args.iterations, aggregate=False)(x, perm)
        us = statistics.median(sum(t for _, t in it) for it in timings) * 1e3
        results[name] = dict(us=round(us, 1), bytes=moved, tbps=round(moved / us / 1e6, 3),
                             kernels=[n[:40] for n, _ in timings[0]])
        print(f"{name:12s} {us:10.1f} us  {moved / us / 1e6:6.3f} TB/s  kernels {results[name]['kernels']}", flush=True)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"hbm_{time.strftime('%Y%m%d-%H%M%S')}.json")
    with open(path, "w") as fh:
        json.dump(dict(device=str(jax.devices()[0]), jax=jax.__version__, gib=args.gib, results=results), fh, indent=1)
    print("wrote", path)


if __name__ == "__main__":
    main()
