"""Engine == reference generate, token for token, across batching, chunking, prefix hits, preemption, n and seeds."""
import dataclasses
import threading
import time

import jax
import numpy as np
from flax import nnx
import pytest

import ie_jax
from engine.config import EngineConfig
from engine.llm import LLM
from engine.llm_engine import LLMEngine
from engine.step_inputs import StepInputs
from ie_jax import SamplingParams

PROMPTS = ["Hello there", "a", "The quick brown fox jumps over the lazy dog, twice over", "xyz" * 9, "0123456789"]


@pytest.fixture(scope="module")
def tiny():
    return ie_jax.load_model("tiny-llama", dtype="float32", seed=1)


def make_llm(tiny, **kw):
    model, tok = tiny
    args = dict(max_model_len=96, max_num_seqs=4, max_num_batched_tokens=64, page_size=8, progress=False)
    return LLM(model, tokenizer=tok, **{**args, **kw})


def reference(tiny, prompts, params):
    model, tok = tiny
    return [o.token_ids for o in ie_jax.generate(model, tok, prompts, params)]


GREEDY = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)


def test_engine_equals_reference_with_chunked_prefill_and_no_recompiles(tiny):
    llm = make_llm(tiny, max_num_batched_tokens=16, token_buckets=(4, 8, 16))  # prompts > budget: chunked
    compiled = llm.engine.runner.num_compiled()
    assert compiled == 4  # 3 token buckets, + an argmax-only variant of the one with T <= max_num_seqs
    got = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert [o.token_ids for o in got] == reference(tiny, PROMPTS, GREEDY)
    assert [o.text for o in got] == [tiny[1].decode(o.token_ids) for o in got]
    assert llm.engine.runner.num_compiled() == compiled  # nothing compiled after warm-up
    assert llm.engine.block_manager.num_free_pages == llm.engine.block_manager.num_pages


def test_requests_arriving_at_different_steps(tiny):
    llm = make_llm(tiny)
    engine = llm.engine
    expected = reference(tiny, PROMPTS, GREEDY)
    got = {}
    pending = list(enumerate(PROMPTS))
    while pending or engine.has_unfinished_requests():
        if pending:  # one new request every step
            i, p = pending.pop(0)
            engine.add_request(str(i), p, GREEDY)
        for out in engine.step():
            got.setdefault(int(out.request_id), []).extend(out.new_token_ids)
    assert [got[i] for i in range(len(PROMPTS))] == expected


def test_prefix_cache_hits_give_identical_tokens(tiny):
    system = "You are a helpful assistant. Answer briefly and clearly. "
    prompts = [system + q for q in ("What is 2+2?", "Name a colour.", "Say hi.")]
    llm = make_llm(tiny, max_model_len=128)
    first = llm.generate(prompts[:1], GREEDY, use_tqdm=False)
    rest = llm.generate(prompts[1:], GREEDY, use_tqdm=False)
    assert [o.token_ids for o in first + rest] == reference(tiny, prompts, GREEDY)
    bm = llm.engine.block_manager
    assert bm.prefix_hits >= 2 * 7 * 8  # the shared system prompt's 7 full pages, for both later requests
    assert bm.num_free_pages == bm.num_pages


def test_preemption_by_recompute_changes_nothing(tiny):
    long = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
    llm = make_llm(tiny, num_pages=12, max_num_seqs=4)  # 96 tokens of KV for 4 requests of ~45: must preempt
    got = llm.generate(PROMPTS[:4], long, use_tqdm=False)
    assert [o.token_ids for o in got] == reference(tiny, PROMPTS[:4], long)
    assert llm.engine.scheduler.num_preemptions > 0
    assert llm.engine.block_manager.num_free_pages == 12


