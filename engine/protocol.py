"""The OpenAI wire format the server speaks: pydantic request models, the mapping of a request onto
`SamplingParams`, and the JSON shapes of responses, stream chunks and errors.

Field names, defaults and extras (top_k, min_p, repetition_penalty, min_tokens, stop_token_ids, ignore_eos, ...)
follow vLLM's OpenAI server, so clients written for it work unchanged. This module knows nothing of the engine,
of HTTP or of tokenizers: it turns parsed JSON into plain values and plain values back into JSON-able dicts.
"""
from __future__ import annotations

import base64
import time
from typing import Any, Literal

import numpy as np
import pydantic

from engine.beam_search import BeamSearchParams
from ie_jax.chat_template import content_text, continue_final
from ie_jax.guided import GuidedDecodingParams
from ie_jax.regex_dfa import compile_regex
from ie_jax.sampling import SamplingParams


class ServerError(Exception):
    """An error the client caused (or overload); becomes `error_body(...)` with this HTTP status."""

    def __init__(self, message: str, status: int = 400, param: str | None = None):
        super().__init__(message)
        self.message, self.status, self.param = message, status, param


ERROR_TYPES = {400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError",
               405: "MethodNotAllowedError", 409: "ConflictError", 500: "InternalServerError",
               503: "ServiceUnavailableError"}


def error_body(message: str, status: int, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "BadRequestError"), "param": param,
                      "code": status}}


def batch_of(value, name: str) -> list[str | list[int]]:
    """A prompt field as a batch: one string or id list each (OpenAI's four shapes). An empty one raises."""
    batch = [value] if isinstance(value, str) or (value and isinstance(value[0], int)) else list(value)
    if not batch or any(len(x) == 0 for x in batch):
        raise ServerError(f"{name} cannot be empty", param=name)
    return batch


def truncate(ids: list[int], k: int | None, max_model_len: int) -> list[int]:
    """vLLM's truncate_prompt_tokens: the prompt's last k tokens (left truncation); -1 keeps max_model_len."""
    if k is None:
        return ids
    if k != -1 and k < 1:
        raise ServerError(f"truncate_prompt_tokens={k} must be -1 or at least 1", param="truncate_prompt_tokens")
    return ids[-(max_model_len if k == -1 else k):]


class _Request(pydantic.BaseModel):
    # Unknown fields are ignored, as the OpenAI API and vLLM do.
    model_config = pydantic.ConfigDict(extra="ignore")


class StreamOptions(_Request):
    include_usage: bool = True
    continuous_usage_stats: bool = False


# What a request that leaves these unset gets when the checkpoint's generation_config sets no default either.
API_DEFAULTS = dict(temperature=1.0, top_p=1.0, top_k=0, min_p=0.0, repetition_penalty=1.0)


