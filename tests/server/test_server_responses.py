"""POST /v1/responses through the openai client: the Responses API over the chat path (engine/responses.py), whole
and streamed, with instructions, input items, function tools, structured text and reasoning."""
from __future__ import annotations

import json
import re

import openai
import pytest
from harness import MODEL, LiveServer, greedy_reference, idle, tok

from engine.responses import ResponsesRequest

EOS = {"ignore_eos": True}
WEATHER = {"type": "function", "name": "get_weather", "description": "the weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}}, "required": ["city"]}}


@pytest.fixture(scope="module")
def thinking(live):
    server = LiveServer(live.engine, reasoning_parser="qwen3", grammar_in_reasoning=True)  # the same engine
    yield server
    server.stop()


def reference(live, messages: list[dict], max_tokens: int) -> tuple[list[int], str]:
    ids = tok(live).apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return ids, tok(live).decode(greedy_reference(live.engine, ids, max_tokens))


def test_text_input_matches_the_chat_reference(live, client):
    ids, want = reference(live, [{"role": "user", "content": "Hello there"}], 8)
    r = client.responses.create(model=MODEL, input="Hello there", max_output_tokens=8, temperature=0, extra_body=EOS)
    assert r.object == "response" and r.id.startswith("resp_") and r.model == MODEL
    assert r.output_text == want and [o.type for o in r.output] == ["message"]
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert (r.usage.input_tokens, r.usage.output_tokens, r.usage.total_tokens) == (len(ids), 8, len(ids) + 8)
    assert idle(live.engine)


def test_instructions_and_input_items(live, client):
    """instructions -> a system message; message items with text parts (developer -> system) -> the chat messages
    the template renders; function calls and their outputs -> an assistant turn with tool_calls and tool messages
    (checked as messages: the tiny model's template has no tool role)."""
    items = [{"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Weather "},
                                                             {"type": "input_text", "text": "in Paris?"}]},
             {"type": "message", "role": "developer", "content": "Answer briefly."}]
    chat = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Weather in Paris?"},
            {"role": "system", "content": "Answer briefly."}]
    ids, want = reference(live, chat, 6)
    r = client.responses.create(model=MODEL, instructions="Be kind.", input=items, max_output_tokens=6,
                                temperature=0, extra_body=EOS)
    assert r.usage.input_tokens == len(ids) and r.output_text == want
    calls = [{"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": '{"city": "Paris"}'},
             {"type": "function_call", "call_id": "c2", "name": "get_weather", "arguments": '{"city": "Rome"}'},
             {"type": "function_call_output", "call_id": "c1", "output": "sunny"},
             {"type": "function_call_output", "call_id": "c2", "output": [{"type": "input_text", "text": "rain"}]},
             {"type": "reasoning", "id": "rs_1", "summary": []}]
    assert ResponsesRequest(input=items[:1] + calls).messages() == [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": c, "type": "function", "function": {"name": "get_weather", "arguments": f'{{"city": "{city}"}}'}}
            for c, city in (("c1", "Paris"), ("c2", "Rome"))]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
        {"role": "tool", "tool_call_id": "c2", "content": "rain"}]


def test_streamed_events_add_up_to_the_response(live, client):
    kw = dict(model=MODEL, input="Tell me", max_output_tokens=10, temperature=0, top_logprobs=2, extra_body=EOS)
    whole = client.responses.create(**kw)
    events = list(client.responses.create(stream=True, **kw))
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.incomplete"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = [e for e in events if e.type == "response.output_text.delta"]
    assert len(deltas) > 1 and "".join(e.delta for e in deltas) == whole.output_text
    assert sum(len(e.logprobs) for e in deltas) == 10  # a logprob entry per token, top 2 each
    assert all(len(x.top_logprobs) == 2 for e in deltas for x in e.logprobs)
    final = events[-1].response
    assert final.output_text == whole.output_text and final.usage.output_tokens == 10
    assert [x.token for x in whole.output[0].content[0].logprobs] == [x.token for e in deltas for x in e.logprobs]


def test_function_tools_and_structured_text(live, client):
    forced = dict(model=MODEL, input="Weather in Paris?", tools=[WEATHER], max_output_tokens=60, temperature=0,
                  tool_choice={"type": "function", "name": "get_weather"})
    r = client.responses.create(**forced)
    call = r.output[-1]
    assert call.type == "function_call" and call.name == "get_weather" and call.call_id
    assert json.loads(call.arguments)["city"] in ("Paris", "Rome")
    events = list(client.responses.create(stream=True, **forced))
    args = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    done = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert args == done[0].arguments == call.arguments and events[-1].type == "response.completed"
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    text = client.responses.create(model=MODEL, input="A number?", max_output_tokens=40, temperature=0,
                                   text={"format": {"type": "json_schema", "name": "n", "schema": schema}})
    assert isinstance(json.loads(text.output_text)["n"], int) and text.status == "completed"


def test_reasoning_item(thinking):
    regex = r"<think>[a-z]{3,5}</think>\n\n[A-Z][a-z]{2,5}\."
    kw = dict(model=MODEL, input="Think first.", max_output_tokens=40, temperature=0,
              extra_body={"guided_regex": regex})
    r = thinking.client().responses.create(**kw)
    assert [o.type for o in r.output] == ["reasoning", "message"]
    thought = r.output[0].content[0].text
    assert re.fullmatch("[a-z]{3,5}", thought) and re.fullmatch(r"[A-Z][a-z]{2,5}\.", r.output_text)
    events = list(thinking.client().responses.create(stream=True, **kw))
    assert "".join(e.delta for e in events if e.type == "response.reasoning_text.delta") == thought
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == r.output_text
    assert [o.type for o in events[-1].response.output] == ["reasoning", "message"]


def test_unsupported_requests_are_clear_errors(live, client):
    for kw, word in ((dict(previous_response_id="resp_1"), "not stored"),
                     (dict(tools=[{"type": "web_search"}]), "only function tools"),
                     (dict(input=[{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]),
                      "'input_image'.* is not supported: only type 'input_text'"),
                     (dict(input=[{"type": "item_reference", "id": "x"}]), "item_reference"),
                     (dict(text={"format": {"type": "grammar"}}), "text.format")):
        with pytest.raises(openai.BadRequestError, match=word):
            client.responses.create(**{"model": MODEL, "input": "x", "max_output_tokens": 2, **kw})
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model="nope", input="x")
    assert idle(live.engine)
