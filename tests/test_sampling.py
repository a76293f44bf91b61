"""SamplingParams validation, the host builder, the device sampler against numpy references, and the defaults a
checkpoint's generation_config.json sets."""
import dataclasses
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ie_jax.sampling import (MAX_LOGPROBS, SamplingParams, SamplingTensors, apply_penalties,
                             model_sampling_defaults, sample)

_sample = jax.jit(sample, static_argnums=2)
V = 12  # vocab of the distribution tests
NUM_DRAWS = 20_000
TOLERANCE = 0.02  # max abs error of an empirical frequency; ~6 sigma at 20k draws


def _log_softmax(x):
    x = np.asarray(x, np.float64)
    z = x - x.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def _softmax(x):
    return np.exp(_log_softmax(x))


def _tensors(params, vocab_size, prompts=None, outputs=None, eos_ids=None):
    prompts = prompts or [[] for _ in params]
    outputs = outputs or [[] for _ in params]
    return SamplingTensors.from_params(params, prompts, outputs, vocab_size, eos_ids)


def _draws(logits_row, params, num_draws=NUM_DRAWS, seed=0):
    """Tokens of `num_draws` rows that share one logits row and parameters and differ only in their step."""
    one = _tensors([params], len(logits_row))
    many = jax.tree.map(lambda x: np.repeat(x, num_draws, axis=0), one)
    many = many.replace(seeds=np.full(num_draws, seed, np.uint32), step=np.arange(num_draws, dtype=np.int32))
    logits = np.repeat(np.asarray(logits_row, np.float32)[None], num_draws, axis=0)
    return np.asarray(_sample(logits, many).token_ids)


def _frequencies(tokens, vocab_size):
    return np.bincount(tokens, minlength=vocab_size) / len(tokens)


def _distinct_logits(rng, vocab_size=V):
    """Random logits with well separated probabilities, so no test sits on a tie or a cut-off boundary."""
    return np.sort(rng.normal(size=vocab_size) * 1.5)[::-1][rng.permutation(vocab_size)].astype(np.float32)


# ---------------------------------------------------------------------------------------------------- params


@pytest.mark.parametrize("field, value", [
    ("n", 0), ("temperature", -0.1), ("temperature", float("nan")), ("temperature", 1e308),
    ("temperature", float("inf")), ("top_p", 0.0), ("top_p", 1.5),
    ("top_k", -2), ("top_k", 2.5), ("min_p", -0.1), ("min_p", 1.1), ("repetition_penalty", 0.0),
    ("repetition_penalty", 1e300),
    ("presence_penalty", 2.5), ("presence_penalty", -2.1), ("frequency_penalty", 3.0),
    ("frequency_penalty", -2.5), ("max_tokens", 0), ("logprobs", -1), ("logprobs", MAX_LOGPROBS + 1),
    ("seed", 1.5), ("stop", [""]), ("stop_token_ids", [-3]),
])
def test_params_reject_bad_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_params_min_tokens_above_max_tokens():
    with pytest.raises(ValueError, match="min_tokens"):
        SamplingParams(min_tokens=20, max_tokens=10)


def test_params_normalise_and_greedy():
    p = SamplingParams(stop="###", stop_token_ids=[7, 9], top_k=-1, logprobs=MAX_LOGPROBS)
    assert p.stop == ("###",) and p.stop_token_ids == (7, 9)
    assert SamplingParams(stop=["a", "b"]).stop == ("a", "b")
    assert hash(p) == hash(dataclasses.replace(p))
    assert not p.greedy
    assert SamplingParams(temperature=0).greedy and SamplingParams(top_k=1).greedy


