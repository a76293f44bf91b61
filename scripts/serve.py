"""Serve a model over an OpenAI-compatible HTTP API (flags follow `vllm serve`).

    python scripts/serve.py                                   # the embedded default model, on 127.0.0.1:8000
    python scripts/serve.py /path/to/hf_dir --max-model-len 4096   # or --model /path/to/hf_dir
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

from engine.config import EngineConfig, PoolerConfig  # noqa: E402
from engine.serve_flags import token_buckets_flag  # noqa: E402
from engine.speculative import SpeculativeConfig  # noqa: E402

DEFAULT_MODEL = "default"

BANNER = """\
Serving the embedded default model: a tiny Llama (4 layers, hidden size 256) with random weights over a byte-level
tokenizer (ids 0-255 are bytes, 256-262 special tokens). It is there to try the server and the API, and its text is
noise. To serve a real checkpoint, pass a Hugging Face model directory (config.json, *.safetensors,
tokenizer.json):  python scripts/serve.py --model /path/to/hf_dir"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    engine = {f.name: f.default for f in dataclasses.fields(EngineConfig)}
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("model_tag", nargs="?", default=None, metavar="MODEL", help="the model, as in `vllm serve MODEL`")
    p.add_argument("--model", default=None,
                   help=f"HF checkpoint directory, Hugging Face Hub name (org/name, fetched into the Hub cache) or "
                        f"preset name (default: {DEFAULT_MODEL!r}, the embedded tiny model)")
    p.add_argument("--tokenizer", default=None,
                   help="a directory (or Hub name) with the tokenizer (tokenizer.json, tokenizer_config.json) if not "
                        "the model's")
    p.add_argument("--revision", default=None, help="a Hub name's branch, tag or commit")
    p.add_argument("--download-dir", default=None, help="where Hub names are fetched (default: the Hub's cache)")
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
                   help="prompt + output tokens per request (default: the model's max_position_embeddings, at "
                        "most 8192; longer contexts must be asked for, as they widen every step's page table)")
    p.add_argument("--max-num-seqs", type=int, default=engine["max_num_seqs"], help="requests in one step")
    p.add_argument("--max-num-batched-tokens", type=int, default=engine["max_num_batched_tokens"],
                   help="token budget of one step, shared by decodes and prompt chunks")
    p.add_argument("--calculate-kv-scales", action="store_true",
                   help="with --kv-cache-dtype fp8 and a checkpoint without k_scale/v_scale: calibrate per-layer "
                        "scales at start-up on the bundled text (vLLM computes them from the first requests)")
    p.add_argument("--token-buckets", type=token_buckets_flag, default=None, metavar="T,T,...",
                   help="step sizes (tokens) compiled at start-up, as vLLM's --cuda-graph-sizes, except that every "
                        "step runs in one: default powers of two from 8 to --max-num-batched-tokens; fewer start "
                        "faster")
    p.add_argument("--page-size", "--block-size", dest="page_size", type=int, default=engine["page_size"],
                   choices=[8, 16, 32, 64, 128], help="tokens per KV-cache page")
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
    p.add_argument("--tool-call-parser", default=None, choices=["hermes", "llama3_json", "mistral", "pythonic"],
                   help="the model's tool-call format (with --enable-auto-tool-choice)")
    p.add_argument("--reasoning-parser", default=None, choices=["qwen3", "deepseek_r1"],
                   help="a thinking model's <think> ... </think> goes to the chat message's reasoning field "
                        "(and reasoning_content), the rest to content; a grammar (response_format, guided_*) "
                        "holds only the text after the thought")
    p.add_argument("--structured-outputs-config", type=json_dict, default={}, metavar="JSON",
                   help='\'{"enable_in_reasoning": true}\': grammars hold the whole reply, thought included; '
                        '"backend" is accepted and changes nothing (one guide implementation here)')
    p.add_argument("--chat-template", default=None, metavar="FILE_OR_TEMPLATE",
                   help="Jinja chat template for /v1/chat/completions, replacing the tokenizer's: a file, or the "
                        "template text")
    p.add_argument("--response-role", default="assistant", help="the role of chat completion replies")
    p.add_argument("--trust-request-chat-template", action="store_true",
                   help="let a chat request bring its own chat_template (else refused with a 400, as in vLLM)")
    p.add_argument("--max-logprobs", type=int, default=engine["max_logprobs"],
                   help="the most logprobs / top_logprobs a request may ask for")
    p.add_argument("--return-tokens-as-token-ids", action="store_true",
                   help='logprobs name each token "token_id:<id>" (a request\'s return_tokens_as_token_ids overrides)')
    p.add_argument("--generation-config", default="auto", metavar="{auto,vllm,FOLDER}",
                   help="the defaults of request fields left unset: auto takes the model's generation_config.json "
                        "(temperature, top_p, top_k, min_p, repetition_penalty; max_new_tokens caps max_tokens), "
                        "FOLDER the generation_config.json there, vllm none (the API's); the EOS ids are the model's")
    p.add_argument("--override-generation-config", type=json_dict, default=None, metavar="JSON",
                   help="defaults over the generation config's, in its names: "
                        "'{\"temperature\": 0.5, \"max_new_tokens\": 64}'")
    p.add_argument("--speculative-config", type=json_dict, default=None, metavar="JSON",
                   help='prompt-lookup speculative decoding: \'{"method": "ngram", '
                        '"num_speculative_tokens": 4, "prompt_lookup_max": 4}\' (drafts take free request seats)')
    p.add_argument("--pooler-config", "--override-pooler-config", type=json_dict, default=None, metavar="JSON",
                   help='/v1/embeddings pooling: \'{"pooling_type": "LAST" | "MEAN" | "CLS", "normalize": true}\' '
                        '(default LAST, normalized)')
    p.add_argument("--tensor-parallel-size", "-tp", type=int, default=1, help="only 1: the server uses one GPU")
    p.add_argument("--pipeline-parallel-size", "-pp", type=int, default=1, help="only 1: the server uses one GPU")
    p.add_argument("--allowed-origins", type=json_list, default=None,
                   help='CORS, a JSON list: \'["http://x"]\' (default: no CORS headers, so that a web page in the '
                        'browser cannot read a local server; vLLM allows any origin)')
    p.add_argument("--allowed-methods", type=json_list, default=["*"], help="CORS, a JSON list")
    p.add_argument("--allowed-headers", type=json_list, default=["*"], help="CORS, a JSON list")
    p.add_argument("--allow-credentials", action="store_true", help="CORS: allow cookies and auth headers")
    p.add_argument("--enable-log-requests", action="store_true",
                   help="log each request as it arrives: its prompt, token ids and sampling parameters")
    p.add_argument("--max-log-len", type=int, default=None,
                   help="with --enable-log-requests: the most prompt characters and token ids a line shows")
    p.add_argument("--uvicorn-log-level", default="info",
                   choices=["critical", "error", "warning", "info", "debug", "trace"])
    # vLLM flags accepted so a pasted command runs; compat_notes says at start-up why each changes nothing here
    same = "accepted for vLLM commands; changes nothing here (a note at start-up says why)"
    p.add_argument("--trust-remote-code", action="store_true", help=same)
    p.add_argument("--enable-chunked-prefill", action=argparse.BooleanOptionalAction, default=None,
                   help="always on here; --no-enable-chunked-prefill is an error")
    p.add_argument("--enforce-eager", action="store_true", help=same)
    p.add_argument("--swap-space", type=float, default=None, metavar="GIB", help=same)
    p.add_argument("--disable-log-requests", action="store_true", help=same)
    p.add_argument("--disable-log-stats", action="store_true",
                   help="no engine stats line on stderr every 10 s (throughput, requests, KV cache, prefix hits)")
    p.add_argument("--disable-frontend-multiprocessing", action="store_true", help=same)
    args = p.parse_args(argv)
    if args.model_tag and args.model and args.model_tag != args.model:
        p.error(f"the model is given twice: {args.model_tag!r} (positional) and --model {args.model!r}")
    args.model = args.model_tag or args.model or DEFAULT_MODEL
    for flag, n in (("--tensor-parallel-size", args.tensor_parallel_size),
                    ("--pipeline-parallel-size", args.pipeline_parallel_size)):
        if n != 1:
            p.error(f"{flag}={n}: ie-jax serves on one GPU; a model too large for one may fit with "
                    f"--quantization int8, int4 or fp8")
    if args.enable_chunked_prefill is False:
        p.error("--no-enable-chunked-prefill: chunked prefill is always on here (prompts are split under "
                "--max-num-batched-tokens); leave the flag out")
    if args.generation_config not in ("auto", "vllm") and \
            not (Path(args.generation_config) / "generation_config.json").is_file():
        p.error(f"--generation-config {args.generation_config!r}: give auto, vllm or a folder that holds a "
                f"generation_config.json")
    unknown = set(args.structured_outputs_config) - {"enable_in_reasoning", "backend"}
    if unknown:
        p.error(f"--structured-outputs-config: unknown keys {sorted(unknown)}; known: backend, enable_in_reasoning")
    if not isinstance(args.structured_outputs_config.get("enable_in_reasoning", False), bool):
        p.error("--structured-outputs-config: enable_in_reasoning must be true or false")
    try:  # a bad --speculative-config stops here, before the model loads
        SpeculativeConfig.parse(args.speculative_config)
    except (ValueError, TypeError) as e:
        p.error(f"--speculative-config: {e}")
    try:
        PoolerConfig.parse(args.pooler_config)
    except (ValueError, TypeError) as e:
        p.error(f"--pooler-config: {e}")
    if args.max_log_len is not None and args.max_log_len < 0:
        p.error(f"--max-log-len={args.max_log_len} must be >= 0")
    if args.max_logprobs < 0:
        p.error(f"--max-logprobs={args.max_logprobs} must be >= 0")
    if not args.response_role:
        p.error("--response-role must not be empty")
    if args.tokenizer and Path(args.tokenizer).is_dir() and not (Path(args.tokenizer) / "tokenizer.json").is_file():
        p.error(f"--tokenizer {args.tokenizer}: no tokenizer.json there")
    if args.chat_template is not None:
        from engine.serve_flags import read_chat_template
        try:
            args.chat_template = read_chat_template(args.chat_template)
        except (OSError, ValueError) as e:
            p.error(f"--chat-template: {e}")
    budget = max(args.max_num_batched_tokens or 0, args.max_num_seqs) or 2048  # as engine/async_llm.py sets it
    if args.token_buckets and max(args.token_buckets) < budget:
        p.error(f"--token-buckets {','.join(map(str, args.token_buckets))}: the largest must reach the step's token "
                f"budget ({budget}, from --max-num-batched-tokens / --max-num-seqs), or longer steps had no bucket")
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


