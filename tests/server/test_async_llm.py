"""AsyncLLM's delivery: a consumer that falls behind reads the deltas waiting for it merged into one, with the same
tokens, text, logprobs and ending as one delta at a time."""
import asyncio
import dataclasses

import ie_jax
from engine.async_llm import AsyncLLM
from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.outputs import RequestOutput, merge_outputs
from ie_jax.sampling import SamplingParams


def test_merge_outputs_concatenates_deltas_and_keeps_the_later_state():
    a = RequestOutput("r", [5], "ab", [{5: -0.1}], False, None, None, 7, 3, 2)
    b = RequestOutput("r", [6, 9], "c", [{6: -1.0, 2: -2.0}, {9: -0.5}], True, "stop", "c", 7, 5, 2)
    m = merge_outputs(a, b)
    assert (m.new_token_ids, m.new_text, m.new_logprobs) == ([5, 6, 9], "abc", [{5: -0.1}, {6: -1.0, 2: -2.0},
                                                                                  {9: -0.5}])
    assert (m.finished, m.finish_reason, m.stop_reason, m.num_output_tokens) == (True, "stop", "c", 5)
    assert merge_outputs(a, dataclasses.replace(b, new_logprobs=None)).new_logprobs == [{5: -0.1}]
    plain = RequestOutput("r", [1], "x", None, False)
    assert merge_outputs(plain, plain).new_logprobs is None


def test_a_lagging_consumer_gets_merged_deltas_with_the_same_result():
    model, tok = ie_jax.load_model("tiny-llama", dtype="float32", seed=1)
    config = EngineConfig(max_model_len=64, max_num_seqs=4, max_num_batched_tokens=32, page_size=8,
                          token_buckets=(8, 32))
    engine = AsyncLLM(LLMEngine(model, tok, config, progress=False))
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=2)
    expected = ie_jax.generate(model, tok, "lagging", params)[0].outputs[0]

    async def consume(lag: float):
        outs = []
        async for out in engine.generate(tok.encode("lagging"), params, f"lag-{lag}"):
            outs.append(out)
            await asyncio.sleep(lag)  # a slow client: the engine keeps stepping meanwhile
        return outs

    try:
        prompt_ok = asyncio.run(consume(0.0))
        lagging = asyncio.run(consume(0.3))
    finally:
        engine.shutdown()
    for outs in (prompt_ok, lagging):
        assert [t for o in outs for t in o.new_token_ids] == expected.token_ids
        assert "".join(o.new_text for o in outs) == expected.text
        assert [lp.keys() for o in outs for lp in o.new_logprobs] == [lp.keys() for lp in expected.logprobs]
        assert outs[-1].finished and outs[-1].finish_reason == "length" and outs[-1].num_output_tokens == 12
        assert not any(o.finished for o in outs[:-1])
    assert len(lagging) < len(expected.token_ids)  # the deltas that waited arrived merged


def test_prompt_logprobs_are_scored_beside_the_engine_thread():
    """A request with prompt_logprobs gets them with its first output, as the reference computes them, and the
    scoring forward runs on AsyncLLM's scoring thread, never on the engine's (a first compile there would stall
    every stream)."""
    import threading

    import numpy as np

    from ie_jax.generate import prompt_logprobs

    model, tok = ie_jax.load_model("tiny-llama", dtype="float32", seed=1)
    config = EngineConfig(max_model_len=64, max_num_seqs=4, max_num_batched_tokens=32, page_size=8,
                          token_buckets=(8, 32))
    engine = AsyncLLM(LLMEngine(model, tok, config, progress=False))
    threads, score = [], engine.engine.runner.score
    engine.engine.runner.score = lambda *a: (threads.append(threading.current_thread().name), score(*a))[1]
    ids = tok.encode("score this prompt")
    params = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True, prompt_logprobs=2)

    async def run():
        return [out async for out in engine.generate(ids, params, "p")]

    try:
        outs = asyncio.run(run())
        alone = asyncio.run(engine.score(ids, 2))
    finally:
        engine.shutdown()
    want = prompt_logprobs(model, ids, 2)
    assert outs[0].prompt_logprobs is not None and all(o.prompt_logprobs is None for o in outs[1:])
    for got in (outs[0].prompt_logprobs, alone):
        assert got[0] is None and len(got) == len(ids)
        for a, b in zip(got[1:], want[1:]):
            assert a.keys() == b.keys()
            np.testing.assert_allclose([a[k] for k in b], list(b.values()), atol=1e-4)
    assert threads and all(name.startswith("ie-jax-score") for name in threads)
    reference = ie_jax.generate(model, tok, [ids], params)[0].outputs[0]
    assert [t for o in outs for t in o.new_token_ids] == reference.token_ids
