"""The OpenAI server over real HTTP on localhost, driven by the official `openai` client (and raw httpx where the
wire format itself is the point).

The engine behind it comes from `make_engine()`, and the token ids a greedy request must produce come from
`greedy_reference()`, both in harness.py with the uvicorn harness (shared with the other server test files).
The overload and disconnect tests keep `FakeAsyncLLM`, which they can hold back (`gate`) or slow down, and which
records its aborts.
"""
from __future__ import annotations

import asyncio
import json
import math
import random
import threading

import httpx
import openai
import pytest

import ie_jax
from engine.config import EngineConfig
from engine.outputs import RequestOutput
from ie_jax.detokenizer import IncrementalDetokenizer
from ie_jax.generate import prompt_logprobs
from ie_jax.presets import PRESETS
from ie_jax.sampling import SamplingParams
from ie_jax.tokenizer import ByteTokenizer

from harness import (MAX_MODEL_LEN, MODEL, LiveServer, _tiny_model, assert_error, greedy_reference, idle,  # noqa: F401
                     make_engine, reference_text, sse_events, tok, wait_for)

# ---------------------------------------------------------------------------------------------------------------
# A stand-in engine with AsyncLLM's interface. Its "model": logits are a parabola around a target letter chosen
# from the last tokens, so greedy decoding is a fixed rule, sampling is seeded, and logprobs are real log-softmaxes.

def _fake_target(ids: list[int]) -> int:
    return 97 + (ids[-1] * 7 + (ids[-2] if len(ids) > 1 else 0) * 3 + len(ids)) % 26


def _fake_logprobs(target: int, vocab: int) -> list[float]:
    scores = [-((j - target) ** 2) / 8 for j in range(vocab)]
    top = max(scores)
    log_z = top + math.log(sum(math.exp(s - top) for s in scores))
    return [s - log_z for s in scores]


class FakeAsyncLLM:
    def __init__(self, max_model_len: int, step_delay: float):
        self.tokenizer = ByteTokenizer()
        self.model_config = PRESETS["default"]
        self.engine_config = EngineConfig(max_model_len=max_model_len, max_num_seqs=64, max_num_batched_tokens=256)
        self.step_delay = step_delay
        self.gate = threading.Event()  # cleared: requests wait before their first token
        self.gate.set()
        self.running: dict[str, bool] = {}  # request id -> past the gate
        self.aborted: list[str] = []
        self.finished: list[str] = []
        self.num_prompt_tokens = self.num_generated = 0

    async def generate(self, prompt_token_ids, sampling_params: SamplingParams, request_id: str, priority: int = 0):
        sp, prompt = sampling_params, list(prompt_token_ids)
        if len(prompt) + sp.max_tokens > self.engine_config.max_model_len:
            raise ValueError(f"{len(prompt)=} + max_tokens={sp.max_tokens} exceeds max_model_len")
        if request_id in self.running:
            raise ValueError(f"{request_id=} is already running")
        assert sp.n == 1, "the server fans out n"
        self.running[request_id] = False
        done = False
        try:
            while not self.gate.is_set():
                await asyncio.sleep(0.002)
            self.running[request_id] = True
            self.num_prompt_tokens += len(prompt)
            ids, out_ids, text, emitted = list(prompt), [], "", 0
            detok = IncrementalDetokenizer(self.tokenizer, prompt, sp.skip_special_tokens)
            hold = max((len(s) for s in sp.stop), default=1) - 1
            rng = random.Random(f"{sp.seed}") if sp.seed is not None else random.Random()
            for step in range(sp.max_tokens):
                logprobs = _fake_logprobs(_fake_target(ids), self.tokenizer.vocab_size)
                if sp.greedy:
                    token = max(range(len(logprobs)), key=logprobs.__getitem__)
                else:
                    token = rng.choices(range(len(logprobs)), weights=[math.exp(lp) for lp in logprobs])[0]
                ids.append(token)
                out_ids.append(token)
                self.num_generated += 1
                text += detok.add(token)
                finish, stop_reason = ("length", None) if step == sp.max_tokens - 1 else (None, None)
                for s in sp.stop:
                    if s in text:
                        text, finish, stop_reason = text[:text.index(s)], "stop", s
                end = len(text) if finish else max(emitted, len(text) - hold)
                new_text, emitted = text[emitted:end], end
                top = None
                if sp.logprobs is not None:
                    ranked = sorted(range(len(logprobs)), key=lambda j: -logprobs[j])[:sp.logprobs]
                    top = [{j: logprobs[j] for j in ranked + [token]}]
                done = finish is not None
                yield RequestOutput(request_id, [token], new_text, top, done, finish, stop_reason,
                                    num_prompt_tokens=len(prompt), num_output_tokens=len(out_ids))
                if done:
                    self.finished.append(request_id)
                    return
                await asyncio.sleep(self.step_delay)
        finally:
            if not done:
                self.aborted.append(request_id)
            self.running.pop(request_id, None)

    async def abort(self, request_id: str) -> None:
        if request_id in self.running and request_id not in self.aborted:
            self.aborted.append(request_id)

    def stats(self) -> dict:
        waiting = sum(not past for past in self.running.values())
        return {"num_running": len(self.running) - waiting, "num_waiting": waiting,
                "kv_usage": len(self.running) / 64, "prefix_cache_queries": 0, "prefix_cache_hits": 0,
                "prompt_tokens_total": self.num_prompt_tokens, "generation_tokens_total": self.num_generated}

    def shutdown(self) -> None:
        pass


