"""Serving fuses q/k/v and gate/up into one Linear each: the fused model computes what the separate one does."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import ie_jax
from engine.config import EngineConfig
from engine.runner import ModelRunner
from ie_jax.models.llama import LlamaForCausalLM, fuse_projections
from ie_jax.presets import get_preset
from ie_jax.quant.linear import quantize_model


def _model(**overrides):
    cfg = dataclasses.replace(get_preset("tiny-llama"), **overrides)
    return LlamaForCausalLM(cfg, dtype=jnp.float32, rngs=nnx.Rngs(3))


def _randomize_biases(model):
    """Biases start at zero; give them random values so that the fused bias is checked too."""
    key = jax.random.key(7)
    for _, m in nnx.iter_modules(model):
        if getattr(m, "bias", None) is not None and isinstance(m.bias, nnx.Param):
            key, sub = jax.random.split(key)
            m.bias[...] = jax.random.normal(sub, m.bias.shape, m.bias.dtype)


@pytest.mark.parametrize("bias", [False, True], ids=["llama", "qkv+mlp bias"])
def test_fused_forward_equals_separate(bias):
    model = _model(qkv_bias=bias, mlp_bias=bias)
    if bias:
        _randomize_biases(model)
    ids = jax.random.randint(jax.random.key(0), (2, 11), 0, model.config.vocab_size)
    expected = ie_jax.forward(model, ids)

    fused = nnx.clone(model)
    assert fuse_projections(fused) == 2  # one attention and one MLP module (stacked over the layers)
    attn, mlp = fused.layers.self_attn, fused.layers.mlp
    assert attn.q_proj is None and mlp.gate_proj is None
    cfg = model.config
    qkv_cols = (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim
    assert attn.qkv_proj.kernel.shape == (cfg.num_layers, cfg.hidden_size, qkv_cols)
    assert mlp.gate_up_proj.kernel.shape == (cfg.num_layers, cfg.hidden_size, 2 * cfg.intermediate_size)
    assert (attn.qkv_proj.bias is not None) == bias
    got = ie_jax.forward(fused, ids)
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("method", ["int8", "int4", "fp8"])
def test_fused_quantized_forward_equals_separate(method):
    """Quantized layers fuse where their class can concatenate, and keep separate projections otherwise; either
    way the forward is the separate model's."""
    model, _ = ie_jax.load_model("tiny-llama", dtype="float32", seed=1)
    quantize_model(model, method, group_size=32)
    ids = jax.random.randint(jax.random.key(1), (1, 9), 0, model.config.vocab_size)
    expected = ie_jax.forward(model, ids)
    fuse_projections(model)
    np.testing.assert_allclose(np.asarray(ie_jax.forward(model, ids)), np.asarray(expected), rtol=1e-5, atol=1e-5)


def test_runner_fuses_a_copy_unless_it_owns_the_model():
    model = _model()
    cfg = EngineConfig(max_model_len=64, max_num_seqs=2, max_num_batched_tokens=16, page_size=8)
    runner = ModelRunner(model, cfg)
    assert model.layers.self_attn.q_proj is not None  # the caller's model is untouched
    assert model.layers.self_attn.qkv_proj is None
    first = runner.layer_states[0]
    assert "qkv_proj" in first["self_attn"] and "gate_up_proj" in first["mlp"]
