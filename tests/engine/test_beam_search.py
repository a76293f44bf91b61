"""Beam search (engine/beam_search.py): the search against an exhaustive ranking on a small synthetic model, its EOS
and length-penalty rules, and `LLM.beam_search` over the engine against the same search driven by the dense forward
of the reference model (so the engine's prompts, prefix cache and logprobs are what is checked)."""
from __future__ import annotations

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ie_jax
from engine.beam_search import BeamSearch, BeamSearchParams, BeamSearchSequence, beam_score
from engine.llm import LLM

VOCAB = 4


def synthetic_logprobs(tokens: list[int]) -> dict[int, float]:
    """A fixed next-token distribution over VOCAB tokens that depends on the whole prefix."""
    rng = np.random.default_rng(hash(tuple(tokens)) % 2**32)
    logits = rng.standard_normal(VOCAB) * 2
    lp = logits - np.log(np.exp(logits).sum())
    return {t: float(v) for t, v in enumerate(lp)}


def drive(search: BeamSearch, logprob_fn):
    while not search.done:
        search.advance({key: logprob_fn(tokens) for key, tokens in search.pending()})
    return search.outputs(lambda ids: " ".join(map(str, ids)))


def test_full_width_equals_the_exhaustive_ranking():
    """Wide enough to keep every sequence, beam search is exhaustive: the best sequences by score, in order."""
    prompt, depth = [1, 2], 3
    params = BeamSearchParams(beam_width=VOCAB ** depth, max_tokens=depth, ignore_eos=True, length_penalty=0.5)
    out = drive(BeamSearch([prompt], params, eos_token_ids=(0,)), synthetic_logprobs)[0]
    every = []
    for tail in itertools.product(range(VOCAB), repeat=depth):
        cum = sum(synthetic_logprobs(prompt + list(tail[:i]))[tail[i]] for i in range(depth))
        every.append(BeamSearchSequence(prompt + list(tail), [], cum))
    want = sorted(every, key=lambda s: beam_score(s, (0,), 0.5), reverse=True)
    assert [s.tokens for s in out.sequences] == [s.tokens for s in want]
    for got, ref in zip(out.sequences, want):
        assert math.isclose(got.cum_logprob, ref.cum_logprob, rel_tol=1e-9)
        assert got.finish_reason == "length" and got.text == " ".join(map(str, got.tokens[2:]))
        assert len(got.logprobs) == depth and all(len(lp) == VOCAB for lp in got.logprobs)


def test_eos_finishes_a_beam_and_the_score_ignores_it():
    """A child ending in EOS is set aside (finish "stop") and not expanded; ignore_eos keeps expanding it. The score
    divides by the length without a final EOS, so length_penalty ranks finished and live beams alike."""
    def lp(tokens):  # EOS (0) is the likeliest first token; after it everything is cheap
        return {0: -0.1, 1: -1.0, 2: -3.0, 3: -4.0} if len(tokens) == 1 else {0: -2.0, 1: -0.5, 2: -1.5, 3: -5.0}

    out = drive(BeamSearch([[7]], BeamSearchParams(beam_width=2, max_tokens=3), (0,)), lp)[0]
    stopped = [s for s in out.sequences if s.finish_reason == "stop"]
    assert [s.tokens for s in stopped] == [[7, 0]] and math.isclose(stopped[0].cum_logprob, -0.1)
    assert beam_score(stopped[0], (0,), 1.0) == pytest.approx(-0.1 / 1)
    longer = drive(BeamSearch([[7]], BeamSearchParams(beam_width=2, max_tokens=3, ignore_eos=True), (0,)), lp)[0]
    assert all(len(s.tokens) == 4 and s.finish_reason == "length" for s in longer.sequences)


def test_bad_params_are_named():
    with pytest.raises(ValueError, match="beam_width"):
        BeamSearchParams(beam_width=0, max_tokens=4)
    with pytest.raises(ValueError, match="max_tokens"):
        BeamSearchParams(beam_width=2, max_tokens=True)


@pytest.fixture(scope="module")
def tiny():
    return ie_jax.load_model("tiny-llama", dtype="float32", seed=3)


def dense_logprobs(model, k):
    """The reference: the next token's top-k logprobs from a dense forward of the whole sequence."""
    forward = jax.jit(lambda ids: jax.nn.log_softmax(model(ids)[0][0, -1]))

    def fn(tokens):
        lp = np.asarray(forward(jnp.asarray([tokens], jnp.int32)))
        top = np.argsort(-lp)[:k]
        return {int(t): float(lp[t]) for t in top}
    return fn


def test_llm_beam_search_matches_the_dense_reference(tiny):
    model, tok = tiny
    llm = LLM(model, tokenizer=tok, max_model_len=64, max_num_seqs=8, max_num_batched_tokens=64, page_size=8,
              progress=False)
    params = BeamSearchParams(beam_width=3, max_tokens=6, length_penalty=1.0)
    prompts = ["The quick brown", [tok.BOS, 40, 41, 42, 43, 44, 45, 46, 47, 48]]  # 10 ids: a full page and more
    outs = llm.beam_search(prompts, params)
    ids = [tok.encode(prompts[0]), prompts[1]]
    want = drive(BeamSearch(ids, params, llm.engine.eos_token_ids), dense_logprobs(model, 2 * params.beam_width))
    for out, ref, prompt in zip(outs, want, ids):
        assert len(out.sequences) == 3
        assert [s.tokens for s in out.sequences] == [s.tokens for s in ref.sequences]
        assert all(s.tokens[:len(prompt)] == prompt for s in out.sequences)
        for got, r in zip(out.sequences, ref.sequences):
            assert got.cum_logprob == pytest.approx(r.cum_logprob, abs=1e-4)
            assert got.text == tok.decode(got.tokens[len(prompt):], skip_special_tokens=True)
    bm = llm.engine.scheduler.block_manager
    assert not llm.engine.has_unfinished_requests() and bm.num_free_pages == bm.num_pages  # every page back
    assert bm.prefix_hits > 0  # the rounds reread the beams' shared full pages from the prefix cache
