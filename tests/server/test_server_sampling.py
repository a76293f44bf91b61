"""Sampling controls and output shapes through the server: logit_bias, structured outputs (response_format,
guided_*), tool calling (named, required, and "auto" with a parser), on the real engine; and how a request's unset
fields take the checkpoint's generation_config defaults."""
from __future__ import annotations

import json
import random
import re
from types import SimpleNamespace

import openai
import pytest
from harness import MODEL, LiveServer, _tiny_model, greedy_reference, idle

import ie_jax
from engine.config import EngineConfig
from engine.protocol import API_DEFAULTS, ChatCompletionRequest, CompletionRequest, ServerError
from engine.server import OpenAIServer
from engine.tools import ToolMode, tool_mode
from ie_jax.sampling import SamplingParams


@pytest.fixture(scope="module")
def hermes(live):
    server = LiveServer(live.engine, tool_call_parser="hermes")  # the same engine, `--tool-call-parser hermes`
    yield server
    server.stop()


def test_logit_bias_forces_and_bans_tokens(live, client):
    """OpenAI's logit_bias (token ids as strings): +100 forces a token, -100 bans one; bad entries are a 400."""
    forced = client.completions.create(model=MODEL, prompt="The quick brown fox", max_tokens=6, temperature=0,
                                       logit_bias={str(ord("x")): 100})
    assert forced.choices[0].text == "x" * 6
    model, tokenizer = _tiny_model()
    ids = tokenizer.encode("The quick brown fox")
    first = greedy_reference(live.engine, ids, 6)
    params = SamplingParams(temperature=0.0, max_tokens=6, logit_bias={t: -100 for t in set(first)})
    want = ie_jax.generate(model, tokenizer, [ids], params)[0].token_ids
    assert not set(want) & set(first)
    r = client.completions.create(model=MODEL, prompt="The quick brown fox", max_tokens=6, temperature=0,
                                  logit_bias={str(t): -100 for t in set(first)})
    assert r.choices[0].text == tokenizer.decode(want)
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=3,
                                          temperature=0.7, seed=1, logit_bias={str(ord("z")): 100})
    assert chat.choices[0].message.content == "zzz"
    for bad, word in (({"abc": 1}, "token ids"), ({"65": 101}, "100"), ({"99999": 1}, "vocabulary")):
        with pytest.raises(openai.BadRequestError, match=word):
            client.completions.create(model=MODEL, prompt="x", max_tokens=2, logit_bias=bad)
    assert idle(live.engine)


def test_structured_outputs(live, client):
    """response_format json_schema / json_object, guided_choice and guided_regex hold the text to them."""
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 5},
                                               "n": {"type": "integer"}, "ok": {"type": "boolean"}},
              "required": ["city", "n", "ok"]}
    chat = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "a city?"}], max_tokens=80, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": schema}})
    obj = json.loads(chat.choices[0].message.content)
    assert list(obj) == ["city", "n", "ok"] and chat.choices[0].finish_reason == "stop"
    anything = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "json"}],
                                              max_tokens=100, temperature=0.8, seed=3,
                                              response_format={"type": "json_object"})
    if anything.choices[0].finish_reason == "stop":  # else max_tokens cut a long string short
        assert isinstance(json.loads(anything.choices[0].message.content), dict)
    else:
        assert anything.choices[0].message.content.startswith("{")
    picked = client.completions.create(model=MODEL, prompt="pick:", max_tokens=10, temperature=1.0, seed=1,
                                       extra_body={"guided_choice": ["red", "green", "blue"]})
    assert picked.choices[0].text in ("red", "green", "blue")
    streamed = client.completions.create(model=MODEL, prompt="code:", max_tokens=10, temperature=0, stream=True,
                                         extra_body={"guided_regex": r"[A-Z]{2}-[0-9]{3}"})
    assert re.fullmatch(r"[A-Z]{2}-[0-9]{3}", "".join(c.choices[0].text for c in streamed))
    assert idle(live.engine)



