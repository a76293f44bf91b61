"""Quantize a model's attention and MLP projections and write a checkpoint that `ie_jax.load_model` and
`scripts/serve.py` load like any other.

    python scripts/quantize.py --model /path/to/hf_dir --out /path/to/out --method awq
    python scripts/quantize.py --model /path/to/hf_dir --out OUT --method awq --calib my_domain.txt \
        --calib-samples 128 --calib-seq-len 512
    python scripts/quantize.py --model tiny-llama --out /tmp/tiny-int8 --method int8     # a preset: random weights

Methods:
  int8      W8A16: int8 weights, one symmetric scale per output channel
  int4-rtn  W4A16: int4 in groups of --group-size input rows, round-to-nearest, AutoAWQ "GEMM" layout
  awq       W4A16 as int4-rtn, after AWQ calibration (activation-aware per-channel scales folded into the model);
            the checkpoint is an AutoAWQ GEMM checkpoint
  fp8       W8A8: e4m3 weights with per-channel scales, dynamic per-token activation scales

--kv-cache-scales (any method) also calibrates static fp8 KV-cache scales, one for K and one for V per layer
(amax / 448 over the calibration text), and writes them as `self_attn.k_scale` / `v_scale`, the tensors vLLM reads;
serve.py uses them with --kv-cache-dtype fp8. Without scales an fp8 cache clips |K|, |V| above 448.

AWQ and the KV-cache scales calibrate on --calib (a text file); without it, on the project's own README and docs,
which is enough to try the tools but not the best text for a model's domain. Embeddings, norms and lm_head keep the
model dtype.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import ie_jax  # noqa: E402
from finetune.export import save_tokenizer  # noqa: E402
from ie_jax.quant import kv_scales, quantize_model  # noqa: E402
from ie_jax.quant.awq import AWQConfig, awq_calibrate  # noqa: E402
from ie_jax.quant.calibration import bundled_calibration_text, calibration_ids  # noqa: E402
from ie_jax.quant.checkpoint import save_quantized  # noqa: E402

METHODS = ("int8", "int4-rtn", "awq", "fp8")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="HF checkpoint directory or preset name (presets: random weights)")
    p.add_argument("--out", required=True, help="output directory (created; existing files are overwritten)")
    p.add_argument("--method", required=True, choices=METHODS)
    p.add_argument("--group-size", type=int, default=128, help="int4: input rows per scale/zero group")
    p.add_argument("--kv-cache-scales", action="store_true",
                   help="also calibrate and write per-layer fp8 KV-cache scales (k_scale, v_scale)")
    p.add_argument("--calib", help="awq, --kv-cache-scales: calibration text file (default: the bundled "
                                   "README/docs text)")
    p.add_argument("--calib-samples", type=int, default=128, help="awq, --kv-cache-scales: calibration rows")
    p.add_argument("--calib-seq-len", type=int, default=512, help="awq, --kv-cache-scales: tokens per row")
    p.add_argument("--dtype", default="auto", help="weights dtype while quantizing (auto: the checkpoint's)")
    p.add_argument("--load-format", default="auto", choices=("auto", "dummy"),
                   help="dummy: random weights of the checkpoint's shapes (presets are always random)")
    p.add_argument("--seed", type=int, default=0, help="random weights' seed (presets, --load-format dummy)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    for name in ("group_size", "calib_samples", "calib_seq_len"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')}={getattr(args, name)} must be >= 1")
    if args.calib is not None and args.method != "awq" and not args.kv_cache_scales:
        p.error(f"--calib is only used by --method awq and --kv-cache-scales, not by --method {args.method} alone")
    if args.calib is not None and not Path(args.calib).is_file():
        p.error(f"--calib {args.calib} is not a file")
    return args


def awq_calibrate_from_text(model, tokenizer, text: str, source: str, args, log=print):
    rows = calibration_ids(tokenizer, text, args.calib_samples, args.calib_seq_len,
                           model.config.max_position_embeddings)
    log(f"AWQ: calibrating on {rows.shape[0]} rows x {rows.shape[1]} tokens of {source}")
    model, found = awq_calibrate(model, rows, AWQConfig(group_size=args.group_size), progress=not args.quiet)
    log(found.summary())
    return model


def quantize(args, log=print):
    """Load, (calibrate,) quantize and save; returns (the quantized model, the output directory)."""
    start = time.perf_counter()
    model, tokenizer = ie_jax.load_model(args.model, dtype=args.dtype, load_format=args.load_format,
                                         seed=args.seed, progress=not args.quiet)
    source_dir = Path(args.model) if Path(args.model).is_dir() else None
    if source_dir is None or args.load_format == "dummy":
        log(f"{args.model}: random weights (a preset or --load-format dummy); the result is for testing the tools")
    if model.config.quantization is not None:
        raise ValueError(f"{args.model} is already quantized ({model.config.quantization.method}); start from a "
                         f"float checkpoint")
    if args.method == "awq" or args.kv_cache_scales:
        if args.calib is None:
            text, files = bundled_calibration_text()
            source = f"the bundled text ({', '.join(files)}); pass --calib FILE for text like the model's use"
        else:
            text, source = Path(args.calib).read_text(encoding="utf-8"), args.calib
    if args.method == "awq":
        model = awq_calibrate_from_text(model, tokenizer, text, source, args, log)
    quantize_model(model, args.method, group_size=args.group_size)
    if args.kv_cache_scales:  # on the quantized model: the K and V it will write
        rows = calibration_ids(tokenizer, text, args.calib_samples, args.calib_seq_len,
                               model.config.max_position_embeddings)
        model.kv_cache_scales = kv_scales.calibrate(model, rows)
        log(f"KV-cache scales from {rows.shape[0]} rows x {rows.shape[1]} tokens of {source}: k "
            f"{min(model.kv_cache_scales[0]):.3g}-{max(model.kv_cache_scales[0]):.3g}, v "
            f"{min(model.kv_cache_scales[1]):.3g}-{max(model.kv_cache_scales[1]):.3g}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    save_quantized(model, out)
    if tokenizer is not None:
        save_tokenizer(tokenizer, out, source_dir)
    if not (out / "tokenizer.json").exists():
        log(f"note: {args.model} has no tokenizer files to copy; {out} loads without a tokenizer")
    size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    log(f"wrote {out} ({args.method}, {size / 2**20:.1f} MiB of weights) in {time.perf_counter() - start:.1f}s")
    return model, out


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        quantize(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"quantize.py: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
