"""Streamed tool calls (engine/tools.py, ToolMode.stream_delta): random call texts fed as growing prefixes, one
character at a time and in random chunks; the deltas must add up to what the non-streamed response (parse()) says,
send each call's arguments as they are written, and never send a character twice or drop one."""
from __future__ import annotations

import json
import random
import re

import pytest

from engine.tools import ToolMode, ToolStream, tool_finish

SCHEMAS = {"get_weather": {}, "get_time": {}, "f": {}}
HERMES = ToolMode("auto", SCHEMAS, parser="hermes")
LLAMA = ToolMode("auto", SCHEMAS, parser="llama3_json")
MISTRAL = ToolMode("auto", SCHEMAS, parser="mistral")
PYTHONIC = ToolMode("auto", SCHEMAS, parser="pythonic")
REQUIRED = ToolMode("required", SCHEMAS)
ID = re.compile(r"chatcmpl-tool-[0-9a-f]{32}")
MISTRAL_ID = re.compile(r"[0-9a-zA-Z]{9}")  # Mistral's chat templates take 9-character ids only
PIECES = ["a", "Z", "0", " ", "{", "}", "[", "]", '"', "\\", ";", ",", ":", "é", "\n", "\t", "<", "/", "≠"]


def rand_value(rng: random.Random, depth: int, tags: bool):
    kind = rng.choice(["str", "int", "float", "lit", "list", "dict"] if depth else ["str", "int", "lit"])
    if kind == "str":
        pieces = PIECES + (["<tool_call>", "</tool_call>", "<|python_tag|>"] if tags else [])
        return "".join(rng.choice(pieces) for _ in range(rng.randrange(8)))
    if kind == "int":
        return rng.randrange(-10**6, 10**6)
    if kind == "float":
        return rng.uniform(-1e3, 1e3)
    if kind == "lit":
        return rng.choice([True, False, None])
    if kind == "list":
        return [rand_value(rng, depth - 1, tags) for _ in range(rng.randrange(4))]
    return rand_args(rng, depth - 1, tags)


def rand_args(rng: random.Random, depth: int = 2, tags: bool = True) -> dict:
    return {rng.choice(["city", "days", "a", "k{", "x\"y", "z;"]) + str(i): rand_value(rng, depth, tags)
            for i in range(rng.randrange(4))}


def dumps(rng: random.Random, value) -> str:
    return json.dumps(value, ensure_ascii=rng.random() < 0.5, indent=rng.choice([None, None, 2]),
                      separators=rng.choice([(",", ":"), (", ", ": ")]))


def space(rng: random.Random) -> str:
    return rng.choice(["", "", " ", "\n", "  "])


class Text:
    """A text built piece by piece, with where each call's name ends and its arguments lie."""

    def __init__(self):
        self.text, self.calls = "", []  # calls: (name, name's end, arguments' start, arguments' end)

    def add(self, piece: str):
        self.text += piece

    def call(self, rng: random.Random, name: str, key: str, args: str):
        """A call object {"name": ..., key: {...}} (either member first)."""
        members = [("name", json.dumps(name)), (key, args)]
        if rng.random() < 0.3:
            members.reverse()
        self.add("{" + space(rng))
        where = {}
        for k, (member, value) in enumerate(members):
            self.add(("," + space(rng) if k else "") + json.dumps(member) + space(rng) + ":" + space(rng))
            where[member] = len(self.text)
            self.add(value)
        self.add(space(rng) + "}")
        self.calls.append((name, where["name"] + len(json.dumps(name)), where[key], where[key] + len(args)))


