"""Run `bench_throughput.py` for several environment variants, interleaved and repeated, in one call.

The batch-1 decode step moves by up to 1.3% between machine starts with the same code (docs/benchmarks.md, v12),
so a variant is only judged against a baseline measured on the same machine, in alternation. Each run is its own
process (the env knobs are read at trace time). The first variant is the baseline; every variant's median decode
step is reported as a ratio to it.

    python scripts/bench_variants.py --repeats 3 \
        --variant plain= --variant ropekv=IE_JAX_FUSED_ROPE_KV=1 \
        -- --model llama-3-8b --load-format dummy --dtype bfloat16 --input-len 128 --output-len 512 \
           --num-prompts 1 --max-num-seqs 1 --max-num-batched-tokens 256

Writes one JSON (every run's figures and file, the medians, the ratios) and prints a table.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FIELDS = ("decode_step_ms_median", "decode_tok_s_per_seq", "output_tok_s", "step_ms_median")


def parse_variant(spec: str) -> tuple[str, dict[str, str]]:
    """'NAME=K=V,K=V' (or 'NAME=' for no overrides) -> (NAME, {K: V})."""
    name, sep, rest = spec.partition("=")
    if not sep or not name:
        raise ValueError(f"variant {spec!r}: expected NAME=ENV=VALUE,... (or NAME= for none)")
    env = {}
    for item in filter(None, rest.split(",")):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"variant {spec!r}: {item!r} is not ENV=VALUE")
        env[key] = value
    return name, env


def summarize(runs: list[dict], names: list[str]) -> dict:
    """Per variant: the median of each field over its runs, and its median decode step over the first variant's."""
    out = {}
    for name in names:
        mine = [r for r in runs if r["variant"] == name and "decode_step_ms_median" in r]
        out[name] = {f: statistics.median(r[f] for r in mine) if mine else None for f in FIELDS}
        out[name]["runs"] = len(mine)
    base = out[names[0]]["decode_step_ms_median"]
    for name in names:
        step = out[name]["decode_step_ms_median"]
        out[name]["step_ratio_to_" + names[0]] = step / base if step and base else None
    return out


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    own, bench_args = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", action="append", required=True, metavar="NAME=ENV=VALUE,...",
                    help="repeatable; the first is the baseline")
    ap.add_argument("--repeats", type=int, default=2, help="rounds; each round runs every variant once, in order")
    ap.add_argument("--timeout", type=float, default=300, help="seconds per run")
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"), help="folder for the JSON")
    args = ap.parse_args(own)
    variants = [parse_variant(v) for v in args.variant]
    names = [n for n, _ in variants]
    if len(set(names)) != len(names):
        ap.error(f"variant names must differ: {names}")
    bench = Path(__file__).with_name("bench_throughput.py")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.repeats):
            for name, env in variants:
                path = Path(tmp) / f"{name}_{round_}.json"
                cmd = [sys.executable, str(bench), *bench_args, "--out", str(path)]
                try:
                    proc = subprocess.run(cmd, env={**os.environ, **env}, capture_output=True, text=True,
                                          timeout=args.timeout)
                    ok = proc.returncode == 0 and path.exists()
                    tail = "" if ok else (proc.stdout + proc.stderr)[-2000:]
                except subprocess.TimeoutExpired:
                    ok, tail = False, f"timed out after {args.timeout} s"
                run = {"variant": name, "round": round_, "env": env}
                if ok:
                    res = json.loads(path.read_text())
                    run.update({f: res.get(f) for f in FIELDS}, commit=res.get("commit"), result=res)
                else:
                    run["error"] = tail
                runs.append(run)
                shown = (f"{run['decode_step_ms_median']:.4f} ms, {run['decode_tok_s_per_seq']:.1f} decode tok/s"
                         if ok else "FAILED")
                print(f"[{round_}] {name}: {shown}", flush=True)
    summary = summarize(runs, names)
    res = dict(bench_args=bench_args, variants=dict(variants), repeats=args.repeats, summary=summary, runs=runs,
               commit=next((r["commit"] for r in runs if r.get("commit")), None))
    path = out_dir / f"variants_{stamp}.json"
    path.write_text(json.dumps(res, indent=2))
    ratio_key = "step_ratio_to_" + names[0]
    print(f"{'variant':<20} {'runs':>4} {'decode step ms':>15} {'decode tok/s':>13} {'ratio':>7}")
    for name in names:
        s = summary[name]
        if s["runs"]:
            print(f"{name:<20} {s['runs']:>4} {s['decode_step_ms_median']:>15.4f} {s['decode_tok_s_per_seq']:>13.1f} "
                  f"{s[ratio_key] or float('nan'):>7.4f}")
        else:
            print(f"{name:<20} {0:>4} {'failed':>15}")
    print(f"wrote {path}")
    return 0 if all("error" not in r for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
