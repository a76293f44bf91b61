"""Where the weight-only quantized matmul kernel's time goes (H200), at the Llama-3-8B layer shapes. Weights, configs
and paths are the bench's (kernels_pallas/quant_bench.py).

Two modes, one process each:
  (default)     time every (shape, M, format, config) of --configs (quant_bench's kernel config labels) and, with
                --trace, run it once more under Mosaic GPU's in-kernel profiler: the mean cycles per region of a
                pipeline step (wait, widen, mma, refill) and per CTA; JSON to --out.
  --loop N      call every bench path whose label starts with one of --only N times and nothing else: the
                program to run under `ncu`, e.g.
                ncu --clock-control none --section SpeedOfLight --section WarpStateStats python scripts/profile_quant.py --loop 3
                Restrict ncu to the kernel under study (-k regex:..., --launch-skip / --launch-count): unfiltered,
                it replays every small XLA kernel of the process as well (18 passes each), which took longer than
                a 200 s device call before reaching the first Mosaic kernel (2026-12-04).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from kernels_pallas import quant_bench as qb  # noqa: E402
from kernels_pallas import quant_matmul as qm  # noqa: E402

def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="gate_up,down")
    parser.add_argument("--ms", default="1,16")
    parser.add_argument("--formats", default="int4,int8")
    parser.add_argument("--configs", default="reg 128x3 c8m4,reg 128x3 c3",
                        help=f"int8/int4 kernel configs: {', '.join(qb._KERNEL_CONFIGS)}")
    parser.add_argument("--trace", action="store_true", help="also the in-kernel profile of each config")
    parser.add_argument("--loop", type=int, default=0, help="only call the --only paths this many times (for ncu)")
    parser.add_argument("--only", default="int4 kernel reg 128x3 c8m4,int8 kernel reg 128x3 c3,bf16 skinny 256x64x4,"
                                          "fp8 kernel 128x4 c2", help="--loop: comma-separated bench label prefixes")
    parser.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    args = parser.parse_args(argv)
    from kernels_pallas.kernel_profile import summarize
    from kernels_pallas.skinny_matmul import _time_device
    rows = []
    for shape in args.shapes.split(","):
        k, n = qm.LLAMA3_8B_SHAPES[shape]
        weights = {fmt: ws[0] for fmt, ws in qb._weights(jax.random.key(k + n), k, n, 1).items()}
        for m in [int(v) for v in args.ms.split(",")]:
            x = jax.random.normal(jax.random.key(m), (m, k), jnp.bfloat16)
            if args.loop:
                for label, fmt, fn in qb._paths(m):
                    if any(label.startswith(p) for p in args.only.split(",")):
                        f = jax.jit(fn)
                        for _ in range(args.loop):
                            jax.block_until_ready(f(x, weights[fmt]))
                        print(f"ran {shape} M={m} {label} x{args.loop}", flush=True)
                continue
            for fmt in args.formats.split(","):
                for label in args.configs.split(","):
                    config, w = qb._KERNEL_CONFIGS[label], weights[fmt]
                    us, kernel_us = _time_device(
                        lambda x, w: qm._quant_matmul(x, w, config=config, interpret=False), x, [w], 20)
                    splits = config.splits_for(k, n)
                    row = dict(shape=shape, k=k, n=n, m=m, format=fmt, config=label, us=us, kernel_us=kernel_us,
                               steps_per_cta=(k // config.block_k) // splits, ctas=(n // config.block_n) * splits)
                    if args.trace:
                        with tempfile.TemporaryDirectory() as d:
                            traced = dataclasses.replace(config, profile_dir=d)
                            jax.block_until_ready(jax.jit(lambda x, w: qm._quant_matmul(
                                x, w, config=traced, interpret=False))(x, w))
                            row["profile"] = summarize(d)
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    if rows:
        os.makedirs(args.out, exist_ok=True)
        path = os.path.join(args.out, f"quant_profile_{time.strftime('%Y%m%d-%H%M%S')}.json")
        with open(path, "w") as f:
            json.dump(dict(device=str(jax.devices()[0]), commit=os.environ.get("IE_JAX_COMMIT"), rows=rows), f,
                      indent=1)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