def run(mode: ToolMode, text: str, cuts: list[int], finish: str, check=None):
    """Feed text[:n] for each n in cuts, then the whole text with `finish`; the content and calls (name, id,
    arguments) that come out, and the finish reason. `check(n, calls)` looks at the calls after each step."""
    state, content, calls = ToolStream(), "", []
    for n in [*cuts, len(text)]:
        last = n == len(text)
        delta, reason = mode.stream_delta(text[:n], state, finish if last else None)
        assert (reason is None) != last
        assert delta is not None if last else delta != {}  # nothing to say is None, until the last chunk
        content += (delta or {}).get("content", "")
        for tc in (delta or {}).get("tool_calls", []):
            i = tc["index"]
            if i == len(calls):  # a call's first delta: id, type and name
                assert (MISTRAL_ID if mode is MISTRAL else ID).fullmatch(tc["id"])
                assert tc["type"] == "function" and set(tc["function"]) == {
                    "name", "arguments"}
                calls.append({"name": tc["function"]["name"], "id": tc["id"], "arguments": ""})
            else:  # then only arguments fragments, of a call that has begun
                assert i < len(calls) and set(tc) == {"index", "function"} and list(tc["function"]) == ["arguments"]
                assert tc["function"]["arguments"]
            calls[i]["arguments"] += tc["function"]["arguments"]
        assert [c["id"] for c in calls] == state.ids  # one id per call, for all of its deltas
        if check is not None and not last:
            check(n, calls)
    return content, calls, reason


def chunkings(rng: random.Random, text: str) -> list[list[int]]:
    """One character at a time, and random chunks."""
    cuts, n = [], 0
    while (n := n + rng.randint(1, 8)) < len(text):
        cuts.append(n)
    return [list(range(1, len(text))), cuts]


def incremental(t: Text, close: str = ""):
    """A check for run(): after each character, every call whose name is complete has begun (in order), and its
    arguments have gone out exactly as far as the text has written them (less an end that may be the start of the
    `close` tag)."""
    def check(n, calls):
        begun = 0
        while begun < len(t.calls) and t.calls[begun][1] <= n:
            begun += 1
        assert [c["name"] for c in calls] == [c[0] for c in t.calls[:begun]]
        written = n - max(k for k in range(len(close) or 1) if t.text[:n].endswith(close[:k]))
        for c, (_, _, start, end) in zip(calls, t.calls):
            assert c["arguments"] == t.text[start:min(max(written, start), end)]
    return check


def expect_parsed(mode: ToolMode, text: str, calls: list[dict]):
    """The streamed calls are the non-streamed response's, ids aside."""
    _, parsed = mode.parse(text)
    assert [(c["name"], c["arguments"]) for c in calls] == \
        [(p["function"]["name"], p["function"]["arguments"]) for p in parsed]


@pytest.mark.parametrize("seed", range(20))
def test_named_streams_the_text_as_arguments(seed):
    rng = random.Random(seed)
    mode = ToolMode("named", SCHEMAS, "get_weather")
    text = dumps(rng, rand_args(rng))

    def check(n, calls):  # the first delta with the first text, then every character as it comes
        assert [(c["name"], c["arguments"]) for c in calls] == [("get_weather", text[:n])]
    for cuts in chunkings(rng, text):
        content, calls, reason = run(mode, text, cuts, "stop", check)
        assert content == "" and reason == "stop" and len(calls) == 1 and calls[0]["arguments"] == text
        expect_parsed(mode, text, calls)


@pytest.mark.parametrize("seed", range(30))
def test_required_streams_each_element(seed):
    rng = random.Random(seed)
    t, params = Text(), []
    t.add("[" + space(rng))
    for k in range(rng.randint(1, 3)):
        params.append(rand_args(rng))
        t.add(("," + space(rng)) * bool(k))
        t.call(rng, rng.choice(["get_weather", "get_time"]), "parameters", dumps(rng, params[-1]))
    t.add(space(rng) + "]")
    for cuts in chunkings(rng, t.text):
        content, calls, reason = run(REQUIRED, t.text, cuts, "stop", incremental(t))
        assert content == "" and reason == "tool_calls" and [json.loads(c["arguments"]) for c in calls] == params
        expect_parsed(REQUIRED, t.text, calls)


def hermes_text(rng: random.Random, calls: int) -> tuple[Text, str]:
    """Words, <tool_call> blocks between words, and the content the stream must send (its trailing blank held)."""
    def words():
        return "".join(rng.choice(["Sure.", " ", "\n", "<", "<tool_", "a<b", "x", "_call>"])
                       for _ in range(rng.randrange(4)))
    t, content = Text(), ""
    for _ in range(calls):
        content += (w := words())
        t.add(w + "<tool_call>" + space(rng))
        t.call(rng, rng.choice(["get_weather", "f"]), "arguments", dumps(rng, rand_args(rng, tags=False)))
        t.add(space(rng) + "</tool_call>")
    content += (w := words())
    t.add(w)
    return t, content.rstrip()


