"""What the runner decides before its first step: KV-cache sizing from the device allocator's figures
(`runner.pages_that_fit`) and the step's XLA options by weight format."""
import numpy as np
import pytest

import ie_jax
from engine.config import step_compiler_options
from engine.llm import LLM
from engine.runner import pages_that_fit

GiB = 2**30


def test_pages_follow_the_limit_less_what_is_in_use():
    stats = {"bytes_limit": 72 * GiB, "bytes_in_use": 17 * GiB}
    page = 2 * 32 * 8 * 16 * 128 * 2  # Llama-3-8B, page 16, bf16: 2 MiB
    pages = pages_that_fit(stats, 0.9, 15 * GiB, GiB, page)
    assert pages == int((0.9 * 72 * GiB - 17 * GiB - GiB) // page)


def test_weights_count_when_the_allocator_reports_less_in_use():
    stats = {"bytes_limit": 100 * GiB, "bytes_in_use": 3 * GiB}
    assert pages_that_fit(stats, 0.5, 10 * GiB, 0, GiB) == 40


def test_the_largest_free_block_caps_the_cache():
    """A fragmented pool: 48 GiB free in total but 38 GiB in one piece. The cache is one buffer, so it gets the
    piece less a 256 MiB spare."""
    stats = {"bytes_limit": 80 * GiB, "bytes_in_use": 16 * GiB, "largest_free_block_bytes": 38 * GiB}
    page = 2 * 2**20
    pages = pages_that_fit(stats, 1.0, 16 * GiB, 0, page)
    assert pages == (38 * GiB - 2**28) // page
    assert pages * page < 38 * GiB
    # unfragmented, the block is the whole remainder and the total binds
    stats["largest_free_block_bytes"] = 64 * GiB
    assert pages_that_fit(stats, 0.9, 16 * GiB, 0, page) == int((0.9 * 80 * GiB - 16 * GiB) // page)


@pytest.mark.parametrize("seed", range(5))
def test_random_figures_never_exceed_either_bound(seed):
    rng = np.random.default_rng(seed)
    limit = int(rng.integers(20, 140)) * GiB
    in_use = int(rng.integers(1, limit // GiB // 2)) * GiB
    block = int(rng.integers(1, (limit - in_use) // GiB + 1)) * GiB
    headroom, page = int(rng.integers(0, 4)) * GiB, int(rng.integers(1, 64)) * 2**20
    util = float(rng.uniform(0.5, 1.0))
    stats = {"bytes_limit": limit, "bytes_in_use": in_use, "largest_free_block_bytes": block}
    pages = pages_that_fit(stats, util, in_use // 2, headroom, page)
    assert pages >= 0
    assert pages * page <= max(util * limit - in_use - headroom, 0)
    assert pages * page <= max(block - 2**28, 0)
    assert (pages + 1) * page > min(util * limit - in_use - headroom, block - 2**28)


def test_fp8_weights_compile_without_triton_gemms(monkeypatch):
    """fp8 weights: XLA's Triton GEMM autotuning is off for the step and the scoring forward (H100: 21.7 s -> 0.56 s
    to compile one gate_up dot, same speed); other formats keep XLA's defaults; IE_JAX_XLA_OPTIONS still wins."""
    def options(quantization):
        model, tok = ie_jax.load_model("tiny-llama", quantization=quantization)
        # one token bucket: the step compiles (full and greedy sampler) and runs under these options all the same
        llm = LLM(model, tokenizer=tok, max_model_len=16, max_num_seqs=2, max_num_batched_tokens=8, token_buckets=(8,),
                  progress=False)
        out = llm.generate(["ab"], ie_jax.SamplingParams(max_tokens=2, temperature=0.0))[0].outputs[0].token_ids
        assert len(out) == 2
        return llm.engine.runner.compiler_options

    assert options("fp8")["xla_gpu_enable_triton_gemm"] is False
    for q in (None, "int8"):
        assert "xla_gpu_enable_triton_gemm" not in options(q)
    monkeypatch.setenv("IE_JAX_XLA_OPTIONS", "xla_gpu_enable_triton_gemm=true")
    assert step_compiler_options(fp8_weights=True)["xla_gpu_enable_triton_gemm"] is True
