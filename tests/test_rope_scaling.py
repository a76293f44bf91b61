"""YaRN rope scaling (Qwen2.5 / Qwen3 long context): the frequencies and the attention factor as HF defines them,
read from config.json, and applied alike by the dense forward and the serving engine."""
from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import ie_jax
from engine.llm import LLM
from ie_jax.config import ModelConfig, RopeScaling
from ie_jax.models.layers import rope_attention_factor, rope_inv_freq
from ie_jax.presets import PRESETS
from ie_jax.sampling import SamplingParams
from ie_jax.weights import init_model


def yarn_reference(dim: int, base: float, factor: float, original: int, beta_fast=32.0, beta_slow=1.0,
                   truncate=True) -> np.ndarray:
    """The YaRN paper's frequencies, step by step in float64: extrapolated (the original) frequencies for the
    dimensions that turn often over the original context, interpolated ones (divided by factor) for the slow ones."""
    idx = np.arange(0, dim, 2) / dim
    extrapolated, interpolated = base ** -idx, base ** -idx / factor
    correction = [dim * math.log(original / (n * 2 * math.pi)) / (2 * math.log(base)) for n in (beta_fast, beta_slow)]
    if truncate:
        correction = [math.floor(correction[0]), math.ceil(correction[1])]
    low, high = max(correction[0], 0), min(correction[1], dim - 1)
    if low == high:
        high += 0.001
    weight_interp = np.clip((np.arange(dim // 2) - low) / (high - low), 0, 1)
    return interpolated * weight_interp + extrapolated * (1 - weight_interp)


def yarn_config(base: ModelConfig, **rope) -> ModelConfig:
    hf = base.to_hf()
    hf["rope_scaling"] = {"rope_type": "yarn", **rope}
    return ModelConfig.from_hf(hf)


@pytest.mark.parametrize("rope, dim, theta", [
    (dict(factor=4.0, original_max_position_embeddings=32768), 128, 1e6),  # Qwen3's recommended setting
    (dict(factor=2.0, original_max_position_embeddings=4096, beta_fast=16, beta_slow=2), 64, 1e4),
    (dict(factor=8.0, original_max_position_embeddings=64, truncate=False), 16, 1e4),
])
def test_yarn_frequencies_match_the_reference(rope, dim, theta):
    cfg = dataclasses.replace(yarn_config(PRESETS["tiny-llama"], **rope), head_dim=dim, rope_theta=theta)
    want = yarn_reference(dim, theta, rope["factor"], rope["original_max_position_embeddings"],
                          rope.get("beta_fast", 32.0), rope.get("beta_slow", 1.0), rope.get("truncate", True))
    got = rope_inv_freq(cfg)
    np.testing.assert_allclose(got, want, rtol=2e-6)
    assert got[0] == pytest.approx(1.0) and got[-1] < want[-1] * rope["factor"]  # fast kept, slow interpolated


def test_yarn_config_defaults_and_attention_factor():
    base = dataclasses.replace(PRESETS["tiny-llama"], max_position_embeddings=131072)
    cfg = yarn_config(base, factor=4.0, original_max_position_embeddings=32768)
    assert cfg.rope_scaling == RopeScaling("yarn", 4.0, original_max_position_embeddings=32768)
    assert rope_attention_factor(cfg) == pytest.approx(0.1 * math.log(4.0) + 1)
    assert ModelConfig.from_hf(cfg.to_hf()) == cfg  # written back as read
    implied = yarn_config(base, original_max_position_embeddings=32768)  # no factor: the ratio of the lengths
    assert implied.rope_scaling.factor == 4.0
    own = yarn_config(base, factor=4.0)  # no original length: the model's own
    assert own.rope_scaling.original_max_position_embeddings == 131072
    ds = yarn_config(base, factor=40.0, mscale=1.0, mscale_all_dim=0.8)  # DeepSeek's form
    assert rope_attention_factor(ds) == pytest.approx((0.1 * math.log(40) + 1) / (0.08 * math.log(40) + 1))
    assert rope_attention_factor(yarn_config(base, factor=4.0, attention_factor=1.25)) == 1.25
    assert rope_attention_factor(base) == 1.0
    with pytest.raises(ValueError, match="rope_type='longrope'"):
        ModelConfig.from_hf({**base.to_hf(), "rope_scaling": {"rope_type": "longrope", "factor": 4.0}})


def test_yarn_model_scales_q_and_k_and_serves_like_the_reference():
    """The attention factor multiplies cos and sin, so q and k: the same as scaling the q and k projections by it
    under a factor of 1. The engine (rope in its KV-write kernel path) matches the dense reference."""
    cfg = yarn_config(PRESETS["tiny-llama"], factor=8.0, original_max_position_embeddings=64)
    af = rope_attention_factor(cfg)
    assert af > 1.2
    model = init_model(cfg, dtype=jnp.float32, seed=3)
    plain_cfg = dataclasses.replace(cfg, rope_scaling=dataclasses.replace(cfg.rope_scaling, attention_factor=1.0))
    scaled = init_model(plain_cfg, dtype=jnp.float32, seed=3)
    state = nnx.state(scaled)
    for name in ("q_proj", "k_proj"):  # the layers' weights, stacked
        kernel = state["layers"]["self_attn"][name]["kernel"]
        kernel[...] = kernel[...] * af
    nnx.update(scaled, state)
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 40))
    a, b = ie_jax.forward(model, ids), ie_jax.forward(scaled, ids)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=2e-4)
    unscaled = init_model(plain_cfg, dtype=jnp.float32, seed=3)
    assert not np.allclose(np.asarray(ie_jax.forward(unscaled, ids)), np.asarray(a), atol=1e-3)
    tok = ie_jax.load_model("tiny-llama", dtype="float32")[1]
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    prompts = ["The quick brown fox jumps over", "yarn"]
    want = [o.token_ids for o in ie_jax.generate(model, tok, prompts, params)]
    llm = LLM(model, tokenizer=tok, max_model_len=96, max_num_seqs=2, max_num_batched_tokens=16, page_size=8,
              progress=False)
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)] == want
