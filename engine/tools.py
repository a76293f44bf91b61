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
                                                     pythonic     [f(a=1, b="x"), g()] (Llama 3.2 / 4's
                                                                  pythonic templates), each call's keyword
                                                                  arguments as a JSON object
                                                     mistral      [TOOL_CALLS][{"name": ..., "arguments": {...}},
                                                                  ...], or [TOOL_CALLS]name[ARGS]{...} (newer
                                                                  tokenizers), after any content; call ids are 9
                                                                  characters, as Mistral's templates require
  "none"                                           the tools are shown to the template, the text is the answer

A call's arguments are the text of its arguments object as the model wrote it (not re-serialized), so that a
stream can send them as they are generated and still add up to what the whole response says.
"""
from __future__ import annotations

import ast
import dataclasses
import json
import re
import uuid

from engine.protocol import ServerError
from ie_jax.guided import GuidedDecodingParams

PARSERS = ("hermes", "llama3_json", "mistral", "pythonic")
_HERMES, _PYTHON_TAG, _MISTRAL, _ARGS = "<tool_call>", "<|python_tag|>", "[TOOL_CALLS]", "[ARGS]"
MARKERS = {"hermes": _HERMES, "mistral": _MISTRAL}  # parsers whose calls follow content, from this tag on
_NAME = re.compile(r"[A-Za-z0-9_.:-]+")
_PY_CALL = re.compile(r"([A-Za-z_][A-Za-z0-9_.]*)\s*\(")  # a pythonic call's name, once its "(" is written
_PY_TOKEN = re.compile(r"""'(?:[^'\\\n]|\\.)*'|"(?:[^"\\\n]|\\.)*"|['"]|[()\[\]{}]""")
_PYTHON_START, _PYTHON_END = "<|python_start|>", "<|python_end|>"
_BLOCK = re.compile(r"<tool_call>(.*?)(</tool_call>|\Z)", re.S)  # a hermes call, closed or still being written
_CLOSED = re.compile(r"<tool_call>(.*?)</tool_call>", re.S)
_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"|"|[{}\[\]]', re.S)  # a whole string, one still open, or a bracket
_ATOM = re.compile(r"[^\s,:\]}]*")  # a number, true, false or null
_SPACE = re.compile(r"\s*")


def _new_id(parser: str | None = None) -> str:
    return uuid.uuid4().hex[:9] if parser == "mistral" else f"chatcmpl-tool-{uuid.uuid4().hex}"


def _call(name: str, arguments, parser: str | None = None) -> dict:
    if arguments is None:  # a call without arguments
        arguments = "{}"
    elif not isinstance(arguments, str):
        arguments = json.dumps(arguments, ensure_ascii=False)
    return {"id": _new_id(parser), "type": "function", "function": {"name": name, "arguments": arguments}}


def _json(text: str):
    """The value of a JSON text; None when it is not JSON."""
    try:
        return json.loads(text)
    except ValueError:
        return None


def tag_start(text: str, tag: str) -> int:
    """How many characters at the end of `text` may be the start of `tag`."""
    tail = text[-(len(tag) - 1):]
    i = tail.find(tag[0])  # (most texts: no candidate at all)
    while i >= 0 and not tag.startswith(tail[i:]):
        i = tail.find(tag[0], i + 1)
    return 0 if i < 0 else len(tail) - i


def _ws(src: str, i: int) -> int:
    return _SPACE.match(src, i).end()


def _value_end(src: str, i: int) -> int | None:
    """Where the JSON value at src[i] ends; None while the text stops inside it. Strings are skipped whole, so the
    brackets and quotes inside them do not count."""
    if i >= len(src):
        return None
    if src[i] not in '"{[':
        end = _ATOM.match(src, i).end()
        return end if end < len(src) else None  # a number at the end may still grow
    depth = 0
    for m in _TOKEN.finditer(src, i):
        tok = m.group()
        if tok == '"':  # a string the text has not closed yet
            return None
        depth += 0 if tok[0] == '"' else 1 if tok in "{[" else -1
        if depth == 0:
            return m.end()
    return None


