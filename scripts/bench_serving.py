"""Serving benchmark: streams requests at an OpenAI-compatible server and reports latency and throughput, with the
semantics of `vllm bench serve` so the numbers compare one to one.

    python scripts/serve.py --load-format dummy --model /path/to/llama3-8b &
    python scripts/bench_serving.py --num-prompts 1000 --random-input-len 1024 --random-output-len 128 \
        --request-rate inf --save-result --result-dir benchmarks/results

Requests come from the random dataset (token-id prompts by default, or random text), a ShareGPT JSON file
(`--dataset-name sharegpt --dataset-path ShareGPT_V3_unfiltered_cleaned_split.json`: each conversation's first turn
is the prompt, the reply's length the output length) or a JSONL file of {"prompt": ...} lines (`custom`). Text is
counted in tokens by the server's own /tokenize. Requests are sent with `ignore_eos`, so each produces exactly its
output length. Arrivals are all at once (`--request-rate inf`) or a
gamma process (Poisson at `--burstiness 1`), optionally capped at `--max-concurrency` in flight.

Metrics, per request: TTFT (send to first streamed token), TPOT ((latency - TTFT) / (output tokens - 1)), ITL
(gaps between streamed chunks), E2EL (send to last token). Totals: request and token throughput over the
benchmark's wall time, and goodput (requests per second that met every `--goodput` SLO). Token counts are the
server's `usage`. This script knows only HTTP: it imports nothing of the engine.
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import random
import statistics
import sys
import time
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path

import httpx

METRICS = ("ttft", "tpot", "itl", "e2el")
METRIC_TITLES = {"ttft": "Time to First Token", "tpot": "Time per Output Token (excl. 1st token)",
                 "itl": "Inter-token Latency", "e2el": "End-to-end Latency"}


@dataclasses.dataclass
class Prompt:
    prompt: str | list[int]
    prompt_len: int
    output_len: int


@dataclasses.dataclass
class RequestResult:
    prompt_len: int
    success: bool = False
    output_tokens: int = 0
    ttft: float = 0.0  # seconds
    latency: float = 0.0
    itl: list[float] = dataclasses.field(default_factory=list)
    text: str = ""
    error: str = ""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--base-url", default=None, help="server root, e.g. http://127.0.0.1:8000 (overrides host/port)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--endpoint", default="/v1/completions", choices=["/v1/completions", "/v1/chat/completions"])
    p.add_argument("--model", default=None, help="model name to send (default: the server's first model)")
    p.add_argument("--lora-modules", nargs="+", default=None, metavar="NAME",
                   help="adapter names the server serves (--lora-modules there): each request picks one at random")
    p.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"))
    p.add_argument("--dataset-name", default="random", choices=["random", "sharegpt", "custom"])
    p.add_argument("--dataset-path", default=None, help="sharegpt: the JSON file; custom: a JSONL file of prompts")
    p.add_argument("--sharegpt-output-len", type=int, default=None,
                   help="every request's output length (default: the length of the conversation's reply)")
    p.add_argument("--custom-output-len", type=int, default=256)
    p.add_argument("--num-prompts", type=int, default=1000)
    p.add_argument("--random-input-len", type=int, default=1024)
    p.add_argument("--random-output-len", type=int, default=128)
    p.add_argument("--random-range-ratio", type=float, default=0.0,
                   help="lengths are drawn uniformly from [len * (1 - r), len * (1 + r)]")
    p.add_argument("--random-prefix-len", type=int, default=0, help="tokens of one shared prefix before each prompt")
    p.add_argument("--random-prompt-type", default="token-ids", choices=["token-ids", "text"],
                   help="token-ids: exact lengths; text: random words (chat needs text), lengths from usage")
    p.add_argument("--tokenizer", default=None,
                   help="HF tokenizer directory: draw token ids from its non-special vocabulary (default: ids "
                        "0-255, which every bundled tokenizer has)")
    p.add_argument("--request-rate", type=float, default=float("inf"), help="requests/s; inf sends all at once")
    p.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of arrivals; 1 is Poisson")
    p.add_argument("--max-concurrency", type=int, default=None)
    p.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--percentile-metrics", default="ttft,tpot,itl,e2el")
    p.add_argument("--metric-percentiles", default="99", help="comma-separated, e.g. 50,90,99")
    p.add_argument("--goodput", nargs="+", default=None, metavar="KEY:MS",
                   help="SLOs in ms, e.g. ttft:500 tpot:50 (keys: ttft, tpot, e2el)")
    p.add_argument("--save-result", action="store_true")
    p.add_argument("--result-dir", default=".")
    p.add_argument("--result-filename", default=None)
    p.add_argument("--metadata", nargs="*", default=[], metavar="KEY=VALUE", help="extra fields for the JSON")
    p.add_argument("--timeout", type=float, default=6 * 3600, help="seconds per request")
    p.add_argument("--disable-tqdm", action="store_true")
    args = p.parse_args(argv)
    for name in ("num_prompts", "random_input_len", "random_output_len"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if not 0 <= args.random_range_ratio < 1:
        p.error(f"--random-range-ratio={args.random_range_ratio} must be in [0, 1)")
    if args.dataset_name != "random" and not args.dataset_path:
        p.error(f"--dataset-name {args.dataset_name} needs --dataset-path")
    if args.dataset_path and not Path(args.dataset_path).is_file():
        p.error(f"--dataset-path {args.dataset_path}: no such file")
    for name in ("sharegpt_output_len", "custom_output_len"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.endpoint.endswith("chat/completions") and args.random_prompt_type == "token-ids":
        args.random_prompt_type = "text"  # chat messages are text
    args.goodput_slos = parse_goodput(args.goodput, p)
    return args


def parse_goodput(items: list[str] | None, parser: argparse.ArgumentParser) -> dict[str, float]:
    slos = {}
    for item in items or []:
        key, _, value = item.partition(":")
        if key not in ("ttft", "tpot", "e2el") or not value:
            parser.error(f"--goodput {item!r} must be KEY:MS with KEY in ttft, tpot, e2el")
        slos[key] = float(value)
    return slos


# ---------------------------------------------------------------------------------------------------------------
# Dataset and arrivals

def random_prompts(args, rng: random.Random) -> list[Prompt]:
    """vLLM's random dataset: uniform lengths around the targets, random token ids (or words) per prompt."""
    if args.tokenizer:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from ie_jax.tokenizer import load_tokenizer
        tokenizer = load_tokenizer(args.tokenizer)
        vocab = [i for i in range(tokenizer.vocab_size) if not tokenizer.is_special(i)]
    else:
        tokenizer, vocab = None, list(range(256))

    def length(target: int) -> int:
        low, high = int(target * (1 - args.random_range_ratio)), int(target * (1 + args.random_range_ratio))
        return max(1, rng.randint(low, high))

    def words(n: int) -> str:
        return " ".join("".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=rng.randint(2, 7))) for _ in range(n))

    prefix = [rng.choice(vocab) for _ in range(args.random_prefix_len)]
    prompts = []
    for _ in range(args.num_prompts):
        input_len = length(args.random_input_len)
        ids = prefix + [rng.choice(vocab) for _ in range(input_len)]
        if args.random_prompt_type == "token-ids":
            prompt = ids
        elif tokenizer is not None:
            prompt = tokenizer.decode(ids)
        else:  # roughly one token a word for BPE tokenizers; the true count comes back in `usage`
            prompt = words(len(ids))
        prompts.append(Prompt(prompt, len(ids), length(args.random_output_len)))
    return prompts