# ---------------------------------------------------------------------------------------------------------------
# Endpoints

def test_models_health_version(live, client):
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL]
    assert models[0].max_model_len == MAX_MODEL_LEN
    assert httpx.get(f"{live.url}/health").status_code == 200
    assert httpx.get(f"{live.url}/ping").status_code == httpx.post(f"{live.url}/ping").status_code == 200
    assert httpx.get(f"{live.url}/version").json()["version"]
    one = client.models.retrieve(MODEL)
    assert (one.id, one.max_model_len) == (MODEL, MAX_MODEL_LEN)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.models.retrieve("nope")


def test_completion_matches_reference(live, client):
    prompt = "The quick brown fox"
    ids = tok(live).encode(prompt)
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0)
    assert r.object == "text_completion" and r.id.startswith("cmpl-")
    assert r.choices[0].text == reference_text(live, ids, 12)
    assert r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (len(ids), 12, len(ids) + 12)
    echoed = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0, echo=True)
    assert echoed.choices[0].text == prompt + r.choices[0].text


def test_completion_stream_equals_non_stream(live, client):
    prompt = "streaming: " + "".join(random.choices("abcdefgh ", k=20))
    full = client.completions.create(model=MODEL, prompt=prompt, max_tokens=20, temperature=0)
    chunks = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=20, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == full.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks][-1] == "length"
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])


def test_stream_wire_format_done_and_usage(live):
    body = {"model": MODEL, "prompt": "hello", "max_tokens": 7, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    with httpx.stream("POST", f"{live.url}/v1/completions", json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    last = chunks[-1]
    assert last["choices"] == [] and last["usage"]["completion_tokens"] == 7
    assert last["usage"]["prompt_tokens"] == len(tok(live).encode("hello"))
    assert all(c["usage"] is None for c in chunks[:-1])
    assert "".join(c["choices"][0]["text"] for c in chunks[:-1]) == reference_text(live, tok(live).encode("hello"), 7)


def test_token_id_prompts_and_batches(live, client):
    rng = random.Random(0)
    prompts = [[rng.randrange(256) for _ in range(rng.randint(1, 30))] for _ in range(3)]
    r = client.completions.create(model=MODEL, prompt=prompts, max_tokens=9, temperature=0)
    assert [c.index for c in r.choices] == [0, 1, 2]
    for p, choice in zip(prompts, r.choices):
        assert choice.text == reference_text(live, p, 9)
    assert r.usage.prompt_tokens == sum(map(len, prompts))
    single = client.completions.create(model=MODEL, prompt=prompts[1], max_tokens=9, temperature=0)
    assert single.choices[0].text == r.choices[1].text


def test_n_choices_stream_and_not(live, client):
    ids = tok(live).encode("n choices")
    expected = reference_text(live, ids, 10)
    r = client.completions.create(model=MODEL, prompt="n choices", max_tokens=10, temperature=0, n=3)
    assert sorted(c.index for c in r.choices) == [0, 1, 2]
    assert all(c.text == expected for c in r.choices)
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), 30)
    texts = {0: "", 1: "", 2: ""}
    for chunk in client.completions.create(model=MODEL, prompt="n choices", max_tokens=10, temperature=0, n=3,
                                           stream=True):
        for c in chunk.choices:
            texts[c.index] += c.text
    assert texts == {0: expected, 1: expected, 2: expected}


