"""OpenAI's Responses API (`POST /v1/responses`, `client.responses.create`) over the chat path.

A request becomes a chat completion request (`ResponsesRequest.as_chat`): `instructions` a system message, `input`
(text, or items: messages, function calls and their outputs) the conversation, `text.format` the response format,
`max_output_tokens` max_tokens, function tools the chat tools. The server runs it as a chat completion (templates,
tools, reasoning, structured outputs and all), and `ResponseShape` turns the result into a Response: a reasoning
item (with --reasoning-parser), a message with its output_text, and a function_call item per tool call. Streamed,
the chat chunks become the Responses events (response.created ... response.output_text.delta ... response.completed).

Responses are not stored: `previous_response_id` (and `conversation`, `background`) are refused, so a multi-turn
client sends the conversation as input items, as it does with store=false.
"""
from __future__ import annotations

import contextlib
import itertools
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pydantic

from engine.protocol import ChatCompletionRequest, ServerError
from ie_jax.chat_template import content_text

CHAT_EXTRAS = ("top_k", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty", "seed", "stop",
               "stop_token_ids", "min_tokens", "ignore_eos", "priority", "chat_template_kwargs", "include_reasoning",
               "logit_bias", "truncate_prompt_tokens", "skip_special_tokens", "guided_json", "guided_regex",
               "guided_choice", "allowed_token_ids", "bad_words")  # vLLM's extras, passed through


class ResponsesRequest(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="allow")  # vLLM's sampling extras (CHAT_EXTRAS) ride along
    model: str | None = None
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    text: dict[str, Any] | None = None
    reasoning: dict[str, Any] | None = None
    stream: bool = False
    store: bool | None = None
    previous_response_id: str | None = None
    conversation: Any = None
    background: bool | None = None
    metadata: dict[str, Any] | None = None
    truncation: str | None = None
    user: str | None = None

    def as_chat(self) -> ChatCompletionRequest:
        for name in ("previous_response_id", "conversation"):
            if getattr(self, name) is not None:
                raise ServerError(f"{name} is not supported: responses are not stored here; send the conversation "
                                  f"as input items", param=name)
        if self.background:
            raise ServerError("background responses are not supported", param="background")
        fields = dict(messages=self.messages(), max_tokens=self.max_output_tokens, temperature=self.temperature,
                      top_p=self.top_p, stream=self.stream, stream_options={"include_usage": True},
                      tools=self.chat_tools(), tool_choice=self.chat_tool_choice(),
                      response_format=self.response_format(), model=self.model,
                      logprobs=self.top_logprobs is not None, top_logprobs=self.top_logprobs or None)
        fields.update({k: v for k, v in (self.model_extra or {}).items() if k in CHAT_EXTRAS})
        try:
            return ChatCompletionRequest(**fields)
        except pydantic.ValidationError as e:
            raise ServerError(f"invalid request: {e.errors()[0]['msg']} ({e.errors()[0]['loc']})") from e

    def messages(self) -> list[dict]:
        """The conversation as chat messages: instructions first, then each input item."""
        out = [{"role": "system", "content": self.instructions}] if self.instructions else []
        if isinstance(self.input, str):
            return out + [{"role": "user", "content": self.input}]
        for item in self.input:
            kind = item.get("type", "message")
            if kind == "message":
                role = {"developer": "system"}.get(item.get("role"), item.get("role"))
                out.append({"role": role, "content": _text(item.get("content"))})
            elif kind == "function_call":  # consecutive calls are one assistant turn
                call = {"id": item.get("call_id"), "type": "function",
                        "function": {"name": item.get("name"), "arguments": item.get("arguments", "{}")}}
                if out and out[-1]["role"] == "assistant" and out[-1].get("tool_calls") and not out[-1]["content"]:
                    out[-1]["tool_calls"].append(call)
                else:
                    out.append({"role": "assistant", "content": "", "tool_calls": [call]})
            elif kind == "function_call_output":
                output = item.get("output")
                out.append({"role": "tool", "tool_call_id": item.get("call_id"),
                            "content": output if isinstance(output, str) else _text(output)})
            elif kind != "reasoning":  # an earlier turn's reasoning is not shown to the model again
                raise ServerError(f"input item type {kind!r} is not supported: use message, function_call or "
                                  f"function_call_output", param="input")
        return out

    def chat_tools(self) -> list[dict] | None:
        if not self.tools:
            return None
        out = []
        for tool in self.tools:
            if tool.get("type") != "function":
                raise ServerError(f"tool type {tool.get('type')!r} is not supported: only function tools",
                                  param="tools")
            out.append({"type": "function", "function": {k: tool[k] for k in ("name", "description", "parameters")
                                                         if k in tool}})
        return out

    def chat_tool_choice(self):
        choice = self.tool_choice
        if isinstance(choice, dict):
            if choice.get("type") != "function":
                raise ServerError(f"tool_choice {choice!r} is not supported: auto, none, required or a function",
                                  param="tool_choice")
            return {"type": "function", "function": {"name": choice.get("name")}}
        return choice

    def response_format(self) -> dict | None:
        fmt = (self.text or {}).get("format") or {"type": "text"}
        if fmt.get("type") == "json_schema":
            return {"type": "json_schema", "json_schema": {k: fmt[k] for k in ("name", "schema", "strict") if k in fmt}}
        if fmt.get("type") == "json_object":
            return {"type": "json_object"}
        if fmt.get("type") != "text":
            raise ServerError(f"text.format type {fmt.get('type')!r} is not supported", param="text")
        return None