class _SamplingFields(_Request):
    """Fields shared by completions and chat; the ones after `user` are vLLM's extras (sent via extra_body)."""

    model: str | None = None
    n: int = 1
    temperature: float | None = None
    top_p: float | None = None
    presence_penalty: float | None = 0.0
    frequency_penalty: float | None = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int = 0
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    priority: int = 0
    truncate_prompt_tokens: int | None = None  # keep the prompt's last k tokens (-1: max_model_len of them)
    # Structured outputs (OpenAI's response_format, vLLM's guided_*; ie_jax/guided.py)
    response_format: dict[str, Any] | None = None
    guided_json: Any = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    return_tokens_as_token_ids: bool | None = None  # logprobs name tokens "token_id:<id>" (None: the server's flag)
    use_beam_search: bool = False  # the n best beams instead of n samples (engine/beam_search.py)
    length_penalty: float = 1.0  # beam search: a sequence's score is cum_logprob / length ** length_penalty
    prompt_logprobs: int | None = None  # vLLM's: each prompt token's logprob, rank and top k (-1: the whole vocab)
    return_token_ids: bool = False  # vLLM's: the prompt's and each choice's token ids beside the text

    def beam_params(self, max_tokens: int, max_logprobs: int) -> BeamSearchParams | None:
        """use_beam_search's search (n beams), None without it. Raises ServerError for what it cannot combine."""
        if not self.use_beam_search:
            return None
        for name in ("response_format", "guided_json", "guided_regex", "guided_choice", "guided_grammar",
                     "logit_bias", "allowed_token_ids", "bad_words", "echo"):
            if getattr(self, name, None):
                raise ServerError(f"use_beam_search cannot take {name}", param=name)
        if self.prompt_logprobs is not None:
            raise ServerError("use_beam_search cannot take prompt_logprobs", param="prompt_logprobs")
        if 2 * self.n > max_logprobs:
            raise ServerError(f"use_beam_search with n={self.n} ranks 2n candidates a step, more than the server's "
                              f"max_logprobs={max_logprobs}", param="n")
        try:
            return BeamSearchParams(beam_width=self.n, max_tokens=max_tokens, ignore_eos=self.ignore_eos,
                                    temperature=self.temperature or 0.0, length_penalty=self.length_penalty)
        except ValueError as e:
            raise ServerError(str(e)) from e

    def sampling_params(self, max_tokens: int, logprobs: int | None, defaults: dict | None = None) -> SamplingParams:
        """A field of API_DEFAULTS the request leaves unset takes `defaults`' value (the checkpoint's
        generation_config), else the API's. Raises ValueError naming the field when a value is out of range."""
        guided = self.guided_decoding()
        bias = None
        if self.logit_bias:
            try:  # OpenAI sends the token ids as strings
                bias = {int(token): float(value) for token, value in self.logit_bias.items()}
            except ValueError as e:
                raise ServerError(f"logit_bias keys must be token ids: {e}", param="logit_bias") from e
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        fallback = {**API_DEFAULTS, **(defaults or {})}  # its max_tokens is already in `max_tokens`
        chosen = {k: fallback[k] if getattr(self, k) is None else getattr(self, k) for k in API_DEFAULTS}
        return SamplingParams(
            n=self.n, **chosen, presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0, seed=self.seed, max_tokens=max_tokens,
            min_tokens=self.min_tokens, stop=tuple(stop), stop_token_ids=tuple(self.stop_token_ids or ()),
            ignore_eos=self.ignore_eos, logprobs=logprobs, skip_special_tokens=self.skip_special_tokens,
            include_stop_str_in_output=self.include_stop_str_in_output, logit_bias=bias, guided_decoding=guided,
            allowed_token_ids=None if self.allowed_token_ids is None else tuple(self.allowed_token_ids),
            bad_words=tuple(self.bad_words) if self.bad_words else None)

    def num_prompt_logprobs(self, vocab_size: int, max_logprobs: int) -> int | None:
        """prompt_logprobs as a count of top tokens (-1: all of them), None when not asked for. vLLM's rules: not
        with streaming, -1 or at least 0, and at most the server's max_logprobs."""
        k = self.prompt_logprobs
        if k is None:
            return None
        if k < -1:
            raise ServerError(f"prompt_logprobs={k} must be -1 (the whole vocabulary) or at least 0",
                              param="prompt_logprobs")
        if self.stream:
            raise ServerError("prompt_logprobs are not available when stream=true", param="prompt_logprobs")
        k = vocab_size if k == -1 else k
        if k > max_logprobs:
            raise ServerError(f"Requested prompt logprobs of {k}, which is greater than max allowed: {max_logprobs}",
                              param="prompt_logprobs")
        return k

    def truncated(self, ids: list[int], max_model_len: int) -> list[int]:
        return truncate(ids, self.truncate_prompt_tokens, max_model_len)

    def guided_decoding(self) -> GuidedDecodingParams | None:
        """The structured-output spec of response_format or vLLM's guided_* fields (one at most); its pattern is
        compiled here, so a bad regex or an unsupported schema is a 400 before anything streams."""
        specs = []
        kind = (self.response_format or {}).get("type", "text")
        if kind == "json_object":
            specs.append(("response_format", dict(json_object=True)))
        elif kind == "json_schema":
            schema = ((self.response_format or {}).get("json_schema") or {}).get("schema")
            if not isinstance(schema, dict):
                raise ServerError("response_format json_schema needs {\"json_schema\": {\"schema\": {...}}}",
                                  param="response_format")
            specs.append(("response_format", dict(json=schema)))
        elif kind != "text":
            raise ServerError(f"response_format type {kind!r} is not supported: 'text', 'json_object' or "
                              f"'json_schema'", param="response_format")
        for name, key in (("guided_json", "json"), ("guided_regex", "regex"), ("guided_choice", "choice")):
            if getattr(self, name) is not None:
                specs.append((name, {key: getattr(self, name)}))
        if self.guided_grammar is not None:
            raise ServerError("guided_grammar is not supported: use guided_json, guided_regex or guided_choice",
                              param="guided_grammar")
        if len(specs) > 1:
            raise ServerError(f"give one structured-output constraint, not {[n for n, _ in specs]}",
                              param=specs[1][0])
        if not specs:
            return None
        name, spec = specs[0]
        try:
            params = GuidedDecodingParams(**spec)
            compile_regex(params.regex_pattern())
        except ValueError as e:
            raise ServerError(f"{name}: {e}", param=name) from e
        return params

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    @property
    def continuous_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.continuous_usage_stats