def _members(src: str, i: int) -> tuple[dict[str, tuple[int, int | None]], int | None]:
    """The members of the JSON object at src[i] ("{") as far as the text goes, key -> (where its value starts, where
    it ends or None while open), and where the object ends (None: not yet, or the text is not JSON)."""
    members, i = {}, _ws(src, i + 1)
    while i < len(src):
        if src[i] == "}":
            return members, i + 1
        if members:
            if src[i] != ",":
                break
            i = _ws(src, i + 1)
        key_end = _value_end(src, i) if src.startswith('"', i) else None
        key = _json(src[i:key_end]) if key_end is not None else None
        colon = _ws(src, key_end or i)
        if not isinstance(key, str) or not src.startswith(":", colon):
            break
        start = _ws(src, colon + 1)
        members[key] = start, _value_end(src, start)
        if members[key][1] is None:
            break
        i = _ws(src, members[key][1])
    return members, None


def _read_call(src: str, i: int, keys: tuple[str, ...]) -> tuple[str | None, str | None, str | None, int | None]:
    """The call object at src[i] as far as the text goes: its name (once the string is closed), its arguments
    object's text so far (under the first of `keys` it has), the object's whole text and its end (once closed)."""
    members, end = _members(src, i)
    start, stop = members.get("name", (0, None))
    name = _json(src[start:stop]) if stop is not None else None
    key = next((k for k in keys if k in members), None)
    args = None
    if key is not None and src.startswith("{", members[key][0]):
        start, stop = members[key]
        args = src[start:stop]  # stop None: the object is still open, all of the text so far is in it
    return (name if isinstance(name, str) else None), args, (src[i:end] if end is not None else None), end


@dataclasses.dataclass
class ToolStream:
    """What of one streaming choice has gone out: `content` characters of content, and for each call begun its id
    and the arguments text sent."""
    content: int = 0
    ids: list[str] = dataclasses.field(default_factory=list)
    args: list[str] = dataclasses.field(default_factory=list)
    searched: int = 0  # "auto" before any call: how much of the text is known to hold no call's start


