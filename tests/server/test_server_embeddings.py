"""/v1/embeddings (engine/pooling.py through the server): the openai client's default base64 and plain floats equal
the reference pooling of a dense forward; bad input gets vLLM's errors."""
from __future__ import annotations

import base64

import httpx
import numpy as np
import openai
import pytest
from harness import MODEL, _tiny_model, assert_error, pooling_server, unit_embedding


PROMPTS = ["a", "The quick brown fox jumps over the lazy dog", "hello hello hello"]


def test_server_embeddings():
    model, tok = _tiny_model()
    server, engine = pooling_server()
    reference = unit_embedding
    try:
        client = server.client()
        r = client.embeddings.create(model=MODEL, input=PROMPTS[:3])  # the client asks for base64 and decodes it
        assert [d.index for d in r.data] == [0, 1, 2]
        for d, prompt in zip(r.data, PROMPTS):
            np.testing.assert_allclose(d.embedding, reference(model, tok.encode(prompt)), atol=2e-5)
        assert r.usage.prompt_tokens == r.usage.total_tokens == sum(len(tok.encode(p)) for p in PROMPTS[:3])
        url = f"{server.url}/v1/embeddings"
        floats = httpx.post(url, json={"model": MODEL, "input": tok.encode(PROMPTS[1]),
                                       "encoding_format": "float"}).json()
        assert floats["object"] == "list" and floats["data"][0]["object"] == "embedding"
        np.testing.assert_allclose(floats["data"][0]["embedding"], r.data[1].embedding, atol=1e-6)
        raw = httpx.post(url, json={"model": MODEL, "input": PROMPTS[0], "encoding_format": "base64"}).json()
        decoded = np.frombuffer(base64.b64decode(raw["data"][0]["embedding"]), "<f4")
        np.testing.assert_allclose(decoded, r.data[0].embedding, atol=1e-6)
        assert_error(httpx.post(url, json={"model": MODEL, "input": "x" * 60}), 400, "maximum context length is 48")
        assert len(httpx.post(url, json={"model": MODEL, "input": "x" * 60, "truncate_prompt_tokens": 10}).json()[
            "data"]) == 1
        assert_error(httpx.post(url, json={"model": MODEL, "input": ""}), 400, "input cannot be empty")
        assert_error(httpx.post(url, json={"model": MODEL, "input": [[5, 999]]}), 400, "out of vocabulary")
        assert_error(httpx.post(url, json={"model": MODEL, "input": "a", "dimensions": 8}), 400, "matryoshka")
        assert_error(httpx.post(url, json={"model": "other", "input": "a"}), 404, "does not exist")
        with pytest.raises(openai.BadRequestError, match="encoding_format"):
            client.embeddings.create(model=MODEL, input="a", encoding_format="int8")
    finally:
        server.stop()
        engine.shutdown()
