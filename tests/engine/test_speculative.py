"""Prompt-lookup speculative decoding (engine/speculative.py): drafts checked as one-token rows of the same
sequence give exactly the tokens plain decoding gives, with fewer steps where the text repeats."""
import numpy as np
import pytest

import ie_jax
from engine.config import EngineConfig
from engine.llm import LLM
from engine.speculative import History, SpeculativeConfig, accepted, propose
from ie_jax import SamplingParams

# the tiny random model falls into loops, which prompt lookup then predicts
PROMPTS = ["abcabcabcabcabc", "The quick brown fox", "1 2 3 1 2 3 1 2", "xyz", "Hello there, hello there"]
SPEC = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3}


@pytest.fixture(scope="module")
def tiny():
    return ie_jax.load_model("tiny-llama", dtype="float32", seed=1)


def make_llm(tiny, **kw):
    model, tok = tiny
    args = dict(max_model_len=128, max_num_seqs=16, max_num_batched_tokens=32, page_size=8, progress=False,
                speculative_config=SPEC)
    return LLM(model, tokenizer=tok, **{**args, **kw})


def reference(tiny, prompts, params):
    model, tok = tiny
    return [o.token_ids for o in ie_jax.generate(model, tok, prompts, params)]


def test_propose_finds_the_latest_longest_recurrence():
    assert propose([1, 2, 3, 9, 1, 2, 3, 7, 1, 2, 3], k=3, n_max=3, n_min=1) == [7, 1, 2]  # the latest "1 2 3"
    assert propose([5, 6, 7, 5, 6, 8, 6], k=2, n_max=3, n_min=1) == [8, 6]  # no "5 6"+"6": the 1-gram "6"
    assert propose([4, 4, 4], k=5, n_max=2, n_min=1) == [4]  # overlapping: what followed the latest "4 4"
    assert propose([1, 2, 3], k=4, n_max=2, n_min=1) == []
    assert propose([1, 2, 1, 3, 1], k=4, n_max=2, n_min=2) == []  # no bigram recurs; n_min forbids unigrams
    assert accepted([5, 6, 7], [5, 6, 9, 1]) == 2 and accepted([5], [4, 1]) == 0 and accepted([], [3]) == 0


def test_propose_equals_a_brute_force_search_and_the_history_buffer_keeps_up():
    rng = np.random.default_rng(3)

    def brute(tokens, k, n_max, n_min):
        for n in range(min(n_max, len(tokens) - 1), n_min - 1, -1):
            for start in range(len(tokens) - 1 - n, -1, -1):
                if tokens[start:start + n] == tokens[len(tokens) - n:]:
                    return tokens[start + n:start + n + k]
        return []
    for _ in range(3000):
        tokens = rng.integers(0, 4, rng.integers(1, 30)).tolist()
        n_max = int(rng.integers(1, 5))
        n_min, k = int(rng.integers(1, n_max + 1)), int(rng.integers(1, 5))
        assert propose(tokens, k, n_max, n_min) == brute(tokens, k, n_max, n_min), (tokens, k, n_max, n_min)
    history, prompt, outputs = History(), rng.integers(0, 9, 300).tolist(), []
    for _ in range(400):  # the buffer grows past its first size and stays equal to the text
        outputs.append(int(rng.integers(0, 9)))
        assert history.tokens(prompt, outputs).tolist() == prompt + outputs


def test_config_is_vllms_and_checked():
    c = EngineConfig(speculative_config='{"method": "ngram", "num_speculative_tokens": 3}').speculative_config
    assert c == SpeculativeConfig("ngram", 3, 4, 1)
    for bad, word in (({"method": "eagle"}, "only 'ngram'"), ({"num_speculative_tokens": 0}, ">= 1"),
                      ({"prompt_lookup_min": 3, "prompt_lookup_max": 2}, "1 <= min <= max"),
                      ({"model": "x"}, "keys \\['model'\\]")):
        with pytest.raises(ValueError, match=word):
            EngineConfig(speculative_config=bad)