def test_seeded_sampling_and_n_match_reference_whatever_the_batch(tiny):
    seeded = SamplingParams(n=2, temperature=0.9, top_p=0.95, top_k=50, max_tokens=8, seed=42, ignore_eos=True,
                            presence_penalty=0.5, repetition_penalty=1.2)
    others = SamplingParams(temperature=1.0, max_tokens=5, ignore_eos=True)
    model, tok = tiny
    expected = [c.token_ids for c in ie_jax.generate(model, tok, ["seeded"], seeded)[0].outputs]
    llm = make_llm(tiny)
    alone = llm.generate(["seeded"], seeded, use_tqdm=False)[0]
    mixed = llm.generate(["x", "seeded", "yy"], [others, seeded, others], use_tqdm=False)[1]
    assert [c.token_ids for c in alone.outputs] == expected == [c.token_ids for c in mixed.outputs]
    assert expected[0] != expected[1]


def test_stop_strings_and_logprobs_through_the_engine(tiny):
    model, tok = tiny
    base = ie_jax.generate(model, tok, "stop me", GREEDY)[0]
    stop = base.text[3:5]
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True, stop=[stop], logprobs=3)
    expected = ie_jax.generate(model, tok, "stop me", params)[0].outputs[0]
    llm = make_llm(tiny)
    streamed = ""
    llm.engine.add_request("s", "stop me", params)
    while llm.engine.has_unfinished_requests():
        for out in llm.engine.step():
            streamed += out.new_text
            last = out
    assert streamed == expected.text == base.text[: base.text.index(stop)]
    assert last.finish_reason == "stop" and last.stop_reason == stop
    got = llm.generate(["stop me"], params, use_tqdm=False)[0].outputs[0]
    assert got.token_ids == expected.token_ids
    for a, b in zip(got.logprobs, expected.logprobs):
        assert a.keys() == b.keys()
        np.testing.assert_allclose(list(a.values()), [b[k] for k in a], atol=1e-4)


def test_abort_and_bad_requests(tiny):
    llm = make_llm(tiny)
    engine = llm.engine
    engine.add_request("a", "abc", SamplingParams(max_tokens=50, ignore_eos=True))
    engine.add_request("b", "abcd", SamplingParams(max_tokens=50, ignore_eos=True))
    engine.step()
    engine.abort_request("a")
    engine.step()
    engine.abort_request("b")
    assert not engine.has_unfinished_requests()
    assert engine.block_manager.num_free_pages == engine.block_manager.num_pages
    assert sorted(engine.runner.free_slots) == list(range(4))
    with pytest.raises(ValueError, match="maximum context length is 96"):
        engine.add_request("c", "x" * 90, SamplingParams(max_tokens=10))
    with pytest.raises(ValueError, match="empty"):
        engine.add_request("d", [], SamplingParams())
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request("e", "hi", SamplingParams())
        engine.add_request("e", "hi", SamplingParams())


def test_step_executables_hold_no_device_conditionals(tiny):
    """XLA on GPU runs a `conditional` by reading its predicate back to the host, which stalls the launch of the
    step and breaks host/device overlap; the engine's compiled steps must contain none."""
    llm = make_llm(tiny, token_buckets=(4, 64))
    executables = llm.engine.runner.executables
    llm.generate(PROMPTS[:2], [SamplingParams(temperature=0.7, max_tokens=2),
                               SamplingParams(temperature=0.7, top_k=5, max_tokens=2)], use_tqdm=False)
    assert sorted(executables) == [(4, 4, "draw"), (4, 4, "full"), (4, 4, "greedy"), (4, 4, "sort"),
                                   (64, 4, "full")]
    for key, executable in executables.items():
        assert "conditional(" not in executable.as_text(), key