class CompletionRequest(_SamplingFields):
    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None
    add_special_tokens: bool = True

    def prompts(self) -> list[str | list[int]]:
        """The batch of prompts: one string or id list per prompt. An empty prompt raises."""
        return batch_of(self.prompt, "prompt")


class ChatMessage(_Request):
    model_config = pydantic.ConfigDict(extra="allow")  # name, tool_calls, ... reach the template untouched
    role: str
    content: str | list[dict[str, Any]] | None = None

    def as_template_dict(self) -> dict:
        message = self.model_dump(exclude_none=True)
        try:
            message["content"] = content_text(self.content)
        except ValueError as e:
            raise ServerError(str(e), param="messages") from e
        return message


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    add_generation_prompt: bool = True
    add_special_tokens: bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    include_reasoning: bool = True  # with --reasoning-parser: False leaves the reasoning out of the response
    continue_final_message: bool = False  # the reply goes on with the last message (add_generation_prompt=False)
    chat_template: str | None = None  # this request's template (the server must trust request templates)
    documents: list[dict[str, Any]] | None = None  # for templates that take documents (RAG), as vLLM passes them

    def prompt_ids(self, tokenizer) -> list[int]:
        """The conversation rendered by the chat template (with the tools, documents, this request's template and
        chat_template_kwargs), as token ids."""
        messages = [m.as_template_dict() for m in self.messages]
        kwargs = {**({"tools": self.tools} if self.tools else {}), **({"documents": self.documents} if self.documents
                                                                       else {}),
                  **({"chat_template": self.chat_template} if self.chat_template else {}),
                  **(self.chat_template_kwargs or {})}
        if not self.continue_final_message:
            return tokenizer.apply_chat_template(messages, add_generation_prompt=self.add_generation_prompt,
                                                 tokenize=True, **kwargs)
        if self.add_generation_prompt:
            raise ServerError("continue_final_message=true continues the last message and add_generation_prompt=true "
                              "starts a new one: send add_generation_prompt=false", param="continue_final_message")
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=False, tokenize=False, **kwargs)
        return tokenizer.encode(continue_final(text, messages[-1]["content"]), add_special_tokens=False)

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def num_logprobs(self) -> int | None:
        if not self.logprobs:
            if self.top_logprobs:
                raise ServerError("top_logprobs needs logprobs=true", param="top_logprobs")
            return None
        return self.top_logprobs or 0


class TokenizeRequest(_Request):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    return_token_strs: bool = False


class DetokenizeRequest(_Request):
    model: str | None = None
    tokens: list[int]


