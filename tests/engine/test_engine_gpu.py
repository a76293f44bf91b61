"""The engine on a Hopper GPU, where its step runs the Pallas paged-attention kernel inside the unrolled layers:
every greedy token must be the (near-)argmax of the dense forward pass over the same sequence."""
import dataclasses

import jax
import numpy as np
import pytest

import ie_jax
from engine.llm import LLM
from ie_jax import SamplingParams
from ie_jax.generate import prompt_logprobs
from ie_jax.presets import get_preset
from ie_jax.weights import init_model
from kernels_pallas import ops

pytestmark = pytest.mark.gpu


def _small_engine(kv_cache_dtype: str):
    """Head dim 128 and 8 q-heads per kv-head (shapes the paged kernel takes) in three layers of a small model."""
    cfg = dataclasses.replace(get_preset("tiny-llama"), vocab_size=512, hidden_size=512, num_heads=8, num_kv_heads=1,
                              head_dim=128, intermediate_size=1024, num_layers=3)
    model = init_model(cfg, dtype=jax.numpy.bfloat16, seed=3)
    llm = LLM(model, tokenizer=None, max_model_len=256, max_num_seqs=8, max_num_batched_tokens=128, page_size=16,
              kv_cache_dtype=kv_cache_dtype, progress=False)
    return cfg, model, llm


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "fp8"])
def test_gpu_engine_tokens_are_argmax_of_the_dense_forward(kv_cache_dtype):
    if not ops.is_hopper():
        pytest.skip("needs a Hopper GPU (the paged kernel)")
    cfg, model, llm = _small_engine(kv_cache_dtype)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, cfg.vocab_size, n).tolist() for n in (1, 17, 40, 100, 130, 7)]
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    outs = llm.generate(prompts, params, use_tqdm=False)
    # fp8 stores K/V with 3 mantissa bits: its logits move more than bf16 rounding does.
    slack = 0.15 if kv_cache_dtype == "auto" else 0.6
    for prompt, out in zip(prompts, outs):
        ids = prompt + list(out.token_ids)
        logits = np.asarray(ie_jax.forward(model, np.array([ids], np.int32)), np.float32)[0]  # [S, V]
        picked = logits[len(prompt) - 1:-1][np.arange(len(out.token_ids)), out.token_ids]
        best = logits[len(prompt) - 1:-1].max(-1)
        assert np.all(best - picked <= slack), (best - picked).max()


def test_gpu_prompt_logprobs_match_the_dense_forward():
    """The scoring forward (unrolled, fused projections, released layers) on the GPU gives the reference's prompt
    logprobs, up to bf16 rounding."""
    if not ops.is_hopper():
        pytest.skip("needs a Hopper GPU")
    cfg, model, llm = _small_engine("auto")
    prompt = np.random.default_rng(1).integers(0, cfg.vocab_size, 100).tolist()
    got = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=2, prompt_logprobs=2),
                       use_tqdm=False)[0].prompt_logprobs
    want = prompt_logprobs(model, prompt, 2)
    assert got[0] is None and len(got) == len(want) == 100
    for t, a, b in zip(prompt[1:], got[1:], want[1:]):
        assert abs(a[t] - b[t]) < 0.05
