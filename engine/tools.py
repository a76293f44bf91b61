"""Tool calling on /v1/chat/completions, as vLLM's server does it.

The tools reach the chat template (its `tools` variable); what the model then writes is read in one of three ways,
by `tool_choice`:
  {"type": "function", "function": {"name": f}}   the text is f's arguments: decoding is held to its parameters'
                                                   JSON Schema (ie_jax/guided.py), so they always parse
  "required"                                       the text is a JSON array of {"name", "parameters"} calls, held
                                                   to the tools' schemas the same way
  "auto" (the default when tools are given)        the model may call tools or answer; with --enable-auto-tool-choice
                                                   and a --tool-call-parser its calls are parsed out of the text:
                                                     hermes       <tool_call>{"name": ..., "arguments": {...}}
                                                                  </tool_call>
                                                     llama3_json  {"name": ..., "parameters": {...}} (after an
                                                                  optional <|python_tag|>, several joined by ';')
  "none"                                           the tools are shown to the template, the text is the answer
"""
from __future__ import annotations

import dataclasses
import json
import re
import uuid

from engine.protocol import ServerError
from ie_jax.guided import GuidedDecodingParams

PARSERS = ("hermes", "llama3_json")
_HERMES, _PYTHON_TAG = "<tool_call>", "<|python_tag|>"


def _call(name: str, arguments) -> dict:
    if not isinstance(arguments, str):
        arguments = json.dumps(arguments, ensure_ascii=False)
    return {"id": f"chatcmpl-tool-{uuid.uuid4().hex}", "type": "function",
            "function": {"name": name, "arguments": arguments}}


@dataclasses.dataclass(frozen=True)
class ToolMode:
    choice: str  # "named", "required" or "auto"
    schemas: dict  # tool name -> its parameters' JSON Schema
    name: str | None = None  # the named tool
    parser: str | None = None  # "auto": how calls are read out of the text

    def guided(self) -> GuidedDecodingParams | None:
        if self.choice == "named":
            return GuidedDecodingParams(json=self.schemas[self.name])
        if self.choice == "required":
            calls = [{"type": "object", "properties": {"name": {"enum": [n]}, "parameters": s}}
                     for n, s in self.schemas.items()]
            return GuidedDecodingParams(json={"type": "array", "minItems": 1, "items": {"anyOf": calls}})
        return None

    def streamable(self, text: str) -> int:
        """How much of a streaming choice's text may go out as content now: with "auto", what cannot be (the start
        of) a call; a forced call's text is never content."""
        if self.choice != "auto":
            return 0
        if self.parser == "hermes":
            start = text.find(_HERMES)
            if start >= 0:
                return start
            held = next((k for k in range(min(len(_HERMES) - 1, len(text)), 0, -1) if _HERMES.startswith(text[-k:])),
                        0)
            return len(text) - held
        head = text.lstrip()
        if not head or head.startswith("{") or _PYTHON_TAG.startswith(head[:len(_PYTHON_TAG)]) or \
                head.startswith(_PYTHON_TAG):
            return 0
        return len(text)

    def stream_delta(self, text: str, streamed: int, finish_reason: str | None) -> tuple[dict | None, int, str | None]:
        """A streaming choice's next chat delta (None: nothing to send yet), the characters of `text` sent as
        content after it, and the finish reason to send (finish_reason is set once the text is complete)."""
        if finish_reason is None:
            limit = self.streamable(text)
            return ({"content": text[streamed:limit]}, limit, None) if limit > streamed else (None, streamed, None)
        _, calls = self.parse(text)
        before = text[:text.find(_HERMES)] if self.parser == "hermes" else ""  # content ahead of the first call
        rest = (before if calls else text)[streamed:]
        delta = {"content": rest} if rest else {}
        if calls:
            delta["tool_calls"] = [{"index": i, **call} for i, call in enumerate(calls)]
        return delta, len(text), tool_finish(self, calls, finish_reason)

    def parse(self, text: str) -> tuple[str | None, list[dict]]:
        """(content, tool calls) of a finished choice's text."""
        if self.choice == "named":
            return None, [_call(self.name, text)]
        if self.choice == "required":
            try:
                return None, [_call(c["name"], c["parameters"]) for c in json.loads(text)]
            except (ValueError, KeyError, TypeError):  # cut short by max_tokens: hand back the text
                return text, []
        if self.parser == "hermes":
            calls, content = [], text
            for block in re.findall(r"<tool_call>(.*?)</tool_call>", text, re.S):
                try:
                    obj = json.loads(block)
                    calls.append(_call(obj["name"], obj.get("arguments", {})))
                except (ValueError, KeyError, TypeError):
                    return text, []  # a malformed call: the text stays the answer
            if calls:
                content = re.sub(r"<tool_call>.*?</tool_call>", "", text, flags=re.S).strip() or None
            return content, calls
        stripped = text.strip().removeprefix("<|python_tag|>").strip()
        if stripped.startswith("{"):
            try:
                objs = [json.loads(part) for part in re.split(r"\s*;\s*(?=\{)", stripped)]
                return None, [_call(o["name"], o.get("parameters", o.get("arguments", {}))) for o in objs]
            except (ValueError, KeyError, TypeError):
                pass
        return text, []


def tool_mode(tools: list[dict] | None, tool_choice, parser: str | None, auto_enabled: bool) -> ToolMode | None:
    """How a chat request's tools shape its output (None: the text is the answer). Bad input raises ServerError."""
    if tool_choice is not None and not tools and tool_choice != "none":
        raise ServerError("tool_choice needs tools", param="tool_choice")
    if not tools:
        return None
    schemas = {}
    for tool in tools:
        fn = tool.get("function") if isinstance(tool, dict) else None
        if tool.get("type", "function") != "function" or not isinstance(fn, dict) or not fn.get("name"):
            raise ServerError(f"each tool must be {{\"type\": \"function\", \"function\": {{\"name\": ...}}}}, got "
                              f"{tool!r}", param="tools")
        schemas[fn["name"]] = fn.get("parameters") or {"type": "object", "properties": {}}
    choice = "auto" if tool_choice is None else tool_choice
    if isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name")
        if name not in schemas:
            raise ServerError(f"tool_choice names the function {name!r}, which is not among the tools "
                              f"{sorted(schemas)}", param="tool_choice")
        return ToolMode("named", schemas, name)
    if choice == "none":
        return None
    if choice == "required":
        return ToolMode("required", schemas)
    if choice != "auto":
        raise ServerError(f"tool_choice {choice!r} must be 'none', 'auto', 'required' or a named function",
                          param="tool_choice")
    if not auto_enabled:
        if tool_choice is None:  # tools shown to the model, its text returned as it is
            return None
        raise ServerError('"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser to be set',
                          param="tool_choice")
    return ToolMode("auto", schemas, parser=parser)


def tool_finish(tools: ToolMode | None, calls: list[dict] | None, finish_reason: str | None) -> str | None:
    """OpenAI's finish reason: "tool_calls" when the model chose to call tools ("stop" for a forced one)."""
    if tools is None or not calls or finish_reason is None or tools.choice == "named":
        return finish_reason
    return "tool_calls"