def test_seeded_sampling_repeats(client):
    kwargs = dict(model=MODEL, prompt="seeded", max_tokens=16, temperature=1.0, seed=1234)
    a = client.completions.create(**kwargs).choices[0].text
    b = client.completions.create(**kwargs).choices[0].text
    assert a == b
    # Choice 0 of n keeps the request's seed; the others get derived seeds, so they differ from it.
    two = client.completions.create(**kwargs, n=2)
    assert two.choices[0].text == a and two.choices[1].text != a


def test_stop_strings(live, client):
    ids = tok(live).encode("stop here")
    ref = reference_text(live, ids, 30)
    stop = ref[6:8]
    expected = ref[:ref.index(stop)]
    r = client.completions.create(model=MODEL, prompt="stop here", max_tokens=30, temperature=0, stop=[stop, "\x00"])
    assert r.choices[0].text == expected
    assert r.choices[0].finish_reason == "stop" and r.choices[0].model_extra["stop_reason"] == stop
    chunks = list(client.completions.create(model=MODEL, prompt="stop here", max_tokens=30, temperature=0,
                                            stop=stop, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_completion_logprobs(live, client):
    r = client.completions.create(model=MODEL, prompt="logprobs", max_tokens=8, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == r.usage.completion_tokens == 8
    expected = greedy_reference(live.engine, tok(live).encode("logprobs"), 8)
    assert lp.tokens == [tok(live).decode([t], skip_special_tokens=False) for t in expected]
    assert lp.text_offset == [sum(map(len, lp.tokens[:i])) for i in range(8)]
    for token, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert value <= 0 and 1 <= len(top) <= 4 and math.isclose(top[token], value)
        assert max(top.values()) == value  # greedy picks the most likely token


def prompt_reference(prompt_ids, k):
    """The prompt's logprobs from the reference: a dense forward of the same model."""
    return prompt_logprobs(_tiny_model()[0], prompt_ids, k)


def test_echo_with_logprobs_scores_the_prompt(live, client):
    """lm-evaluation-harness's loglikelihood request: echo, logprobs, max_tokens=0. The text is the prompt, the
    logprobs cover its tokens (null for the first) and match the reference; nothing is generated."""
    text = "the cat sat on the mat"
    ids = tok(live).encode(text)
    r = client.completions.create(model=MODEL, prompt=text, max_tokens=0, echo=True, logprobs=2, temperature=0)
    choice, want = r.choices[0], prompt_reference(ids, 2)
    assert choice.text == text and choice.finish_reason == "length"
    assert r.usage.completion_tokens == 0 and r.usage.prompt_tokens == len(ids)
    lp = choice.logprobs
    assert lp.tokens == [tok(live).decode([t], skip_special_tokens=False) for t in ids]
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    for t, value, top, ref in zip(ids[1:], lp.token_logprobs[1:], lp.top_logprobs[1:], want[1:]):
        assert math.isclose(value, ref[t], abs_tol=1e-4)
        assert 2 <= len(top) <= 3 and math.isclose(max(top.values()), max(ref.values()), abs_tol=1e-4)
    assert lp.text_offset == [sum(map(len, lp.tokens[:i])) for i in range(len(ids))]


def test_echo_with_logprobs_then_generated_tokens(live, client):
    """With max_tokens > 0 the prompt's entries come first, then the generated tokens' (as without echo); the
    stream carries the same entries."""
    text = "echo and score"
    ids = tok(live).encode(text)
    plain = client.completions.create(model=MODEL, prompt=text, max_tokens=5, temperature=0, logprobs=1)
    r = client.completions.create(model=MODEL, prompt=text, max_tokens=5, temperature=0, logprobs=1, echo=True)
    lp, gen = r.choices[0].logprobs, plain.choices[0].logprobs
    assert r.choices[0].text == text + plain.choices[0].text
    assert len(lp.tokens) == len(ids) + 5 and lp.tokens[len(ids):] == gen.tokens
    assert lp.token_logprobs[0] is None and lp.token_logprobs[len(ids):] == pytest.approx(gen.token_logprobs)
    want = prompt_reference(ids, 1)
    assert lp.token_logprobs[1:len(ids)] == pytest.approx([w[t] for t, w in zip(ids[1:], want[1:])], abs=1e-4)
    assert lp.text_offset[len(ids):] == [len(text) + o for o in gen.text_offset]
    chunks = list(client.completions.create(model=MODEL, prompt=text, max_tokens=5, temperature=0, logprobs=1,
                                            echo=True, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == r.choices[0].text
    assert [t for c in chunks for t in c.choices[0].logprobs.tokens] == lp.tokens
    streamed = [v for c in chunks for v in c.choices[0].logprobs.token_logprobs]
    assert streamed[0] is None and streamed[1:] == pytest.approx(lp.token_logprobs[1:])


def test_chat_completions(live, client):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"}]
    ids = tok(live).apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=11, temperature=0)
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == reference_text(live, ids, 11)
    assert r.usage.prompt_tokens == len(ids)
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=11, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == r.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == 11 and chunks[-2].choices[0].finish_reason == "length"
    # Without max_tokens, a chat request may run to max_model_len.
    r = client.chat.completions.create(model=MODEL, messages=messages, temperature=0)
    assert r.usage.completion_tokens == MAX_MODEL_LEN - len(ids)


def test_chat_logprobs_and_content_parts(live, client):
    messages = [{"role": "user", "content": [{"type": "text", "text": "part one, "}, {"type": "text", "text": "two"}]}]
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, temperature=0, logprobs=True,
                                       top_logprobs=2)
    content = r.choices[0].logprobs.content
    ids = tok(live).apply_chat_template([{"role": "user", "content": "part one, two"}], tokenize=True)
    expected = greedy_reference(live.engine, ids, 6)
    assert [c.token for c in content] == [tok(live).decode([t], skip_special_tokens=False) for t in expected]
    for c in content:
        assert [t.logprob for t in c.top_logprobs] == sorted((t.logprob for t in c.top_logprobs), reverse=True)
        assert len(c.top_logprobs) == 2 and c.top_logprobs[0].token == c.token and c.bytes == list(c.token.encode())
    plain = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "part one, two"}],
                                           max_tokens=6, temperature=0)
    assert plain.choices[0].message.content == r.choices[0].message.content