async def token_counts(client: httpx.AsyncClient, texts: list[str], special: bool) -> list[int]:
    """Each text's length in the served model's tokens (the server's /tokenize), 32 requests at a time."""
    limit = asyncio.Semaphore(32)

    async def one(text: str) -> int:
        async with limit:
            r = await client.post("/tokenize", json={"prompt": text, "add_special_tokens": special})
            r.raise_for_status()
            return r.json()["count"]
    return list(await asyncio.gather(*(one(t) for t in texts)))


async def sharegpt_prompts(args, rng: random.Random, client: httpx.AsyncClient) -> list[Prompt]:
    """vLLM's ShareGPT sampling: shuffled conversations of two turns or more, the first turn as the prompt and
    the reply's token count as the output length (or --sharegpt-output-len); pairs with a prompt or reply under 4
    tokens, a prompt over 1,024 or both over 2,048 are skipped."""
    data = json.loads(Path(args.dataset_path).read_text())
    convs = [(c["conversations"][0]["value"], c["conversations"][1]["value"]) for c in data
             if len(c.get("conversations") or []) >= 2]
    rng.shuffle(convs)
    fixed, out, start = args.sharegpt_output_len, [], 0
    while len(out) < args.num_prompts and start < len(convs):
        batch = convs[start:start + 2 * (args.num_prompts - len(out))]
        start += len(batch)
        prompt_lens = await token_counts(client, [p for p, _ in batch], True)
        reply_lens = await token_counts(client, [r for _, r in batch], False) if fixed is None else [fixed] * len(batch)
        for (prompt, _), n_in, n_out in zip(batch, prompt_lens, reply_lens):
            if n_in < 4 or (fixed is None and n_out < 4) or n_in > 1024 or n_in + n_out > 2048:
                continue
            if len(out) < args.num_prompts:
                out.append(Prompt(prompt, n_in, n_out))
    if len(out) < args.num_prompts:
        raise SystemExit(f"{args.dataset_path}: {len(out)} usable conversations of {len(convs)}, "
                         f"fewer than --num-prompts {args.num_prompts}")
    return out


