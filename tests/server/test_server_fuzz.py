"""Random request bodies at every route: fields of the right names with values of the wrong types, ranges and shapes.
The server must answer each with its response or a 4xx error JSON (never a 5xx, a hang or a dropped connection),
and end with nothing running. Fixed seeds; the failures such a run once found (a non-object guided_json, n = 10^9,
a float32-overflowing temperature) have their own cases in test_server.py."""
from __future__ import annotations

import json
import random

import httpx
import pytest
from harness import MODEL, LiveServer, idle, make_engine

VALUES = [None, True, False, 0, 1, -1, 2, 10**9, -10**9, 0.5, -0.5, 1e308, "", "x", "abc" * 50, [], [1], [[]], ["a"],
          [[1, 2]], {}, {"a": 1}, [{"role": "user"}], [{"role": "user", "content": None}],
          [{"role": "user", "content": [{"type": "image_url"}]}], [{"type": "function"}], "auto", "none", "required",
          {"type": "json_object"}, {"type": "json_schema"},
          {"type": "json_schema", "json_schema": {"schema": {"type": "integer"}}}, "[a-z]+", "(", 300, 2**31,
          [0, 262, 300], [-1], 128, 127, "é≠", {"include_usage": True}, {"continuous_usage_stats": True},
          [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
          {"type": "function", "function": {"name": "f"}}, {"enable_thinking": False},
          [{"role": "assistant", "content": "x"}], {"format": {"type": "json_object"}}, 1.5, -2, 20, 21, "stop",
          ["stop", "s"], [[1, 2], [3]]]
ROUTES = {
    "/v1/completions": ({"prompt": "hi", "max_tokens": 3}, [
        "prompt", "max_tokens", "n", "logprobs", "echo", "stop", "temperature", "top_p", "top_k", "min_p", "seed",
        "presence_penalty", "repetition_penalty", "logit_bias", "min_tokens", "stop_token_ids", "guided_regex",
        "guided_choice", "guided_json", "response_format", "allowed_token_ids", "bad_words", "use_beam_search",
        "prompt_logprobs", "return_token_ids", "truncate_prompt_tokens", "best_of", "stream_options", "priority"]),
    "/v1/chat/completions": ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}, [
        "messages", "max_tokens", "n", "logprobs", "top_logprobs", "stop", "temperature", "tools", "tool_choice",
        "response_format", "prompt_logprobs", "return_token_ids", "continue_final_message", "add_generation_prompt",
        "chat_template_kwargs", "use_beam_search", "documents", "guided_choice", "seed"]),
    "/v1/embeddings": ({"input": "hi"}, ["input", "encoding_format", "dimensions", "truncate_prompt_tokens"]),
    "/v1/responses": ({"input": "hi", "max_output_tokens": 3}, [
        "input", "instructions", "max_output_tokens", "tools", "text", "temperature", "reasoning"]),
    "/tokenize": ({"prompt": "hi"}, ["prompt", "messages", "add_special_tokens", "return_token_strs"]),
    "/detokenize": ({"tokens": [1, 2]}, ["tokens"]),
    "/invocations": ({"prompt": "hi", "max_tokens": 2}, ["prompt", "messages", "max_tokens"]),
}


@pytest.fixture(scope="module")
def server():
    s = LiveServer(make_engine(), tool_call_parser="hermes")
    yield s
    s.stop()


@pytest.mark.parametrize("seed", range(4))
def test_random_bodies_get_answers_or_4xx(server, seed):
    rng, failures = random.Random(seed), []
    with httpx.Client(base_url=server.url, timeout=60) as client:
        for _ in range(300):
            route = rng.choice(sorted(ROUTES))
            base, fields = ROUTES[route]
            body = {**base, "model": MODEL}
            for field in rng.sample(fields, min(len(fields), rng.randint(1, 4))):
                body[field] = rng.choice(VALUES)
            stream = rng.random() < 0.3 and route not in ("/tokenize", "/detokenize", "/v1/embeddings")
            if stream:
                body["stream"] = True
            r = client.post(route, content=json.dumps(body), headers={"content-type": "application/json"})
            in_band = stream and r.status_code == 200 and '"code":500' in r.text.replace(" ", "")
            if r.status_code >= 500 or in_band or (r.status_code >= 400 and "error" not in r.json()):
                failures.append((route, body, r.status_code, r.text[:200]))
    assert not failures, failures[:3]
    assert idle(server.engine)