def test_tokenize_detokenize(live):
    text = "tokens, ünïcödé and <|eos|>"
    r = httpx.post(f"{live.url}/tokenize", json={"prompt": text}).json()
    assert r["tokens"] == tok(live).encode(text) and r["count"] == len(r["tokens"])
    assert r["max_model_len"] == MAX_MODEL_LEN
    back = httpx.post(f"{live.url}/detokenize", json={"tokens": r["tokens"][1:]}).json()
    assert back["prompt"] == text
    messages = [{"role": "user", "content": "hey"}]
    r = httpx.post(f"{live.url}/tokenize", json={"messages": messages}).json()
    assert r["tokens"] == tok(live).apply_chat_template(messages, add_generation_prompt=True, tokenize=True)


def test_metrics(live, client):
    client.completions.create(model=MODEL, prompt="metrics", max_tokens=5, temperature=0)
    text = httpx.get(f"{live.url}/metrics").text
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    label = f'{{model_name="{MODEL}"}}'
    assert values[f"ie_jax:time_to_first_token_seconds_count{label}"] >= 1
    assert values[f"ie_jax:e2e_request_latency_seconds_count{label}"] >= 1
    assert values[f"ie_jax:generation_tokens_total{label}"] == live.engine.stats()["generation_tokens_total"]
    for name in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc", "prefix_cache_hit_rate"):
        assert f"ie_jax:{name}{label}" in values


# ---------------------------------------------------------------------------------------------------------------
# Errors: OpenAI error JSON with the right status

