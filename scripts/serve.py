"""Serve a model over an OpenAI-compatible HTTP API (flags follow `vllm serve`).

    python scripts/serve.py                                   # the embedded default model, on 127.0.0.1:8000
    python scripts/serve.py --model /path/to/hf_dir --max-model-len 4096
    python scripts/serve.py --model /path/to/llama3-8b --load-format dummy --dtype bfloat16   # benchmarks
    python scripts/serve.py --model /path/to/hf_dir --enable-lora --lora-modules sql=/path/to/peft_adapter

Then any OpenAI client works against http://127.0.0.1:8000/v1, e.g.
    curl http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \
        -d '{"prompt": "Hello", "max_tokens": 16}'
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.config import EngineConfig  # noqa: E402

DEFAULT_MODEL = "default"

BANNER = """\
Serving the embedded default model: a tiny Llama (4 layers, hidden size 256) with random weights over a byte-level
tokenizer (ids 0-255 are bytes, 256-262 special tokens). It is there to try the server and the API, and its text is
noise. To serve a real checkpoint, pass a Hugging Face model directory (config.json, *.safetensors,
tokenizer.json):  python scripts/serve.py --model /path/to/hf_dir"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    engine = {f.name: f.default for f in dataclasses.fields(EngineConfig)}
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"HF checkpoint directory or preset name (default: {DEFAULT_MODEL!r}, the embedded tiny model)")
    p.add_argument("--served-model-name", nargs="+", default=None,
                   help="names clients send as `model` (default: --model); the first names the responses")
    p.add_argument("--host", default="127.0.0.1", help="bind address; 0.0.0.0 exposes the server to the network")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer <key>' on /v1 routes")
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32", "bf16", "fp16",
                                                       "fp32", "half", "float"])
    p.add_argument("--load-format", default="auto", choices=["auto", "dummy"],
                   help="dummy: random weights of the checkpoint's shapes (benchmarks)")
    p.add_argument("--quantization", "-q", default=None, choices=["int8", "int4", "fp8"],
                   help="quantize a float checkpoint's projections on load (int4: round-to-nearest, groups of 128; "
                        "fp8: e4m3 weights, dynamic per-token activation scales); a quantized checkpoint needs none")
    p.add_argument("--seed", type=int, default=engine["seed"])
    p.add_argument("--max-model-len", type=int, default=None,
                   help="prompt + output tokens per request (default: the model's max_position_embeddings)")
    p.add_argument("--max-num-seqs", type=int, default=engine["max_num_seqs"], help="requests in one step")
    p.add_argument("--max-num-batched-tokens", type=int, default=engine["max_num_batched_tokens"],
                   help="token budget of one step, shared by decodes and prompt chunks")
    p.add_argument("--page-size", type=int, default=engine["page_size"], choices=[8, 16, 32, 64, 128],
                   help="tokens per KV-cache page")
    p.add_argument("--gpu-memory-utilization", type=float, default=engine["gpu_memory_utilization"],
                   help="fraction of device memory for weights + KV cache")
    p.add_argument("--num-pages", type=int, default=engine["num_pages"],
                   help="KV-cache pages (overrides --gpu-memory-utilization)")
    p.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction,
                   default=engine["enable_prefix_caching"], help="reuse KV pages of shared prompt prefixes")
    p.add_argument("--compilation-cache-dir", default=str(Path.home() / ".cache" / "ie-jax" / "xla"),
                   help="JAX persistent compilation cache: a second start skips compilation ('' disables it)")
    p.add_argument("--kv-cache-dtype", default=engine["kv_cache_dtype"], choices=["auto", "bf16", "fp8", "fp8_e4m3"],
                   help="fp8: e4m3 KV cache with per-(layer, kv-head) scales (half the bytes per token)")
    p.add_argument("--max-queue", type=int, default=engine["max_queue"],
                   help="requests admitted but not yet producing tokens beyond this get HTTP 503")
    p.add_argument("--unroll-layers", action=argparse.BooleanOptionalAction, default=engine["unroll_layers"],
                   help="run the decoder layers as straight-line code (fast steps); --no-unroll-layers keeps a "
                        "device loop (slower steps, faster start-up)")
    p.add_argument("--enable-lora", action="store_true", help="serve LoRA adapters (PEFT directories)")
    p.add_argument("--lora-modules", nargs="+", default=None, type=lora_module, metavar="NAME=PATH",
                   help="adapters served under their names: name=path, or JSON "
                        "'{\"name\": ..., \"path\": ..., \"base_model_name\": ...}'")
    p.add_argument("--max-loras", type=int, default=engine["max_loras"],
                   help="different adapters in one step (device slots)")
    p.add_argument("--max-lora-rank", type=int, default=engine["max_lora_rank"], help="the largest adapter rank")
    p.add_argument("--enable-auto-tool-choice", action="store_true",
                   help='chat requests with tools and tool_choice "auto" get their calls parsed out of the text')
    p.add_argument("--tool-call-parser", default=None, choices=["hermes", "llama3_json"],
                   help="the model's tool-call format (with --enable-auto-tool-choice)")
    p.add_argument("--uvicorn-log-level", default="info",
                   choices=["critical", "error", "warning", "info", "debug", "trace"])
    args = p.parse_args(argv)
    if args.max_queue is not None and args.max_queue < 1:
        p.error(f"--max-queue={args.max_queue} must be >= 1")
    if args.enable_auto_tool_choice and not args.tool_call_parser:
        p.error("--enable-auto-tool-choice needs --tool-call-parser")
    if args.lora_modules and not args.enable_lora:
        p.error("--lora-modules needs --enable-lora")
    if args.max_loras < 1 or args.max_lora_rank < 1:
        p.error(f"--max-loras={args.max_loras} and --max-lora-rank={args.max_lora_rank} must be >= 1")
    if args.served_model_name is None:
        args.served_model_name = [args.model]
    return args


def lora_module(text: str):
    """One --lora-modules entry, vLLM's two spellings: name=path, or a JSON object with name and path."""
    from engine.lora import LoRARequest
    if text.lstrip().startswith("{"):
        try:
            spec = json.loads(text)
            return LoRARequest(spec["name"], 0, spec["path"])
        except (ValueError, KeyError, TypeError) as e:
            raise argparse.ArgumentTypeError(f"{text!r} is not a JSON object with name and path: {e}") from e
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"{text!r} must read name=path")
    return LoRARequest(name, 0, path)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.model == DEFAULT_MODEL:
        print(BANNER, flush=True)
    from engine.server import run_server
    run_server(args)


if __name__ == "__main__":
    main()