def test_from_params_builds_rows():
    rng = np.random.default_rng(0)
    vocab_size = 20
    params = [SamplingParams(top_k=-1, min_tokens=3, stop_token_ids=[5], seed=2**32 + 7),
              SamplingParams(top_k=50, temperature=0.7, ignore_eos=True, min_tokens=2),
              SamplingParams(top_k=1, temperature=0.9)]
    prompts = [list(rng.integers(0, vocab_size, 6)) for _ in params]
    outputs = [list(rng.integers(0, vocab_size, n)) for n in (2, 1, 4)]
    t = SamplingTensors.from_params(params, prompts, outputs, vocab_size, eos_ids=[[1, 2], [1, 2], [1, 2]])
    np.testing.assert_array_equal(t.top_k, [0, 0, 1])  # -1 and k >= V are both off
    np.testing.assert_array_equal(t.temperature, np.float32([1.0, 0.7, 0.0]))  # top_k=1 is greedy
    assert t.seeds[0] == 7
    np.testing.assert_array_equal(t.step, [2, 1, 4])
    np.testing.assert_array_equal(t.suppress_eos, [True, True, False])
    np.testing.assert_array_equal(t.eos_ids[:, :3], [[1, 2, 5], [-1, -1, -1], [1, 2, -1]])  # ignore_eos: no EOS ban
    assert t.eos_ids.shape == (3, 8) and (t.eos_ids[:, 3:] == -1).all()
    for r in range(3):
        np.testing.assert_array_equal(t.output_counts[r], np.bincount(outputs[r], minlength=vocab_size))
        np.testing.assert_array_equal(np.flatnonzero(t.prompt_mask[r]), np.unique(prompts[r]))
    with pytest.raises(ValueError, match="outputs"):
        SamplingTensors.from_params(params[:1], [[0]], [[vocab_size]], vocab_size)


# ---------------------------------------------------------------------------------------------------- greedy


def test_greedy_rows_take_argmax_in_a_mixed_batch():
    rng = np.random.default_rng(1)
    num_rows, vocab_size = 8, 64
    logits = rng.normal(size=(num_rows, vocab_size)).astype(np.float32) * 3
    params = [SamplingParams(temperature=0) if r % 2 == 0 else SamplingParams(temperature=1.0, seed=r)
              for r in range(num_rows)]
    params[1] = SamplingParams(top_k=1, temperature=1.5)
    tokens = np.asarray(_sample(logits, _tensors(params, vocab_size)).token_ids)
    greedy_rows = [0, 1, 2, 4, 6]
    np.testing.assert_array_equal(tokens[greedy_rows], logits[greedy_rows].argmax(-1))
    # Random rows draw from a nearly flat distribution over 64 tokens: all three landing on argmax is ~1e-4.
    assert (tokens[[3, 5, 7]] != logits[[3, 5, 7]].argmax(-1)).any()


def test_all_greedy_batch_in_bf16():
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(4, 100)).astype(jax.numpy.bfloat16)
    out = _sample(logits, _tensors([SamplingParams(temperature=0)] * 4, 100))
    np.testing.assert_array_equal(out.token_ids, np.asarray(logits, np.float32).argmax(-1))


# ------------------------------------------------------------------------------------------- distributions


@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
def test_temperature_matches_softmax(temperature):
    logits = _distinct_logits(np.random.default_rng(3))
    freq = _frequencies(_draws(logits, SamplingParams(temperature=temperature)), V)
    np.testing.assert_array_less(np.abs(freq - _softmax(logits / temperature)), TOLERANCE)


@pytest.mark.parametrize("top_k", [1, 3, 7])
def test_top_k_keeps_the_k_most_likely(top_k):
    logits = _distinct_logits(np.random.default_rng(4))
    freq = _frequencies(_draws(logits, SamplingParams(top_k=top_k, temperature=0.8)), V)
    keep = np.argsort(-logits)[:top_k]
    expected = np.zeros(V)
    expected[keep] = _softmax(logits[keep] / 0.8)
    assert (freq[expected == 0] == 0).all()
    np.testing.assert_array_less(np.abs(freq - expected), TOLERANCE)


def _nucleus_reference(logits, top_p):
    order = np.argsort(-logits)
    mass = np.cumsum(_softmax(logits)[order])
    return order[: int(np.searchsorted(mass, top_p)) + 1]  # first prefix whose mass reaches top_p


@pytest.mark.parametrize("quantile", [0, 2, 5])
def test_top_p_keeps_the_nucleus(quantile):
    logits = _distinct_logits(np.random.default_rng(5))
    mass = np.cumsum(np.sort(_softmax(logits))[::-1])
    top_p = float((mass[quantile] + mass[quantile + 1]) / 2)  # halfway between two prefixes: no boundary tie
    keep = _nucleus_reference(logits, top_p)
    assert len(keep) == quantile + 2
    expected = np.zeros(V)
    expected[keep] = _softmax(logits[keep])
    freq = _frequencies(_draws(logits, SamplingParams(top_p=top_p)), V)
    assert (freq[expected == 0] == 0).all()
    np.testing.assert_array_less(np.abs(freq - expected), TOLERANCE)