@dataclasses.dataclass(frozen=True)
class ToolMode:
    choice: str  # "named", "required" or "auto"
    schemas: dict  # tool name -> its parameters' JSON Schema
    name: str | None = None  # the named tool
    parser: str | None = None  # "auto": how calls are read out of the text

    @property
    def hermes(self) -> bool:
        return self.choice == "auto" and self.parser == "hermes"

    @property
    def marker(self) -> str | None:
        """The tag the calls begin at, for parsers whose calls may follow content ("auto" only)."""
        return MARKERS.get(self.parser) if self.choice == "auto" else None

    @property
    def keys(self) -> tuple[str, ...]:  # the member that holds a call's arguments, the first there is
        return ("arguments",) if self.marker else ("parameters",) if self.choice == "required" else \
            ("parameters", "arguments")

    @property
    def needs_special_tokens(self) -> bool:
        """The reply's text must keep special tokens: mistral's [TOOL_CALLS] is a control token."""
        return self.marker == _MISTRAL

    def new_id(self) -> str:
        return _new_id(self.parser if self.choice == "auto" else None)

    def guided(self) -> GuidedDecodingParams | None:
        if self.choice == "named":
            return GuidedDecodingParams(json=self.schemas[self.name])
        if self.choice == "required":
            calls = [{"type": "object", "properties": {"name": {"enum": [n]}, "parameters": s},
                      "required": ["name", "parameters"]}
                     for n, s in self.schemas.items()]
            return GuidedDecodingParams(json={"type": "array", "minItems": 1, "items": {"anyOf": calls}})
        return None

    def streamable(self, text: str) -> int:
        """How much of a streaming choice's text may go out as content now: with "auto", what cannot be (the start
        of) a call; a forced call's text is never content."""
        if self.choice != "auto":
            return 0
        if self.marker:
            start = text.find(self.marker)
            return start if start >= 0 else len(text) - tag_start(text, self.marker)
        head = text.lstrip()
        opener, tag = ("[", _PYTHON_START) if self.parser == "pythonic" else ("{", _PYTHON_TAG)
        if not head or head.startswith(opener) or tag.startswith(head[:len(tag)]) or head.startswith(tag):
            return 0
        return len(text)

    def scan(self, text: str) -> tuple[list[tuple[str | None, str | None, str | None]], int | None]:
        """The calls in a (growing) text as far as it goes, each (name, arguments text so far, the call object's
        text once closed), and where the last one read ends (hermes: None, its calls are read block by block)."""
        if self.choice == "named":
            return ([(self.name, text, text)] if text else []), len(text)
        if self.hermes:
            calls = []
            for m in _BLOCK.finditer(text):
                body = m.group(1)
                if not m.group(2):  # still open: what may be the start of </tool_call> is not the call's yet
                    body = body[:len(body) - tag_start(body, "</tool_call>")]
                i = _ws(body, 0)
                calls.append(_read_call(body, i, self.keys)[:3] if body.startswith("{", i) else (None,) * 3)
            return calls, None
        if self.marker:  # mistral
            return self._scan_mistral(text)
        if self.parser == "pythonic" and self.choice == "auto":
            return self._scan_pythonic(text)
        opener, sep = ("[", ",") if self.choice == "required" else (_PYTHON_TAG, ";")
        i, end, calls = _ws(text, 0), None, []
        if text.startswith(opener, i):
            i += len(opener)
        elif opener == "[":
            return [], None
        while text.startswith("{", i := _ws(text, i)):
            *call, end = _read_call(text, i, self.keys)
            calls.append(tuple(call))
            if end is None:
                break
            i = _ws(text, end)
            if not text.startswith(sep, i):
                break
            i += 1
        return calls, end

    def _scan_mistral(self, text: str):
        """scan() for mistral: the JSON array after [TOOL_CALLS], or name[ARGS]{...} calls, each after its own
        [TOOL_CALLS] or one after another."""
        start = text.find(_MISTRAL)
        if start < 0:
            return [], None
        i, calls, end = _ws(text, start + len(_MISTRAL)), [], None
        if text.startswith("[", i):
            i += 1
            while text.startswith("{", i := _ws(text, i)):
                *call, end = _read_call(text, i, self.keys)
                calls.append(tuple(call))
                if end is None or not text.startswith(",", i := _ws(text, end)):
                    break
                i += 1
            close = _ws(text, end) if end is not None else None
            return calls, (close + 1 if close is not None and text.startswith("]", close) else None)
        while (m := _NAME.match(text, i)) and text.startswith(_ARGS, m.end()):
            args_start = _ws(text, m.end() + len(_ARGS))
            stop = _value_end(text, args_start) if text.startswith("{", args_start) else None
            args = text[args_start:stop] if text.startswith("{", args_start) else None
            calls.append((m.group(), args, None if stop is None else text[m.start():stop]))
            end = stop
            if stop is None:
                break
            i = _ws(text, stop)
            i = _ws(text, i + len(_MISTRAL)) if text.startswith(_MISTRAL, i) else i
        return calls, end

    def _scan_pythonic(self, text: str):
        """scan() for pythonic: [name(k=v, ...), ...], maybe inside <|python_start|> ... <|python_end|>. A call's
        arguments (a JSON object) are known once its ")" is written; `end` is past the list's "]"."""
        i = _ws(text, 0)
        if text.startswith(_PYTHON_START, i):
            i = _ws(text, i + len(_PYTHON_START))
        if not text.startswith("[", i):
            return [], None
        calls, i = [], _ws(text, i + 1)
        while m := _PY_CALL.match(text, i):
            close = _py_call_end(text, m.end() - 1)
            if close is None:
                calls.append((m.group(1), None, None))
                return calls, None
            calls.append((m.group(1), _py_arguments(text[m.start():close]), text[m.start():close]))
            i = _ws(text, close)
            if not text.startswith(",", i):
                break
            i = _ws(text, i + 1)
        return calls, (i + 1 if calls and text.startswith("]", i) else None)

    def content(self, text: str, begun: int) -> str:
        """What of a growing text may go out as content now, with `begun` calls sent: a prefix of what the finished
        text says as content. hermes: the text outside the calls, up to the first block that is still open, has
        not begun or is not JSON; whitespace waits for what follows it (parse() strips the content's ends)."""
        if self.choice != "auto":
            return ""
        if self.parser == "mistral":
            return text[:self.streamable(text)].rstrip()
        if not self.hermes:
            return text[:self.streamable(text)]
        out, pos = [], 0
        for k, m in enumerate(_BLOCK.finditer(text)):
            if not m.group(2) or k >= begun or not isinstance(_json(m.group(1)), dict):  # not (yet) a call
                break
            out.append(text[pos:m.start()])
            pos = m.end()
        out.append(text[pos:pos + self.streamable(text[pos:])])
        return "".join(out).rstrip()

    def stream_delta(self, text: str, state: ToolStream, finish_reason: str | None) -> tuple[dict | None, str | None]:
        """A streaming choice's next chat delta (None: nothing to send yet) and the finish reason to send, given its
        text so far and `state`, what of it went out (updated here); finish_reason is set once the text is complete.
        Content goes out as content() allows. A call's first delta (index, id, type, name, "") goes out once its
        name is complete, then its arguments as they are written: fragments of its arguments object's text, never a
        character past that object (not the call's closing brace, nor the array's bracket), adding up to what
        parse() returns for it:
          named        the whole text is the arguments, from its first character
          required     each element of the array once its "name" is closed; then its "parameters" object
          hermes       each <tool_call> block once its "name" is closed; then its "arguments" object
          llama3_json  each object once its "name" is closed; then its "parameters" (or "arguments") object
        At the end parse() has the last word: calls it finds that have not begun go out whole, the finish reason is
        tool_finish()'s, and if no call began, a text it finds no calls in goes out as content. A call found
        malformed (or cut short) only then cannot be taken back: what went out stands, and no more is sent."""
        done = finish_reason is not None
        if not done and self.choice == "auto" and not state.ids:
            end = self._plain_end(text, state)
            if end is not None:  # no call has started: the new text is content, read in time linear in it
                delta = {"content": text[state.content:end]} if end > state.content else None
                state.content = max(state.content, end)
                return delta, None
        if done:
            say, calls = self.parse(text)
            found = [(c["function"]["name"], c["function"]["arguments"], c["id"]) for c in calls]
            if calls:
                say = _CLOSED.sub("", text).rstrip() if self.hermes else \
                    text[:text.find(_MISTRAL)].rstrip() if self.marker else ""
            elif state.ids:
                say = ""
        else:
            found = [(name, args, None) for name, args, _ in self.scan(text)[0]]
        sent = []
        for i, (name, args, call_id) in enumerate(found):
            if name is None:  # calls go out in order
                break
            args = args or ""
            if i == len(state.ids):
                state.ids.append(call_id or self.new_id())
                state.args.append(args)
                sent.append({"index": i, "id": state.ids[i], "type": "function",
                             "function": {"name": name, "arguments": args}})
            elif len(args) > len(state.args[i]) and args.startswith(state.args[i]):
                sent.append({"index": i, "function": {"arguments": args[len(state.args[i]):]}})
                state.args[i] = args
        if not done:
            say = self.content(text, len(state.ids))
        delta = {}
        if len(say) > state.content:
            delta["content"] = say[state.content:]
            state.content = len(say)
        if sent:
            delta["tool_calls"] = sent
        if done:
            return delta, tool_finish(self, calls, finish_reason)
        return delta or None, None

    def _plain_end(self, text: str, state: ToolStream) -> int | None:
        """Where the content that may go out ends, for a text in which no call has started (None where one may
        have): what content() says, found without re-reading the text already searched."""
        if self.marker:
            tag = self.marker
            if text.find(tag, max(0, state.searched - len(tag) + 1)) >= 0:
                return None
            state.searched = len(text)
            end = len(text) - tag_start(text, tag)
            while end > state.content and text[end - 1].isspace():  # whitespace waits for what follows it
                end -= 1
            return end
        return len(text) if state.content else None  # llama3_json: content went out, so the text is no call

    def parse(self, text: str) -> tuple[str | None, list[dict]]:
        """(content, tool calls) of a finished choice's text. A call's arguments are its arguments object's text
        (a value that is not an object is serialized with json.dumps, no arguments are "{}")."""
        if self.choice == "named":
            return None, [_call(self.name, text)]
        seen, end = self.scan(text)
        if self.parser == "mistral" and self.choice == "auto":
            return self._parse_mistral(text, seen, end)
        if self.parser == "pythonic" and self.choice == "auto":
            rest = text[end:].strip() if end is not None else None
            if not seen or rest not in ("", _PYTHON_END) or any(a is None for _, a, _ in seen):
                return text, []
            return None, [_call(name, args) for name, args, _ in seen]
        if self.hermes:
            objs = [_json(block) for block in _CLOSED.findall(text)]
        elif self.choice == "required":
            objs = _json(text)
        else:  # llama3_json: nothing but calls, joined by ';'
            objs = [_json(obj or "") for _, _, obj in seen] if end is not None and not text[end:].strip() else None
        if not isinstance(objs, list) or not objs or len(objs) > len(seen):
            return text, []
        calls = []
        for o, (_, args, _) in zip(objs, seen):
            if not isinstance(o, dict) or not isinstance(o.get("name"), str):
                return text, []  # malformed, or cut short by max_tokens: the text is the answer
            value = next((o[k] for k in self.keys if k in o), {})
            calls.append(_call(o["name"], args if isinstance(value, dict) else value))
        return (_CLOSED.sub("", text).strip() or None) if self.hermes else None, calls

    def _parse_mistral(self, text: str, seen, end) -> tuple[str | None, list[dict]]:
        calls = _mistral_calls(text, seen, end)
        if calls is None:
            return text, []
        return text[:text.find(_MISTRAL)].strip() or None, calls