async def custom_prompts(args, rng: random.Random, client: httpx.AsyncClient) -> list[Prompt]:
    """vLLM's custom dataset: a JSONL file whose lines hold a "prompt", shuffled; every output --custom-output-len
    tokens long."""
    lines = [line for line in Path(args.dataset_path).read_text().splitlines() if line.strip()]
    prompts = []
    for i, line in enumerate(lines, 1):
        row = json.loads(line)
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
            raise SystemExit(f"{args.dataset_path}:{i}: each line must be a JSON object with a \"prompt\" string")
        prompts.append(row["prompt"])
    if len(prompts) < args.num_prompts:
        raise SystemExit(f"{args.dataset_path}: {len(prompts)} prompts, fewer than --num-prompts {args.num_prompts}")
    rng.shuffle(prompts)
    chosen = prompts[:args.num_prompts]
    return [Prompt(p, n, args.custom_output_len) for p, n in zip(chosen, await token_counts(client, chosen, True))]


async def arrivals(prompts: list[Prompt], rate: float, burstiness: float, rng: random.Random
                   ) -> AsyncIterator[Prompt]:
    """Yields prompts at gamma-distributed intervals of mean 1/rate (exponential, i.e. Poisson, at burstiness 1)."""
    for prompt in prompts:
        yield prompt
        if rate != float("inf"):
            await asyncio.sleep(rng.gammavariate(burstiness, 1.0 / (rate * burstiness)))


# ---------------------------------------------------------------------------------------------------------------
# One streamed request

def payload(args, model: str, prompt: Prompt) -> dict:
    body = {"model": model, "max_tokens": prompt.output_len, "temperature": args.temperature, "stream": True,
            "stream_options": {"include_usage": True}, "ignore_eos": args.ignore_eos}
    if args.endpoint.endswith("chat/completions"):
        body["messages"] = [{"role": "user", "content": prompt.prompt}]
    else:
        body["prompt"] = prompt.prompt
    return body