def test_top_k_then_top_p_then_min_p():
    logits = _distinct_logits(np.random.default_rng(6))
    temperature, top_k, top_p, min_p = 1.3, 8, 0.9, 0.08
    scaled = logits / temperature
    keep = np.argsort(-scaled)[:top_k]
    probs = _softmax(scaled[keep])
    order = np.argsort(-probs)
    keep = keep[order[: int(np.searchsorted(np.cumsum(probs[order]), top_p)) + 1]]
    keep = keep[_softmax(scaled[keep]) >= min_p * _softmax(scaled[keep]).max()]
    expected = np.zeros(V)
    expected[keep] = _softmax(scaled[keep])
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    freq = _frequencies(_draws(logits, params), V)
    assert (freq[expected == 0] == 0).all()
    np.testing.assert_array_less(np.abs(freq - expected), TOLERANCE)


@pytest.mark.parametrize("num_keep", [2, 5])
def test_min_p_drops_unlikely_tokens(num_keep):
    logits = _distinct_logits(np.random.default_rng(7))
    probs = _softmax(logits)
    ratio = np.sort(probs)[::-1] / probs.max()
    min_p = float((ratio[num_keep - 1] + ratio[num_keep]) / 2)  # halfway between two tokens: no boundary tie
    keep = probs >= min_p * probs.max()
    assert keep.sum() == num_keep
    expected = np.where(keep, probs, 0) / probs[keep].sum()
    freq = _frequencies(_draws(logits, SamplingParams(min_p=min_p)), V)
    assert (freq[~keep] == 0).all()
    np.testing.assert_array_less(np.abs(freq - expected), TOLERANCE)


# -------------------------------------------------------------------------------------------------- penalties


def _penalties_reference(logits, t):
    expected = np.asarray(logits, np.float64).copy()
    for r in range(expected.shape[0]):
        if t.suppress_eos[r]:
            expected[r, t.eos_ids[r][t.eos_ids[r] >= 0]] = -np.inf
        for v in range(expected.shape[1]):
            if t.prompt_mask[r, v] or t.output_counts[r, v] > 0:
                x, penalty = expected[r, v], t.repetition_penalty[r]
                expected[r, v] = x / penalty if x > 0 else x * penalty
            count = t.output_counts[r, v]
            expected[r, v] -= t.frequency_penalty[r] * count + t.presence_penalty[r] * (count > 0)
    return expected


def test_penalties_match_reference():
    rng = np.random.default_rng(8)
    num_rows, vocab_size = 6, 40
    logits = rng.normal(size=(num_rows, vocab_size)).astype(np.float32) * 2
    params = [SamplingParams(repetition_penalty=float(rng.uniform(0.5, 2.0)),
                             presence_penalty=float(rng.uniform(-2, 2)), frequency_penalty=float(rng.uniform(-2, 2)),
                             min_tokens=int(rng.integers(0, 8)), stop_token_ids=[3])
              for _ in range(num_rows)]
    prompts = [list(rng.integers(0, vocab_size, 10)) for _ in range(num_rows)]
    outputs = [list(rng.integers(0, vocab_size, int(rng.integers(0, 12)))) for _ in range(num_rows)]
    t = SamplingTensors.from_params(params, prompts, outputs, vocab_size, [[0, 1]] * num_rows)
    assert t.suppress_eos.any() and not t.suppress_eos.all()
    np.testing.assert_allclose(apply_penalties(logits, t), _penalties_reference(logits, t), rtol=1e-6, atol=1e-6)
    # ids outside the vocabulary ban nothing (the -1 padding among them)
    wild = t.replace(eos_ids=np.where(t.eos_ids == 1, vocab_size + 3, t.eos_ids))
    got = np.asarray(apply_penalties(logits, wild))
    np.testing.assert_allclose(got, _penalties_reference(logits, t.replace(eos_ids=np.where(t.eos_ids == 1, -1,
                                                                                              t.eos_ids))),
                               rtol=1e-6, atol=1e-6)
    assert np.isneginf(got[t.suppress_eos][:, 0]).all() and np.isfinite(got[:, 1]).all()