COMPLETION_ERRORS = [
    ({"prompt": "x", "max_tokens": "many"}, "max_tokens"),  # wrong types
    ({"prompt": 123}, "prompt"),
    ({"prompt": "x", "stream": "sometimes"}, "stream"),
    ({}, "prompt"),  # missing
    ({"prompt": "x", "temperature": -0.5}, "temperature"),  # out of range
    ({"prompt": "x", "top_p": 0}, "top_p"),
    ({"prompt": "x", "n": 0}, "n="),
    ({"prompt": "x", "logprobs": 50}, "logprobs"),
    ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "x", "presence_penalty": 3}, "presence_penalty"),
    ({"prompt": "x", "min_tokens": 20, "max_tokens": 10}, "min_tokens"),
    ({"prompt": "x" * (MAX_MODEL_LEN + 5)}, "maximum context length"),  # too long
    ({"prompt": "x" * (MAX_MODEL_LEN - 10), "max_tokens": 20}, "maximum context length"),
    ({"prompt": ""}, "empty"),  # empty
    ({"prompt": []}, "empty"),
    ({"prompt": ["ok", ""]}, "empty"),
    ({"prompt": [5, 100000]}, "vocabulary"),
    ({"prompt": "x", "logit_bias": {"5": 1000.0}}, "logit_bias"),
    ({"prompt": "x", "response_format": {"type": "xml"}}, "response_format"),
    ({"prompt": "x", "response_format": {"type": "json_schema"}}, "json_schema"),
    ({"prompt": "x", "guided_regex": "(a"}, "missing"),
    ({"prompt": "x", "guided_choice": []}, "guided_choice"),
    ({"prompt": "x", "guided_grammar": "root ::= x"}, "guided_grammar"),
    ({"prompt": "x", "guided_regex": "a", "guided_choice": ["a"]}, "one structured-output"),
    ({"prompt": "x", "guided_json": 127}, "JSON schema"),  # found by fuzzing: once a 500
    ({"prompt": "x", "n": 10**9}, "at most 1024"),  # once a server that hung building 10^9 requests
    ({"prompt": ["a", "b"], "n": 600}, "1200 completions"),
    ({"prompt": "x", "temperature": 1e308}, "finite"),  # float32 on the device
]


@pytest.mark.parametrize("body,word", COMPLETION_ERRORS)
def test_completion_bad_input(live, body, word):
    r = httpx.post(f"{live.url}/v1/completions", json={"model": MODEL, **body})
    assert_error(r, 400, word)


@pytest.mark.parametrize("body,word", [
    ({"messages": "hi"}, "messages"),
    ({"messages": []}, "empty"),
    ({"messages": [{"content": "no role"}]}, "role"),
    ({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 3}, "logprobs"),
    ({"messages": [{"role": "user", "content": "x"}], "logprobs": True, "top_logprobs": 99}, "logprobs"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "role"),  # the template raises
    ({"messages": [{"role": "user", "content": "x" * MAX_MODEL_LEN}]}, "maximum context length"),
])
def test_chat_bad_input(live, body, word):
    r = httpx.post(f"{live.url}/v1/chat/completions", json={"model": MODEL, **body})
    assert_error(r, 400, word)


def test_malformed_json_unknown_model_and_route(live, client):
    r = httpx.post(f"{live.url}/v1/completions", content=b'{"model": "test-model", "prompt": ',
                   headers={"content-type": "application/json"})
    assert_error(r, 400)
    error = assert_error(httpx.post(f"{live.url}/v1/completions", json={"model": "gpt-9", "prompt": "x"}), 404, "gpt-9")
    assert error["type"] == "NotFoundError"
    assert_error(httpx.get(f"{live.url}/v1/nothing-here"), 404)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-9", prompt="x")
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], temperature=-1)
    assert_error(httpx.post(f"{live.url}/detokenize", json={"tokens": [1, -4]}), 400)
    # The server is still fine, and nothing is left running.
    assert client.completions.create(model=MODEL, prompt="still up", max_tokens=2).usage.completion_tokens == 2
    assert idle(live.engine)


def test_api_key():
    server = LiveServer(make_engine(), api_key="sekrit")
    try:
        assert_error(httpx.post(f"{server.url}/v1/completions", json={"prompt": "x"}), 401)
        assert_error(httpx.get(f"{server.url}/v1/models", headers={"Authorization": "Bearer wrong"}), 401)
        with pytest.raises(openai.AuthenticationError):
            server.client(api_key="wrong").models.list()
        r = server.client(api_key="sekrit").completions.create(model=MODEL, prompt="x", max_tokens=3)
        assert r.usage.completion_tokens == 3
        assert httpx.get(f"{server.url}/health").status_code == 200  # open, as in vLLM
    finally:
        server.stop()


# The next two tests need an engine they can hold back or slow down, so they use the fake whatever make_engine is.

