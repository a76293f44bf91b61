"""vLLM's extras through the server: `prompt_logprobs` (each prompt token's logprob, rank and top k, as their own
field), `return_token_ids` (prompt and output token ids beside the text, whole and streamed) and SageMaker's
/invocations route."""
from __future__ import annotations

import json
import math

import httpx
import numpy as np
from harness import MODEL, _tiny_model, assert_error, greedy_reference, sse_events, tok

from ie_jax.generate import forward, prompt_logprobs

CHAT = [{"role": "user", "content": "rank these tokens"}]


def reference_ranks(ids: list[int]) -> list[int]:
    """Each prompt token's rank at its position, counted over the full log-softmax of a dense forward."""
    logp = np.asarray(forward(_tiny_model()[0], ids)[0, :-1], np.float64)
    return [int((row >= row[t]).sum()) for t, row in zip(ids[1:], logp)]


def check_prompt_logprobs(live, got: list, ids: list[int], k: int) -> None:
    want, ranks = prompt_logprobs(_tiny_model()[0], ids, k), reference_ranks(ids)
    assert len(got) == len(ids) and got[0] is None
    for pos, (t, entry, ref, rank) in enumerate(zip(ids[1:], got[1:], want[1:], ranks), 1):
        keys = list(entry)
        assert keys[0] == str(t), "the prompt token comes first"
        assert set(map(int, keys)) == set(ref), pos
        assert entry[str(t)]["rank"] == rank == ref.rank, pos
        assert math.isclose(entry[str(t)]["logprob"], ref[t], abs_tol=1e-4)
        top = sorted(((v["rank"], int(key), v["logprob"]) for key, v in entry.items() if int(key) != t
                      or rank <= k))
        assert [r for r, _, _ in top][:k] == list(range(1, k + 1))  # the top k ranked 1..k by logprob
        assert all(a[2] >= b[2] for a, b in zip(top, top[1:]))
        for key, v in entry.items():
            assert v["decoded_token"] == tok(live).decode([int(key)], skip_special_tokens=False)


def test_completion_prompt_logprobs_match_the_reference_with_ranks(live):
    text = "the cat sat on a mat"
    ids = tok(live).encode(text)
    r = httpx.post(f"{live.url}/v1/completions", json=dict(model=MODEL, prompt=text, max_tokens=3, temperature=0,
                                                           prompt_logprobs=3, n=2)).json()
    assert len(r["choices"]) == 2
    for choice in r["choices"]:  # scored once, given to both choices
        check_prompt_logprobs(live, choice["prompt_logprobs"], ids, 3)
        assert choice["logprobs"] is None and len(choice["text"]) > 0
    # zero asks for the prompt token alone, with its rank
    r = httpx.post(f"{live.url}/v1/completions", json=dict(model=MODEL, prompt=ids, max_tokens=1,
                                                           prompt_logprobs=0)).json()
    entries = r["choices"][0]["prompt_logprobs"]
    assert [list(e) for e in entries[1:]] == [[str(t)] for t in ids[1:]]
    assert [e[str(t)]["rank"] for e, t in zip(entries[1:], ids[1:])] == reference_ranks(ids)


def test_chat_prompt_logprobs_on_the_response(live, client):
    ids = tok(live).apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True)
    r = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=4, temperature=0,
                                       extra_body={"prompt_logprobs": 2})
    check_prompt_logprobs(live, r.model_extra["prompt_logprobs"], ids, 2)
    plain = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=4, temperature=0)
    assert r.choices[0].message.content == plain.choices[0].message.content
    assert "prompt_logprobs" not in plain.model_extra


def test_prompt_logprobs_bad_requests(live):
    url = f"{live.url}/v1/completions"
    assert_error(httpx.post(url, json=dict(model=MODEL, prompt="x y", prompt_logprobs=2, stream=True)), 400,
                 "stream")
    assert_error(httpx.post(url, json=dict(model=MODEL, prompt="x y", prompt_logprobs=-2)), 400, "-1")
    assert_error(httpx.post(url, json=dict(model=MODEL, prompt="x y", prompt_logprobs=21)), 400,
                 "greater than max allowed: 20")
    assert_error(httpx.post(url, json=dict(model=MODEL, prompt="x y", prompt_logprobs=-1)), 400,
                 f"prompt logprobs of {live.engine.model_config.vocab_size}")
    chat = f"{live.url}/v1/chat/completions"
    assert_error(httpx.post(chat, json=dict(model=MODEL, messages=CHAT, prompt_logprobs=1, stream=True)), 400,
                 "stream")
    assert_error(httpx.post(url, json=dict(model=MODEL, prompt="x y", prompt_logprobs=1, use_beam_search=True,
                                           n=2)), 400, "prompt_logprobs")