def test_min_tokens_never_samples_eos():
    rng = np.random.default_rng(9)
    num_rows, vocab_size, eos = 512, 16, 4
    logits = rng.normal(size=(num_rows, vocab_size)).astype(np.float32)
    logits[:, eos] = 4.0  # EOS is by far the most likely token
    params = [SamplingParams(min_tokens=5, seed=r, temperature=0 if r % 4 == 0 else 1.0) for r in range(num_rows)]
    outputs = [[7] * (r % 8) for r in range(num_rows)]  # rows with >= 5 outputs are free to stop
    t = SamplingTensors.from_params(params, [[1]] * num_rows, outputs, vocab_size, [[eos]] * num_rows)
    tokens = np.asarray(_sample(logits, t).token_ids)
    assert (tokens[t.suppress_eos] != eos).all()
    assert (tokens[~t.suppress_eos] == eos).mean() > 0.5


# -------------------------------------------------------------------------------------------- seeds and jit


def test_seeded_row_ignores_batch_position_and_mates():
    rng = np.random.default_rng(10)
    vocab_size, num_steps = 32, 40
    row = rng.normal(size=vocab_size).astype(np.float32) * 0.5
    mine = SamplingParams(seed=1234, temperature=0.9, top_p=1.0)
    mates = [SamplingParams(top_p=0.7, top_k=5), SamplingParams(temperature=0), SamplingParams(min_p=0.2),
             SamplingParams(repetition_penalty=1.5, seed=9), SamplingParams(temperature=2.0),
             SamplingParams(top_k=3, temperature=0.3), SamplingParams(frequency_penalty=1.0)]
    batch_params = mates[:5] + [mine] + mates[5:]
    alone, in_batch = [], []
    for step in range(num_steps):
        t = _tensors([mine], vocab_size).replace(step=np.int32([step]))
        alone.append(_sample(row[None], t).token_ids[0])
        logits = rng.normal(size=(8, vocab_size)).astype(np.float32)
        logits[5] = row
        # Row 5's penalties are neutral, so its outputs do not matter; the mates' penalties do act.
        t = _tensors(batch_params, vocab_size, outputs=[[1, 2]] * 8).replace(step=np.full(8, step, np.int32))
        in_batch.append(_sample(logits, t).token_ids[5])
    np.testing.assert_array_equal(alone, in_batch)
    assert len(set(int(x) for x in alone)) > 5  # different steps give different draws


def test_logprobs_are_raw_and_top_sorted():
    rng = np.random.default_rng(11)
    num_rows, vocab_size, k = 5, 50, 6
    logits = rng.normal(size=(num_rows, vocab_size)).astype(np.float32) * 2
    params = [SamplingParams(temperature=1.7, repetition_penalty=1.3, presence_penalty=0.5, top_p=0.9,
                             seed=r) for r in range(num_rows)]
    t = _tensors(params, vocab_size, outputs=[list(rng.integers(0, vocab_size, 5)) for _ in params])
    out = _sample(logits, t, k)
    expected = _log_softmax(logits)
    tokens = np.asarray(out.token_ids)
    np.testing.assert_allclose(out.logprobs, expected[np.arange(num_rows), tokens], atol=1e-5)
    np.testing.assert_array_equal(out.top_ids, np.argsort(-expected, axis=-1)[:, :k])
    np.testing.assert_allclose(out.top_logprobs, np.sort(expected, axis=-1)[:, ::-1][:, :k], atol=1e-5)
    assert (np.diff(np.asarray(out.top_logprobs), axis=-1) <= 0).all()
    assert _sample(logits, t).top_ids.shape == (num_rows, 0)


def test_jit_compiles_once_for_any_parameter_mix():
    num_traces = 0

    def counted(logits, t):
        nonlocal num_traces
        num_traces += 1
        return sample(logits, t)

    step = jax.jit(counted)
    rng = np.random.default_rng(12)
    logits = rng.normal(size=(4, 30)).astype(np.float32)
    first = [SamplingParams(temperature=0)] * 4
    second = [SamplingParams(top_k=3, seed=1), SamplingParams(top_p=0.5), SamplingParams(min_p=0.1),
              SamplingParams(repetition_penalty=1.2, min_tokens=3, stop_token_ids=[2])]
    for params in (first, second, first):
        step(logits, _tensors(params, 30, eos_ids=[[2]] * 4)).token_ids.block_until_ready()
    assert num_traces == 1