async def send(client: httpx.AsyncClient, url: str, body: dict, prompt_len: int) -> RequestResult:
    result = RequestResult(prompt_len=prompt_len)
    chunks = []
    start = last = time.perf_counter()
    try:
        async with client.stream("POST", url, json=body) as response:
            if response.status_code != 200:
                result.error = f"HTTP {response.status_code}: {(await response.aread()).decode()[:500]}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    result.error = chunk["error"].get("message", str(chunk["error"]))
                    return result
                if chunk.get("choices"):
                    now = time.perf_counter()
                    if result.ttft == 0.0:
                        result.ttft = now - start
                    else:
                        result.itl.append(now - last)
                    last = now
                    choice = chunk["choices"][0]
                    chunks.append(choice.get("text") or (choice.get("delta") or {}).get("content") or "")
                elif chunk.get("usage"):
                    result.output_tokens = chunk["usage"]["completion_tokens"]
                    result.prompt_len = chunk["usage"]["prompt_tokens"]
        result.text = "".join(chunks)
        result.latency = last - start
        result.success = result.ttft > 0
        if not result.output_tokens:  # a server without usage in streams: count chunks
            result.output_tokens = len(result.itl) + 1 if result.success else 0
        if not result.success:
            result.error = "the stream held no tokens"
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        result.error = f"{type(e).__name__}: {e}"
    return result


# ---------------------------------------------------------------------------------------------------------------
# Metrics

def summarize(results: list[RequestResult], duration: float, args) -> dict:
    ok = [r for r in results if r.success]
    ttfts = [r.ttft for r in ok]
    tpots = [(r.latency - r.ttft) / (r.output_tokens - 1) if r.output_tokens > 1 else 0.0 for r in ok]
    itls = [x for r in ok for x in r.itl]
    e2els = [r.latency for r in ok]
    total_in, total_out = sum(r.prompt_len for r in ok), sum(r.output_tokens for r in ok)

    good = 0
    if args.goodput_slos:
        for ttft, tpot, e2el in zip(ttfts, tpots, e2els):
            measured = {"ttft": ttft, "tpot": tpot, "e2el": e2el}
            good += all(measured[k] * 1000 <= slo for k, slo in args.goodput_slos.items())

    out = {
        "completed": len(ok), "failed": len(results) - len(ok), "duration": duration,
        "total_input_tokens": total_in, "total_output_tokens": total_out,
        "request_throughput": len(ok) / duration, "request_goodput": good / duration if args.goodput_slos else None,
        "output_throughput": total_out / duration, "total_token_throughput": (total_in + total_out) / duration,
        "input_lens": [r.prompt_len for r in results], "output_lens": [r.output_tokens for r in results],
        "ttfts": ttfts, "itls": [r.itl for r in results], "errors": [r.error for r in results],
    }
    percentiles = [float(p) for p in args.metric_percentiles.split(",")]
    for name, values in zip(METRICS, (ttfts, tpots, itls, e2els)):
        ms = sorted(v * 1000 for v in values) or [0.0]
        out[f"mean_{name}_ms"] = statistics.fmean(ms)
        out[f"median_{name}_ms"] = statistics.median(ms)
        out[f"std_{name}_ms"] = statistics.pstdev(ms)
        for p in percentiles:
            out[f"p{p:g}_{name}_ms"] = percentile(ms, p)
    return out


