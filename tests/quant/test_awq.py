"""AWQ calibration: the scale search beats RTN on outlier channels, folding is exact in float, the calibration
forward sees the activations the model computes, and a calibrated model quantizes with less error than RTN."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import ie_jax
from ie_jax.models import build_model
from ie_jax.presets import get_preset
from ie_jax.quant import quantize_model
from ie_jax.quant.awq import (AWQConfig, awq_calibrate, calibration_rows, fake_quantize_int4, fold_awq_scales,
                              scale_from_magnitude, search_awq_scales, search_scale)
from ie_jax.weights import init_model


def _outlier_inputs(key, T, C, channels, factor=30.0):
    x = jax.random.normal(key, (T, C))
    return x.at[:, channels].multiply(factor)


def test_awq_beats_rtn_on_outlier_channels():
    T, C, O, G = 1024, 256, 128, 64
    k = jax.random.split(jax.random.key(1), 4)
    channels = jax.random.choice(k[0], C, (4,), replace=False)
    x, x_test = _outlier_inputs(k[1], T, C, channels), _outlier_inputs(k[2], T, C, channels)
    w = jax.random.normal(k[3], (C, O)) * 0.02
    mag = jnp.mean(jnp.abs(x), axis=0)
    s, alpha, errors = search_scale(x, mag, w, group_size=G, num_grid=20)
    # errors[0] (alpha = 0, s = 1) is plain RTN, measured independently here.
    rtn = float(jnp.mean(jnp.square(x @ fake_quantize_int4(w, G) - x @ w)))
    np.testing.assert_allclose(float(errors[0]), rtn, rtol=1e-4)
    # On held-out tokens of the same distribution, AWQ's output error is at most half of RTN's.
    expected = x_test @ w
    rtn_test = jnp.mean(jnp.square(x_test @ fake_quantize_int4(w, G) - expected))
    awq_test = jnp.mean(jnp.square((x_test / s) @ fake_quantize_int4(w * s[:, None], G) - expected))
    assert 0.0 < float(alpha) < 1.0
    assert float(awq_test) <= 0.5 * float(rtn_test), (float(awq_test), float(rtn_test))
    # The outlier channels get the largest scales.
    assert set(np.argsort(np.asarray(s))[-4:]) == set(np.asarray(channels).tolist())


def test_scale_normalisation():
    mag = jax.random.uniform(jax.random.key(2), (64,), minval=0.1, maxval=9.0)
    s = scale_from_magnitude(mag, 0.5)
    np.testing.assert_allclose(float(jnp.max(s) * jnp.min(s)), 1.0, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(s / s[0]), np.asarray(jnp.sqrt(mag / mag[0])), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(scale_from_magnitude(mag, 0.0)), 1.0)


# ----------------------------------------------------------------------------------------------------------------
# Whole models

VARIANTS = {
    "llama-gqa": {},
    "qwen2-bias-mha": dict(model_type="qwen2", num_kv_heads=4, qkv_bias=True),
    "qwen3-qknorm": dict(model_type="qwen3", qk_norm=True, o_bias=True, mlp_bias=True),
    "mistral-window": dict(model_type="mistral", sliding_window=8),
}


def _random_model(variant: str, seed: int = 0):
    """tiny-llama with every parameter random (biases and norm weights too, so their folds are exercised)."""
    cfg = dataclasses.replace(get_preset("tiny-llama"), **VARIANTS[variant])
    model = build_model(cfg, dtype=jnp.float32, rngs=nnx.Rngs(seed))
    state = nnx.state(model, nnx.Param)
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(seed + 100), len(leaves))
    noisy = [a * (1 + 0.3 * jax.random.normal(k, a.shape)) + 0.02 * jax.random.normal(k, a.shape)
             for a, k in zip(leaves, keys)]
    nnx.update(model, jax.tree.unflatten(treedef, noisy))
    return model


def _tokens(cfg, B=2, S=24, seed=3):
    return np.asarray(jax.random.randint(jax.random.key(seed), (B, S), 0, cfg.vocab_size), np.int32)


def _rel_err(a, b):
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_folding_random_scales_leaves_logits_unchanged(variant):
    model = _random_model(variant)
    cfg = model.config
    ids = _tokens(cfg)
    expected = ie_jax.forward(model, ids)
    L, K, G, H = cfg.num_layers, cfg.num_kv_heads, cfg.num_heads // cfg.num_kv_heads, cfg.head_dim
    k = jax.random.split(jax.random.key(7), 4)
    rand = lambda key, shape: np.asarray(jnp.exp(0.7 * jax.random.normal(key, shape)))  # noqa: E731
    s_o = np.broadcast_to(rand(k[1], (L, K, 1, H)), (L, K, G, H)).reshape(L, K * G * H)  # one scale per kv head
    scales = {"qkv": rand(k[0], (L, cfg.hidden_size)), "o": s_o, "gate_up": rand(k[2], (L, cfg.hidden_size)),
              "down": rand(k[3], (L, cfg.intermediate_size))}
    q_before = np.asarray(model.layers.self_attn.q_proj.kernel[...])
    fold_awq_scales(model, scales)
    q_after = np.asarray(model.layers.self_attn.q_proj.kernel[...])
    np.testing.assert_allclose(q_after, q_before * scales["qkv"][:, :, None], rtol=1e-6)
    assert _rel_err(ie_jax.forward(model, ids), expected) < 1e-5


def test_fold_refuses_o_scales_that_differ_within_a_kv_head():
    model = _random_model("llama-gqa")
    cfg = model.config
    s_o = np.asarray(jnp.exp(jax.random.normal(jax.random.key(0), (cfg.num_layers, cfg.num_heads * cfg.head_dim))))
    with pytest.raises(ValueError, match="kv head"):
        fold_awq_scales(model, {"o": s_o})


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_calibration_folds_exactly_and_sees_the_model_activations(variant):
    model = _random_model(variant)
    cfg = model.config
    ids = _tokens(cfg, B=3, S=32)
    expected = ie_jax.forward(model, ids)
    # Layer 0's q/k/v input, computed here from the model's own embedding and norm.
    h = model.embed_tokens(jnp.asarray(ids))
    weight0 = model.layers.input_layernorm.weight[...][0]
    normed = h * jax.lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + cfg.norm_eps) * weight0
    mag0 = jnp.mean(jnp.abs(normed.reshape(-1, cfg.hidden_size)), axis=0)

    config = AWQConfig(group_size=32, batch_size=2, max_search_tokens=64)
    model, found = awq_calibrate(model, ids, config, progress=False)
    np.testing.assert_allclose(found.scales["qkv"][0], np.asarray(scale_from_magnitude(mag0, found.alphas["qkv"][0])),
                               rtol=1e-4)
    for g, s in found.scales.items():
        assert s.shape[0] == cfg.num_layers and np.isfinite(s).all() and (s > 0).all()
        assert ((found.alphas[g] >= 0) & (found.alphas[g] <= 1)).all()
        assert (found.errors[g][:, 1] <= found.errors[g][:, 0]).all()
    assert _rel_err(ie_jax.forward(model, ids), expected) < 1e-5


def test_awq_model_quantizes_with_less_logit_error_than_rtn():
    """A model whose hidden states have outlier channels (planted through the norm weights, as trained LLMs have
    them): after int4 quantization, AWQ's logits are closer to the float model's than RTN's."""
    def planted():
        model = _random_model("llama-gqa", seed=4)
        for norm in (model.layers.input_layernorm, model.layers.post_attention_layernorm):
            norm.weight.set_value(norm.weight[...].at[:, :3].multiply(25.0))
        return model

    cfg = planted().config
    ids, test_ids = _tokens(cfg, B=4, S=32, seed=5), _tokens(cfg, B=2, S=32, seed=6)
    expected = ie_jax.forward(planted(), test_ids)
    rtn = _rel_err(ie_jax.forward(quantize_model(planted(), "awq", group_size=32), test_ids), expected)
    awq_model, _ = awq_calibrate(planted(), ids, AWQConfig(group_size=32), progress=False)
    awq = _rel_err(ie_jax.forward(quantize_model(awq_model, "awq", group_size=32), test_ids), expected)

    assert awq <= 0.85 * rtn, (awq, rtn)  # relative L2 of the logits; the per-layer MSE ratios are 0.2-0.75


