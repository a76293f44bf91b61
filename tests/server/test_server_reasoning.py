"""--reasoning-parser through the server: a thinking reply's <think> block goes to the message's `reasoning` (and
`reasoning_content`), the rest to content, streamed or not, beside tool calls. The tiny model's text is forced with
guided_regex (a guided reply thinks only where it writes <think> itself)."""
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
    server = LiveServer(live.engine, reasoning_parser="qwen3", tool_call_parser="hermes")  # the same engine
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


def test_the_prompt_decides_where_the_reply_starts(thinking):
    """A template that opens <think> puts the reply in thought from its first token; a guided request never."""
    server, ids = thinking.app.state.server, tok(thinking).encode("<|im_start|>assistant\n<think>\n")
    free, guided = SamplingParams(), SamplingParams(guided_decoding=GuidedDecodingParams(regex="[a-z]+"))
    assert server.chat_mode(None, free, ids, True).prompt_thinks
    assert not server.chat_mode(None, guided, ids, True).prompt_thinks
    closed = tok(thinking).encode("<|im_start|>assistant\n<think>\n\n</think>\n\n")  # enable_thinking=False
    assert not server.chat_mode(None, free, closed, True).prompt_thinks
    assert server.chat_mode(None, free, ids, True).message("a plan</think>An answer", "stop") == (
        "An answer", "a plan", None, "stop")