def test_allowed_token_ids(live, client):
    allowed = [ord(c) for c in "xyz"]
    out = client.completions.create(model=MODEL, prompt="letters:", max_tokens=8, temperature=0.9, seed=4,
                                    extra_body={"allowed_token_ids": allowed, "ignore_eos": True})
    assert len(out.choices[0].text) == 8 and set(out.choices[0].text) <= set("xyz")
    for bad in ([], [10**6]):
        with pytest.raises(openai.BadRequestError, match="allowed_token_ids"):
            client.completions.create(model=MODEL, prompt="x", max_tokens=2, extra_body={"allowed_token_ids": bad})
    assert idle(live.engine)

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "the weather in a city",
                                            "parameters": {"type": "object", "properties": {
                                                "city": {"enum": ["Paris", "Rome"]}, "days": {"type": "integer"}},
                                                "required": ["city", "days"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"type": "string", "maxLength": 6}}}}}
ASK = [{"role": "user", "content": "Weather in Paris?"}]


def test_named_and_required_tool_choice(live, client):
    """A forced call is decoded under the tools' schemas, so its arguments always parse."""
    named = client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER, TIME], max_tokens=60,
                                           temperature=0, tool_choice={"type": "function",
                                                                       "function": {"name": "get_weather"}})
    message = named.choices[0].message
    assert message.content is None and len(message.tool_calls) == 1 and named.choices[0].finish_reason == "stop"
    call = message.tool_calls[0]
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("chatcmpl-tool-")
    args = json.loads(call.function.arguments)
    assert args["city"] in ("Paris", "Rome") and isinstance(args["days"], int)
    required = client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER, TIME], max_tokens=100,
                                              temperature=0.7, seed=5, tool_choice="required")
    calls = required.choices[0].message.tool_calls
    if required.choices[0].finish_reason == "tool_calls":
        assert calls and all(c.function.name in ("get_weather", "get_time") for c in calls)
        assert all(isinstance(json.loads(c.function.arguments), dict) for c in calls)
    else:  # max_tokens cut the array short: the text comes back as it is
        assert required.choices[0].message.content.startswith("[")
    # streamed: each call's first delta (id, name), then its arguments in fragments, as they are generated
    named_choice = {"type": "function", "function": {"name": "get_weather"}}
    chunks = list(client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER, TIME], max_tokens=60,
                                                 temperature=0, stream=True, tool_choice=named_choice))
    streamed, fragments = reassemble(chunks)
    assert streamed == [("get_weather", call.function.arguments)] and fragments > 1  # greedy: the same call
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    with client.chat.completions.stream(model=MODEL, messages=ASK, tools=[WEATHER, TIME], max_tokens=60,
                                        temperature=0, tool_choice=named_choice) as stream:  # the client's helper
        final = stream.get_final_completion().choices[0].message.tool_calls
    assert [(c.function.name, c.function.arguments) for c in final] == streamed
    for seed in (5, 6):  # seed 5 is cut short by max_tokens, seed 6 completes its call
        kwargs = dict(model=MODEL, messages=ASK, tools=[WEATHER, TIME], max_tokens=100, temperature=0.7, seed=seed,
                      tool_choice="required")
        whole = client.chat.completions.create(**kwargs).choices[0]
        chunks = list(client.chat.completions.create(**kwargs, stream=True))
        streamed, fragments = reassemble(chunks)
        assert streamed and [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.finish_reason
        if whole.message.tool_calls:  # the same seed: the same calls, the arguments sent as they were generated
            assert streamed == [(c.function.name, c.function.arguments) for c in whole.message.tool_calls]
            assert fragments > len(streamed) and whole.finish_reason == "tool_calls"
        else:  # cut short: what went out stands, as the text wrote it
            text = whole.message.content
            assert [name for name, _ in streamed] == re.findall(r'"name" ?: ?"(\w+)"', text)
            assert all(re.search(r'"parameters" ?: ?' + re.escape(args), text) for _, args in streamed)
    assert idle(live.engine)


def reassemble(chunks, ids: str = r"chatcmpl-tool-[0-9a-f]{32}") -> tuple[list[tuple[str, str]], int]:
    """The (name, arguments) of the tool calls a stream sent, put together by index as clients do, and how many
    tool-call deltas it took. A call's id (matching `ids`) and name come once, in its first delta."""
    calls, count = {}, 0
    for delta in [c.choices[0].delta for c in chunks if c.choices]:
        for tc in delta.tool_calls or []:
            count += 1
            if tc.index not in calls:
                assert re.fullmatch(ids, tc.id) and tc.type == "function" and tc.index == len(calls)
                calls[tc.index] = [tc.function.name, ""]
            else:
                assert tc.id is None and tc.function.name is None
            calls[tc.index][1] += tc.function.arguments
    return [tuple(calls[i]) for i in sorted(calls)], count


def test_auto_tool_choice_with_the_hermes_parser(hermes, live):
    """The model's text is forced (guided_regex) into a hermes call, which the parser turns into tool_calls."""
    client = hermes.client()
    regex = r'Sure\. <tool_call>\{"name": "get_weather", "arguments": \{"city": "(Paris|Rome)"\}\}</tool_call>'
    out = client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER], max_tokens=100, temperature=0,
                                         extra_body={"guided_regex": regex})
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == "Sure."
    assert choice.message.tool_calls[0].function.name == "get_weather"
    assert json.loads(choice.message.tool_calls[0].function.arguments)["city"] in ("Paris", "Rome")
    plain = client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER], max_tokens=5, temperature=0,
                                           extra_body={"guided_regex": "[a-z]{5}"})
    assert plain.choices[0].message.tool_calls == [] and re.fullmatch("[a-z]{5}", plain.choices[0].message.content)
    # streamed: text that cannot be a call goes out as it comes, the call's arguments as they are generated
    chunks = list(client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER], max_tokens=100,
                                                 temperature=0, stream=True, extra_body={"guided_regex": regex}))
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    streamed, fragments = reassemble(chunks)
    assert content == "Sure." and fragments > 1
    assert streamed == [("get_weather", choice.message.tool_calls[0].function.arguments)]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"
    words = list(client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER], max_tokens=5,
                                                temperature=0, stream=True, extra_body={"guided_regex": "[a-z]{5}"}))
    pieces = [c.choices[0].delta.content for c in words if c.choices and c.choices[0].delta.content]
    assert len(pieces) > 1 and "".join(pieces) == plain.choices[0].message.content  # streamed as it came
    # without a parser, "auto" must be asked of a server started for it
    with pytest.raises(openai.BadRequestError, match="enable-auto-tool-choice"):
        live.client().chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER], tool_choice="auto")
    with pytest.raises(openai.BadRequestError, match="not among the tools"):
        client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER],
                                       tool_choice={"type": "function", "function": {"name": "nope"}})