def test_without_o_proj_scaling_v_and_o_are_untouched():
    model = _random_model("llama-gqa")
    v, o = np.asarray(model.layers.self_attn.v_proj.kernel[...]), np.asarray(model.layers.self_attn.o_proj.kernel[...])
    ids = _tokens(model.config, B=2, S=16)
    _, found = awq_calibrate(model, ids, AWQConfig(group_size=32, scale_o_proj=False), progress=False)
    assert found.scales["o"] is None and "o" not in found.alphas
    # v_proj's rows still carry the q/k/v scale; its columns and o_proj are as they were.
    np.testing.assert_allclose(np.asarray(model.layers.self_attn.v_proj.kernel[...]),
                               v * found.scales["qkv"][:, :, None], rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(model.layers.self_attn.o_proj.kernel[...]), o)


def test_refusals():
    gpt2 = init_model(get_preset("tiny-gpt2"), dtype=jnp.float32)
    with pytest.raises(ValueError, match="Llama family"):
        search_awq_scales(gpt2, np.ones((1, 8), np.int32))
    model = _random_model("llama-gqa")
    with pytest.raises(ValueError, match="group_size=48"):
        search_awq_scales(model, np.ones((1, 8), np.int32), AWQConfig(group_size=48))
    with pytest.raises(ValueError, match="num_grid"):
        AWQConfig(num_grid=0)
    with pytest.raises(ValueError, match="fewer than one row"):
        calibration_rows(np.arange(10), 4, 16)


def test_calibration_rows_spread_over_the_stream():
    ids = np.arange(1000)
    rows = calibration_rows(ids, 3, 100)
    assert rows.shape == (3, 100)
    np.testing.assert_array_equal(rows[:, 0], [0, 400, 900])  # rows 0, 4, 9 of the 10 available
    np.testing.assert_array_equal(rows[1], np.arange(400, 500))
    assert calibration_rows(ids, 50, 100).shape == (10, 100)
