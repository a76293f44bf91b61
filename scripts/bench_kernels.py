"""Kernel benchmarks on a Hopper GPU: `python scripts/bench_kernels.py {attention,paged,quant,skinny} [options]`.

Each kernel module owns its benchmark in `main(argv)`; this script only dispatches, so that every kernel's
sweep, correctness check and same-run baseline live beside the kernel itself.
"""
import importlib
import sys

KERNELS = {
    "attention": "kernels_pallas.flash_attention",
    "paged": "kernels_pallas.paged_bench",
    "quant": "kernels_pallas.quant_matmul",
    "skinny": "kernels_pallas.skinny_matmul",
}

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in KERNELS:
        sys.exit(f"usage: python scripts/bench_kernels.py {{{','.join(KERNELS)}}} [options]")
    sys.exit(importlib.import_module(KERNELS[sys.argv[1]]).main(sys.argv[2:]))
