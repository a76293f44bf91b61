"""--speculative-config through the server: greedy completions, whole and streamed, stay plain decoding's, and
/metrics counts the drafts."""
from __future__ import annotations

import httpx
import pytest
from harness import MAX_MODEL_LEN, MODEL, LiveServer, _tiny_model, greedy_reference, idle

from engine.async_llm import AsyncLLM
from engine.config import EngineConfig
from engine.llm_engine import LLMEngine


@pytest.fixture(scope="module")
def spec():
    model, tokenizer = _tiny_model()
    config = EngineConfig(max_model_len=MAX_MODEL_LEN, max_num_seqs=8, max_num_batched_tokens=128, page_size=16,
                          token_buckets=(8, 32, 128),
                          speculative_config={"method": "ngram", "num_speculative_tokens": 4})
    server = LiveServer(AsyncLLM(LLMEngine(model, tokenizer, config, progress=False)))
    yield server
    server.stop()
    server.engine.shutdown()


def test_streams_are_plain_decoding_and_metrics_count_drafts(spec):
    client = spec.client()
    tok = _tiny_model()[1]
    for prompt in ("abcabcabcabc", "The quick brown fox"):
        want = tok.decode(greedy_reference(spec.engine, tok.encode(prompt), 40))
        whole = client.completions.create(model=MODEL, prompt=prompt, max_tokens=40, temperature=0,
                                          extra_body={"ignore_eos": True})
        chunks = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=40, temperature=0,
                                                stream=True, extra_body={"ignore_eos": True}))
        assert whole.choices[0].text == want == "".join(c.choices[0].text for c in chunks)
        assert whole.usage.completion_tokens == 40
    text = httpx.get(f"{spec.url}/metrics").text
    drafts, kept = (float(next(line.split()[-1] for line in text.splitlines()
                               if line.startswith(f"ie_jax:spec_decode_num_{name}_tokens_total")))
                    for name in ("draft", "accepted"))
    assert drafts > kept > 0
    assert idle(spec.engine)