def test_tool_call_parsers():
    schemas = {"f": {}, "g": {}}
    hermes = ToolMode("auto", schemas, parser="hermes")
    content, calls = hermes.parse('Let me check.\n<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call>'
                                  '<tool_call>{"name": "g", "arguments": {}}</tool_call>')
    assert content == "Let me check." and [c["function"]["name"] for c in calls] == ["f", "g"]
    assert json.loads(calls[0]["function"]["arguments"]) == {"a": 1}
    assert hermes.parse("<tool_call>{not json</tool_call>") == ("<tool_call>{not json</tool_call>", [])
    llama = ToolMode("auto", schemas, parser="llama3_json")
    content, calls = llama.parse('<|python_tag|>{"name": "f", "parameters": {"x": "y"}}; '
                                 '{"name": "g", "parameters": {}}')
    assert content is None and [json.loads(c["function"]["arguments"]) for c in calls] == [{"x": "y"}, {}]
    assert llama.parse("The answer is 4.") == ("The answer is 4.", [])
    # what may stream as content before a call is complete
    assert hermes.streamable("Let me <tool_") == len("Let me ") and hermes.streamable("abc <tool_call>{") == 4
    assert hermes.streamable("a < b") == len("a < b")
    assert llama.streamable("  {\"name\"") == 0 and llama.streamable("<|python") == 0
    assert llama.streamable("Hello") == 5 and ToolMode("named", schemas, "f").streamable("{") == 0
    assert tool_mode(None, None, None, False) is None and tool_mode([WEATHER], "none", None, False) is None
    assert tool_mode([WEATHER], None, None, False) is None  # tools shown to the template, text returned
    for tools, choice, word in (([{"type": "web"}], None, "each tool"), (None, "required", "needs tools"),
                                ([WEATHER], "sometimes", "must be")):
        with pytest.raises(ServerError, match=word):
            tool_mode(tools, choice, None, False)
    mistral = ToolMode("auto", schemas, parser="mistral")
    for text in ('Checking. [TOOL_CALLS] [{"name": "f", "arguments": {"a": 1}}, {"name": "g", "arguments": {}}]',
                 'Checking.[TOOL_CALLS]f[ARGS]{"a": 1}[TOOL_CALLS]g[ARGS]{}',
                 'Checking.[TOOL_CALLS]f[ARGS]{"a": 1}g[ARGS]{}'):
        content, calls = mistral.parse(text)
        assert content == "Checking." and [c["function"]["name"] for c in calls] == ["f", "g"], text
        assert [json.loads(c["function"]["arguments"]) for c in calls] == [{"a": 1}, {}]
        assert all(re.fullmatch("[0-9a-zA-Z]{9}", c["id"]) for c in calls)  # Mistral's templates check this
    for broken in ('[TOOL_CALLS] [{"name": "f", "arguments": {"a": 1}', '[TOOL_CALLS]f[ARGS]{"a"',
                   '[TOOL_CALLS] [{"arguments": {}}]', "no call [TOOL_CALL"):
        assert mistral.parse(broken) == (broken, []), broken
    assert mistral.streamable("Sure [TOOL_") == len("Sure ") and mistral.streamable("a [b]") == 5


