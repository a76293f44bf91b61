"""What `scripts/serve.py`'s vLLM flags turn into beyond EngineConfig: a chat template given on the command line, a
tokenizer from another directory, and build_app's keyword arguments. Kept apart from engine/server.py, which is
the HTTP surface only."""
from __future__ import annotations

import argparse
from pathlib import Path


def token_buckets_flag(text: str) -> tuple[int, ...]:
    """--token-buckets "8,64,1024,16384": the padded step sizes compiled at start-up (EngineConfig.token_buckets),
    the counterpart of vLLM's --cuda-graph-sizes. Fewer buckets start faster; a step runs in the smallest bucket
    that holds its tokens, so the largest must reach --max-num-batched-tokens (EngineConfig checks that)."""
    try:
        sizes = [int(part) for part in text.replace(" ", "").split(",") if part]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give token counts separated by commas, e.g. 8,64,1024") from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give one or more positive token counts, e.g. 8,64,1024")
    return tuple(sorted(set(sizes)))


def read_chat_template(value: str) -> str:
    """vLLM's --chat-template: a file's text, or the value itself when it is template text. A value that names no
    file and has none of "{", "}" or a newline is a mistyped path, not a template that prints itself; template
    text given inline has its backslash escapes (\\n) decoded, as vLLM does. The template must compile."""
    path = Path(value).expanduser()
    if path.is_file():
        text = path.read_text(encoding="utf-8")
    elif any(c in value for c in "{}\n"):
        text = value.encode("latin-1", "backslashreplace").decode("unicode_escape")  # keeps non-ASCII text intact
    else:
        raise ValueError(f"{value!r} is no file, and without '{{', '}}' or a newline not template text either")
    from ie_jax.chat_template import compile_chat_template  # imported here: ie_jax brings in jax
    compile_chat_template(text)  # a ChatTemplateError (ValueError) names the jinja2 error
    return text


def served_tokenizer(args, model, tokenizer):
    """The tokenizer the server uses: the checkpoint's, or --tokenizer's directory (tokenizer.json,
    tokenizer_config.json and its generation_config's EOS ids); --chat-template replaces its templates."""
    if getattr(args, "tokenizer", None):
        from ie_jax.tokenizer import _as_id_list, _read_json, load_tokenizer
        tokenizer = load_tokenizer(args.tokenizer)
        if tokenizer.vocab_size > model.config.vocab_size:
            raise ValueError(f"--tokenizer {args.tokenizer}: its ids reach {tokenizer.vocab_size - 1}, beyond the "
                             f"model's vocabulary of {model.config.vocab_size}")
        if Path(args.model).is_dir():  # vLLM reads generation_config from the model, whichever the tokenizer
            model_eos = _as_id_list(_read_json(Path(args.model) / "generation_config.json").get("eos_token_id"))
            tokenizer.eos_token_ids = tuple(dict.fromkeys([*tokenizer.eos_token_ids, *model_eos]))
    if getattr(args, "chat_template", None):
        if tokenizer is None:
            raise ValueError(f"--chat-template needs a tokenizer: {args.model} has no tokenizer.json (--tokenizer DIR)")
        # one template for every request, tools or not (the checkpoint's "tool_use" one included), as in vLLM
        tokenizer.chat_templates = {"default": args.chat_template}
    return tokenizer


def app_kwargs(args) -> dict:
    """build_app's keyword arguments from the parsed flags (run_server and the tests share them)."""
    return dict(served_model_name=args.served_model_name or args.model, api_key=args.api_key,
                max_queue=args.max_queue, model_root=args.model,
                tool_call_parser=args.tool_call_parser if getattr(args, "enable_auto_tool_choice", False) else None,
                response_role=getattr(args, "response_role", "assistant"),
                return_tokens_as_token_ids=getattr(args, "return_tokens_as_token_ids", False),
                trust_request_chat_template=getattr(args, "trust_request_chat_template", False),
                log_stats_interval=None if getattr(args, "disable_log_stats", False) else 10.0,
                log_requests=getattr(args, "enable_log_requests", False),
                max_log_len=getattr(args, "max_log_len", None),
                reasoning_parser=getattr(args, "reasoning_parser", None),
                grammar_in_reasoning=(getattr(args, "structured_outputs_config", None) or {}).get("enable_in_reasoning",
                                                                                                 False),
                cors=None if getattr(args, "allowed_origins", None) is None else  # CORS only when asked for
                dict(allow_origins=args.allowed_origins, allow_methods=getattr(args, "allowed_methods", ["*"]),
                     allow_headers=getattr(args, "allowed_headers", ["*"]),
                     allow_credentials=getattr(args, "allow_credentials", False)))