def test_greedy_outputs_are_exact_and_take_fewer_steps(tiny):
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    want = reference(tiny, PROMPTS, params)
    llm = make_llm(tiny)
    engine = llm.engine
    for i, p in enumerate(PROMPTS):
        engine.add_request(str(i), p, params)
    steps, got = 0, {}
    while engine.has_unfinished_requests():
        steps += 1
        for o in engine.step():
            got.setdefault(o.request_id, []).extend(o.new_token_ids)
    assert [got[str(i)] for i in range(len(PROMPTS))] == want
    assert engine.num_accepted_tokens > 20 and engine.num_draft_tokens > engine.num_accepted_tokens
    assert steps < 40  # one prefill step, then 39 tokens of each: fewer steps than tokens
    assert engine.block_manager.num_free_pages == engine.runner.num_pages  # every page back, none leaked


def test_mixed_batch_stops_limits_and_preemption(tiny):
    """Beside sampled, penalised and logprob rows (which never speculate), with stop strings, EOS, short
    max_tokens and a page pool small enough to preempt: every output is plain decoding's."""
    greedy = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
    cases = [(PROMPTS[0], greedy), (PROMPTS[2], SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)),
             (PROMPTS[1], SamplingParams(temperature=0.8, seed=7, max_tokens=12, ignore_eos=True)),
             (PROMPTS[4], SamplingParams(temperature=0.0, max_tokens=20, repetition_penalty=1.3, ignore_eos=True)),
             (PROMPTS[3], SamplingParams(temperature=0.0, max_tokens=25))]  # stops at EOS if the model says so
    plain = make_llm(tiny, speculative_config=None)
    want = [o.outputs[0] for o in plain.generate([p for p, _ in cases], [s for _, s in cases], use_tqdm=False)]
    text = want[0].text
    stop = text[12:15]  # a stop string inside the greedy loop: it ends a run of accepted drafts
    cases.append((PROMPTS[0], SamplingParams(temperature=0.0, max_tokens=30, stop=[stop], ignore_eos=True)))
    want.append(plain.generate([PROMPTS[0]], cases[-1][1], use_tqdm=False)[0].outputs[0])
    assert want[-1].text == text[:text.index(stop)]
    # as they come: seats to spare; 64 tokens of KV for six requests of up to 45 (preempts); four seats for six
    # requests (queued prompts and a full batch run overlapped steps, speculation resumes when seats free up)
    for kw in ({}, {"max_model_len": 64, "num_pages": 8}, {"max_num_seqs": 4}):
        llm = make_llm(tiny, **kw)
        got = [o.outputs[0] for o in llm.generate([p for p, _ in cases], [s for _, s in cases], use_tqdm=False)]
        assert [g.token_ids for g in got] == [w.token_ids for w in want]
        assert [g.text for g in got] == [w.text for w in want]
        assert llm.engine.num_accepted_tokens > 0
        if "num_pages" in kw:
            assert llm.engine.scheduler.num_preemptions > 0
    logprobs = SamplingParams(temperature=0.0, max_tokens=8, logprobs=2, ignore_eos=True)
    got = make_llm(tiny).generate(PROMPTS[:2], [greedy, logprobs], use_tqdm=False)
    assert [o.outputs[0].token_ids for o in got] == [reference(tiny, PROMPTS[:1], greedy)[0],
                                                     reference(tiny, PROMPTS[1:2], logprobs)[0]]
    assert all(2 <= len(lp) <= 3 for lp in got[1].outputs[0].logprobs) and np.isfinite(
        [v for lp in got[1].outputs[0].logprobs for v in lp.values()]).all()


def test_sampled_requests_speculate_and_keep_their_seeded_text(tiny):
    """A sampled row's draft token stands when the row's own sample (seeded by its output position) equals it:
    rejection sampling for a fixed draft, and the same text as without speculation."""
    params = [SamplingParams(temperature=t, top_p=p, seed=s, max_tokens=40, ignore_eos=True)
              for t, p, s in ((0.02, 1.0, 1), (0.05, 0.9, 2), (1.0, 1.0, 3), (0.02, 1.0, 4))]
    plain = make_llm(tiny, speculative_config=None).generate(PROMPTS[:4], params, use_tqdm=False)
    llm = make_llm(tiny)
    got = llm.generate(PROMPTS[:4], params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in plain]
    assert llm.engine.num_accepted_tokens > 10  # near-greedy temperatures loop too: their drafts are taken