@pytest.mark.parametrize("seed", range(40))
def test_hermes_streams_content_and_calls(seed):
    rng = random.Random(seed)
    t, want = hermes_text(rng, rng.randint(1, 3))
    for cuts in chunkings(rng, t.text):
        content, calls, reason = run(HERMES, t.text, cuts, "stop", incremental(t, "</tool_call>"))
        assert content == want and reason == "tool_calls" and len(calls) == len(t.calls)
        assert HERMES.parse(t.text)[0] == (want.strip() or None)
        expect_parsed(HERMES, t.text, calls)
    plain, want = hermes_text(rng, 0)  # no call: every character is content, sent as it comes
    content, calls, reason = run(HERMES, plain.text, list(range(1, len(plain.text))), "length")
    assert content == plain.text and calls == [] and reason == "length"


@pytest.mark.parametrize("seed", range(40))
def test_llama3_json_streams_calls(seed):
    rng = random.Random(seed)
    t = Text()
    t.add(space(rng) + rng.choice(["", "<|python_tag|>"]) + space(rng))
    for k in range(rng.randint(1, 3)):
        t.add((space(rng) + ";" + space(rng)) * bool(k))
        key = rng.choice(["parameters", "arguments"])
        t.call(rng, rng.choice(["get_weather", "f"]), key, dumps(rng, rand_args(rng)))
    t.add(space(rng))
    for cuts in chunkings(rng, t.text):
        content, calls, reason = run(LLAMA, t.text, cuts, "stop", incremental(t))
        assert content == "" and reason == "tool_calls" and len(calls) == len(t.calls)
        expect_parsed(LLAMA, t.text, calls)
    answer = "The answer is " + json.dumps(rand_args(rng))  # an answer, not a call: content as it comes
    content, calls, reason = run(LLAMA, answer, list(range(1, len(answer))), "stop")
    assert content == answer and calls == [] and reason == "stop"


def mistral_text(rng: random.Random, calls: int, v11: bool) -> tuple[Text, str]:
    """Content words, then [TOOL_CALLS] and the calls: a JSON array, or name[ARGS]{...} each (v11 tokenizers)."""
    words = "".join(rng.choice(["Sure.", " ", "\n", "[", "[TOOL", "x", "CALLS]"]) for _ in range(rng.randrange(4)))
    t = Text()
    t.add(words + "[TOOL_CALLS]" + space(rng) * (not v11))
    t.add("" if v11 else "[" + space(rng))
    for k in range(calls):
        name, args = rng.choice(["get_weather", "f"]), dumps(rng, rand_args(rng, tags=False))
        if v11:
            t.add("[TOOL_CALLS]" * (k > 0 and rng.random() < 0.5))
            t.add(name + "[ARGS]")
            t.calls.append((name, len(t.text), len(t.text), len(t.text) + len(args)))
            t.add(args)
        else:
            t.add(("," + space(rng)) * bool(k))
            t.call(rng, name, "arguments", args)
    t.add("" if v11 else space(rng) + "]")
    return t, words.rstrip()


@pytest.mark.parametrize("seed", range(40))
def test_mistral_streams_content_and_calls(seed):
    rng = random.Random(seed)
    for v11 in (False, True):
        t, want = mistral_text(rng, rng.randint(1, 3), v11)
        for cuts in chunkings(rng, t.text):
            content, calls, reason = run(MISTRAL, t.text, cuts, "stop", incremental(t))
            assert content == want and reason == "tool_calls" and len(calls) == len(t.calls)
            assert MISTRAL.parse(t.text)[0] == (want.strip() or None)
            expect_parsed(MISTRAL, t.text, calls)
            assert [json.loads(c["arguments"]) for c in calls] == [json.loads(t.text[a:b]) for *_, a, b in t.calls]
    plain = "An answer with [brackets] and [TOOL but no call"
    assert run(MISTRAL, plain, list(range(1, len(plain))), "length") == (plain, [], "length")


