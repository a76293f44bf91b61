"""Where a serving step's device time goes: every kernel of one engine step, grouped by name (CUPTI).

    python scripts/profile_step.py --model llama-3-8b --batch 1 --context 1024
    python scripts/profile_step.py --model llama-3-8b --batch 64 --context 1024 --prefill 0

Builds the engine's step for a decode batch of `--batch` requests at `--context` cached tokens (plus an optional
prefill chunk of `--prefill` tokens) and measures it with the Mosaic GPU CUPTI profiler. Prints the device time
of the step, the sum of its kernels against the weight-bytes floor, the wall time of a call (the difference is
launch gaps and host work), and the kernels grouped by name. The cache is small and not donated, so the copy of
it XLA makes per call is listed too; it is not part of the engine's step (the engine donates the cache).
GPU only; writes JSON to --out.
"""
import argparse
import collections
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from engine.config import EngineConfig  # noqa: E402
from engine.request import Request  # noqa: E402
from engine.runner import STEP_STATIC_ARGNUMS, ModelRunner, _step_flat, step_compiler_options  # noqa: E402
from engine.scheduler import SchedulerOutput  # noqa: E402
from ie_jax import SamplingParams, load_model  # noqa: E402

HBM_TBPS = 4.14


def decode_inputs(runner: ModelRunner, batch: int, context: int, prefill: int, prefill_count: int = 1,
                  lora_slot: int = -1):
    """Step inputs, built by the runner's own `prepare`, for `batch` decode rows at `context` cached tokens plus
    `prefill_count` prefill chunks of `prefill` tokens; pages are a random permutation (not contiguous), tokens
    random."""
    P = runner.config.page_size
    rng = np.random.default_rng(0)
    perm = rng.permutation(runner.num_pages).tolist()
    pages_per_row = -(-(context + max(prefill, 1)) // P)
    params = SamplingParams(temperature=0.0, max_tokens=max(prefill, 1) + 1)
    scheduled = []
    for r, n in enumerate([1] * batch + ([prefill] * prefill_count if prefill else [])):
        tokens = rng.integers(0, runner.model_config.vocab_size, context + n).tolist()
        request = Request(f"profile-{r}", tokens, params, seed=r)
        request.num_computed_tokens = context
        request.page_ids = perm[r * pages_per_row:(r + 1) * pages_per_row]
        request.lora_slot = lora_slot
        runner.assign_slot(request)
        scheduled.append((request, n))
    inp, _ = runner.prepare(SchedulerOutput(scheduled, []))
    return inp


def measure_variant(args, runner, host_inp, packed, layout, decode_only, options, profiler) -> dict:
    """One compiled step with these XLA options: first call (compile) time, wall time per call, the back-to-back
    period (plain and engine-like) and the CUPTI kernels of one call, grouped by name."""
    # not donated: callable again on the same arguments
    step = jax.jit(_step_flat, static_argnums=STEP_STATIC_ARGNUMS, compiler_options=options)
    args_ = (runner.graphdef, runner.weights_tree, runner.caches, runner.counts, runner.last_tokens,
             runner.tables.arrays, packed, layout, 0, args.mode, decode_only, *runner.weights)
    call = lambda: step(*args_)  # noqa: E731
    t0 = time.perf_counter()
    jax.block_until_ready(call())
    compile_s = time.perf_counter() - t0
    walls = []
    for _ in range(args.iterations):
        t0 = time.perf_counter()
        jax.block_until_ready(call())
        walls.append(time.perf_counter() - t0)
    # The engine's own pattern: the caches, counts and last tokens donated and fed back, calls queued back to back.
    # The period per call is the device's time per step including the gaps between kernels, which the kernel sum
    # below (CUPTI, op by op) does not see.
    donated = jax.jit(_step_flat, static_argnums=STEP_STATIC_ARGNUMS, donate_argnums=(2, 3, 4),
                      compiler_options=options)
    carry = jax.tree.map(lambda a: a.copy(), (runner.caches, runner.counts, runner.last_tokens))

    def period(engine_like: bool) -> float:
        """engine_like: as the engine loop runs: inputs packed and sent from the host every call, and each call
        followed by the read-back of the previous call's tokens (the one host sync per step)."""
        nonlocal carry
        periods = []
        for _ in range(3):
            t0, previous = time.perf_counter(), None
            for _ in range(args.pipelined):
                x = jax.device_put(host_inp.pack()) if engine_like else packed
                out = donated(runner.graphdef, runner.weights_tree, *carry, runner.tables.arrays, x, layout, 0,
                              args.mode, decode_only, *runner.weights)
                carry = out[:3]
                if engine_like:
                    out[3].token_ids.copy_to_host_async()
                    if previous is not None:
                        np.asarray(previous.token_ids)
                    previous = out[3]
            jax.block_until_ready(carry)
            periods.append((time.perf_counter() - t0) / args.pipelined)
        return 1e3 * min(periods)

    pipelined_ms, pipelined_host_ms = period(False), period(True)
    gaps = {}
    if args.timeline:  # the device timeline of back-to-back donated calls: where the device sits idle
        import tempfile
        with tempfile.TemporaryDirectory() as trace_dir:
            jax.block_until_ready(carry)
            jax.profiler.start_trace(trace_dir)
            for _ in range(args.timeline):
                carry = donated(runner.graphdef, runner.weights_tree, *carry, runner.tables.arrays, packed, layout, 0,
                                args.mode, decode_only, *runner.weights)[:3]
            jax.block_until_ready(carry)
            jax.profiler.stop_trace()
            gaps = device_gaps(trace_dir, args.timeline)
    del carry
    if gaps.get("kernels"):  # CUPTI is taken by the trace: the kernels of its middle steps instead
        timings = gaps.pop("kernels")
    else:
        _, timings = profiler.measure(step, iterations=args.iterations, aggregate=False)(*args_)
    per_iter = [sum(t for _, t in it) for it in timings]
    groups = collections.defaultdict(lambda: [0, 0.0])
    for name, t in timings[len(timings) // 2]:
        groups[name][0] += 1
        groups[name][1] += t
    weight_bytes = sum(x.nbytes for x in runner.weights)
    ranked = sorted(groups.items(), key=lambda kv: -kv[1][1])
    return dict(compile_s=compile_s, device_ms=statistics.median(per_iter),
                wall_ms=statistics.median(walls) * 1e3, pipelined_ms=pipelined_ms,
                pipelined_host_ms=pipelined_host_ms, weight_bytes=weight_bytes,
                floor_ms=weight_bytes / HBM_TBPS / 1e9, num_kernels=len(timings[0]),
                kernels=[dict(name=n, count=c, total_ms=t) for n, (c, t) in ranked], timeline=gaps,
                hlo=step.lower(*args_).compile().as_text() if args.dump_hlo else "")


def device_gaps(trace_dir: str, steps: int, top: int = 15) -> dict:
    """From a profiler trace of `steps` back-to-back calls: per step, the span of the device's activity, the time
    something ran on it (the union of all streams' events) and the idle rest, and the largest idle gaps grouped by
    the (before, after) activity pair. The first and last steps are left out where there are three or more."""
    import glob
    from jax.profiler import ProfileData
    (path,) = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)
    events, lines = [], []
    for plane in ProfileData.from_file(path).planes:
        if not plane.name.startswith("/device:GPU"):
            continue
        for line in plane.lines:
            evs = list(line.events)
            lines.append((plane.name, line.name, len(evs)))
            if line.name.startswith("Stream"):
                events += [(e.start_ns, e.start_ns + e.duration_ns, e.name) for e in evs]
    if not events:
        return dict(lines=lines)
    events.sort()
    t0, t1 = events[0][0], max(e[1] for e in events)
    if steps >= 3:  # trim to the middle steps by time (steps are back to back, of equal length)
        cut = (t1 - t0) / steps
        events = [e for e in events if t0 + cut <= e[0] < t1 - cut]
        steps -= 2
        t0, t1 = events[0][0], max(e[1] for e in events)
    per_step = [[] for _ in range(steps)]  # each step's activities (name, ms), as the CUPTI timings
    for s, e, name in events:
        per_step[min(int((s - t0) / ((t1 - t0) / steps)), steps - 1)].append((name, (e - s) / 1e6))
    busy, end, prev = 0.0, events[0][0], events[0][2]
    pairs = collections.defaultdict(lambda: [0, 0.0])
    for s, e, name in events:
        if s > end:
            pair = pairs[(prev[:60], name[:60])]
            pair[0] += 1
            pair[1] += (s - end) / 1e3
        if e > end:
            busy += e - max(s, end)
            end, prev = e, name
    ranked = sorted(pairs.items(), key=lambda kv: -kv[1][1])[:top]
    return dict(steps=steps, span_ms=(t1 - t0) / 1e6 / steps, busy_ms=busy / 1e6 / steps,
                idle_ms=((t1 - t0) - busy) / 1e6 / steps, lines=lines,
                gaps=[dict(before=b, after=a, count=c / steps, us_per_step=t / steps) for (b, a), (c, t) in ranked],
                kernels=per_step)


def print_result(args, name, options, r):
    print(f"[{name}] {options}")
    print(f"{args.model} batch {args.batch} context {args.context} prefill {args.prefill} ({args.mode}, {args.layers}): "
          f"{r['num_kernels']} kernels, device {r['device_ms']:.3f} ms, wall {r['wall_ms']:.3f} ms, "
          f"weights {r['weight_bytes'] / 1e9:.2f} GB -> floor {r['floor_ms']:.3f} ms "
          f"({r['floor_ms'] / r['device_ms']:.0%} of device), first call (compile) {r['compile_s']:.1f} s; "
          f"back to back {r['pipelined_ms']:.3f} ms per step ({r['pipelined_host_ms']:.3f} engine-like: inputs from "
          f"the host, tokens read back)")
    print(f"{'count':>6} {'total ms':>9} {'mean us':>9}  kernel")
    for k in r["kernels"][:args.top]:
        print(f"{k['count']:6d} {k['total_ms']:9.3f} {k['total_ms'] / k['count'] * 1e3:9.1f}  {k['name'][:110]}")
    tl = r.get("timeline") or {}
    if "span_ms" in tl:
        print(f"timeline over {tl['steps']} steps: span {tl['span_ms']:.3f} ms per step, busy {tl['busy_ms']:.3f}, "
              f"idle {tl['idle_ms']:.3f}; largest idle gaps (per step):")
        for g in tl["gaps"]:
            print(f"  {g['us_per_step']:9.1f} us  x{g['count']:6.1f}  {g['before'][:50]} -> {g['after'][:50]}")
    elif tl:
        print("timeline: no stream events; lines:", tl.get("lines"))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama-3-8b")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--prefill", type=int, default=0)
    ap.add_argument("--prefill-count", type=int, default=1, help="how many requests have a --prefill chunk")
    ap.add_argument("--mode", default="argmax", choices=["argmax", "greedy", "sample", "draw"],
                    help="the sampler's mode; argmax is what the engine's greedy steps run (greedy applies penalties)")
    ap.add_argument("--iterations", type=int, default=5)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--layers", default="unrolled", choices=["scan", "unrolled"],
                    help="a device loop over the stacked weights, or straight-line code over per-layer arrays")
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    ap.add_argument("--pipelined", type=int, default=50, help="back-to-back donated calls timed for the period")
    ap.add_argument("--packed-decode", action="store_true",
                    help="decode-only steps without the decode kernel (the engine's non-decode executables)")
    ap.add_argument("--timeline", type=int, default=0, metavar="STEPS",
                    help="also trace STEPS back-to-back donated calls (jax.profiler) and report the device's idle "
                         "gaps between activities; the kernel table then comes from that trace (CUPTI serves one "
                         "client at a time)")
    ap.add_argument("--dump-hlo", action="store_true", help="also write the compiled step's optimized HLO text")
    ap.add_argument("--enable-lora", action="store_true",
                    help="every row under one LoRA adapter (max_loras 1; its factors are the runner's empty ones)")
    ap.add_argument("--max-lora-rank", type=int, default=16)
    ap.add_argument("--kv-cache-dtype", default="auto", help="as serve.py's flag: auto (the weights' dtype) or fp8")
    ap.add_argument("--max-model-len", type=int, default=None,
                    help="the page table's width, as the engine's flag (default: the context plus the step's tokens)")
    ap.add_argument("--num-pages", type=int, default=None,
                    help="KV cache pages (default: what the rows need); the step's undonated calls copy the cache")
    ap.add_argument("--max-num-batched-tokens", type=int, default=None,
                    help="as the engine's flag: with --max-num-seqs, the step runs in the engine's own (T, R) bucket")
    ap.add_argument("--max-num-seqs", type=int, default=None,
                    help="as the engine's flag (default: max(rows + 1, 8))")
    ap.add_argument("--decode-splits", type=int, default=None,
                    help="kv splits of the decode kernel (default: paged_decode.num_splits_for's rule)")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME=xla_opt=v,IE_JAX_KNOB=v",
                    help="also measure the step compiled with these XLA options and IE_JAX_* knobs, set while it "
                         "traces (repeatable; the first measurement is always the engine's own options, named "
                         "'default'); one process, one JSON for them all. A knob variant clears JAX's caches first "
                         "so the model re-traces (not yet run on the GPU)")
    args = ap.parse_args(argv)
    variants = [("default", "")] + [tuple(v.split("=", 1)) if "=" in v else (v, "") for v in args.variant]
    from jax.experimental.mosaic.gpu import profiler
    if args.decode_splits:
        from kernels_pallas import paged_decode
        paged_decode.num_splits_for = lambda *_: args.decode_splits

    model, _ = load_model(args.model, load_format="dummy", dtype="bfloat16", progress=False)
    rows = args.batch + (args.prefill_count if args.prefill else 0)
    pages_needed = (rows + 1) * (-(-(args.context + max(args.prefill, 1)) // 16))
    cfg = EngineConfig(max_model_len=args.max_model_len or args.context + max(args.prefill, 1) + 16,
                       max_num_seqs=args.max_num_seqs or max(rows + 1, 8),
                       max_num_batched_tokens=args.max_num_batched_tokens or max(512, rows + 1,
                                                                                 args.batch + args.prefill *
                                                                                 args.prefill_count),
                       page_size=16,
                       num_pages=max(args.num_pages or 0, pages_needed + 8), unroll_layers=args.layers == "unrolled",
                       kv_cache_dtype=args.kv_cache_dtype, enable_lora=args.enable_lora, max_loras=1,
                       max_lora_rank=args.max_lora_rank)
    runner = ModelRunner(model, cfg, owns_model=True)
    host_inp = decode_inputs(runner, args.batch, args.context, args.prefill, args.prefill_count,
                             lora_slot=0 if args.enable_lora else -1)
    packed, layout = jax.device_put(host_inp.pack()), host_inp.layout()
    decode_only = args.prefill == 0 and not args.packed_decode  # as the engine's decode-only executables
    results = []
    for name, extra in variants:
        items = [i for i in extra.split(",") if i]
        env = dict(i.split("=", 1) for i in items if i.startswith("IE_JAX_"))  # knobs, set while it traces
        options = step_compiler_options(",".join(i for i in items if not i.startswith("IE_JAX_")))
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        if env or any(r.get("env") for r in results):
            jax.clear_caches()  # the knobs are read at trace time, and the model's jitted layer keeps its trace
        try:
            result = measure_variant(args, runner, host_inp, packed, layout, decode_only, options, profiler)
        except Exception as e:  # an option XLA rejects, or a variant that fails to compile: the others still run
            if name == "default":
                raise
            print(f"[{name}] {options} {env} failed: {type(e).__name__}: {str(e)[:300]}")
            continue
        finally:
            for k, v in saved.items():
                if v is None:
                    del os.environ[k]
                else:
                    os.environ[k] = v
        results.append(dict(variant=name, options=options, env=env, **result))
        print_result(args, name, options, result)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"profile_step_b{args.batch}_c{args.context}_p{args.prefill}"
                                  f"{f'x{args.prefill_count}' if args.prefill_count > 1 else ''}_"
                                  f"{'fp8kv_' if args.kv_cache_dtype.startswith('fp8') else ''}"
                                  f"{'lora_' if args.enable_lora else ''}"
                                  f"{'variants_' if len(variants) > 1 else ''}"
                                  f"{time.strftime('%Y%m%d-%H%M%S')}.json")
    first = results[0]
    with open(path, "w") as f:
        json.dump(dict(args=vars(args), commit=os.environ.get("IE_JAX_COMMIT", ""),
                       device=jax.devices()[0].device_kind, xla_flags=os.environ.get("XLA_FLAGS", ""),
                       **{k: v for k, v in first.items() if k != "hlo"},
                       variants=[{k: v for k, v in r.items() if k != "hlo"} for r in results[1:]]), f, indent=1)
        # the top level is the default variant, as the single-variant files before
    print(f"wrote {path}")
    if args.dump_hlo:
        for r in results:
            suffix = "" if r["variant"] == "default" else "_" + r["variant"]
            with open(path.replace(".json", f"{suffix}.hlo.txt"), "w") as f:
                f.write(r["hlo"])


if __name__ == "__main__":
    main()
