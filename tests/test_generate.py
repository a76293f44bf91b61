"""Reference generate on the tiny byte-level Llama: batching, stop rules, n, seeds, logprobs, cache == no cache."""
import numpy as np
import pytest

import ie_jax
from ie_jax import SamplingParams


@pytest.fixture(scope="module")
def tiny():
    return ie_jax.load_model("tiny-llama", dtype="float32", seed=1)


def test_batch_equals_one_by_one_and_cache_equals_no_cache(tiny):
    model, tok = tiny
    prompts = ["Hello there", "a", "The quick brown fox jumps"]
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    single = [ie_jax.generate(model, tok, [p], params)[0].token_ids for p in prompts]
    for kwargs in ({}, {"padding_side": "right"}, {"use_cache": False}):
        batch = ie_jax.generate(model, tok, prompts, params, **kwargs)
        assert [o.token_ids for o in batch] == single, kwargs
        assert all(len(t) == 12 for t in single)
    out = ie_jax.generate(model, tok, prompts[0], params)[0]
    assert out.text == tok.decode(out.token_ids) and out.outputs[0].finish_reason == "length"


def test_string_and_token_prompts_agree(tiny):
    model, tok = tiny
    params = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True)
    a = ie_jax.generate(model, tok, "abc", params)[0]
    b = ie_jax.generate(model, tok, [tok.encode("abc")], params)[0]
    assert a.token_ids == b.token_ids and a.prompt_token_ids == b.prompt_token_ids


def test_stop_token_and_stop_string(tiny):
    model, tok = tiny
    base = ie_jax.generate(model, tok, "xyz", SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True))[0]
    ids = base.token_ids
    # Stop on the 4th generated token's id: generation ends at its first occurrence, which is excluded.
    stop_id = ids[3]
    first = ids.index(stop_id)
    out = ie_jax.generate(model, tok, "xyz", SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True,
                                                            stop_token_ids=[stop_id]))[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop_id and out.token_ids == ids[: first + 1]
    # A stop string spanning two tokens: the text is cut before it.
    text = tok.decode(ids)
    assert len(text) >= 6
    stop = text[4:6]
    out = ie_jax.generate(model, tok, "xyz", SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True,
                                                            stop=[stop]))[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop and out.text == text[: text.index(stop)]
    out = ie_jax.generate(model, tok, "xyz", SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True,
                                                            stop=[stop], include_stop_str_in_output=True))[0]
    assert out.text == text[: text.index(stop) + len(stop)]


def test_eos_stops_unless_ignored_and_min_tokens(tiny):
    model, tok = tiny
    base = ie_jax.generate(model, tok, "hi", SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True))[0]
    eos = base.token_ids[2]

    class Tok:  # the byte tokenizer, with a different end-of-sequence id
        eos_token_ids = (eos,)
        def __getattr__(self, name):
            return getattr(tok, name)

    first = base.token_ids.index(eos)
    out = ie_jax.generate(model, Tok(), "hi", SamplingParams(temperature=0.0, max_tokens=10))[0].outputs[0]
    assert out.finish_reason == "stop" and out.token_ids == base.token_ids[: first + 1]
    out = ie_jax.generate(model, Tok(), "hi", SamplingParams(temperature=0.0, max_tokens=10, min_tokens=6))[0]
    assert eos not in out.token_ids[:6] and len(out.token_ids) >= 6


def test_seeded_sampling_reproducible_whatever_the_batch(tiny):
    model, tok = tiny
    p = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=10, seed=1234, ignore_eos=True)
    alone = ie_jax.generate(model, tok, ["seeded prompt"], p)[0].token_ids
    mixed = ie_jax.generate(model, tok, ["other", "seeded prompt", "and a longer third prompt"],
                            [SamplingParams(temperature=0.8, max_tokens=7), p, SamplingParams(temperature=0.0)])
    assert mixed[1].token_ids == alone
    other = ie_jax.generate(model, tok, ["seeded prompt"], SamplingParams(temperature=1.0, top_p=0.9, max_tokens=10,
                                                                         seed=99, ignore_eos=True))[0].token_ids
    assert other != alone


def test_n_samples_and_logprobs(tiny):
    model, tok = tiny
    out = ie_jax.generate(model, tok, "n>1", SamplingParams(n=3, temperature=1.0, max_tokens=6, seed=5, logprobs=2,
                                                           ignore_eos=True))[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1
    for c in out.outputs:
        assert len(c.logprobs) == len(c.token_ids) == 6
        for t, entry in zip(c.token_ids, c.logprobs):
            assert t in entry and 2 <= len(entry) <= 3 and all(v <= 0 for v in entry.values())
    # Greedy logprobs equal log_softmax of the forward logits.
    g = ie_jax.generate(model, tok, "lp", SamplingParams(temperature=0.0, max_tokens=3, logprobs=0,
                                                         ignore_eos=True))[0]
    ids = np.array([g.prompt_token_ids + g.token_ids[:2]], np.int32)
    logits = np.asarray(ie_jax.forward(model, ids))[0, -1]
    ref = logits - np.log(np.exp(logits - logits.max()).sum()) - logits.max()
    np.testing.assert_allclose(g.outputs[0].logprobs[2][g.token_ids[2]], ref[g.token_ids[2]], atol=1e-4)


def test_bad_prompts_raise(tiny):
    model, tok = tiny
    with pytest.raises(ValueError, match="empty"):
        ie_jax.generate(model, tok, [[]], SamplingParams())
    with pytest.raises(ValueError, match="outside the vocabulary"):
        ie_jax.generate(model, tok, [[1, 999]], SamplingParams())
    with pytest.raises(ValueError, match="max_position_embeddings"):
        ie_jax.generate(model, tok, "x", SamplingParams(max_tokens=600))