@pytest.mark.parametrize("parser, regex, ids", [
    ("pythonic", r'\[get_weather\(city="(Paris|Rome)", days=[1-9]\)\]', r"chatcmpl-tool-[0-9a-f]{32}"),
    # mistral: the reply keeps its special tokens for the parser; call ids are 9 characters
    ("mistral", r'\[TOOL_CALLS\]\[\{"name": "get_weather", "arguments": \{"city": "(Paris|Rome)", "days": [1-9]\}\}\]',
     "[0-9a-zA-Z]{9}"),
])
def test_auto_tool_choice_with_other_parsers(live, parser, regex, ids):
    """The model's text is forced (guided_regex) into the parser's call format; whole and streamed, the call comes
    out the same."""
    server = LiveServer(live.engine, tool_call_parser=parser)
    try:
        client = server.client()
        out = client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER], max_tokens=100,
                                             temperature=0, extra_body={"guided_regex": regex})
        (call,) = out.choices[0].message.tool_calls
        assert out.choices[0].finish_reason == "tool_calls" and out.choices[0].message.content is None
        assert call.function.name == "get_weather" and re.fullmatch(ids, call.id)
        args = json.loads(call.function.arguments)
        assert args["city"] in ("Paris", "Rome") and 1 <= args["days"] <= 9
        chunks = list(client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER], max_tokens=100,
                                                     temperature=0, stream=True, extra_body={"guided_regex": regex}))
        assert reassemble(chunks, ids)[0] == [("get_weather", call.function.arguments)]
    finally:
        server.stop()


def test_several_served_model_names(live):
    """vLLM's --served-model-name a b: either name is accepted, the first names the responses."""
    server = LiveServer(live.engine, name=["alias-a", "alias-b"])
    try:
        client = server.client()
        assert [m.id for m in client.models.list().data] == ["alias-a", "alias-b"]
        out = client.completions.create(model="alias-b", prompt="hi", max_tokens=2)
        assert out.model == "alias-a" and out.usage.completion_tokens == 2
        with pytest.raises(openai.NotFoundError):
            client.completions.create(model=MODEL, prompt="hi", max_tokens=2)
    finally:
        server.stop()


def test_unset_request_fields_take_the_generation_config_defaults():
    """A field the request leaves out takes the generation_config default, else the API's; one it gives wins, even
    when it is 0 or equals the API default."""
    rng = random.Random(0)
    for _ in range(200):
        defaults = {k: v for k, v in dict(temperature=rng.choice([0.0, 0.6, 1.3]), top_p=rng.choice([0.8, 0.95]),
                                          top_k=rng.choice([1, 20, 50]), min_p=rng.choice([0.05, 0.2]),
                                          repetition_penalty=rng.choice([1.05, 1.3])).items() if rng.random() < 0.6}
        given = {k: v for k, v in dict(temperature=rng.choice([0.0, 1.0, 0.7]), top_p=rng.choice([1.0, 0.5]),
                                       top_k=rng.choice([0, -1, 5]), min_p=rng.choice([0.0, 0.1]),
                                       repetition_penalty=rng.choice([1.0, 1.2])).items() if rng.random() < 0.5}
        want = {**API_DEFAULTS, **defaults, **given}
        for body in (CompletionRequest(prompt="hi", **given), ChatCompletionRequest(messages=[], **given)):
            sp = body.sampling_params(9, None, {**defaults, "max_tokens": 3})
            assert {k: getattr(sp, k) for k in API_DEFAULTS} == want, (defaults, given)
            assert sp.max_tokens == 9  # the server's max_tokens, already capped by generation_config's
    assert CompletionRequest(prompt="hi").sampling_params(16, None) == SamplingParams(max_tokens=16)