@pytest.mark.parametrize("seed", range(30))
def test_pythonic_streams_calls(seed):
    """[f(k=v, ...), ...]: each call's name goes out once its "(" is written, its arguments (the keyword arguments
    as a JSON object) once its ")" is; parse() says the same."""
    rng = random.Random(seed)
    calls = [(rng.choice(["get_weather", "f"]), {f"{rng.choice(['city', 'days', 'a'])}{i}": rand_value(rng, 2, False)
                                                 for i in range(rng.randrange(4))}) for _ in range(rng.randint(1, 3))]
    body = ("," + space(rng)).join(f"{name}({', '.join(f'{k}={v!r}' for k, v in kw.items())})" for name, kw in calls)
    tag = rng.random() < 0.3
    text = space(rng) + "<|python_start|>" * tag + "[" + body + "]" + "<|python_end|>" * tag
    for cuts in chunkings(rng, text):
        content, got, reason = run(PYTHONIC, text, cuts, "stop")
        assert content == "" and reason == "tool_calls"
        assert [(c["name"], json.loads(c["arguments"])) for c in got] == calls
        expect_parsed(PYTHONIC, text, got)
    for plain in ("The answer is [1, 2].", "[not a call]", "[1, 2] are the numbers"):  # never a call
        assert run(PYTHONIC, plain, list(range(1, len(plain))), "stop") == (plain, [], "stop")
    for broken in ("[f(1)]", "[f(a=x)]", "[f(a=1)] and more", "[f(a=1), g(b="):  # a call began, then was not one
        assert PYTHONIC.parse(broken) == (broken, [])
        content, got, reason = run(PYTHONIC, broken, list(range(1, len(broken))), "length")
        assert reason == "length" and got[0]["name"] == "f" and content == ""


@pytest.mark.parametrize("seed", range(60))
def test_a_text_cut_short_or_malformed(seed):
    """Whatever the text ends as: what went out is never taken back, and never contradicts parse(). A call's
    fragments are a prefix of its arguments; if parse() finds calls they are the streamed ones; if no call began
    and parse() finds none, the whole text was content."""
    rng = random.Random(seed)
    mode = [HERMES, LLAMA, REQUIRED, MISTRAL][seed % 4]
    if mode is HERMES:
        t, _ = hermes_text(rng, rng.randint(1, 2))
    elif mode is MISTRAL:
        t, _ = mistral_text(rng, rng.randint(1, 2), rng.random() < 0.5)
    else:
        t = Text()
        t.add("[" if mode is REQUIRED else "")
        t.call(rng, "f", "parameters", dumps(rng, rand_args(rng)))
        t.add("]" if mode is REQUIRED else "")
    text = t.text[:rng.randrange(len(t.text))]
    if rng.random() < 0.3:  # or a broken call: cut, then more text
        text += rng.choice(["}", "</tool_call>", " then", '"}}'])
    content, parsed = mode.parse(text)
    for cuts in chunkings(rng, text):
        streamed, calls, reason = run(mode, text, cuts, "length")
        assert reason == tool_finish(mode, parsed, "length")
        for c, (name, _, start, _) in zip(calls, t.calls):
            assert c["name"] == name and text[start:].startswith(c["arguments"])  # as written, from its start
        if parsed:
            expect_parsed(mode, text, calls[:len(parsed)])
            assert streamed.strip() == (content or "")
        elif not calls:
            assert streamed == text


def test_malformed_calls():
    """A block that is not JSON never begins: it is content. One that began stands, and the finish reason is
    parse()'s (no calls: the engine's own)."""
    for text in ['Hi <tool_call>{not json}</tool_call>', 'Hi <tool_call>{"arguments": {}}</tool_call> ok',
                 '<tool_call>{"name": 7, "arguments": {}}</tool_call>']:
        assert run(HERMES, text, list(range(1, len(text))), "stop") == (text, [], "stop")
    text = 'Hi <tool_call>{"name": "f", "arguments": {"s": "a</tool_call>b"}}</tool_call> ok'
    content, calls, reason = run(HERMES, text, list(range(1, len(text))), "stop")
    assert HERMES.parse(text) == (text, []) and reason == "stop" and content == "Hi"
    assert [c["name"] for c in calls] == ["f"] and calls[0]["arguments"] == '{"s": "a'
    text = '{"name": "f", "parameters": {"a": [1, "]"]}} and then words'
    content, calls, reason = run(LLAMA, text, list(range(1, len(text))), "stop")
    assert (content, reason, calls[0]["arguments"]) == ("", "stop", '{"a": [1, "]"]}')