def test_return_token_ids_completion_whole_and_streamed(live):
    text = "token ids please"
    ids = tok(live).encode(text)
    want = greedy_reference(live.engine, ids, 9)
    body = dict(model=MODEL, prompt=text, max_tokens=9, temperature=0, return_token_ids=True, ignore_eos=True)
    choice = httpx.post(f"{live.url}/v1/completions", json=body).json()["choices"][0]
    assert choice["prompt_token_ids"] == ids and choice["token_ids"] == want
    assert choice["text"] == tok(live).decode(want)
    with httpx.stream("POST", f"{live.url}/v1/completions", json={**body, "stream": True}) as r:
        chunks = [json.loads(e) for e in sse_events(r) if e != "[DONE]"]
    assert chunks[0]["choices"][0]["prompt_token_ids"] == ids
    assert all("prompt_token_ids" not in c["choices"][0] for c in chunks[1:])
    assert [t for c in chunks for t in c["choices"][0]["token_ids"]] == want
    plain = httpx.post(f"{live.url}/v1/completions", json={**body, "return_token_ids": False}).json()
    assert "token_ids" not in plain["choices"][0] and plain["choices"][0]["text"] == choice["text"]


def test_return_token_ids_chat_whole_and_streamed(live):
    ids = tok(live).apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True)
    want = greedy_reference(live.engine, ids, 7)
    body = dict(model=MODEL, messages=CHAT, max_tokens=7, temperature=0, return_token_ids=True, ignore_eos=True)
    r = httpx.post(f"{live.url}/v1/chat/completions", json=body).json()
    assert r["prompt_token_ids"] == ids and r["choices"][0]["token_ids"] == want
    with httpx.stream("POST", f"{live.url}/v1/chat/completions", json={**body, "stream": True}) as s:
        chunks = [json.loads(e) for e in sse_events(s) if e != "[DONE]"]
    assert chunks[0]["prompt_token_ids"] == ids and chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all("prompt_token_ids" not in c for c in chunks[1:])
    assert [t for c in chunks[1:] for t in c["choices"][0]["token_ids"]] == want


def test_invocations_routes_chat_and_completion_bodies(live, client):
    url = f"{live.url}/invocations"
    body = dict(model=MODEL, prompt="route me", max_tokens=6, temperature=0)
    want = client.completions.create(**body)
    got = httpx.post(url, json=body).json()
    assert got["object"] == "text_completion" and got["choices"][0]["text"] == want.choices[0].text
    chat = dict(model=MODEL, messages=CHAT, max_tokens=6, temperature=0)
    want = client.chat.completions.create(**chat)
    got = httpx.post(url, json=chat).json()
    assert got["object"] == "chat.completion"
    assert got["choices"][0]["message"]["content"] == want.choices[0].message.content
    with httpx.stream("POST", url, json={**chat, "stream": True}) as r:
        events = sse_events(r)
    assert events[-1] == "[DONE]" and json.loads(events[0])["object"] == "chat.completion.chunk"
    assert_error(httpx.post(url, json={"model": MODEL, "input": "x"}), 400, "messages", "prompt")
    assert_error(httpx.post(url, content=b"{not json", headers={"content-type": "application/json"}), 400, "JSON")
    assert_error(httpx.post(url, json={"prompt": "x", "max_tokens": "many"}), 400, "max_tokens")
    assert_error(httpx.post(url, json={"model": "other", "prompt": "x"}), 404, "does not exist")


def test_reset_prefix_cache_route(live):
    """vLLM's POST /reset_prefix_cache: the cached pages are forgotten when the engine is idle (200); while a request
    holds pages the engine refuses and the route says so (409)."""
    text = "a shared system prompt, long enough to fill several pages of the cache"
    assert httpx.post(f"{live.url}/v1/completions", json=dict(model=MODEL, prompt=text, max_tokens=2,
                                                              temperature=0)).status_code == 200
    bm = live.engine.engine.block_manager
    assert bm.cached  # the prompt's full pages were published
    r = httpx.post(f"{live.url}/reset_prefix_cache")
    assert r.status_code == 200 and r.json() == {"reset": True}
    assert not bm.cached and bm.prefix_hits == 0
    held = bm.ref_counts[0]
    bm.ref_counts[0] += 1  # a page in use, as a running request holds it
    try:
        assert_error(httpx.post(f"{live.url}/reset_prefix_cache"), 409, "only while no request is running")
    finally:
        bm.ref_counts[0] = held
