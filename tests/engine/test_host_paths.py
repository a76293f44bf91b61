"""The engine's per-step host work, checked against plain per-row constructions: the runner's step inputs (built
from per-slot state with numpy) and the engine's output text (kept as a short window per request)."""
import numpy as np
import pytest

import ie_jax
from engine.config import EngineConfig
from engine.llm import LLM
from engine.request import Request
from engine.runner import ModelRunner
from engine.step_inputs import NUM_BANNED
from engine.scheduler import SchedulerOutput
from ie_jax import SamplingParams


@pytest.fixture(scope="module")
def tiny():
    return ie_jax.load_model("tiny-llama", dtype="float32", seed=1)


def expected_inputs(runner: ModelRunner, scheduled) -> dict[str, np.ndarray]:
    """What each step input must hold, row by row and token by token, written directly from the requests."""
    T, R = runner.bucket(sum(n for _, n in scheduled))
    V, P = runner.model_config.vocab_size, runner.config.page_size
    e = {k: v.copy() for k, v in vars(runner._empty_inputs(T, R)).items() if isinstance(v, np.ndarray)}
    pos = 0
    for r, (req, n) in enumerate(scheduled):
        start, slot, p = req.num_computed_tokens, runner.slot_of[req.request_id], req.sampling_params
        for i in range(n):
            t = req.all_token_ids[start + i]
            e["input_ids"][pos + i] = t
            e["from_slot"][pos + i] = slot if t < 0 else -1
            e["positions"][pos + i] = start + i
            e["slot_mapping"][pos + i] = req.page_ids[(start + i) // P] * P + (start + i) % P
        pos += n
        e["query_start_loc"][r + 1:] = pos
        e["seq_lens"][r] = start + n
        e["page_table"][r, :len(req.page_ids)] = req.page_ids
        e["logits_indices"][r], e["slots"][r] = pos - 1, slot
        e["sample_mask"][r] = start + n == req.num_tokens
        e["temperature"][r] = 0.0 if p.greedy else p.temperature
        e["top_k"][r] = p.top_k if 0 < p.top_k < V else 0
        e["top_p"][r], e["min_p"][r] = p.top_p, p.min_p
        e["repetition_penalty"][r] = p.repetition_penalty
        e["presence_penalty"][r], e["frequency_penalty"][r] = p.presence_penalty, p.frequency_penalty
        e["seeds"][r], e["step"][r] = req.seed % 2**32, len(req.output_token_ids)
        if len(req.output_token_ids) < p.min_tokens:
            banned = ((() if p.ignore_eos else req.eos_token_ids) + tuple(p.stop_token_ids))[:NUM_BANNED]
            e["suppress_eos"][r] = True
            e["eos_ids"][r, :len(banned)] = banned
    return e


def test_prepare_matches_a_per_row_construction(tiny):
    """A mixed step (a prompt chunk mid-prompt, a prompt's last chunk, decodes with a token still on the device,
    min_tokens, varied sampling), then the same requests a step later with new pages, and a reseated slot: every
    field equals the per-row construction, and rows of a released slot leave no stale pages behind."""
    model, _ = tiny
    cfg = EngineConfig(max_model_len=64, max_num_seqs=6, max_num_batched_tokens=64, page_size=4, num_pages=64,
                       token_buckets=(16, 64))
    runner = ModelRunner(model, cfg)
    rng = np.random.default_rng(0)
    pages = rng.permutation(64).tolist()  # pages are not contiguous
    kinds = [
        (20, [], 8, SamplingParams(temperature=0.0)),  # prompt chunk, mid-prompt: no sample
        (9, [], 5, SamplingParams(temperature=0.7, top_k=5, top_p=0.9, seed=3)),  # last chunk of the prompt
        (7, [11, -1], 1, SamplingParams(temperature=0.0, min_tokens=4, stop_token_ids=[5, 6])),  # token pending
        (5, [3, 4, 9], 1, SamplingParams(temperature=1.2, min_p=0.1, repetition_penalty=1.3, top_k=400)),
        (12, [8], 1, SamplingParams(temperature=0.5, presence_penalty=0.5, frequency_penalty=-0.2, ignore_eos=True,
                                    min_tokens=3)),
    ]
    requests, scheduled = [], []
    for i, (prompt_len, outputs, n, params) in enumerate(kinds):
        req = Request(f"r{i}", rng.integers(0, 200, prompt_len).tolist(), params, seed=1000 + i,
                      eos_token_ids=(258, 259))
        req.output_token_ids = list(outputs)
        req.num_computed_tokens = {8: 4, 5: 4}.get(n, req.num_tokens - 1)
        need = -(-(req.num_computed_tokens + n) // 4)
        req.page_ids, pages = pages[:need], pages[need:]
        requests.append(req)
        scheduled.append((req, n))
    first_pages = [list(r.page_ids) for r in requests]
    for _ in range(2):
        want = expected_inputs(runner, scheduled) if runner.slot_of else None
        inp, samples = runner.prepare(SchedulerOutput(scheduled, []))
        want = want or expected_inputs(runner, scheduled)  # first call: slots are assigned by prepare
        for name, value in want.items():
            np.testing.assert_array_equal(getattr(inp, name), value, err_msg=name)
        assert samples == want["sample_mask"][:len(scheduled)].tolist()
        ran, scheduled = scheduled, []
        for req, n in ran:  # the step ran; decodes sampled a pending token
            req.num_computed_tokens += n
            if req.num_computed_tokens == req.num_tokens:
                req.output_token_ids.append(-1)
            n = 1 if req.num_computed_tokens == req.num_tokens - 1 else 4
            k = max(0, -(-(req.num_computed_tokens + n) // 4) - len(req.page_ids))  # pages for the next step
            req.page_ids, pages = req.page_ids + pages[:k], pages[k:]
            scheduled.append((req, n))
    assert any(len(r.page_ids) > len(p) for r, p in zip(requests, first_pages))  # pages grew in between
    # A released slot is reseated with a shorter page list: no page of the old request may remain in its row.
    old_slot = runner.slot_of["r3"]
    runner.release_slot(requests[3])
    new = Request("new", [1, 2, 3], SamplingParams(temperature=0.0), seed=0)
    new.page_ids = [63]
    inp, _ = runner.prepare(SchedulerOutput([(new, 3)], []))
    assert runner.slot_of["new"] == old_slot
    np.testing.assert_array_equal(inp.page_table[0], [63] + [0] * (cfg.max_pages_per_seq - 1))


@pytest.mark.parametrize("stops, include", [
    ((3, 4), False),  # one stop string of 4 characters, cut from the text at offset 3
    ((7, 2), True),  # included in the output
    ((9, 3, "zzzzzzzzzzzz"), False),  # with a longer stop string that never matches: a wider window
    ((), False),  # no stop strings, EOS possible (not ignored)
])
def test_streamed_text_matches_the_reference_generate(tiny, stops, include):
    """The engine keeps only a short window of each request's text; what it streams, joined, and where it stops
    must be the reference generate's (which keeps the whole text), for prompts of different lengths in one
    batch, stop strings that straddle token boundaries, and stop strings held back and then released."""
    model, tok = tiny
    prompts = ["Hello there", "a", "The quick brown fox", "xyz" * 5]
    base = ie_jax.generate(model, tok, prompts, SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True))
    params = []
    for out in base:
        text = out.outputs[0].text
        stop = [text[stops[0]: stops[0] + stops[1]], *stops[2:]] if stops else []
        params.append(SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=bool(stops),
                                     stop=stop, include_stop_str_in_output=include))
    expected = [ie_jax.generate(model, tok, [p], q)[0].outputs[0] for p, q in zip(prompts, params)]
    llm = LLM(model, tokenizer=tok, max_model_len=96, max_num_seqs=4, max_num_batched_tokens=64, page_size=8,
              progress=False)
    streamed = {}
    for i, (p, q) in enumerate(zip(prompts, params)):
        llm.engine.add_request(str(i), p, q)
    finals = {}
    while llm.engine.has_unfinished_requests():
        for out in llm.engine.step():
            streamed[out.request_id] = streamed.get(out.request_id, "") + out.new_text
            if out.finished:
                finals[out.request_id] = out
    for i, e in enumerate(expected):
        assert streamed[str(i)] == e.text
        assert finals[str(i)].finish_reason == e.finish_reason and finals[str(i)].stop_reason == e.stop_reason
    if stops:
        assert all(e.finish_reason == "stop" for e in expected)  # every stop string was met
    got = llm.generate(prompts, params, use_tqdm=False)
    assert [g.outputs[0].text for g in got] == [e.text for e in expected]
    assert [g.outputs[0].token_ids for g in got] == [e.token_ids for e in expected]