def test_max_tokens_is_capped_by_max_new_tokens():
    """vLLM's rule: the least of what is left of max_model_len, the request's max_tokens and max_new_tokens."""
    def server(defaults):
        engine = SimpleNamespace(tokenizer=None, engine_config=EngineConfig(max_model_len=64), stats=dict,
                                 default_sampling=defaults)
        return OpenAIServer(engine, "m", None, None)

    capped, plain = server({"temperature": 0.0, "max_tokens": 5}), server(None)
    assert plain.default_sampling == {} and capped.default_sampling["max_tokens"] == 5
    for num_prompt, requested, want_capped, want_plain in ((10, None, 5, 54), (10, 3, 3, 3), (10, 20, 5, 20),
                                                           (61, None, 3, 3), (59, 5, 5, 5), (10, 0, 0, 0)):
        assert capped.max_tokens(num_prompt, requested, "prompt") == want_capped, (num_prompt, requested)
        assert plain.max_tokens(num_prompt, requested, "prompt") == want_plain, (num_prompt, requested)
    for s in (capped, plain):
        with pytest.raises(ServerError, match="you requested 70 tokens"):
            s.max_tokens(60, 10, "prompt")


def test_truncate_prompt_tokens(live, client):
    """vLLM's truncate_prompt_tokens keeps the prompt's last k tokens, in completions and chat."""
    prompt = "The quick brown fox jumps over the lazy dog"
    ids = _tiny_model()[1].encode(prompt)
    want = _tiny_model()[1].decode(greedy_reference(live.engine, ids[-6:], 5))
    out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=5, temperature=0, echo=True,
                                    extra_body={"truncate_prompt_tokens": 6, "ignore_eos": True})
    tail = _tiny_model()[1].decode(ids[-6:])
    assert out.usage.prompt_tokens == 6 and out.choices[0].text == tail + want
    whole = client.completions.create(model=MODEL, prompt=prompt, max_tokens=5, temperature=0, echo=True,
                                      extra_body={"truncate_prompt_tokens": 100, "ignore_eos": True})
    assert whole.usage.prompt_tokens == len(ids) and whole.choices[0].text.startswith(prompt)
    messages = [{"role": "user", "content": prompt}]
    chat = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4, temperature=0,
                                          extra_body={"truncate_prompt_tokens": 7, "ignore_eos": True})
    rendered = _tiny_model()[1].apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    assert chat.usage.prompt_tokens == 7
    assert chat.choices[0].message.content == _tiny_model()[1].decode(greedy_reference(live.engine, rendered[-7:], 4))
    for bad in (0, -2):
        with pytest.raises(openai.BadRequestError, match="truncate_prompt_tokens"):
            client.completions.create(model=MODEL, prompt=prompt, max_tokens=2,
                                      extra_body={"truncate_prompt_tokens": bad})
    assert idle(live.engine)


def test_continue_final_message(live, client):
    """vLLM's continue_final_message: the reply goes on with the last (assistant) message, not a new turn."""
    from ie_jax.chat_template import continue_final
    tok = _tiny_model()[1]
    messages = [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Sure, the colour"}]
    text = tok.apply_chat_template(messages, add_generation_prompt=False, tokenize=False)
    ids = tok.encode(continue_final(text, messages[-1]["content"]), add_special_tokens=False)
    assert tok.decode(ids).endswith("Sure, the colour")
    out = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=5, temperature=0,
                                         extra_body={"continue_final_message": True, "add_generation_prompt": False,
                                                     "ignore_eos": True})
    assert out.usage.prompt_tokens == len(ids)
    assert out.choices[0].message.content == tok.decode(greedy_reference(live.engine, ids, 5))
    with pytest.raises(openai.BadRequestError, match="add_generation_prompt=false"):
        client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2,
                                       extra_body={"continue_final_message": True})
    with pytest.raises(openai.BadRequestError, match="nothing to continue"):
        client.chat.completions.create(model=MODEL, messages=[*messages[:1], {"role": "assistant", "content": " "}],
                                       max_tokens=2, extra_body={"continue_final_message": True,
                                                                 "add_generation_prompt": False})