def _text(content) -> str:
    """A Responses message's text: a string, or its text parts (input_text, output_text) joined."""
    try:
        return content_text(content, ("input_text", "output_text", "text"))
    except ValueError as e:
        raise ServerError(str(e), param="input") from e


def _id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


class ResponseShape:
    """A chat completion (whole, or as SSE chunks) reshaped into a Response (or its events)."""

    def __init__(self, body: ResponsesRequest, response_id: str, model: str):
        self.body, self.id, self.model, self.created = body, response_id, model, int(time.time())

    def response(self, status: str, output: list[dict], usage: dict | None = None, finish: str | None = None,
                 error: dict | None = None) -> dict:
        b = self.body
        incomplete = {"reason": "max_output_tokens"} if status == "incomplete" else None
        return {"id": self.id, "object": "response", "created_at": self.created, "status": status,
                "model": self.model, "output": output, "error": error, "incomplete_details": incomplete,
                "instructions": b.instructions, "max_output_tokens": b.max_output_tokens, "metadata": b.metadata or {},
                "parallel_tool_calls": True if b.parallel_tool_calls is None else b.parallel_tool_calls,
                "temperature": b.temperature, "top_p": b.top_p, "top_logprobs": b.top_logprobs,
                "tool_choice": b.tool_choice or "auto", "tools": b.tools or [], "reasoning": b.reasoning,
                "text": b.text or {"format": {"type": "text"}}, "previous_response_id": None, "store": False,
                "truncation": b.truncation or "disabled", "user": b.user, "usage": _usage(usage)}

    @staticmethod
    def status(finish: str | None) -> str:
        return "incomplete" if finish == "length" else "completed"

    def whole(self, completion: dict) -> dict:
        choice = completion["choices"][0]
        message, finish = choice["message"], choice["finish_reason"]
        output = []
        if message.get("reasoning") is not None:
            output.append(_reasoning_item(_id("rs"), message["reasoning"]))
        if message.get("content") or not message.get("tool_calls"):
            logprobs = (choice.get("logprobs") or {}).get("content") or []
            output.append(_message_item(_id("msg"), message.get("content") or "", logprobs))
        for call in message.get("tool_calls") or []:
            output.append(_call_item(_id("fc"), call["id"], call["function"]["name"], call["function"]["arguments"]))
        return self.response(self.status(finish), output, completion.get("usage"))

    async def stream(self, chunks: AsyncIterator[str]) -> AsyncIterator[str]:
        seq = itertools.count()
        output, item, finish, usage, error = [], None, None, None, None
        held = []  # logprobs of tokens whose text has not come yet (a character split over tokens)

        def event(kind: str, **fields) -> str:
            data = json.dumps({"type": kind, "sequence_number": next(seq), **fields}, ensure_ascii=False)
            return f"event: {kind}\ndata: {data}\n\n"

        def close() -> list[str]:  # the open item's done events
            nonlocal item
            if item is None:
                return []
            done, index, where = item, len(output), dict(item_id=item["id"], output_index=len(output))
            item = None
            output.append(done)
            if done["type"] == "message":
                part = done["content"][0]
                part["logprobs"] += held
                held.clear()
                return [event("response.output_text.done", **where, content_index=0, text=part["text"],
                              logprobs=part["logprobs"]),
                        event("response.content_part.done", **where, content_index=0, part=part),
                        event("response.output_item.done", output_index=index, item=done)]
            if done["type"] == "reasoning":
                text = done["content"][0]["text"]
                return [event("response.reasoning_text.done", **where, content_index=0, text=text),
                        event("response.output_item.done", output_index=index, item=done)]
            return [event("response.function_call_arguments.done", **where, arguments=done["arguments"]),
                    event("response.output_item.done", output_index=index, item=done)]

        def open_(new: dict) -> list[str]:
            nonlocal item
            out = close()
            item = new
            shown = {**new, "status": "in_progress"}
            out.append(event("response.output_item.added", output_index=len(output), item=shown))
            if new["type"] == "message":
                out.append(event("response.content_part.added", item_id=new["id"], output_index=len(output),
                                 content_index=0, part={"type": "output_text", "text": "", "annotations": [],
                                                        "logprobs": []}))
            return out

        created = self.response("in_progress", [])
        yield event("response.created", response=created)
        yield event("response.in_progress", response=created)
        async with contextlib.aclosing(chunks):  # a client that leaves closes this, and so the chat stream
            async for sse in chunks:
                data = sse.removeprefix("data: ").strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    error = chunk["error"]
                    continue
                usage = chunk.get("usage") or usage
                for choice in chunk["choices"]:
                    delta, finish = choice["delta"], choice.get("finish_reason") or finish
                    held += (choice.get("logprobs") or {}).get("content") or []
                    if delta.get("reasoning"):
                        if item is None or item["type"] != "reasoning":
                            for e in open_(_reasoning_item(_id("rs"), "")):
                                yield e
                        item["content"][0]["text"] += delta["reasoning"]
                        yield event("response.reasoning_text.delta", item_id=item["id"], output_index=len(output),
                                    content_index=0, delta=delta["reasoning"])
                    if delta.get("content"):
                        if item is None or item["type"] != "message":
                            for e in open_(_message_item(_id("msg"), "", [])):
                                yield e
                        lps, part = held[:], item["content"][0]
                        held.clear()
                        part["text"] += delta["content"]
                        part["logprobs"] += lps
                        yield event("response.output_text.delta", item_id=item["id"], output_index=len(output),
                                    content_index=0, delta=delta["content"], logprobs=lps)
                    for call in delta.get("tool_calls") or []:
                        if call.get("id"):  # a call's first delta: its id and name
                            for e in open_(_call_item(_id("fc"), call["id"], call["function"]["name"], "")):
                                yield e
                        args = (call.get("function") or {}).get("arguments") or ""
                        if args and item is not None and item["type"] == "function_call":
                            item["arguments"] += args
                            yield event("response.function_call_arguments.delta", item_id=item["id"],
                                        output_index=len(output), delta=args)
        if item is None and not output and error is None:  # nothing was said: an empty message, as whole() gives
            for e in open_(_message_item(_id("msg"), "", [])):
                yield e
        for e in close():
            yield e
        if error is not None:
            yield event("response.failed", response=self.response("failed", output, usage, finish, error))
            return
        status = self.status(finish)
        yield event(f"response.{status}", response=self.response(status, output, usage, finish))


def _message_item(item_id: str, text: str, logprobs: list) -> dict:
    return {"id": item_id, "type": "message", "role": "assistant", "status": "completed",
            "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": logprobs}]}


def _reasoning_item(item_id: str, text: str) -> dict:
    return {"id": item_id, "type": "reasoning", "summary": [], "status": "completed",
            "content": [{"type": "reasoning_text", "text": text}]}


def _call_item(item_id: str, call_id: str, name: str, arguments: str) -> dict:
    return {"id": item_id, "type": "function_call", "call_id": call_id, "name": name, "arguments": arguments,
            "status": "completed"}


def _usage(chat_usage: dict | None) -> dict | None:
    if chat_usage is None:
        return None
    cached = (chat_usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
    return {"input_tokens": chat_usage["prompt_tokens"], "input_tokens_details": {"cached_tokens": cached},
            "output_tokens": chat_usage["completion_tokens"], "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": chat_usage["total_tokens"]}