def test_static_modes_match_device_branches():
    """mode="greedy"/"sample" (no lax.cond, as the engine runs on GPUs) draw exactly what mode="auto" draws."""
    rng = np.random.default_rng(7)
    logits = jnp.asarray(rng.normal(size=(6, 50)).astype(np.float32))
    mixed = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.7, top_p=0.8, seed=1),
             SamplingParams(temperature=1.2, top_k=5, seed=2), SamplingParams(temperature=1.0, seed=3),
             SamplingParams(temperature=0.9, min_p=0.1, seed=4), SamplingParams(temperature=0.0, top_k=1)]
    t = SamplingTensors.from_params(mixed, [[1, 2]] * 6, [[3]] * 6, 50)
    auto = sample(logits, t, 2, "auto")
    full = sample(logits, t, 2, "sample")
    np.testing.assert_array_equal(auto.token_ids, full.token_ids)
    greedy = [SamplingParams(temperature=0.0, repetition_penalty=1.3)] * 6
    t = SamplingTensors.from_params(greedy, [[1, 2]] * 6, [[3]] * 6, 50)
    np.testing.assert_array_equal(sample(logits, t, 0, "auto").token_ids, sample(logits, t, 0, "greedy").token_ids)
    with pytest.raises(ValueError, match="mode"):
        sample(logits, t, 0, "fast")


def test_argmax_mode_is_greedy_without_penalties():
    """mode="argmax" (the engine's "greedy" step: no row with a penalty or a banned EOS) is the raw logits' argmax:
    the same as mode="greedy" for unpenalised rows, and it ignores penalties, which mode="greedy" applies."""
    rng = np.random.default_rng(13)
    logits = jnp.asarray(rng.normal(size=(4, 40)).astype(np.float32))
    plain = SamplingTensors.from_params([SamplingParams(temperature=0.0)] * 4, [[1, 2]] * 4, [[3]] * 4, 40)
    for n in (0, 2):
        a, g = sample(logits, plain, n, "argmax"), sample(logits, plain, n, "greedy")
        np.testing.assert_array_equal(a.token_ids, g.token_ids)
        np.testing.assert_array_equal(a.logprobs, g.logprobs)
    top = np.argmax(np.asarray(logits), axis=-1)
    outputs = [[int(x)] for x in top]  # each row's own argmax already generated: a penalty pushes it down
    pen = SamplingTensors.from_params([SamplingParams(temperature=0.0, repetition_penalty=50.0)] * 4, outputs,
                                      [[3]] * 4, 40)
    np.testing.assert_array_equal(sample(logits, pen, 0, "argmax").token_ids, top)
    assert not np.any(np.asarray(sample(logits, pen, 0, "greedy").token_ids) == top)


def test_greedy_mode_computes_logprobs_only_when_asked():
    """mode="greedy" with num_logprobs=0 (the engine's argmax-only step) skips the log-softmax; asked for logprobs,
    it returns the same raw log-softmax values as the full sampler."""
    rng = np.random.default_rng(11)
    logits = jnp.asarray(rng.normal(size=(5, 40)).astype(np.float32))
    t = SamplingTensors.from_params([SamplingParams(temperature=0.0)] * 5, [[1]] * 5, [[2]] * 5, 40)
    bare = sample(logits, t, 0, "greedy")
    np.testing.assert_array_equal(bare.token_ids, np.argmax(np.asarray(logits), axis=-1))
    np.testing.assert_array_equal(bare.logprobs, np.zeros(5, np.float32))
    asked, full = sample(logits, t, 3, "greedy"), sample(logits, t, 3, "sample")
    np.testing.assert_array_equal(asked.token_ids, full.token_ids)
    np.testing.assert_allclose(asked.logprobs, full.logprobs, rtol=1e-6)
    np.testing.assert_allclose(asked.top_logprobs, full.top_logprobs, rtol=1e-6)
    want = jax.nn.log_softmax(logits, axis=-1)[jnp.arange(5), bare.token_ids]
    np.testing.assert_allclose(asked.logprobs, want, rtol=1e-6)


