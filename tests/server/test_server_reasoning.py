"""--reasoning-parser through the server: a thinking reply's <think> block goes to the message's `reasoning` (and
`reasoning_content`), the rest to content, streamed or not, beside tool calls. The tiny model's text is forced with
guided_regex on a server whose grammars hold the whole reply (enable_in_reasoning); by default a grammar holds only
what follows the thought."""
from __future__ import annotations

import json
import re

import pytest
from harness import MODEL, LiveServer, tok

from ie_jax.guided import GuidedDecodingParams
from ie_jax.sampling import SamplingParams

ASK = [{"role": "user", "content": "Weather?"}]
THINK = r"<think>[a-z]{3,5} [a-z]{3,5}</think>\n\n[A-Z][a-z]{3,6}\."
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}}, "required": ["city"]}}}
CALL = (r'<think>[a-z]{4}</think>\n<tool_call>\{"name": "get_weather", "arguments": \{"city": "(Paris|Rome)"\}\}'
        r'</tool_call>')


@pytest.fixture(scope="module")
def thinking(live):
    """The same engine behind `--reasoning-parser qwen3 --tool-call-parser hermes` with grammars in the thought."""
    server = LiveServer(live.engine, reasoning_parser="qwen3", tool_call_parser="hermes", grammar_in_reasoning=True)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def after(live):
    """The same, with vLLM's default: a grammar holds only the text after the thought."""
    server = LiveServer(live.engine, reasoning_parser="qwen3")
    yield server
    server.stop()


def chat(server, regex: str, **kw):
    return server.client().chat.completions.create(model=MODEL, messages=ASK, max_tokens=kw.pop("max_tokens", 80),
                                                   temperature=0,
                                                   extra_body={"guided_regex": regex, **kw.pop("extra", {})}, **kw)


def test_reasoning_split_whole_and_streamed(thinking, live):
    plain_choice = chat(live, THINK, logprobs=True).choices[0]  # no parser: the tags are content
    plain = plain_choice.message
    m = re.fullmatch(r"<think>(.*)</think>\n\n(.*)", plain.content, re.S)
    assert m and getattr(plain, "reasoning", None) is None
    whole = chat(thinking, THINK)
    message = whole.choices[0].message
    assert (message.reasoning, message.reasoning_content, message.content) == (m[1], m[1], m[2])
    assert whole.choices[0].finish_reason == "stop"
    # streamed one token (here one character) at a time: no tag leaks, nothing is lost, and logprobs of held-back
    # text come with the chunk that finally carries it
    chunks = list(chat(thinking, THINK, stream=True, logprobs=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    reasoning = "".join(getattr(d, "reasoning", None) or "" for d in deltas)
    assert reasoning == "".join(getattr(d, "reasoning_content", None) or "" for d in deltas) == m[1]
    assert "".join(d.content or "" for d in deltas) == m[2]
    assert sum(len(getattr(d, "reasoning", None) or "") > 0 for d in deltas) > 2  # it streamed, not at the end
    lps = [x.token for c in chunks if c.choices and c.choices[0].logprobs for x in c.choices[0].logprobs.content]
    assert lps == [x.token for x in plain_choice.logprobs.content]  # one entry per token (EOS too), in order
    hidden = chat(thinking, THINK, extra={"include_reasoning": False}).choices[0].message
    assert getattr(hidden, "reasoning", None) is None and hidden.content == m[2]


def test_reasoning_beside_a_tool_call(thinking):
    whole = chat(thinking, CALL, tools=[WEATHER], max_tokens=105)
    choice = whole.choices[0]
    assert choice.finish_reason == "tool_calls" and len(choice.message.reasoning) == 4
    assert not choice.message.content
    assert json.loads(choice.message.tool_calls[0].function.arguments)["city"] in ("Paris", "Rome")
    chunks = list(chat(thinking, CALL, tools=[WEATHER], max_tokens=105, stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert "".join(getattr(d, "reasoning", None) or "" for d in deltas) == choice.message.reasoning
    assert not "".join(d.content or "" for d in deltas)
    args = "".join(tc.function.arguments or "" for d in deltas for tc in d.tool_calls or [])
    assert args == choice.message.tool_calls[0].function.arguments
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"


def test_the_prompt_decides_where_the_reply_starts(thinking, after):
    """A template that opens <think> puts the reply in thought from its first token, one that closes a block puts
    it past the thought; a grammar moves behind the thought (open, or optional where the reply may open one)."""
    opened, closed, plain = (tok(after).encode(t) for t in ("<|im_start|>assistant\n<think>\n",
                                                             "<|im_start|>assistant\n<think>\n\n</think>\n\n",
                                                             "<|im_start|>assistant\n"))
    free, guided = SamplingParams(), SamplingParams(guided_decoding=GuidedDecodingParams(regex="[a-z]+"))
    server = after.app.state.server
    for ids, params, thought, thinks in ((opened, free, None, True), (opened, guided, "open", True),
                                         (plain, free, None, False), (plain, guided, "optional", False),
                                         (closed, free, None, False), (closed, guided, None, False)):
        got, mode = server.chat_mode(None, params, ids, True)
        assert mode.prompt_thinks == thinks
        assert (got.guided_decoding and got.guided_decoding.thought) == (thought if params is guided else None)
    got, mode = thinking.app.state.server.chat_mode(None, guided, opened, True)  # enable_in_reasoning
    assert got is guided and not mode.prompt_thinks
    assert server.chat_mode(None, free, opened, True)[1].message("a plan</think>An answer", "stop") == (
        "An answer", "a plan", None, "stop")


def test_a_grammar_holds_the_text_after_the_thought(after, live):
    """By default the grammar waits behind an optional thought: the tiny model does not open one, so its JSON is
    the content."""
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    out = after.client().chat.completions.create(
        model=MODEL, messages=ASK, max_tokens=40, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "n", "schema": schema}})
    message = out.choices[0].message
    assert getattr(message, "reasoning", None) is None and isinstance(json.loads(message.content)["n"], int)
