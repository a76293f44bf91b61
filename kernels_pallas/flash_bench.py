"""Benchmark of the flash-attention forward/backward (`python scripts/bench_kernels.py attention`): correctness
checks against the f32 reference, then each config timed against cuDNN (and XLA) on the same inputs, in
interleaved rounds; JSON to --out and a markdown table last."""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import time

import jax
import jax.numpy as jnp

from kernels_pallas.flash_attention import TuningConfig, flash_attention, flash_attention_reference

PEAK_TFLOPS = 752.0         # measured bf16 GEMM ceiling (shared/GPU.md)
SHAPES = {"b4 s8192 h32/8 d128": (4, 8192, 32, 8, 128), "b1 s32768 h32/8 d128": (1, 32768, 32, 8, 128),
          "b4 s8192 h32/8 d64": (4, 8192, 32, 8, 64), "b2 s8192 h32/8 d256": (2, 8192, 32, 8, 256)}
SWEEP = {   # forward variants per head dim; the first of each is the default, --sweep times them all
    128: {"pipe-none": TuningConfig.default(128), "pipe-handoff": TuningConfig(schedule="handoff"),
          "plain-rendezvous": TuningConfig(pipeline=False, schedule="rendezvous"),
          "pipe-rendezvous": TuningConfig(schedule="rendezvous"),
          "pipe-handoff-kv64x4": TuningConfig(block_kv=64, num_stages=4, schedule="handoff")},
    64: {"plain-rendezvous-kv256": TuningConfig.default(64), "pipe-none-kv128": TuningConfig(),
         "pipe-handoff-kv128": TuningConfig(schedule="handoff")},
    256: {"pipe-none-kv64": TuningConfig.default(256),
          "pipe-handoff-kv64": TuningConfig(block_kv=64, schedule="handoff"),
          "plain-rendezvous-kv64": TuningConfig(block_kv=64, pipeline=False, schedule="rendezvous")},
}