def test_unrolled_layers_match_the_layer_loop_and_hold_no_while(tiny):
    """The default step runs the layers as straight-line code over per-layer weights: same tokens as the device
    loop over the stacked weights, the layer loop gone from the compiled step, and the caller's model untouched."""
    model, _ = tiny
    before = [np.asarray(x) for x in jax.tree.leaves(nnx.state(model.layers))]
    looped = make_llm(tiny, unroll_layers=False, token_buckets=(8, 64))
    unrolled = make_llm(tiny, token_buckets=(8, 64))
    assert unrolled.engine.runner.layer_states is not None and looped.engine.runner.layer_states is None
    # The layer loop is gone; other small loops (searchsorted's) stay.
    for key, executable in unrolled.engine.runner.executables.items():
        assert executable.as_text().count(" while(") < looped.engine.runner.executables[key].as_text().count(
            " while("), key
    sampled = SamplingParams(temperature=0.8, top_p=0.9, max_tokens=12, seed=3, ignore_eos=True)
    for params in (GREEDY, sampled):
        a = [o.token_ids for o in looped.generate(PROMPTS, params, use_tqdm=False)]
        b = [o.token_ids for o in unrolled.generate(PROMPTS, params, use_tqdm=False)]
        assert a == b
    after = jax.tree.leaves(nnx.state(model.layers))
    assert all(np.array_equal(x, np.asarray(y)) for x, y in zip(before, after))  # not owned: not released


def test_engine_that_loads_its_model_releases_the_stacked_weights():
    llm = LLM("tiny-llama", max_model_len=64, max_num_seqs=2, max_num_batched_tokens=16, page_size=8,
              token_buckets=(8, 16), progress=False)
    assert all(x.shape[0] == 0 for x in jax.tree.leaves(nnx.state(llm.model.layers)))
    layer_states = llm.engine.runner.layer_states
    assert len(layer_states) == llm.model.config.num_layers
    out = llm.generate(["abc"], GREEDY, use_tqdm=False)
    assert len(out[0].token_ids) == 10


def test_background_compile_of_step_variants(tiny):
    """The server's start-up builds only the full-sampler steps; the cheaper variants (argmax only, no logprobs,
    no sort) arrive on a background thread, and requests give the same tokens before and after they do."""
    model, tok = tiny
    config = EngineConfig(max_model_len=96, max_num_seqs=4, max_num_batched_tokens=64, page_size=8,
                          token_buckets=(4, 64))
    engine = LLMEngine(model, tok, config, progress=False, background_extras=True)
    runner = engine.runner
    assert {(4, 4, "full"), (64, 4, "full")} <= set(runner.executables)
    llm = make_llm(tiny, token_buckets=(4, 64))
    seeded = SamplingParams(temperature=0.9, max_tokens=10, seed=11, ignore_eos=True)
    want = [[o.token_ids for o in llm.generate(PROMPTS, params, use_tqdm=False)] for params in (GREEDY, seeded)]
    runner.extras_thread.join(timeout=300)
    assert sorted(runner.executables) == [(4, 4, "draw"), (4, 4, "full"), (4, 4, "greedy"), (4, 4, "sort"),
                                          (64, 4, "full")]
    llm.engine = engine
    assert [[o.token_ids for o in llm.generate(PROMPTS, params, use_tqdm=False)]
            for params in (GREEDY, seeded)] == want


def test_step_variant_is_the_cheapest_that_serves_every_row():
    from engine.variants import row_variant, step_variant
    V = 300

    def of(*params):
        return step_variant(row_variant(p, V) for p in params)

    greedy, draw = SamplingParams(temperature=0.0, top_p=0.5), SamplingParams(temperature=0.7, top_k=-1)
    nucleus, top_k, full_k = (SamplingParams(temperature=0.7, top_p=0.9), SamplingParams(temperature=0.7, top_k=5),
                              SamplingParams(temperature=0.7, top_k=V))
    assert of(greedy) == "greedy"  # a greedy row's top_p is never used
    assert of(greedy, draw) == "draw"
    assert of(greedy, full_k) == "draw"  # top-k of the whole vocabulary filters nothing
    assert of(draw, nucleus) == of(top_k, greedy) == "sort"
    assert of(greedy, SamplingParams(temperature=0.0, logprobs=0)) == "full"
    assert of(draw, SamplingParams(temperature=0.7, logprobs=2)) == "full"
    # "greedy" is the raw argmax: greedy rows with a penalty or min_tokens take "draw" (penalised argmax)
    for kw in (dict(repetition_penalty=1.1), dict(presence_penalty=0.5), dict(frequency_penalty=-0.3),
               dict(min_tokens=2)):
        assert of(SamplingParams(temperature=0.0, **kw)) == "draw"
        assert of(greedy, SamplingParams(temperature=0.0, **kw)) == "draw"