def percentile(sorted_values: list[float], p: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    k = (len(sorted_values) - 1) * p / 100
    lo = int(k)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (k - lo)


def print_table(r: dict, args) -> None:
    width = 50
    row = "{:<40} {:<10}".format
    print(" Serving Benchmark Result ".center(width, "="))
    print(row("Successful requests:", r["completed"]))
    if r["failed"]:
        print(row("Failed requests:", r["failed"]))
    if args.max_concurrency is not None:
        print(row("Maximum request concurrency:", args.max_concurrency))
    print(row("Benchmark duration (s):", f"{r['duration']:.2f}"))
    print(row("Total input tokens:", r["total_input_tokens"]))
    print(row("Total generated tokens:", r["total_output_tokens"]))
    print(row("Request throughput (req/s):", f"{r['request_throughput']:.2f}"))
    if r["request_goodput"] is not None:
        print(row("Request goodput (req/s):", f"{r['request_goodput']:.2f}"))
    print(row("Output token throughput (tok/s):", f"{r['output_throughput']:.2f}"))
    print(row("Total Token throughput (tok/s):", f"{r['total_token_throughput']:.2f}"))
    for name in args.percentile_metrics.split(","):
        name = name.strip()
        if name not in METRICS:
            continue
        print(f" {METRIC_TITLES[name]} ".center(width, "-"))
        label = name.upper()
        print(row(f"Mean {label} (ms):", f"{r[f'mean_{name}_ms']:.2f}"))
        print(row(f"Median {label} (ms):", f"{r[f'median_{name}_ms']:.2f}"))
        for p in args.metric_percentiles.split(","):
            print(row(f"P{float(p):g} {label} (ms):", f"{r[f'p{float(p):g}_{name}_ms']:.2f}"))
    print("=" * width)


# ---------------------------------------------------------------------------------------------------------------

async def run(args) -> dict:
    base_url = (args.base_url or f"http://{args.host}:{args.port}").rstrip("/")
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limit = args.max_concurrency or args.num_prompts
    async with httpx.AsyncClient(base_url=base_url, headers=headers, timeout=httpx.Timeout(args.timeout),
                                 limits=httpx.Limits(max_connections=limit + 1, max_keepalive_connections=limit + 1),
                                 trust_env=False) as client:
        model = args.model
        if model is None:
            response = await client.get("/v1/models")
            response.raise_for_status()
            model = response.json()["data"][0]["id"]
        rng = random.Random(args.seed)
        if args.dataset_name == "sharegpt":
            prompts = await sharegpt_prompts(args, rng, client)
        elif args.dataset_name == "custom":
            prompts = await custom_prompts(args, rng, client)
        else:
            prompts = random_prompts(args, rng)

        # One request first, to fail fast on a wrong URL, model or flag.
        test = await send(client, args.endpoint, payload(args, model, prompts[0]), prompts[0].prompt_len)
        if not test.success:
            raise SystemExit(f"test request failed: {test.error}")
        print(f"Model {model} at {base_url}: test request ok; starting {len(prompts)} requests at "
              f"rate {args.request_rate}, burstiness {args.burstiness}, max concurrency {args.max_concurrency}")

        progress = None
        if not args.disable_tqdm:
            from tqdm import tqdm
            progress = tqdm(total=len(prompts))
        semaphore = asyncio.Semaphore(limit)
        pick = random.Random(args.seed + 1)  # adapters: a stream of its own, so the prompts stay the same

        async def limited(prompt: Prompt) -> RequestResult:
            name = pick.choice(args.lora_modules) if args.lora_modules else model
            async with semaphore:
                result = await send(client, args.endpoint, payload(args, name, prompt), prompt.prompt_len)
            if progress is not None:
                progress.update(1)
            return result

        start = time.perf_counter()
        tasks = [asyncio.create_task(limited(p)) async for p in arrivals(prompts, args.request_rate,
                                                                         args.burstiness, rng)]
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
        if progress is not None:
            progress.close()
    summary = summarize(results, duration, args)
    summary.update(model_id=model, base_url=base_url, endpoint=args.endpoint, lora_modules=args.lora_modules)
    return summary


def main(args: argparse.Namespace) -> dict:
    result = asyncio.run(run(args))
    print_table(result, args)
    for error in sorted({e for e in result["errors"] if e})[:5]:
        print(f"error: {error}")
    result = {
        "date": datetime.now().strftime("%Y%m%d-%H%M%S"), "backend": "ie-jax", "num_prompts": args.num_prompts,
        "dataset_name": args.dataset_name, "dataset_path": args.dataset_path,
        "request_rate": args.request_rate if args.request_rate != float("inf") else "inf",
        "burstiness": args.burstiness, "max_concurrency": args.max_concurrency,
        "random_input_len": args.random_input_len, "random_output_len": args.random_output_len,
        "random_range_ratio": args.random_range_ratio, "random_prefix_len": args.random_prefix_len,
        "goodput_slos_ms": args.goodput_slos, **dict(kv.split("=", 1) for kv in args.metadata), **result,
    }
    if args.save_result:
        concurrency = f"-concurrency{args.max_concurrency}" if args.max_concurrency is not None else ""
        name = args.result_filename or (f"ie-jax-{result['request_rate']}qps{concurrency}-"
                                        f"{Path(result['model_id']).name}-{result['date']}.json")
        path = Path(args.result_dir) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2) + "\n")
        print(f"saved {path}")
    return result


if __name__ == "__main__":
    main(parse_args())
