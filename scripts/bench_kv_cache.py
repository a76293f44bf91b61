"""What the KV cache buys: decode tokens/s with the contiguous cache vs recomputing the whole prefix per token.

    python scripts/bench_kv_cache.py                                # embedded default model, CPU-friendly lengths
    python scripts/bench_kv_cache.py --model llama-3.2-1b --dtype bfloat16 --lengths 64 256 1024 --batch 8

Both paths run the same jitted reference generate (ie_jax.generate, greedy, ignore_eos); each configuration is run
once to compile and then timed. With the cache a token costs O(n) (attention over the cached prefix); without it,
O(n^2) in the prefix (the whole buffer is recomputed), so the gap grows with the output length.
"""
import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import numpy as np  # noqa: E402

import ie_jax  # noqa: E402


def _time(model, prompts, params, use_cache, repeats):
    ie_jax.generate(model, None, prompts, params, use_cache=use_cache)  # compile
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = ie_jax.generate(model, None, prompts, params, use_cache=use_cache)
        best = min(best, time.perf_counter() - t0)
    assert all(len(o.token_ids) == params.max_tokens for o in out)
    return best


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default", help="checkpoint directory or preset (default: embedded model)")
    ap.add_argument("--load-format", default="dummy", choices=["auto", "dummy"])
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--lengths", type=int, nargs="+", default=[16, 64, 256])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default=None, help="JSON path (default: $OUT or benchmarks/results/)")
    args = ap.parse_args(argv)

    model, _ = ie_jax.load_model(args.model, dtype=args.dtype, load_format=args.load_format)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, min(model.config.vocab_size, 256), args.prompt_len).tolist() for _ in range(args.batch)]
    rows = []
    print(f"{'new tokens':>10} {'cache tok/s':>12} {'no-cache tok/s':>15} {'speed-up':>9}")
    for n in args.lengths:
        params = ie_jax.SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
        t_cache = _time(model, prompts, params, True, args.repeats)
        t_full = _time(model, prompts, params, False, args.repeats)
        row = dict(new_tokens=n, cache_tok_s=args.batch * n / t_cache, no_cache_tok_s=args.batch * n / t_full,
                   cache_s=t_cache, no_cache_s=t_full)
        rows.append(row)
        print(f"{n:>10} {row['cache_tok_s']:>12.1f} {row['no_cache_tok_s']:>15.1f} {t_full / t_cache:>8.1f}x")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip() or "unknown"
    result = dict(bench="kv_cache", model=args.model, dtype=args.dtype, batch=args.batch, prompt_len=args.prompt_len,
                  device=str(jax.devices()[0].device_kind), host=platform.node(), commit=commit,
                  date=time.strftime("%Y-%m-%d"), rows=rows)
    out = Path(args.out or os.environ.get("OUT") or "benchmarks/results")
    if out.suffix != ".json":
        out.mkdir(parents=True, exist_ok=True)
        out = out / f"kv_cache_{result['date']}_{commit}_{result['device'].replace(' ', '_')}.json"
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