def test_use_beam_search_returns_the_best_beams(live, client):
    """vLLM's use_beam_search: n choices, the n best beams in order, the same search as offline over the dense
    forward; streamed, the same choices arrive whole. What beam search cannot combine is a 400."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from engine.beam_search import BeamSearch, BeamSearchParams

    model, tokenizer = _tiny_model()
    forward = jax.jit(lambda ids: jax.nn.log_softmax(model(ids)[0][0, -1]))

    def dense(tokens):  # the next token's top 6 (2n) logprobs
        lp = np.asarray(forward(jnp.asarray([tokens], jnp.int32)))
        return {int(t): float(lp[t]) for t in np.argsort(-lp)[:6]}

    prompt = "beams of"
    ids = tokenizer.encode(prompt)
    search = BeamSearch([ids], BeamSearchParams(beam_width=3, max_tokens=5), live.engine.engine.eos_token_ids)
    while not search.done:
        search.advance({key: dense(tokens) for key, tokens in search.pending()})
    want = search.outputs(lambda t: tokenizer.decode(t, skip_special_tokens=True))[0].sequences
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=5, n=3, logprobs=2,
                                  extra_body={"use_beam_search": True})
    assert [c.text for c in r.choices] == [s.text for s in want] and [c.index for c in r.choices] == [0, 1, 2]
    for c, s in zip(r.choices, want):
        n = len(s.tokens) - len(ids)
        assert len(c.logprobs.tokens) == n
        assert sum(c.logprobs.token_logprobs) == pytest.approx(s.cum_logprob, abs=1e-3)
    assert r.usage.completion_tokens == sum(len(s.tokens) - len(ids) for s in want)
    long = "a prompt long enough to fill a page or two of the cache"  # the second search finds its pages cached
    first, again = (client.completions.create(model=MODEL, prompt=long, max_tokens=3, n=2,
                                              extra_body={"use_beam_search": True}) for _ in range(2))
    assert [c.text for c in again.choices] == [c.text for c in first.choices]
    assert again.usage.prompt_tokens_details.cached_tokens >= 16 * (len(tokenizer.encode(long)) // 16) - 16 > 0
    chunks = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=5, n=3, stream=True,
                                            extra_body={"use_beam_search": True}))
    texts = {}
    for chunk in chunks:
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
    assert [texts[i] for i in range(3)] == [s.text for s in want]
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                          n=2, extra_body={"use_beam_search": True})
    assert len(chat.choices) == 2 and chat.choices[0].message.content != chat.choices[1].message.content
    for bad, param in (({"n": 11}, "n"), ({"n": 2, "guided_regex": "a+"}, "guided_regex"), ({"echo": True}, "echo")):
        with pytest.raises(openai.BadRequestError, match=param):
            client.completions.create(model=MODEL, prompt=prompt, max_tokens=3,
                                      extra_body={"use_beam_search": True, **bad})
    assert idle(live.engine)


def test_bad_words(live, client):
    """vLLM's bad_words through the server: the tiny model answers "dog 1" with "1"s, and "11" can never appear;
    an empty word is a 400."""
    plain = client.completions.create(model=MODEL, prompt="dog 1", max_tokens=8, temperature=0)
    assert plain.choices[0].text == "1" * 8
    r = client.completions.create(model=MODEL, prompt="dog 1", max_tokens=8, temperature=0,
                                  extra_body={"bad_words": ["11"]})
    assert "11" not in r.choices[0].text and r.usage.completion_tokens == 8
    with pytest.raises(openai.BadRequestError, match="bad_words"):
        client.completions.create(model=MODEL, prompt="dog 1", max_tokens=2, extra_body={"bad_words": [""]})