def test_penalised_greedy_rows_keep_their_penalties(tiny):
    """A greedy batch where one row has a repetition penalty and one has min_tokens runs "draw", not the argmax-only
    "greedy" step, and gives the reference generate's tokens; the same batch without them runs "greedy"."""
    params = [SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True, repetition_penalty=1.5 if i == 1
                             else 1.0) for i in range(len(PROMPTS))]
    params[2] = SamplingParams(temperature=0.0, max_tokens=10, min_tokens=4)
    llm = make_llm(tiny, token_buckets=(4, 64))
    ran, run = [], llm.engine.runner.run
    llm.engine.runner.run = lambda inp, v="full", decode_only=False: (ran.append(v), run(inp, v, decode_only))[1]
    got = [o.token_ids for o in llm.generate(PROMPTS, params, use_tqdm=False)]
    assert got == [reference(tiny, [p], q)[0] for p, q in zip(PROMPTS, params)]
    assert "draw" in ran  # the steps holding a penalised row (the others may run "greedy")
    ran.clear()
    plain = [o.token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]
    assert plain == reference(tiny, PROMPTS, GREEDY) and "greedy" in ran and "draw" not in ran
    assert got[1] != plain[1]  # the penalty changed that row: an argmax-only step would have lost it


@pytest.mark.parametrize("variant", ["sort", "draw"])
def test_cheaper_variants_sample_the_same_tokens_as_the_full_one(tiny, variant):
    """Offline generate compiles the variant its requests use before the first step (nothing compiles during the
    run), and that variant draws the same seeded tokens as the full sampler does (an engine without it)."""
    params = [SamplingParams(temperature=0.8, max_tokens=12, seed=5 + i, ignore_eos=True,
                             top_p=0.85 if variant == "sort" and i % 2 else 1.0,
                             repetition_penalty=1.2 if i == 2 else 1.0) for i in range(len(PROMPTS))]
    params[3] = dataclasses.replace(params[3], temperature=0.0)  # a greedy row in the sampled steps
    full = make_llm(tiny, token_buckets=(4, 64))
    full.engine.runner.ensure_variants = lambda variants, progress=True: None  # keeps it on "full"
    want = [o.token_ids for o in full.generate(PROMPTS, params, use_tqdm=False)]
    assert all((4, 4, v) not in full.engine.runner.executables for v in ("sort", "draw"))
    llm = make_llm(tiny, token_buckets=(4, 64))
    ran, run = [], llm.engine.runner.run
    llm.engine.runner.run = lambda inp, v="full", decode_only=False: (ran.append(v), run(inp, v, decode_only))[1]
    got = [o.token_ids for o in llm.generate(PROMPTS, params, use_tqdm=False)]
    assert (4, 4, variant) in llm.engine.runner.executables
    assert variant in ran and got == want


def test_decode_only_steps_run_their_decode_twins(tiny):
    """With decode twins on (the default on a Hopper GPU), warm-up also builds "<variant>/decode" for the
    decode-sized buckets; a step whose requests all have one token runs the twin, any other step the plain
    variant, and the tokens are those of an engine without twins (greedy, prompts of mixed lengths)."""
    want = [o.token_ids for o in make_llm(tiny, token_buckets=(4, 64)).generate(PROMPTS, GREEDY, use_tqdm=False)]
    llm = make_llm(tiny, token_buckets=(4, 64), decode_steps=True)
    runner = llm.engine.runner
    assert (4, 4, "greedy/decode") in runner.executables
    assert not any(T == 64 and v.endswith("/decode") for T, _, v in runner.executables)  # prefill-sized: none
    ran, run = [], runner.run

    def watched(inp, v="full", decode_only=False):
        res = run(inp, v, decode_only)
        ran.append((decode_only, runner.last_variant))
        return res
    runner.run = watched
    assert [o.token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)] == want
    assert (True, "greedy/decode") in ran and any(not decode for decode, _ in ran)
    assert all(v.endswith("/decode") == decode for decode, v in ran)


