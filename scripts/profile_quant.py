"""Where the weight-only quantized matmul kernel's time goes (H200), at the Llama-3-8B layer shapes.

Two modes, one process each:
  --trace DIR   run every (shape, M, format, config) once under Mosaic GPU's in-kernel profiler and record the
                mean cycles per region of a pipeline step (wait, widen, mma, refill) and per CTA, with the
                kernel's CUPTI time; JSON to --out.
  --loop N      call every case N times and nothing else: the program to run under `ncu`, e.g.
                ncu --clock-control none --section SpeedOfLight --section WarpStateStats python scripts/profile_quant.py --loop 3
                Restrict ncu to the kernel under study (-k regex:..., --launch-skip / --launch-count): unfiltered,
                it replays every small XLA kernel of the process as well (18 passes each), which took longer than
                a 200 s device call before reaching the first Mosaic kernel (2026-12-04).
Formats: int8 / int4 (the packed layouts the Linear holds, kernels_pallas/quant_matmul.py), bf16 (the skinny
kernel, kernels_pallas/skinny_matmul.py) and fp8 (kernels_pallas/fp8_matmul.py) for comparison in --loop.
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

from kernels_pallas import quant_matmul as qm  # noqa: E402

CONFIGS = {  # label -> the int8 / int4 kernel's config (quant_bench's labels)
    "c3": qm.TuningConfig(num_stages=3, ctas_per_sm=3),
    "c8m4": qm.TuningConfig(num_stages=3, ctas_per_sm=8, min_k_steps=4),
    "s4": qm.TuningConfig(num_splits=4),
}


def _case(fmt, k, n, m, label, key):
    """(x, weights, fn(x, w)) of one case: the kernel under config `label` on random weights."""
    from ie_jax.quant.fp8 import quantize_fp8
    from ie_jax.quant.int4 import quantize_int4
    from ie_jax.quant.int8 import quantize_int8
    from kernels_pallas import fp8_matmul, skinny_matmul
    w = 0.02 * jax.random.normal(key, (k, n), jnp.float32)
    x = jax.random.normal(jax.random.fold_in(key, 1), (m, k), jnp.bfloat16)
    if fmt == "int8":
        return x, qm.pack_int8(quantize_int8(w)), lambda x, w, c=CONFIGS[label]: qm._quant_matmul(
            x, w, config=c, interpret=False)
    if fmt == "int4":
        return x, qm.pack_int4(quantize_int4(w, qm.GROUP)), lambda x, w, c=CONFIGS[label]: qm._quant_matmul(
            x, w, config=c, interpret=False)
    if fmt == "fp8":
        f8 = quantize_fp8(w)
        return x, (f8.q, f8.scale), lambda x, w: fp8_matmul._fp8_skinny_matmul(
            x, *w, config=fp8_matmul.FP8_CONFIG, interpret=False)
    cfg = skinny_matmul.TuningConfig(block_n=256, block_k=64, mma_depth=1, ctas_per_sm=1)
    return x, w.astype(jnp.bfloat16), lambda x, w: skinny_matmul._skinny_matmul(x, w, config=cfg, interpret=False)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="gate_up,down")
    parser.add_argument("--ms", default="1,16")
    parser.add_argument("--formats", default="int4,int8")
    parser.add_argument("--configs", default="c8m4,c3", help=f"int8/int4 kernel configs: {','.join(CONFIGS)}")
    parser.add_argument("--trace", action="store_true", help="in-kernel profile of int8/int4 (see above)")
    parser.add_argument("--loop", type=int, default=0, help="only call every case this many times (for ncu)")
    parser.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    args = parser.parse_args(argv)
    from kernels_pallas.kernel_profile import summarize
    from kernels_pallas.skinny_matmul import _time_device
    rows = []
    for shape in args.shapes.split(","):
        k, n = qm.LLAMA3_8B_SHAPES[shape]
        for m in [int(v) for v in args.ms.split(",")]:
            for fmt in args.formats.split(","):
                labels = args.configs.split(",") if fmt in ("int8", "int4") else ["-"]
                for label in labels:
                    x, w, fn = _case(fmt, k, n, m, label, jax.random.key(k + n + m))
                    name = f"{shape} M={m} {fmt} {label}"
                    if args.loop:
                        f = jax.jit(fn)
                        for _ in range(args.loop):
                            jax.block_until_ready(f(x, w))
                        print(f"ran {name} x{args.loop}", flush=True)
                        continue
                    if fmt not in ("int8", "int4"):
                        continue
                    us, kernel_us = _time_device(fn, x, [w], 20)
                    row = dict(shape=shape, k=k, n=n, m=m, format=fmt, config=label, us=us, kernel_us=kernel_us,
                               steps_per_cta=(k // 128) // CONFIGS[label].splits_for(k, n),
                               ctas=(n // 128) * CONFIGS[label].splits_for(k, n))
                    if args.trace:
                        with tempfile.TemporaryDirectory() as d:
                            cfg = dataclasses.replace(CONFIGS[label], profile_dir=d)
                            jax.block_until_ready(jax.jit(lambda x, w: qm._quant_matmul(
                                x, w, config=cfg, interpret=False))(x, w))
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
