"""The engine's host time per step, without a device: the step's executable is replaced by a stand-in that returns
random tokens at once, so what is timed is the Python around it (schedule, prepare the inputs, dispatch, read the
tokens back, detokenize and apply the stop rules). At 1,000 decode rows that Python is nearly as long as the H200's
step (docs/benchmarks.md, v16), so it bounds the offline throughput once the device gets faster.

    python scripts/profile_host.py                          # 1,000 requests, 128 in / 128 out, embedded model
    python scripts/profile_host.py --profile 20             # also cProfile 20 decode steps: the top functions
    python scripts/profile_host.py --synthetic-vocab 128256 # the dummy llama-3-8b preset's tokenizer
    python scripts/profile_host.py --bpe-vocab 32000        # a byte-level BPE (HF tokenizers), trained here

Prints the median host time of the decode steps split into its parts, and writes JSON (--out).
"""
import argparse
import cProfile
import io
import json
import os
import pstats
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

import ie_jax  # noqa: E402
from engine.config import EngineConfig  # noqa: E402
from engine.llm_engine import LLMEngine, frozen_heap  # noqa: E402
from ie_jax import SamplingParams  # noqa: E402


class _Result:
    """What the runner's step returns, as far as the engine reads it: the sampled ids (already on the host)."""

    def __init__(self, token_ids):
        self.token_ids = token_ids


def _timed(fn, bucket, times):
    def wrapper(*args, **kwargs):
        t = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            times[bucket] = times.get(bucket, 0.0) + time.perf_counter() - t
    return wrapper


def train_bpe(vocab_size: int):
    """A byte-level BPE (GPT-2 / Llama-3 style) trained on the standard library's sources, as an HFTokenizer."""
    import glob
    import sysconfig

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from ie_jax.tokenizer import HFTokenizer
    files = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train(files, trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                             initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return HFTokenizer(backend)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--load-format", default="auto", choices=["auto", "dummy"])
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--num-prompts", type=int, default=1000)
    ap.add_argument("--max-num-seqs", type=int, default=1024)
    ap.add_argument("--max-num-batched-tokens", type=int, default=16384)
    ap.add_argument("--synthetic-vocab", type=int, default=0,
                    help="detokenize with the SyntheticTokenizer of this vocabulary (what `--model llama-3-8b "
                         "--load-format dummy` serves with) instead of the model's own")
    ap.add_argument("--bpe-vocab", type=int, default=0,
                    help="detokenize with a byte-level BPE of this vocabulary, trained in seconds on this Python's "
                         "standard-library sources: an HF tokenizer of a real model's kind, where no checkpoint's "
                         "tokenizer can be downloaded")
    ap.add_argument("--profile", type=int, default=0, help="cProfile this many decode steps")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="JSON path or folder (default: $OUT or benchmarks/results/)")
    args = ap.parse_args(argv)

    model, tokenizer = ie_jax.load_model(args.model, load_format=args.load_format, seed=args.seed, progress=False)
    if args.synthetic_vocab:
        from ie_jax.tokenizer import SyntheticTokenizer
        tokenizer = SyntheticTokenizer(args.synthetic_vocab)
    elif args.bpe_vocab:
        tokenizer = train_bpe(args.bpe_vocab)
    pages = args.num_prompts * (-(-(args.input_len + args.output_len) // 16) + 1) + 16
    config = EngineConfig(max_model_len=args.input_len + args.output_len, max_num_seqs=args.max_num_seqs,
                          max_num_batched_tokens=args.max_num_batched_tokens, num_pages=pages, seed=args.seed)
    engine = LLMEngine(model, tokenizer, config, progress=False, warmup=False)  # nothing compiles: no device step
    runner = engine.runner
    V = tokenizer.vocab_size if args.synthetic_vocab or args.bpe_vocab else model.config.vocab_size
    rng = np.random.default_rng(args.seed)
    parts: dict[str, float] = {}

    def run(inp, variant="full", decode_only=False):  # the device step, replaced: random ids at once
        runner.last_variant = variant
        return _Result(rng.integers(0, V, inp.seq_lens.shape[0]).astype(np.int32))

    runner.run = _timed(run, "dispatch", parts)
    engine.scheduler.schedule = _timed(engine.scheduler.schedule, "schedule", parts)
    runner.prepare = _timed(runner.prepare, "prepare", parts)
    engine._update = _timed(engine._update, "update", parts)

    params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    for i in range(args.num_prompts):
        engine.add_request(f"host-{i}", rng.integers(0, model.config.vocab_size, args.input_len).tolist(), params)
    steps, profiler = [], cProfile.Profile() if args.profile else None
    with frozen_heap():
        while engine.has_unfinished_requests():
            decode = not engine.scheduler.waiting and all(
                r.num_computed_tokens >= r.num_prompt_tokens for r in engine.scheduler.running)
            parts.clear()
            profiling = profiler is not None and decode and len(steps) < args.profile
            if profiling:
                profiler.enable()
            t = time.perf_counter()
            engine.step()
            dt = time.perf_counter() - t
            if profiling:
                profiler.disable()
            if decode and len(engine.scheduler.running) >= args.num_prompts // 2:
                steps.append(dict(total=dt, **parts))
    if not steps:
        raise SystemExit("no decode step ran with at least half of the requests")
    med = {k: 1e3 * float(np.median([s.get(k, 0.0) for s in steps])) for k in steps[0]}
    med["other"] = med["total"] - sum(v for k, v in med.items() if k != "total")
    res = dict(bench="host", model=args.model, num_prompts=args.num_prompts, input_len=args.input_len,
               output_len=args.output_len, decode_steps=len(steps), median_ms=med,
               per_row_us=1e3 * med["total"] / args.num_prompts, synthetic_vocab=args.synthetic_vocab,
               bpe_vocab=args.bpe_vocab, tokenizer=type(tokenizer).__name__,
               commit=current_commit(), date=time.strftime("%Y-%m-%d %H:%M"))
    print(f"{len(steps)} decode steps of ~{args.num_prompts} rows: host {med['total']:.2f} ms a step "
          f"({res['per_row_us']:.1f} us a row): " + ", ".join(f"{k} {v:.2f}" for k, v in med.items() if k != "total"))
    if profiler is not None and profiler.getstats():
        buf = io.StringIO()
        pstats.Stats(profiler, stream=buf).sort_stats("tottime").print_stats(25)
        res["profile"] = buf.getvalue()
        print(buf.getvalue())
    write_json(res, args.out, "host")


def current_commit() -> str:
    if os.environ.get("IE_JAX_COMMIT"):
        return os.environ["IE_JAX_COMMIT"]
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                          cwd=Path(__file__).parent).stdout.strip()


def write_json(res: dict, out: str | None, prefix: str) -> None:
    """To `out` (a .json path or a folder; default $OUT or benchmarks/results/, named by prefix and time)."""
    out = out or os.environ.get("OUT") or "benchmarks/results"
    path = out if out.endswith(".json") else os.path.join(out, f"{prefix}_{time.strftime('%Y%m%d-%H%M%S')}.json")
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(res, f, indent=1)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