def test_draw_mode_and_no_logprobs_match_the_full_sampler():
    """mode="draw" (no sort) draws what mode="sample" draws when no sampled row asks for top-k or top-p, over many
    seeds; num_logprobs=None returns the same tokens with no logprobs at all. With a nucleus row, draw differs
    from sample on some seed (it ignores top-p): the engine never gives it such a step (step_variant)."""
    rng = np.random.default_rng(3)
    logits = jnp.asarray(rng.normal(size=(6, 40)).astype(np.float32) * 2)
    for seed in range(8):
        rows = [SamplingParams(temperature=0.0, top_p=0.3), SamplingParams(temperature=0.7, seed=seed),
                SamplingParams(temperature=1.3, min_p=0.05, seed=seed + 100),
                SamplingParams(temperature=1.0, top_k=-1, seed=seed + 200),
                SamplingParams(temperature=0.9, repetition_penalty=1.3, presence_penalty=0.5, seed=seed + 300),
                SamplingParams(temperature=0.0)]
        t = SamplingTensors.from_params(rows, [[1, 2]] * 6, [[3, 4]] * 6, 40)
        full = sample(logits, t, 2, "sample")
        for mode in ("sample", "draw"):
            bare = sample(logits, t, None, mode)
            np.testing.assert_array_equal(bare.token_ids, full.token_ids)
            np.testing.assert_array_equal(bare.logprobs, np.zeros(6, np.float32))
            assert bare.top_ids.shape == (6, 0)
    differs = False
    for seed in range(16):
        t = SamplingTensors.from_params([SamplingParams(temperature=1.5, top_p=0.2, seed=seed)] * 6, [[1]] * 6,
                                        [[2]] * 6, 40)
        differs |= not np.array_equal(sample(logits, t, None, "draw").token_ids,
                                      sample(logits, t, None, "sample").token_ids)
    assert differs


def test_logit_bias_is_added_first_and_steers_every_mode():
    rng = np.random.default_rng(5)
    B, V = 4, 50
    logits = rng.standard_normal((B, V)).astype(np.float32)
    top1 = int(np.argmax(logits[1]))
    params = [SamplingParams(temperature=0.0, logit_bias={3: 100.0}),
              SamplingParams(temperature=0.0, logit_bias={top1: -100}),
              SamplingParams(temperature=0.0),
              SamplingParams(temperature=0.7, seed=1, logit_bias={"7": 5.5, 9: -2.0})]
    t = SamplingTensors.from_params(params, [[1]] * B, [[]] * B, V)
    expect = logits.copy()
    expect[0, 3] += 100
    expect[1, top1] -= 100
    expect[3, 7] += 5.5
    expect[3, 9] -= 2.0
    np.testing.assert_array_equal(np.asarray(apply_penalties(jnp.asarray(logits), t)), expect)
    for mode in ("auto", "sample", "draw"):
        ids = np.asarray(sample(jnp.asarray(logits), t, 0, mode).token_ids)
        assert ids[0] == 3 and ids[1] == int(np.argmax(expect[1])) != top1 and ids[2] == int(np.argmax(logits[2]))
        # the sampled row draws as if the model's logits were the biased ones (same seed, same step)
        plain = SamplingTensors.from_params([dataclasses.replace(params[3], logit_bias=None)], [[1]], [[]], V)
        assert ids[3] == int(sample(jnp.asarray(expect[3:4]), plain, 0, mode).token_ids[0])


@pytest.mark.parametrize("bias, match", [({1: 101.0}, r"\[-100, 100\]"), ({-1: 1.0}, "non-negative"),
                                         ({"x": 1.0}, "token ids"), ({i: 1.0 for i in range(300)}, "at most")])