def test_batch_one_decodes_in_the_argmax_twin_of_the_smallest_bucket(tiny):
    """max_num_seqs under the smallest bucket (batch 1 decodes in T = 4 here, 8 by default): that bucket is still
    decode-sized, so warm-up builds its argmax-only decode twin and batch-1 decode runs it, not the full sampler."""
    llm = make_llm(tiny, max_num_seqs=1, max_num_batched_tokens=16, token_buckets=(4, 16), decode_steps=True)
    runner = llm.engine.runner
    assert (4, 1, "greedy/decode") in runner.executables and (4, 1, "greedy") in runner.executables
    assert not any(T == 16 and v != "full" for T, _, v in runner.executables)
    ran, run = [], runner.run

    def watched(inp, v="full", decode_only=False):
        res = run(inp, v, decode_only)
        ran.append(runner.last_variant)
        return res
    runner.run = watched
    got = llm.generate(PROMPTS[2:3], GREEDY, use_tqdm=False)
    assert [o.token_ids for o in got] == reference(tiny, PROMPTS[2:3], GREEDY)
    assert ran.count("greedy/decode") == GREEDY.max_tokens - 1  # every step after the prompt's


def test_ops_decode_only_takes_the_decode_kernel(monkeypatch):
    """ops.paged_attention(decode_only=True) on the kernel backend runs paged_decode; without it, the packed kernel."""
    from kernels_pallas import ops, paged_decode
    from tests.kernels.test_paged_attention import make_batch
    q, k, v, pt, qsl, sl, n = make_batch(60, q_lens=[1, 1], seq_lens=[20, 47], K=2, G=4, H=128)
    calls, real = [], paged_decode.decode_attention
    monkeypatch.setattr(paged_decode, "decode_attention", lambda *a, **kw: (calls.append(1), real(*a, **kw))[1])
    with ops.kernel_backend("interpret"):
        tiles = ops.paged_attention(q, k[None], v[None], 0, pt, qsl, sl, n, decode_only=True)
        assert len(calls) == 1
        packed = ops.paged_attention(q, k[None], v[None], 0, pt, qsl, sl, n)
        assert len(calls) == 1
    np.testing.assert_allclose(np.asarray(tiles, np.float32), np.asarray(packed, np.float32), atol=2e-2)


def test_warmup_lowers_one_bucket_at_a_time(tiny):
    """Mosaic GPU's emitter keeps process-global state while lowering a kernel, so warm-up may compile buckets on
    several threads but must lower them one at a time (otherwise kernels and cache keys vary from run to run)."""
    model, tok = tiny
    config = EngineConfig(max_model_len=96, max_num_seqs=4, max_num_batched_tokens=64, page_size=8,
                          token_buckets=(4, 16, 32, 64))
    engine = LLMEngine(model, tok, config, warmup=False)
    runner, step = engine.runner, engine.runner._step
    active, most = [0], [0]
    lock = threading.Lock()

    class CountingStep:  # the jitted step, with its `lower` watched
        def lower(self, *args):
            with lock:
                active[0] += 1
                most[0] = max(most[0], active[0])
            time.sleep(0.05)  # give a racing thread the chance to enter
            try:
                return step.lower(*args)
            finally:
                with lock:
                    active[0] -= 1

    runner._step = CountingStep()
    runner.warmup(progress=False, max_workers=4)
    assert most[0] == 1
    assert len(runner.executables) == 5  # 4 full-sampler steps + the one argmax-only decode bucket
    assert runner.warmup_times["lower"] > 0 and runner.warmup_times["compile"] > 0


