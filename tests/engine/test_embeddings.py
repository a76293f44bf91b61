"""Embeddings (engine/pooling.py): LLM.embed equals the reference pooling of a dense forward's final hidden states,
for each pooling type, whatever the batching; bad input is refused clearly. The server's side:
tests/server/test_server_embeddings.py."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

import ie_jax
from engine.config import EngineConfig, PoolerConfig
from engine.llm import LLM

PROMPTS = ["a", "The quick brown fox jumps over the lazy dog", "hello hello hello", "0123456789" * 4, "xy"]


@pytest.fixture(scope="module")
def tiny():
    return ie_jax.load_model("tiny-llama", dtype="float32", seed=1)


def reference(model, ids: list[int], pooling: str, normalize: bool = True) -> np.ndarray:
    hidden = np.asarray(model(jnp.asarray([ids], jnp.int32), hidden=True)[0][0], np.float64)  # [L, D]
    v = {"LAST": hidden[-1], "MEAN": hidden.mean(axis=0), "CLS": hidden[0]}[pooling]
    return v / np.linalg.norm(v) if normalize else v


@pytest.mark.parametrize("pooling, normalize", [("LAST", True), ("MEAN", True), ("CLS", False)])
def test_llm_embed_matches_the_reference(tiny, pooling, normalize):
    model, tok = tiny
    # a small token budget: the five prompts go in several calls of different row and length buckets
    llm = LLM(model, tokenizer=tok, max_model_len=64, max_num_seqs=4, max_num_batched_tokens=64, page_size=8,
              progress=False, pooler_config={"pooling_type": pooling.lower(), "normalize": normalize})
    outs = llm.embed(PROMPTS)
    assert [o.prompt for o in outs] == PROMPTS
    for out, prompt in zip(outs, PROMPTS):
        ids = tok.encode(prompt)
        assert out.prompt_token_ids == ids
        np.testing.assert_allclose(out.outputs.embedding, reference(model, ids, pooling, normalize), atol=2e-5)
        assert len(out.outputs.embedding) == model.config.hidden_size
    if normalize:
        assert all(np.isclose(np.linalg.norm(o.outputs.embedding), 1.0) for o in outs)
    # one prompt alone gives the same vector as inside a batch; token ids give the text's
    alone = llm.embed(PROMPTS[1])[0].outputs.embedding
    np.testing.assert_allclose(alone, outs[1].outputs.embedding, atol=1e-6)
    by_ids = llm.embed([{"prompt_token_ids": tok.encode(PROMPTS[2])}])[0].outputs.embedding
    np.testing.assert_allclose(by_ids, outs[2].outputs.embedding, atol=1e-6)
    short = llm.embed(PROMPTS[1], truncate_prompt_tokens=5)[0]
    assert short.prompt_token_ids == tok.encode(PROMPTS[1])[-5:]
    assert not llm.engine.has_unfinished_requests()  # no request, no KV page was used


def test_embed_errors(tiny):
    model, tok = tiny
    llm = LLM(model, tokenizer=tok, max_model_len=32, max_num_seqs=2, max_num_batched_tokens=32, page_size=8,
              progress=False)
    with pytest.raises(ValueError, match="more than max_model_len=32"):
        llm.embed("x" * 40)
    with pytest.raises(ValueError, match="empty"):
        llm.embed([[]])
    for bad, match in (({"pooling_type": "max"}, "must be one of"), ({"normalise": True}, "unknown pooler config"),
                       ({"normalize": "yes"}, "true or false"), ("[1]", "JSON object")):
        with pytest.raises(ValueError, match=match):
            PoolerConfig.parse(bad)
    assert EngineConfig().pooler_config == PoolerConfig("LAST", True)


def test_llm_score_is_the_cosine_of_the_embeddings(tiny):
    """vLLM's LLM.score for an embedding model: 1-to-N and N-to-N pairs, cosine similarity even when the pooler
    does not normalize; bad pairings raise ValueError."""
    model, tok = tiny
    llm = LLM(model, tokenizer=tok, max_model_len=64, max_num_seqs=4, max_num_batched_tokens=64, page_size=8,
              progress=False, pooler_config={"pooling_type": "mean", "normalize": False})
    ref = {p: reference(model, tok.encode(p), "MEAN") for p in PROMPTS}  # unit vectors
    outs = llm.score(PROMPTS[1], PROMPTS)
    np.testing.assert_allclose([o.outputs.score for o in outs], [ref[PROMPTS[1]] @ ref[p] for p in PROMPTS],
                               atol=2e-5)
    assert abs(outs[1].outputs.score - 1.0) < 1e-5
    assert outs[0].prompt_token_ids == tok.encode(PROMPTS[1]) + tok.encode(PROMPTS[0])
    pairwise = llm.score(PROMPTS[:2], PROMPTS[3:])
    np.testing.assert_allclose([o.outputs.score for o in pairwise],
                               [ref[PROMPTS[0]] @ ref[PROMPTS[3]], ref[PROMPTS[1]] @ ref[PROMPTS[4]]], atol=2e-5)
    with pytest.raises(ValueError, match="text_1 has 2 entries and text_2 3"):
        llm.score(PROMPTS[:2], PROMPTS[:3])
    with pytest.raises(ValueError, match="text_2 cannot be empty"):
        llm.score("a", [])