def test_logit_bias_rejects_bad_entries(bias, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(logit_bias=bias)
    assert SamplingParams(logit_bias={5: 1, 2: -3}).logit_bias == ((2, -3.0), (5, 1.0))
    assert SamplingParams(logit_bias={}).logit_bias is None


# A Llama-3-style generation_config.json: sampling defaults beside keys that are not sampling defaults.
GENERATION_CONFIG = {"bos_token_id": 1, "do_sample": True, "eos_token_id": [2, 9], "temperature": 0.6, "top_p": 0.9,
                     "max_new_tokens": 7, "transformers_version": "4.45.0"}


def test_generation_config_defaults(tmp_path):
    (tmp_path / "generation_config.json").write_text(json.dumps(GENERATION_CONFIG))
    want = {"temperature": 0.6, "top_p": 0.9, "max_tokens": 7}
    assert model_sampling_defaults(tmp_path) == model_sampling_defaults(str(tmp_path), "auto") == want
    assert SamplingParams(**want) == SamplingParams(temperature=0.6, top_p=0.9, max_tokens=7)
    assert model_sampling_defaults(tmp_path, "vllm") == {}
    for preset in ("default", "tiny-llama", None):  # no checkpoint directory: nothing to read
        assert model_sampling_defaults(preset) == {}
    (tmp_path / "model").mkdir()  # a checkpoint without generation_config.json
    assert model_sampling_defaults(tmp_path / "model") == {}
    # a folder: its file, whatever the model
    assert model_sampling_defaults("tiny-llama", str(tmp_path)) == model_sampling_defaults(tmp_path / "model",
                                                                                            str(tmp_path)) == want
    with pytest.raises(ValueError, match="does not exist .*auto, vllm or a folder"):
        model_sampling_defaults(tmp_path, str(tmp_path / "model"))
    with pytest.raises(ValueError, match="does not exist"):
        model_sampling_defaults(tmp_path, str(tmp_path / "missing"))


def test_generation_config_overrides(tmp_path):
    (tmp_path / "generation_config.json").write_text(json.dumps({**GENERATION_CONFIG, "top_k": 20,
                                                                 "repetition_penalty": 1.05, "min_p": None}))
    overrides = {"temperature": 0.25, "max_new_tokens": 64, "min_p": 0.05, "top_k": None}
    assert model_sampling_defaults(tmp_path, overrides=overrides) == {  # over the file's; a null drops the file's
        "temperature": 0.25, "top_p": 0.9, "min_p": 0.05, "repetition_penalty": 1.05, "max_tokens": 64}
    assert model_sampling_defaults(tmp_path, "vllm", {"temperature": 0.0}) == {"temperature": 0.0}
    assert model_sampling_defaults("tiny-llama", overrides={"repetition_penalty": 1.2}) == {"repetition_penalty": 1.2}
    with pytest.raises(ValueError, match=r"keys must be among \['max_new_tokens', 'min_p', 'repetition_penalty', "
                                         r"'temperature', 'top_k', 'top_p'\]"):
        model_sampling_defaults(tmp_path, overrides={"max_tokens": 5})  # the HF name is max_new_tokens
    # top_k 50 is what transformers writes when nobody chose one: ignored in the file, taken as an override
    (tmp_path / "generation_config.json").write_text(json.dumps({"top_k": 50, "temperature": 0.7}))
    assert model_sampling_defaults(tmp_path) == {"temperature": 0.7}
    assert model_sampling_defaults(tmp_path, overrides={"top_k": 50}) == {"temperature": 0.7, "top_k": 50}


@pytest.mark.parametrize("config, match", [
    ({"top_p": 1.5}, r"top_p=1.5 must be in \(0, 1\]"), ({"temperature": -0.1}, "temperature=-0.1 must be >= 0"),
    ({"top_k": 2.5}, "top_k=2.5 must be an int"),
    ({"max_new_tokens": 0}, r"max_tokens=0 must be at least 1 \(max_new_tokens sets max_tokens\)")])
def test_generation_config_bad_values_fail_at_start_up(tmp_path, config, match):
    path = tmp_path / "generation_config.json"
    path.write_text(json.dumps({**GENERATION_CONFIG, **config}))
    with pytest.raises(ValueError, match=f"generation_config {re.escape(str(path))}: bad sampling default: {match}"):
        model_sampling_defaults(tmp_path)
    assert model_sampling_defaults(tmp_path, "vllm") == {}  # the file is not read
    with pytest.raises(ValueError, match=f"with overrides .*: bad sampling default: {match}"):
        model_sampling_defaults("tiny-llama", overrides=config)
    path.write_text("[1, 2]")
    with pytest.raises(ValueError, match="must hold a JSON object"):
        model_sampling_defaults(tmp_path)
    path.write_text("{")
    with pytest.raises(ValueError, match="is not valid JSON"):
        model_sampling_defaults(tmp_path)