@pytest.mark.parametrize("method", ["int8", "awq", "fp8"])
def test_engine_serves_quantized_models_like_the_reference(method):
    from ie_jax.quant import quantize_model
    model, tok = ie_jax.load_model("tiny-llama", dtype="float32", seed=1)
    quantize_model(model, method, group_size=32)
    llm = make_llm((model, tok), token_buckets=(8, 64))
    got = [o.token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]
    assert got == reference((model, tok), PROMPTS, GREEDY)


def test_step_inputs_cross_as_one_buffer_and_unpack_exactly(tiny):
    """The runner sends a step's inputs as one int32 buffer; unpacking it on device gives every field back, bit for
    bit (f32 and uint32 fields travel as their bit patterns, bools as 0/1)."""
    llm = make_llm(tiny)
    inp = llm.engine.runner._empty_inputs(16, 4)
    rng = np.random.default_rng(0)
    for f in dataclasses.fields(inp):
        a = np.asarray(getattr(inp, f.name))
        if a.dtype == np.bool_:
            value = rng.random(a.shape) < 0.5
        elif a.dtype == np.float32:
            value = rng.standard_normal(a.shape).astype(np.float32)
        else:
            value = rng.integers(-2**31 if a.dtype == np.int32 else 0, 2**31 - 1, a.shape).astype(a.dtype)
        inp = inp.replace(**{f.name: value})
    packed = inp.pack()
    assert packed.dtype == np.int32 and packed.ndim == 1
    offset = 0  # every field starts 256-byte aligned (kernels take slices of the buffer as their operands)
    for f in dataclasses.fields(inp):
        a = np.asarray(getattr(inp, f.name))
        want = (a.astype(np.int32) if a.dtype == np.bool_ else a.view(np.int32)).ravel()
        assert offset % 64 == 0
        np.testing.assert_array_equal(packed[offset: offset + want.size], want, err_msg=f.name)
        offset += -(-want.size // 64) * 64
    assert offset == packed.size
    back = jax.jit(StepInputs.unpack, static_argnums=1)(packed, inp.layout())
    for f in dataclasses.fields(inp):
        want, got = np.asarray(getattr(inp, f.name)), np.asarray(getattr(back, f.name))
        assert got.dtype == want.dtype and got.shape == want.shape, f.name
        np.testing.assert_array_equal(got, want, err_msg=f.name)


def test_step_xla_options_parse_and_reject_bad_input(monkeypatch):
    from engine.runner import STEP_COMPILER_OPTIONS, parse_xla_options, step_compiler_options
    assert parse_xla_options(" xla_a=true, xla_b=3,xla_c=1.5,xla_d=LHS,") == dict(xla_a=True, xla_b=3, xla_c=1.5,
                                                                                  xla_d="LHS")
    for bad in ("xla_a", "gpu_enable_pdl=true", "=1"):
        with pytest.raises(ValueError, match="must read xla_<name>=<value>"):
            parse_xla_options(bad)
    monkeypatch.setenv("IE_JAX_XLA_OPTIONS", "xla_gpu_enable_pdl=false,xla_gpu_dot_merger_threshold_mb=5")
    got = step_compiler_options("xla_gpu_enable_pdl=true")  # later ones win
    assert got == {**STEP_COMPILER_OPTIONS, "xla_gpu_dot_merger_threshold_mb": 5, "xla_gpu_enable_pdl": True}


def test_priming_every_executable_leaves_the_engine_state_unchanged(tiny):
    """Warm-up's first runs (GPU: `ModelRunner.prime`) execute each step on all-padding inputs: the KV cache, the
    penalty counts and the last tokens must come back bit for bit, mid-generation too, and the tokens must not
    change. Run here on CPU, where warm-up itself skips it."""
    params = SamplingParams(temperature=0.8, top_k=20, max_tokens=12, ignore_eos=True, seed=3,
                            repetition_penalty=1.3)
    want = [o.token_ids for o in make_llm(tiny).generate(PROMPTS, params, use_tqdm=False)]
    llm = make_llm(tiny)
    engine, runner = llm.engine, llm.engine.runner
    assert runner.warmup_times["prime"] == 0.0  # CPU: warm-up does not prime
    for i, p in enumerate(PROMPTS):
        engine.add_request(str(i), p, params)
    outs = {}

    def step():
        for o in engine.step():
            outs.setdefault(o.request_id, []).extend(o.new_token_ids)

    for _ in range(3):  # some KV, penalty counts and last tokens in place, a step in flight
        step()
    jax.block_until_ready((runner.caches, runner.counts, runner.last_tokens))
    before = [np.asarray(x).copy() for x in jax.tree.leaves((runner.caches, runner.counts, runner.last_tokens))]
    runner.prime(list(runner.executables))
    after = [np.asarray(x) for x in jax.tree.leaves((runner.caches, runner.counts, runner.last_tokens))]
    assert len(before) == len(after) and all(np.array_equal(a, b) for a, b in zip(before, after))
    while engine.has_unfinished_requests():
        step()
    assert [outs[str(i)] for i in range(len(PROMPTS))] == want


def test_the_server_primes_its_executables_in_idle_time_without_changing_outputs(tiny):
    """The server's warm-up leaves the first runs to the engine loop's idle time (`prime_next`, GPU only; forced on
    here): before the first request each compiled executable, the background variants included, runs once, and the
    tokens are those of an engine that never primed."""
    import asyncio
    import time

    from engine.async_llm import AsyncLLM
    from engine.config import EngineConfig
    from engine.llm_engine import LLMEngine

    model, tok = tiny
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    want = [o.token_ids for o in make_llm(tiny).generate(PROMPTS[:2], params, use_tqdm=False)]
    config = EngineConfig(max_model_len=96, max_num_seqs=4, max_num_batched_tokens=64, page_size=8)
    engine = LLMEngine(model, tok, config, progress=False, background_extras=True)
    runner = engine.runner
    assert runner.defer_priming and runner.warmup_times["prime"] == 0.0 and not runner.primed
    runner.priming = True  # as on a GPU
    llm = AsyncLLM(engine)
    try:
        runner.extras_thread.join()
        deadline = time.monotonic() + 120
        while runner.primed != set(runner.executables) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert runner.primed == set(runner.executables) and len(runner.primed) > len(config.buckets)
        assert runner.prime_next() is False  # nothing left

        async def one(i, prompt):
            ids = tok.encode(prompt)
            return [t async for out in llm.generate(ids, params, str(i)) for t in out.new_token_ids]

        async def both():
            return await asyncio.gather(*(one(i, p) for i, p in enumerate(PROMPTS[:2])))

        assert asyncio.run(both()) == want
    finally:
        llm.shutdown()


_FROZEN_HEAP_CHECK = """
import gc, weakref
import ie_jax
from engine.llm import LLM
from engine.llm_engine import frozen_heap
from ie_jax import SamplingParams

class Node:
    pass

before = gc.get_freeze_count()  # the interpreter may start with some frozen
a = Node()
a.self = a  # a reference cycle: only the cyclic collector frees it
ref = weakref.ref(a)
with frozen_heap():
    assert gc.get_freeze_count() > before
    with frozen_heap():
        pass
    assert gc.get_freeze_count() > before  # the inner scope left the outer one's freeze in place
    del a
    gc.collect()
    assert ref() is not None  # frozen: out of the collector's sight
    model, tok = ie_jax.load_model("tiny-llama", dtype="float32", seed=1)
    llm = LLM(model, tokenizer=tok, max_model_len=96, max_num_seqs=4, max_num_batched_tokens=64, page_size=8,
              progress=False)
    out = llm.generate(["Hello there", "a"], SamplingParams(temperature=0.0, max_tokens=4), use_tqdm=False)
    assert len(out) == 2  # generate's own scope nests inside this one
    assert gc.get_freeze_count() > before
assert gc.get_freeze_count() == 0  # the outermost scope unfreezes everything (a cost of speed only, never leaks)
gc.collect()
assert ref() is None
print("ok")
"""


def test_frozen_heap_scopes_nest_and_unfreeze_at_the_outermost():
    """The serving loops hide the start-up heap from the cyclic collector and give it back when they end: a cycle
    made before the scope and dropped during it is collected once the scope is left, not before. The scope is
    process-wide (another engine's thread in this test process may hold one), so the check runs in a fresh
    interpreter."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    r = subprocess.run([sys.executable, "-c", _FROZEN_HEAP_CHECK], cwd=root, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]


def test_prompt_logprobs_match_the_reference(tiny):
    """SamplingParams.prompt_logprobs (vLLM's): per prompt token, None for the first, else the token's logprob and
    the top k, as the reference's dense forward gives them; once per prompt whatever n, the outputs unchanged."""
    model, tok = tiny
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True, prompt_logprobs=3, n=2)
    want = ie_jax.generate(model, tok, PROMPTS[:3], params)
    llm = make_llm(tiny)
    compiled = llm.engine.runner.num_compiled()
    got = llm.generate(PROMPTS[:3], params, use_tqdm=False)
    for g, w in zip(got, want):
        assert len(g.prompt_logprobs) == len(g.prompt_token_ids) and g.prompt_logprobs[0] is None
        for a, b in zip(g.prompt_logprobs[1:], w.prompt_logprobs[1:]):
            assert 3 <= len(a) <= 4 and a.keys() == b.keys()  # the top 3, and the prompt token if not among them
            np.testing.assert_allclose([a[k] for k in b], list(b.values()), atol=1e-4)
            assert a.rank == b.rank >= 1  # the token's rank in the vocabulary, as the reference counts it
        assert sum(r.rank > 3 for r in g.prompt_logprobs[1:]) > 0  # random weights: some tokens outside the top 3
        assert [c.token_ids for c in g.outputs] == [c.token_ids for c in w.outputs]
    assert got[0].prompt_logprobs[1] == llm.engine.score_prompt(PROMPTS[0], 3)[1]
    assert llm.generate(PROMPTS[:1], GREEDY, use_tqdm=False)[0].prompt_logprobs is None
    assert llm.engine.runner.num_compiled() == compiled  # the step executables are untouched
    assert llm.engine.runner.max_score_tokens == 64  # max_num_batched_tokens: the tiny model's logits are small
    with pytest.raises(ValueError, match="up to 64 tokens"):
        llm.engine.score_prompt("x" * 80, 1)
    with pytest.raises(ValueError, match="prompt_logprobs"):
        SamplingParams(prompt_logprobs=21)


def test_logit_bias_matches_the_reference_and_leaves_the_slot_clean(tiny):
    """Biased greedy and seeded rows beside plain ones == the reference generate; the next requests seated in the
    same slots see no leftover bias."""
    params = [SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, logit_bias={ord("e"): 6.0}),
              SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True),
              SamplingParams(temperature=0.8, seed=3, max_tokens=8, ignore_eos=True,
                             logit_bias={ord("a"): 3.0, ord(" "): -100}),
              SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, logit_bias={ord("x"): 100})]
    llm = make_llm(tiny)
    got = [o.outputs[0].token_ids for o in llm.generate(PROMPTS[:4], params, use_tqdm=False)]
    assert got == reference(tiny, PROMPTS[:4], params)
    assert got[3] == [ord("x")] * 8 and ord(" ") not in got[2]
    assert got[1] != reference(tiny, PROMPTS[1:2], [params[0]])[0] or got[0] != reference(tiny, PROMPTS[:1], GREEDY)[0]
    plain = [params[1]] * 4
    assert [o.outputs[0].token_ids for o in llm.generate(PROMPTS[:4], plain, use_tqdm=False)] == \
        reference(tiny, PROMPTS[:4], plain)
    with pytest.raises(ValueError, match="vocabulary"):
        llm.engine.add_request("big", "x", SamplingParams(logit_bias={10**6: 1.0}))