def _py_call_end(src: str, i: int) -> int | None:
    """Where the Python call whose "(" is at src[i] ends (after its ")"); None while the text stops inside it.
    Strings are skipped whole, so the brackets inside them do not count."""
    depth = 0
    for m in _PY_TOKEN.finditer(src, i):
        tok = m.group()
        if tok in ("'", '"'):  # a string the text has not closed yet
            return None
        depth += 0 if tok[0] in "'\"" else 1 if tok in "([{" else -1
        if depth == 0:
            return m.end()
    return None


def _py_arguments(call: str) -> str | None:
    """A pythonic call's keyword arguments as a JSON object's text; None when it is not a call of literals by
    keyword."""
    try:
        node = ast.parse(call, mode="eval").body
        if not isinstance(node, ast.Call) or node.args or any(k.arg is None for k in node.keywords):
            return None
        return json.dumps({k.arg: ast.literal_eval(k.value) for k in node.keywords}, ensure_ascii=False)
    except (SyntaxError, ValueError, TypeError, RecursionError, MemoryError):
        return None


def _mistral_calls(text: str, seen, end) -> list[dict] | None:
    """The calls of a finished mistral text (None: it has none, or they are malformed or cut short)."""
    if not seen or end is None or text[end:].strip():
        return None
    after = text[text.find(_MISTRAL) + len(_MISTRAL):].strip()
    if after.startswith("["):
        objs = _json(after)
        if not isinstance(objs, list) or len(objs) != len(seen):
            return None
        named = [(o.get("name"), o.get("arguments", {})) if isinstance(o, dict) else (None, None) for o in objs]
    else:
        named = [(name, _json(args or "")) for name, args, _ in seen]
    if any(not isinstance(n, str) or a is None for n, a in named):
        return None
    return [_call(n, args if isinstance(a, dict) else a, "mistral") for (n, a), (_, args, _) in zip(named, seen)]


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