def json_list(text: str) -> list[str]:
    """vLLM's CORS flags take a JSON list of strings."""
    try:
        value = json.loads(text)
    except ValueError:
        value = None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a JSON list of strings, e.g. '[\"http://localhost:3000\"]'")
    return value


def json_dict(text: str) -> dict:
    """vLLM's --override-generation-config takes a JSON object."""
    try:
        value = json.loads(text)
    except ValueError:
        value = None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"{text!r} is not a JSON object, e.g. '{{\"temperature\": 0.5}}'")
    return value


def compat_notes(args: argparse.Namespace) -> list[str]:
    """One line for each vLLM flag given that changes nothing here, and why; then the sampling defaults the
    generation config sets (a bad one raises ValueError)."""
    notes = {
        "trust_remote_code": "--trust-remote-code: checkpoints load through ie-jax's own model code; no repository "
                             "code runs",
        "enable_chunked_prefill": "--enable-chunked-prefill: chunked prefill is always on",
        "enforce_eager": "--enforce-eager: every step shape is compiled ahead of time by XLA; there is no eager mode "
                         "or CUDA graph to turn off",
        "swap_space": "--swap-space: nothing is swapped; a preempted request's KV cache is recomputed",
        "disable_log_requests": "--disable-log-requests: requests are logged only with --enable-log-requests (as in "
                                "vLLM now); uvicorn's access lines follow --uvicorn-log-level",
        "disable_frontend_multiprocessing": "--disable-frontend-multiprocessing: the server and the engine already "
                                            "share one process (the engine runs in a thread)",
    }
    out = [line for name, line in notes.items() if getattr(args, name, None) not in (None, False)]
    if "backend" in (getattr(args, "structured_outputs_config", None) or {}):
        out.append("--structured-outputs-config backend: structured outputs run on ie-jax's own token guides "
                   "(ie_jax/guided.py) whatever the backend named")
    from ie_jax.sampling import model_sampling_defaults  # imported here: ie_jax brings in jax
    sampling = model_sampling_defaults(args.model, args.generation_config, args.override_generation_config)
    if sampling:
        gc, own = args.generation_config, Path(args.model, "generation_config.json").is_file()
        sources = {"auto": ["the model's generation_config.json"] * own, "vllm": []}.get(
            gc, [f"{gc}/generation_config.json"])
        sources += ["--override-generation-config"] * bool(args.override_generation_config)
        out.append(f"--generation-config {gc}: default sampling parameters from {' and '.join(sources)}: {sampling} "
                   f"(a request's own values win; --generation-config vllm ignores the file)")
    return out


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
    try:
        notes = compat_notes(args)
    except ValueError as e:  # a bad generation config: stop before loading the model
        sys.exit(f"error: {e}")
    for note in notes:
        print(f"note: {note}", file=sys.stderr, flush=True)
    from engine.server import run_server
    run_server(args)


if __name__ == "__main__":
    main()
