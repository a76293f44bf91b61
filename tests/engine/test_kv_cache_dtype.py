"""The engine with an fp8 (e4m3) KV cache: it allocates float8 pages with per-(layer, kv-head) scales, writes and
reads them through the paged context, and its greedy tokens follow the 16-bit cache's."""
import jax.numpy as jnp
import numpy as np
import pytest

import ie_jax
from engine.config import EngineConfig
from engine.llm import LLM
from ie_jax import SamplingParams
from kernels_pallas import ops

PROMPTS = ["Hello there", "The quick brown fox jumps over the lazy dog", "0123456789"]
GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny():
    return ie_jax.load_model("tiny-llama", dtype="bfloat16", seed=1)


def generate(tiny, kv_cache_dtype):
    model, tok = tiny
    llm = LLM(model, tokenizer=tok, max_model_len=64, max_num_seqs=4, max_num_batched_tokens=32, page_size=8,
              progress=False, kv_cache_dtype=kv_cache_dtype)
    with ops.kernel_backend("reference"):
        outs = llm.generate(PROMPTS, GREEDY)
    return llm, [o.token_ids for o in outs]


def test_fp8_cache_is_allocated_with_scales_and_follows_bf16_greedy(tiny):
    _, bf16 = generate(tiny, "auto")
    llm, fp8 = generate(tiny, "fp8")
    caches = llm.engine.runner.caches
    mc = tiny[0].config
    assert len(caches) == 3 and caches[0].dtype == jnp.float8_e4m3fn  # interleaved K/V buffer, k_scale, v_scale
    assert caches[0].shape[0] == 2 * mc.num_layers
    assert [c.shape for c in caches[1:]] == [(mc.num_layers, mc.num_kv_heads)] * 2
    written = np.abs(np.asarray(caches[0], np.float32)).max(axis=(1, 2, 3, 4))  # per entry: every layer's K and V
    assert (written > 0).all()  # the steps wrote K (even entries) and V (odd entries) of every layer
    # e4m3 rounding moves K/V by up to 2^-4 of themselves; a random tiny model's logits have near-ties, so the
    # tokens must agree at the start (2 tokens: one from the prompt's K/V, one from a cached fp8 decode step);
    # after a near-tie the sequences may part, so the rest is only required to agree mostly (here: 78%).
    assert [t[:2] for t in fp8] == [t[:2] for t in bf16]
    agree = np.mean([a == b for x, y in zip(fp8, bf16) for a, b in zip(x, y)])
    print(f"fp8 vs bf16 greedy tokens: {agree:.0%} agree", fp8, bf16)
    assert agree >= 0.6


def test_kv_cache_dtype_is_validated():
    assert EngineConfig(kv_cache_dtype="fp8_e4m3").fp8_kv_cache
    assert not EngineConfig(kv_cache_dtype="bf16").fp8_kv_cache
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        EngineConfig(kv_cache_dtype="int8")