class EmbeddingRequest(_Request):
    model: str | None = None
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None
    truncate_prompt_tokens: int | None = None  # keep each input's last k tokens (-1: max_model_len of them)
    add_special_tokens: bool = True

    def inputs(self) -> list[str | list[int]]:
        """The batch of inputs: one string or id list each. An empty input raises."""
        return batch_of(self.input, "input")

    def truncated(self, ids: list[int], max_model_len: int) -> list[int]:
        return truncate(ids, self.truncate_prompt_tokens, max_model_len)


# ---------------------------------------------------------------------------------------------------------------
# Responses. Plain dicts: they go straight to JSON, and streams build thousands of them a second.

def usage(num_prompt: int, num_completion: int, num_cached: int = 0) -> dict:
    return {"prompt_tokens": num_prompt, "completion_tokens": num_completion,
            "total_tokens": num_prompt + num_completion, "prompt_tokens_details": {"cached_tokens": num_cached}}


def completion_choice(index: int, text: str, logprobs: dict | None, finish_reason: str | None,
                      stop_reason: int | str | None) -> dict:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason,
            "stop_reason": stop_reason}


def chat_choice(index: int, text: str | None, logprobs: dict | None, finish_reason: str | None,
                stop_reason: int | str | None, tool_calls: list[dict] | None = None, role: str = "assistant",
                reasoning: str | None = None) -> dict:
    message = {"role": role, "content": text, "tool_calls": tool_calls or []}
    if reasoning is not None:  # --reasoning-parser: vLLM's name, and the older one clients still read
        message["reasoning"] = message["reasoning_content"] = reasoning
    return {"index": index, "message": message, "logprobs": logprobs, "finish_reason": finish_reason,
            "stop_reason": stop_reason}


def chat_delta_choice(index: int, delta: dict, logprobs: dict | None = None, finish_reason: str | None = None,
                      stop_reason: int | str | None = None) -> dict:
    return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason,
            "stop_reason": stop_reason}


class LogprobFormat:
    """The logprobs objects of the responses, with each token's text decoded once. With `as_ids` tokens are named
    "token_id:<id>" instead (vLLM's return_tokens_as_token_ids: a token that is not valid UTF-8 on its own, such
    as part of a multi-byte character, stays identifiable); text offsets still count the decoded text."""

    def __init__(self, tokenizer, as_ids: bool = False, strs: dict[int, str] | None = None):
        self.tokenizer, self.as_ids = tokenizer, as_ids
        self._strs: dict[int, str] = {} if strs is None else strs  # shared by the two forms of one server

    def by_id(self) -> "LogprobFormat":
        """The same format naming tokens by id, sharing this one's decoded strings."""
        return LogprobFormat(self.tokenizer, as_ids=True, strs=self._strs)

    def token_str(self, token_id: int) -> str:
        s = self._strs.get(token_id)
        if s is None:
            s = self._strs[token_id] = self.tokenizer.decode([token_id], skip_special_tokens=False)
        return s

    def label(self, token_id: int) -> str:
        return f"token_id:{token_id}" if self.as_ids else self.token_str(token_id)

    def completion(self, entries: list[tuple[int, dict[int, float] | None]], offset: int) -> dict:
        """The legacy completions `logprobs` object. An entry without logprobs (an echoed prompt's first token)
        gets null for its logprob and top logprobs, as OpenAI and vLLM return it."""
        tokens, token_logprobs, top, offsets = [], [], [], []
        for token_id, lps in entries:
            tokens.append(self.label(token_id))
            token_logprobs.append(None if lps is None else lps.get(token_id))
            ranked: dict[str, float] | None = None if lps is None else {}
            for t, lp in sorted((lps or {}).items(), key=lambda kv: -kv[1]):
                ranked.setdefault(self.label(t), lp)  # tokens that print alike keep the likeliest
            top.append(ranked)
            offsets.append(offset)
            offset += len(self.token_str(token_id))
        return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": offsets}

    def echoed(self, prompt_entries, entries, prefix: str) -> dict:
        """Logprobs of the echoed prompt (offsets from 0), then of `entries` (from the end of the prefix)."""
        head, tail = self.completion(prompt_entries, 0), self.completion(entries, len(prefix))
        return {key: head[key] + tail[key] for key in head}

    def chat(self, entries: list[tuple[int, dict[int, float]]], num_top: int) -> dict:
        def item(t: int, lp: float) -> dict:
            s = self.label(t)
            return {"token": s, "logprob": max(lp, -9999.0), "bytes": list(s.encode("utf-8"))}

        content = []
        for token_id, lps in entries:
            ranked = sorted(lps.items(), key=lambda kv: -kv[1])[:num_top]
            content.append({**item(token_id, lps.get(token_id, float("-inf"))),
                            "top_logprobs": [item(t, lp) for t, lp in ranked]})
        return {"content": content, "refusal": None}

    def prompt(self, entries: list[tuple[int, dict[int, float] | None]]) -> list[dict | None]:
        """vLLM's prompt_logprobs: per prompt token null (the first) or {token id: {logprob, rank, decoded_token}},
        the token itself first, then the top tokens (ranks 1, 2, ...). -inf becomes -9999.0, as vLLM sends it."""
        out: list[dict | None] = []
        for token_id, lps in entries:
            if lps is None:
                out.append(None)
                continue
            obj = {str(token_id): self._logprob(lps[token_id], getattr(lps, "rank", None), token_id)}
            for r, (t, lp) in enumerate(sorted(lps.items(), key=lambda kv: -kv[1]), 1):
                obj.setdefault(str(t), self._logprob(lp, r, t))
            out.append(obj)
        return out

    def _logprob(self, lp: float, rank: int | None, token_id: int) -> dict:
        return {"logprob": max(lp, -9999.0), "rank": rank, "decoded_token": self.label(token_id)}