def _time_ms(fn, *args, reps: int = 5, iters: int = 10) -> float:
    """Median over `reps` of the mean time of `iters` back-to-back calls, after one warm-up call."""
    jax.block_until_ready(fn(*args))
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(iters):
            out = fn(*args)
        jax.block_until_ready(out)
        samples.append((time.perf_counter() - t0) / iters * 1e3)
    return sorted(samples)[len(samples) // 2]


def _inputs(B, T, N, K, H, seed, segments=False):
    keys = jax.random.split(jax.random.key(seed), 5)
    q, do = (jax.random.normal(key, (B, T, N, H), jnp.bfloat16) for key in keys[:2])
    k, v = (jax.random.normal(key, (B, T, K, H), jnp.bfloat16) for key in keys[2:4])
    return q, k, v, do, jnp.sort(jax.random.randint(keys[4], (B, T), 0, 4), axis=1) if segments else None


def _check(case, results):
    """Forward, lse (and gradients unless fwd_only) vs the f32 reference: appends rel errors o, lse[, dq, dk, dv]."""
    kw = dict(case)
    B, T, N, K, H, fwd_only, config = (kw.pop(name, None) for name in ("B", "T", "N", "K", "H", "fwd_only", "config"))
    q, k, v, do, seg = _inputs(B, T, N, K, H, T + N + H, kw.pop("segments", False))
    ours = functools.partial(flash_attention, return_lse=True, config=config)

    def run(fn, q, k, v, do, seg):
        (o, lse), vjp = jax.vjp(lambda q, k, v: fn(q, k, v, segment_ids=seg, **kw), q, k, v)
        return (o, lse) if fwd_only else (o, lse, *vjp((do, jnp.zeros_like(lse))))
    try:
        got, expected = (jax.jit(functools.partial(run, fn))(q, k, v, do, seg)
                         for fn in (ours, flash_attention_reference))
        errs = [float(jnp.linalg.norm((a.astype(jnp.float32) - b.astype(jnp.float32)).ravel())
                      / jnp.linalg.norm(b.astype(jnp.float32).ravel())) for a, b in zip(got, expected)]
        ok = max(errs) < 2e-2
    except Exception as e:  # noqa: BLE001 - report and continue the sweep
        errs, ok = repr(e)[:300], False
    case = {name: str(value) if isinstance(value, TuningConfig) else value for name, value in case.items()}
    results["checks"].append({"case": case, "rel_err o,lse[,dq,dk,dv]": errs, "ok": ok})
    print(f"check {case}: {errs} {'OK' if ok else 'FAIL'}", flush=True)


def _bench_shape(name, causal, configs, args):
    """Times every config and cuDNN (and XLA) on one shape in `args.rounds` interleaved rounds."""
    B, S, N, K, H = SHAPES[name]
    q, k, v, do, _ = _inputs(B, S, N, K, H, S + H + causal)
    flops = 4 * B * S * S * N * H / (2 if causal else 1)
    impls = {f"pallas:{label}": functools.partial(flash_attention, causal=causal, config=cfg)
             for label, cfg in configs.items()}
    impls["cudnn"] = functools.partial(jax.nn.dot_product_attention, is_causal=causal, implementation="cudnn")
    if S <= 8192 and not args.sweep and not args.no_xla:
        impls["xla"] = functools.partial(jax.nn.dot_product_attention, is_causal=causal, implementation="xla")
    row = {"shape": name, "B": B, "S": S, "N": N, "K": K, "H": H, "causal": causal, "fwd_tflop": flops / 1e12}
    row.update({label: {"config": dataclasses.asdict(configs[label[7:]]) if label.startswith("pallas") else None,
                        "fwd_ms_rounds": []} for label in impls})
    for _ in range(args.rounds):
        for label, fn in impls.items():
            if "error" not in row[label]:
                try:
                    row[label]["fwd_ms_rounds"].append(_time_ms(jax.jit(fn), q, k, v))
                except Exception as e:  # noqa: BLE001
                    row[label]["error"] = repr(e)[:300]
    for label, fn in impls.items():
        entry = row[label]
        if "error" not in entry:   # best round: the rounds differ by clock drift, not by the kernel
            entry["fwd_ms"] = min(entry["fwd_ms_rounds"])
            entry["fwd_tflops"] = flops / entry["fwd_ms"] / 1e9
            if not args.no_bwd and label in (next(iter(impls)), "cudnn"):   # one backward for every config
                fwd_bwd = jax.jit(lambda q, k, v, do, fn=fn: jax.vjp(fn, q, k, v)[1](do))
                entry["fwd_bwd_ms"] = _time_ms(fwd_bwd, q, k, v, do, reps=3, iters=5)
                entry["fwd_bwd_tflops"] = 3.5 * flops / entry["fwd_bwd_ms"] / 1e9
        print(f"{name} causal={causal} {label}: {entry}", flush=True)
    return row


def _table(results):
    print("\n| shape | causal | impl | fwd ms | fwd TFLOP/s | % of 752 | vs cuDNN | fwd+bwd ms | fwd+bwd TFLOP/s "
          "| vs cuDNN |\n|---|---|---|---|---|---|---|---|---|---|")
    for row in results["runs"]:
        base, nan = row["cudnn"], float("nan")
        for label, e in [(name, e) for name, e in row.items() if isinstance(e, dict) and "fwd_ms" in e]:
            ratio, bwd = e["fwd_tflops"] / base.get("fwd_tflops", nan), e.get("fwd_bwd_tflops", nan)
            print(f"| {row['shape']} | {row['causal']} | {label} | {e['fwd_ms']:.3f} | {e['fwd_tflops']:.0f} | "
                  f"{100 * e['fwd_tflops'] / PEAK_TFLOPS:.0f}% | {ratio:.2f} | {e.get('fwd_bwd_ms', nan):.3f} | "
                  f"{bwd:.0f} | {bwd / base.get('fwd_bwd_tflops', nan):.2f} |")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="JSON path (default $OUT/attention.json or benchmarks/results)")
    parser.add_argument("--quick", action="store_true", help="only b4 s8192 d128 with the default config")
    parser.add_argument("--sweep", action="store_true", help="every forward variant in SWEEP vs cuDNN, no backward")
    parser.add_argument("--head-dims", default="128,64,256")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds (the best is reported)")
    for flag in ("--no-check", "--no-bwd", "--no-xla"):
        parser.add_argument(flag, action="store_true")
    parser.add_argument("--watchdog", type=float, default=0, help="dump stacks and exit after this many seconds")
    args = parser.parse_args(argv)
    args.no_bwd = args.no_bwd or args.sweep
    if args.watchdog:   # a deadlocked kernel never returns: dump the stacks and exit instead
        __import__("faulthandler").dump_traceback_later(args.watchdog, exit=True)
    out = args.out or os.path.join(os.environ.get("OUT", "benchmarks/results"), "attention.json")
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    results = {"device": str(jax.devices()[0]), "jax": jax.__version__, "checks": [], "runs": []}
    head_dims = [128] if args.quick else [int(h) for h in args.head_dims.split(",")]
    if not args.no_check and not args.sweep:
        for case in [dict(B=2, T=1024, N=8, K=2, H=128, causal=True), dict(B=2, T=1024, N=8, K=2, H=128, causal=False),
                     dict(B=1, T=1000, N=4, K=1, H=64, causal=True, segments=True),
                     dict(B=1, T=777, N=4, K=4, H=128, causal=True, sliding_window=200, softcap=30.0),
                     dict(B=1, T=512, N=4, K=2, H=256, causal=True)]:
            _check(case, results)
    for H in head_dims:
        if not args.no_check and args.sweep:   # every variant, forward only, with more KV steps than stages
            for cfg in SWEEP[H].values():
                for causal in (True, False):
                    _check(dict(B=1, T=1024, N=8, K=2, H=H, causal=causal, config=cfg, fwd_only=True), results)
        names = [n for n, shape in SHAPES.items() if shape[-1] == H and shape[1] == 8192]
        names += ["b1 s32768 h32/8 d128"] if H == 128 and not args.quick and not args.sweep else []
        for name in names:
            for causal in (True, False) if SHAPES[name][1] <= 8192 else (True,):
                keep = 1 if args.quick or SHAPES[name][1] > 8192 else None if args.sweep else 3
                results["runs"].append(_bench_shape(name, causal, dict(list(SWEEP[H].items())[:keep]), args))
                with open(out, "w") as f:
                    json.dump(results, f, indent=1)
    _table(results)
    return 0
