"""Offline throughput through `LLM.generate` (vLLM's `benchmark_throughput` semantics): fixed input/output lengths,
random token prompts, ignore_eos, every request submitted at once.

    python scripts/bench_throughput.py                                   # embedded default model, CPU-sized
    python scripts/bench_throughput.py --model llama-3-8b --load-format dummy --dtype bfloat16 \
        --input-len 1000 --output-len 1000 --num-prompts 1000 --max-num-seqs 256 --max-num-batched-tokens 8192
    python scripts/bench_throughput.py ... --enable-lora --random-loras 4 --max-loras 4   # requests over 4 adapters

Prints requests/s, total and output tokens/s, start-up time (load + compile; run twice with
--compilation-cache-dir for cold vs warm), the per-step wall and host times, and writes JSON.
"""
import argparse
import collections
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

T_START = time.perf_counter()
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from engine.async_llm import enable_compilation_cache  # noqa: E402
from engine.llm import LLM  # noqa: E402
from engine.llm_engine import frozen_heap  # noqa: E402
from engine.lora import LoRARequest, write_random_adapter  # noqa: E402
from engine.serve_flags import token_buckets_flag  # noqa: E402
from engine.variants import row_variant  # noqa: E402
from ie_jax import SamplingParams  # noqa: E402
from ie_jax.guided import GuidedDecodingParams  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--load-format", default="auto", choices=["auto", "dummy"])
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--quantization", "-q", default=None, choices=["int8", "int4", "fp8"],
                    help="quantize the projections on load (serve.py's flag)")
    ap.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "bf16", "fp8", "fp8_e4m3"],
                    help="the KV cache's dtype (serve.py's flag): auto = the weights' dtype")
    ap.add_argument("--input-len", type=int, default=64)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--num-prompts", type=int, default=16)
    ap.add_argument("--max-num-seqs", type=int, default=16)
    ap.add_argument("--max-num-batched-tokens", type=int, default=512)
    ap.add_argument("--max-model-len", type=int, default=None)
    ap.add_argument("--token-buckets", type=token_buckets_flag, default=None, metavar="T,T,...",
                    help="step sizes to compile (default: powers of two up to --max-num-batched-tokens)")
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--num-pages", type=int, default=None)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    ap.add_argument("--no-prefix-caching", action="store_true")
    ap.add_argument("--compilation-cache-dir", default=None)
    ap.add_argument("--unroll-layers", action=argparse.BooleanOptionalAction, default=True,
                    help="straight-line decoder layers (default) or a device loop (--no-unroll-layers)")
    ap.add_argument("--enable-lora", action="store_true", help="requests run with LoRA adapters, round robin")
    ap.add_argument("--lora-path", action="append", default=[], help="a PEFT adapter directory (repeatable)")
    ap.add_argument("--random-loras", type=int, default=0,
                    help="also this many random adapters of rank --max-lora-rank on every linear layer")
    ap.add_argument("--max-loras", type=int, default=1)
    ap.add_argument("--max-lora-rank", type=int, default=16)
    ap.add_argument("--guided-regex", default=None, metavar="REGEX",
                    help="hold every request to this regex (what structured outputs cost; e.g. '[a-z0-9 ]*', which "
                         "the dummy presets' word tokens fit)")
    ap.add_argument("--speculative-config", default=None, metavar="JSON",
                    help='prompt-lookup speculation, e.g. \'{"method": "ngram", "num_speculative_tokens": 4}\' '
                         '(greedy requests; with dummy weights the acceptance says nothing about real text)')
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="JSON path or folder (default: $OUT or benchmarks/results/)")
    args = ap.parse_args(argv)
    if args.enable_lora != bool(args.lora_path or args.random_loras):
        ap.error("--enable-lora goes with --lora-path or --random-loras (and they need it)")

    enable_compilation_cache(args.compilation_cache_dir)
    max_len = args.max_model_len or args.input_len + args.output_len
    llm = LLM(args.model, load_format=args.load_format, dtype=args.dtype, seed=args.seed,
              quantization=args.quantization,
              max_model_len=max_len, max_num_seqs=args.max_num_seqs,
              max_num_batched_tokens=args.max_num_batched_tokens, page_size=args.page_size,
              speculative_config=args.speculative_config,
              num_pages=args.num_pages, gpu_memory_utilization=args.gpu_memory_utilization,
              enable_prefix_caching=not args.no_prefix_caching, unroll_layers=args.unroll_layers,
              kv_cache_dtype=args.kv_cache_dtype, enable_lora=args.enable_lora, max_loras=args.max_loras,
              max_lora_rank=args.max_lora_rank, token_buckets=args.token_buckets)
    startup_s = time.perf_counter() - T_START
    engine = llm.engine
    paths = list(args.lora_path)
    for i in range(args.random_loras):
        paths.append(write_random_adapter(tempfile.mkdtemp(prefix="ie-jax-lora-"), engine.model_config,
                                          engine.runner.lora_layout, args.max_lora_rank, seed=i))
    loras = [LoRARequest(f"lora{i}", i + 1, str(p)) for i, p in enumerate(paths)] or [None]
    V = llm.model.config.vocab_size
    rng = np.random.default_rng(args.seed)
    prompts = [rng.integers(0, V, args.input_len).tolist() for _ in range(args.num_prompts)]
    guided = None if args.guided_regex is None else GuidedDecodingParams(regex=args.guided_regex)
    params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True, guided_decoding=guided)
    if guided is not None:
        engine.guide(guided)  # built before the clock starts, as the server builds it before admitting a request
    engine.runner.ensure_variants({row_variant(params, V)}, progress=False)  # as LLM.generate: nothing compiles later

    for i, p in enumerate(prompts):
        engine.add_request(f"bench-{i}", p, params, lora_request=loras[i % len(loras)])
    step_s, host_s, decode_step_s, dispatch_s, wait_s = [], [], [], [], []
    ran = collections.Counter()  # steps per executable variant (sampler, decode twin)
    t0 = time.perf_counter()
    num_out = 0
    with frozen_heap():  # as LLM.generate
        while engine.has_unfinished_requests():
            ts = time.perf_counter()
            waiting = len(engine.scheduler.waiting)
            outs = engine.step()
            dt = time.perf_counter() - ts
            ran[engine.runner.last_variant] += 1
            step_s.append(dt)
            host_s.append(engine.last_step_host_s)
            dispatch_s.append(engine.last_step_times.get("dispatch", 0.0))
            wait_s.append(engine.last_step_times.get("wait", 0.0))
            if not waiting and all(r.num_computed_tokens >= r.num_prompt_tokens for r in engine.scheduler.running):
                decode_step_s.append(dt)  # a pure decode step: every running request past its prompt
            num_out += sum(len(o.new_token_ids) for o in outs)
    elapsed = time.perf_counter() - t0
    assert num_out == args.num_prompts * args.output_len, (num_out, args.num_prompts * args.output_len)
    total_tokens = args.num_prompts * (args.input_len + args.output_len)
    res = dict(
        bench="throughput", model=args.model, dtype=args.dtype, quantization=args.quantization,
        loras=len(paths), max_loras=args.max_loras if paths else None,
        max_lora_rank=args.max_lora_rank if paths else None, guided_regex=args.guided_regex,
        speculative_config=args.speculative_config, spec_draft_tokens=engine.num_draft_tokens,
        spec_accepted_tokens=engine.num_accepted_tokens,
        input_len=args.input_len, output_len=args.output_len,
        num_prompts=args.num_prompts, kv_cache_dtype=args.kv_cache_dtype, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens, page_size=args.page_size,
        num_pages=engine.runner.num_pages, memory_at_sizing=engine.runner.memory_at_sizing,
        buckets=len(engine.config.buckets), elapsed_s=elapsed,
        requests_per_s=args.num_prompts / elapsed, total_tok_s=total_tokens / elapsed, output_tok_s=num_out / elapsed,
        startup_s=startup_s, num_steps=len(step_s), step_ms_median=1e3 * float(np.median(step_s)),
        host_ms_median=1e3 * float(np.median(host_s)), host_ms_mean=1e3 * float(np.mean(host_s)),
        dispatch_ms_median=1e3 * float(np.median(dispatch_s)), wait_ms_median=1e3 * float(np.median(wait_s)),
        decode_step_ms_median=1e3 * float(np.median(decode_step_s)) if decode_step_s else None,
        preemptions=engine.scheduler.num_preemptions, variants=dict(ran), device=jax.devices()[0].device_kind,
        # IE_JAX_COMMIT: the commit a copied working tree was taken from (its own .git may be older)
        commit=os.environ.get("IE_JAX_COMMIT") or subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
            cwd=Path(__file__).parent).stdout.strip(), date=time.strftime("%Y-%m-%d %H:%M"))
    if decode_step_s:
        res["decode_tok_s_per_seq"] = 1e3 / res["decode_step_ms_median"]
    if len(step_s) <= 4096:  # every step's wall, host and device-wait time (ms): where a run's time went
        res["steps_ms"] = {k: [round(1e3 * x, 3) for x in v]
                           for k, v in dict(wall=step_s, host=host_s, dispatch=dispatch_s, wait=wait_s).items()}
    print(f"Throughput: {res['requests_per_s']:.2f} requests/s, {res['total_tok_s']:.1f} total tokens/s, "
          f"{res['output_tok_s']:.1f} output tokens/s")
    print(f"start-up {startup_s:.1f} s | steps {len(step_s)} | step median {res['step_ms_median']:.2f} ms | "
          f"host median {res['host_ms_median']:.2f} ms (dispatch {res['dispatch_ms_median']:.2f}, device wait "
          f"{res['wait_ms_median']:.2f}) | decode step median {res['decode_step_ms_median'] or 0:.2f} ms"
          f" | preemptions {res['preemptions']}")
    out = Path(args.out or os.environ.get("OUT") or "benchmarks/results")
    if out.suffix != ".json":
        out.mkdir(parents=True, exist_ok=True)
        out = out / f"throughput_{args.input_len}x{args.output_len}_{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(res, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    try:
        main()
    except Exception as e:  # out of device memory: say what the allocator held, for the log
        if "RESOURCE_EXHAUSTED" in str(e) or "out of memory" in str(e).lower():
            stats = jax.devices()[0].memory_stats() or {}
            print("device memory at the failure:", {k: stats[k] for k in sorted(stats) if "bytes" in k},
                  file=sys.stderr, flush=True)
        raise