def test_overload_past_max_queue_gets_503():
    engine = FakeAsyncLLM(MAX_MODEL_LEN, step_delay=0.0)
    server = LiveServer(engine, max_queue=3)
    engine.gate.clear()
    results = []

    def stream(n):
        client = server.client()
        chunks = client.completions.create(model=MODEL, prompt="queued", max_tokens=4, n=n, stream=True)
        results.append((n, "".join(c.choices[0].text for c in chunks)))

    threads = [threading.Thread(target=stream, args=(n,)) for n in (1, 2)]
    try:
        for t in threads:
            t.start()
        wait_for(lambda: len(engine.running) == 3)
        error = assert_error(httpx.post(f"{server.url}/v1/completions", json={"prompt": "one more"}), 503)
        assert error["type"] == "ServiceUnavailableError"
        with pytest.raises(openai.InternalServerError):
            server.client().completions.create(model=MODEL, prompt="x", max_tokens=2)
        engine.gate.set()
        for t in threads:
            t.join(timeout=10)
        assert sorted((n, len(text)) for n, text in results) == [(1, 4), (2, 8)]
        # Once the queue drains, requests are admitted again.
        assert server.client().completions.create(model=MODEL, prompt="x", max_tokens=2).usage.completion_tokens == 2
        assert engine.running == {}
    finally:
        engine.gate.set()
        server.stop()


def test_client_disconnect_aborts():
    engine = FakeAsyncLLM(MAX_MODEL_LEN, step_delay=0.02)
    server = LiveServer(engine)
    try:
        body = {"model": MODEL, "prompt": "long one", "max_tokens": 100, "stream": True, "n": 2}
        with httpx.stream("POST", f"{server.url}/v1/completions", json=body) as r:
            lines = r.iter_lines()
            first = json.loads(next(line for line in lines if line.startswith("data: "))[6:])
        wait_for(lambda: len(engine.aborted) == 2)
        assert sorted(engine.aborted) == [f"{first['id']}-0", f"{first['id']}-1"]
        wait_for(lambda: engine.running == {})
        # A non-streaming client that gives up is aborted too.
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{server.url}/v1/chat/completions", timeout=0.3,
                       json={"messages": [{"role": "user", "content": "wait"}], "max_tokens": 100})
        wait_for(lambda: len(engine.aborted) == 3 and engine.running == {})
        assert engine.aborted[-1].startswith("chatcmpl-")
    finally:
        server.stop()


def test_64_concurrent_streams(live):
    rng = random.Random(7)
    cases = [("".join(rng.choices("abcdefghij klmnop", k=rng.randint(1, 40))), rng.randint(1, 40))
             for _ in range(64)]

    async def one(client, prompt, max_tokens):
        stream = await client.completions.create(model=MODEL, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                                 stream=True, stream_options={"include_usage": True})
        text, usage, finish = "", None, None
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].text
                finish = chunk.choices[0].finish_reason or finish
            usage = chunk.usage or usage
        return text, usage.completion_tokens, finish

    async def main():
        async with openai.AsyncOpenAI(base_url=f"{live.url}/v1", api_key="none", max_retries=0,
                                      http_client=openai.DefaultAsyncHttpxClient(
                                          limits=httpx.Limits(max_connections=100))) as client:
            return await asyncio.gather(*(one(client, p, m) for p, m in cases))

    results = asyncio.run(main())
    # The references in one batched greedy generate (a batch equals one-by-one: test_generate), each cut to its
    # request's max_tokens: one compile instead of one per prompt shape.
    model, tokenizer = _tiny_model()
    longest = SamplingParams(temperature=0.0, max_tokens=max(m for _, m in cases))
    references = ie_jax.generate(model, tokenizer, [tok(live).encode(p) for p, _ in cases], longest)
    for (prompt, max_tokens), reference, (text, num_tokens, finish) in zip(cases, references, results):
        assert text == tok(live).decode(reference.token_ids[:max_tokens])
        assert (num_tokens, finish) == (max_tokens, "length")
    assert idle(live.engine)


def test_responses_stream_disconnect_aborts():
    """/v1/responses reshapes the chat stream: a client that leaves mid-stream aborts the engine request too."""
    engine = FakeAsyncLLM(MAX_MODEL_LEN, step_delay=0.02)
    server = LiveServer(engine)
    try:
        body = {"model": MODEL, "input": "long one", "max_output_tokens": 100, "stream": True}
        with httpx.stream("POST", f"{server.url}/v1/responses", json=body) as r:
            kinds = [json.loads(line[6:])["type"] for line, _ in zip(
                (line for line in r.iter_lines() if line.startswith("data: ")), range(5))]
        assert kinds[:3] == ["response.created", "response.in_progress", "response.output_item.added"]
        wait_for(lambda: len(engine.aborted) == 1 and engine.running == {})
        assert engine.aborted[0].startswith("resp_")
    finally:
        server.stop()