def embedding_response(request_id: str, model: str, vectors, encoding_format: str, num_tokens: int) -> dict:
    """OpenAI's embeddings list; "base64" holds each vector's little-endian float32 bytes (what the openai client
    asks for by default, and decodes)."""
    def encode(v):
        v = np.asarray(v, dtype="<f4")
        return base64.b64encode(v.tobytes()).decode() if encoding_format == "base64" else v.tolist()
    data = [{"index": i, "object": "embedding", "embedding": encode(v)} for i, v in enumerate(vectors)]
    return {"id": request_id, "object": "list", "created": int(time.time()), "model": model, "data": data,
            "usage": {"prompt_tokens": num_tokens, "total_tokens": num_tokens}}


def envelope(kind: Literal["text_completion", "chat.completion", "chat.completion.chunk"], request_id: str,
             created: int, model: str, choices: list[dict], usage_: dict | None) -> dict:
    return {"id": request_id, "object": kind, "created": created, "model": model, "choices": choices,
            "usage": usage_}


def model_card(name: str, root: str, max_model_len: int, parent: str | None = None) -> dict:
    return {"id": name, "object": "model", "created": int(time.time()), "owned_by": "ie-jax", "root": root,
            "parent": parent, "max_model_len": max_model_len}


class LoadLoRAAdapterRequest(pydantic.BaseModel):
    lora_name: str = pydantic.Field(min_length=1)
    lora_path: str = pydantic.Field(min_length=1)


class UnloadLoRAAdapterRequest(pydantic.BaseModel):
    lora_name: str = pydantic.Field(min_length=1)
    lora_int_id: int | None = None


def validation_message(errors: list[dict]) -> str:
    """One line from pydantic's error list, e.g. "body.max_tokens: Input should be a valid integer (got 'x')"."""
    parts = []
    for e in errors:
        where = ".".join(str(x) for x in e.get("loc", ()))
        got = f" (got {e['input']!r})" if "input" in e and e.get("type") != "missing" else ""
        parts.append(f"{where}: {e.get('msg', 'invalid')}{got}")
    return "; ".join(parts)[:2000]
