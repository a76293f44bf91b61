"""The engine serves every architecture the loader reads, token for token as the reference generate: Qwen2's qkv
bias, Qwen3's q/k RMSNorm with tied embeddings, Mistral's sliding window (prompts longer than the window, chunked
prefill across it) and GPT-2's learned positions, LayerNorm and biases. Tiny random models of each shape, greedy,
mixed prompt lengths in a small token budget."""
from __future__ import annotations

import dataclasses

import pytest

import ie_jax
from engine.llm import LLM
from ie_jax import SamplingParams
from ie_jax.presets import get_preset
from ie_jax.tokenizer import ByteTokenizer
from ie_jax.weights import init_model

TINY = get_preset("tiny-llama")
ARCHS = {
    "qwen2": dataclasses.replace(TINY, model_type="qwen2", qkv_bias=True, rope_theta=1e6, norm_eps=1e-6),
    "qwen3": dataclasses.replace(TINY, model_type="qwen3", qk_norm=True, tie_word_embeddings=True, head_dim=32),
    "mistral": dataclasses.replace(TINY, model_type="mistral", sliding_window=12),
    "gpt2": get_preset("tiny-gpt2"),
}
PROMPTS = ["a fairly long prompt that runs past the window", "hi", "0123456789abcdefghij", "xyz " * 7]
GREEDY = SamplingParams(temperature=0.0, max_tokens=14, ignore_eos=True)


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_engine_equals_reference(arch):
    cfg = ARCHS[arch]
    model, tok = init_model(cfg, seed=4), ByteTokenizer()
    want = [o.token_ids for o in ie_jax.generate(model, tok, PROMPTS, GREEDY)]
    assert len({tuple(w) for w in want}) == len(PROMPTS)  # the prompts lead the random model apart
    llm = LLM(model, tokenizer=tok, max_model_len=96, max_num_seqs=3, max_num_batched_tokens=16, page_size=8,
              progress=False)
    got = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in got] == want
    if cfg.sliding_window:  # the window matters here: the same model without it decodes differently
        unwindowed = init_model(dataclasses.replace(cfg, sliding_window=None), seed=4)
        plain = [o.token_ids for o in ie_jax.generate(unwindowed, tok, PROMPTS[:1], GREEDY)]
        assert plain != want[:1]
