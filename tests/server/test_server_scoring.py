"""vLLM's /score and /rerank over the embeddings (engine/scoring_routes.py): scores are the cosine similarities of the
reference pooling of a dense forward, pairs follow vLLM's 1-to-N and N-to-N rules, rerank orders and cuts by top_n,
and bad input gets a 400."""
from __future__ import annotations

import httpx
import numpy as np
from harness import MODEL, _tiny_model, assert_error, pooling_server, unit_embedding

DOCS = ["The quick brown fox", "jumps over the lazy dog", "hello hello hello", "0123456789", "a"]


def test_server_score_and_rerank():
    model, tok = _tiny_model()
    server, engine = pooling_server()
    try:
        ref = {t: unit_embedding(model, tok.encode(t)) for t in DOCS}
        query = DOCS[2]
        want = [float(ref[query] @ ref[d]) for d in DOCS]
        # 1 to N
        r = httpx.post(f"{server.url}/v1/score", json={"model": MODEL, "text_1": query, "text_2": DOCS}).json()
        assert r["object"] == "list" and [d["index"] for d in r["data"]] == list(range(len(DOCS)))
        np.testing.assert_allclose([d["score"] for d in r["data"]], want, atol=2e-5)
        assert abs(r["data"][2]["score"] - 1.0) < 1e-5  # the query against itself
        assert r["usage"]["prompt_tokens"] == sum(len(tok.encode(t)) for t in DOCS)  # each distinct text once
        # N to N, and the bare /score path
        r = httpx.post(f"{server.url}/score", json={"text_1": DOCS[:2], "text_2": DOCS[3:]}).json()
        np.testing.assert_allclose([d["score"] for d in r["data"]],
                                   [ref[DOCS[0]] @ ref[DOCS[3]], ref[DOCS[1]] @ ref[DOCS[4]]], atol=2e-5)
        # rerank: best first, cut to top_n, documents echoed
        for path in ("/rerank", "/v1/rerank", "/v2/rerank"):
            r = httpx.post(f"{server.url}{path}", json={"model": MODEL, "query": query, "documents": DOCS,
                                                        "top_n": 3}).json()
            order = sorted(range(len(DOCS)), key=lambda i: -want[i])[:3]
            assert [x["index"] for x in r["results"]] == order, path
            assert [x["document"]["text"] for x in r["results"]] == [DOCS[i] for i in order]
            np.testing.assert_allclose([x["relevance_score"] for x in r["results"]], [want[i] for i in order],
                                       atol=2e-5)
        assert len(httpx.post(f"{server.url}/rerank", json={"query": query, "documents": DOCS}).json()["results"]) \
            == len(DOCS)  # top_n 0: every document
        url = f"{server.url}/v1/score"
        assert_error(httpx.post(url, json={"text_1": DOCS[:2], "text_2": DOCS[:3]}), 400, "text_1 has 2 entries")
        assert_error(httpx.post(url, json={"text_1": "", "text_2": "a"}), 400, "text_1 cannot be empty")
        assert_error(httpx.post(url, json={"text_1": "a", "text_2": []}), 400, "text_2 cannot be empty")
        assert_error(httpx.post(url, json={"text_1": "x" * 60, "text_2": "a"}), 400, "maximum context length is 48")
        assert httpx.post(url, json={"text_1": "x" * 60, "text_2": "a", "truncate_prompt_tokens": 8}).status_code \
            == 200
        assert_error(httpx.post(url, json={"model": "other", "text_1": "a", "text_2": "b"}), 404, "does not exist")
        rr = f"{server.url}/v1/rerank"
        assert_error(httpx.post(rr, json={"query": "a", "documents": []}), 400, "documents cannot be empty")
        assert_error(httpx.post(rr, json={"query": "", "documents": ["a"]}), 400, "query cannot be empty")
        assert_error(httpx.post(rr, json={"query": "a", "documents": ["b"], "top_n": -1}), 400, "top_n=-1")
        assert httpx.post(rr, json={"query": 5, "documents": ["b"]}).status_code == 400
    finally:
        server.stop()
        engine.shutdown()
