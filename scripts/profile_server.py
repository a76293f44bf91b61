"""The server's host cost per generated token, without a device: the engine's step is replaced by a stand-in that
returns random tokens at once (as in profile_host.py), and N streaming completions run through the real FastAPI
app and AsyncLLM, from an httpx client in the same process (ASGI, no sockets). What is timed is everything between
the step and the SSE bytes: the engine's host work, the hand-off to the event loop, the response shaping, the
metrics and the client's parsing, all on this machine's CPUs and one GIL.

    python scripts/profile_server.py                                 # 256 streams x 256 tokens
    python scripts/profile_server.py --num-streams 1000 --output-len 128

Prints tokens per second (the host-bound ceiling of a server on this CPU), SSE chunks and the engine's step
period; writes JSON (--out).
"""
import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import httpx  # noqa: E402
import numpy as np  # noqa: E402

import ie_jax  # noqa: E402
from engine.async_llm import AsyncLLM  # noqa: E402
from engine.config import EngineConfig  # noqa: E402
from engine.llm_engine import LLMEngine  # noqa: E402
from engine.server import build_app  # noqa: E402
from ie_jax.tokenizer import SyntheticTokenizer  # noqa: E402
from profile_host import _Result, current_commit, write_json  # noqa: E402


async def _stream(client, body) -> tuple[int, int]:
    """(SSE chunks, tokens) of one streamed completion."""
    chunks = tokens = 0
    async with client.stream("POST", "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])  # as a client does with every chunk
                if chunk["choices"]:
                    chunks += 1
                else:  # the last one: usage only
                    tokens = chunk["usage"]["completion_tokens"]
    return chunks, tokens


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-streams", type=int, default=256)
    ap.add_argument("--input-len", type=int, default=64)
    ap.add_argument("--output-len", type=int, default=256)
    ap.add_argument("--synthetic-vocab", type=int, default=128256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="JSON path or folder (default: $OUT or benchmarks/results/)")
    args = ap.parse_args(argv)

    model, _ = ie_jax.load_model("default", progress=False)
    N, V = args.num_streams, args.synthetic_vocab
    config = EngineConfig(max_model_len=args.input_len + args.output_len, max_num_seqs=N,
                          max_num_batched_tokens=max(N, 2048),
                          num_pages=N * (-(-(args.input_len + args.output_len) // 16) + 1) + 16, seed=args.seed)
    engine = LLMEngine(model, SyntheticTokenizer(V), config, progress=False, warmup=False)
    rng = np.random.default_rng(args.seed)
    dispatched = []

    def run(inp, variant="full", decode_only=False):  # the device step, replaced: random ids at once
        dispatched.append(time.perf_counter())
        return _Result(rng.integers(0, V, inp.seq_lens.shape[0]).astype(np.int32))

    engine.runner.run = run
    server = AsyncLLM(engine)
    app = build_app(server, served_model_name="profile")
    bodies = [{"model": "profile", "prompt": rng.integers(0, model.config.vocab_size, args.input_len).tolist(),
               "max_tokens": args.output_len, "ignore_eos": True, "temperature": 0, "stream": True,
               "stream_options": {"include_usage": True}} for _ in range(N)]

    async def drive():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://profile",
                                     timeout=None) as client:
            t = time.perf_counter()
            results = await asyncio.gather(*(_stream(client, b) for b in bodies))
            return results, time.perf_counter() - t

    try:
        results, elapsed = asyncio.run(drive())
    finally:
        server.shutdown()
    chunks, tokens = (sum(x) for x in zip(*results))
    if tokens != N * args.output_len:
        raise SystemExit(f"lost tokens: {tokens} of {N * args.output_len}")
    period = float(np.median(np.diff(dispatched))) if len(dispatched) > 1 else 0.0
    res = dict(bench="server_host", num_streams=N, input_len=args.input_len, output_len=args.output_len,
               synthetic_vocab=V, elapsed_s=elapsed, tokens=tokens, chunks=chunks, tok_s=tokens / elapsed,
               us_per_token=1e6 * elapsed / tokens, steps=len(dispatched), step_period_ms_median=1e3 * period,
               commit=current_commit(), date=time.strftime("%Y-%m-%d %H:%M"))
    print(f"{N} streams x {args.output_len} tokens: {tokens / elapsed:,.0f} tok/s ({res['us_per_token']:.1f} us a "
          f"token), {chunks} chunks, {len(dispatched)} steps, median step period {1e3 * period:.2f} ms")
    write_json(res, args.out, "server_host")


if __name__ == "__main__":
    main()
