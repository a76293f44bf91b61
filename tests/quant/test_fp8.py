"""FP8 W8A8 format: weight error bound, the W8A8 matmul against an independent numpy computation and against the
dequantized kernel, static input scales, and the HF FP8 tensor conventions (q [N, K] is HF's [out, in] as is)."""
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from ie_jax.quant.fp8 import (FP8_MAX, Fp8Weights, dequantize_fp8, fp8_error_bound, fp8_matmul_reference,
                              from_hf_fp8, quantize_fp8, to_hf_fp8)
from kernels_pallas.ops import quant_matmul


def _w(seed, shape, std=0.05):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32) * std


def test_weight_error_within_half_an_e4m3_ulp():
    w = _w(0, (2, 128, 48))
    qw = quantize_fp8(w)
    assert qw.q.dtype == jnp.float8_e4m3fn and qw.q.shape == (2, 48, 128) and qw.scale.shape == (2, 48)
    w_hat = np.asarray(dequantize_fp8(qw))
    assert w_hat.shape == w.shape  # the [L, K, N] kernel back
    err = np.abs(w_hat - np.asarray(w))
    assert (err <= np.asarray(fp8_error_bound(w, qw))).all()
    # the largest value of each output channel (a row of q) maps to 448 exactly
    np.testing.assert_allclose(np.abs(np.asarray(qw.q, np.float32)).max(axis=-1), FP8_MAX)


def _reference(x, q, w_scale, input_scale=None):
    """Per-token e4m3 activations times e4m3 weights q [N, K] in float64, from the format description."""
    x = np.asarray(x, np.float64)
    if input_scale is None:
        s = np.abs(x).max(axis=-1, keepdims=True) / 448.0
    else:
        s = np.full(x.shape[:-1] + (1,), float(input_scale))
    xq = np.clip(x / s, -448, 448).astype(np.float32).astype(ml_dtypes.float8_e4m3fn).astype(np.float64)
    wq = np.asarray(q).astype(np.float64)
    return (xq @ wq.T) * s * np.asarray(w_scale, np.float64)


def test_dynamic_matmul_matches_independent_reference():
    w, x = _w(1, (64, 32)), jax.random.normal(jax.random.key(2), (4, 64)) * 3.0
    qw = quantize_fp8(w)
    got = np.asarray(fp8_matmul_reference(x, qw))
    np.testing.assert_allclose(got, _reference(x, qw.q, qw.scale), rtol=1e-4, atol=1e-5)
    assert np.array_equal(np.asarray(quant_matmul(x, qw)), got)
    # and W8A8 stays close to the exact product: both operands carry a relative error of at most 2^-4
    exact = np.asarray(x) @ np.asarray(w)
    assert np.linalg.norm(got - exact) / np.linalg.norm(exact) < 0.06


def test_static_input_scale_is_used_and_saturates():
    w = _w(3, (32, 16))
    qw = quantize_fp8(w)
    x = jax.random.normal(jax.random.key(4), (3, 32))
    x = x.at[0, 0].set(500.0)  # beyond 448 * input_scale: saturates
    static = Fp8Weights(qw.q, qw.scale, jnp.float32(0.5))
    got = np.asarray(fp8_matmul_reference(x, static))
    np.testing.assert_allclose(got, _reference(x, qw.q, qw.scale, 0.5), rtol=1e-4, atol=1e-5)
    assert not np.allclose(got, np.asarray(fp8_matmul_reference(x, qw)))


def test_matmul_equals_x_times_the_dequantized_kernel():
    """With x exactly representable (e4m3 codes times a power of two per row, each row reaching 448) quantizing x
    loses nothing, so the reference on q [N, K] is x @ dequantize_fp8(qw) [K, N] up to f32 summation order."""
    rng = np.random.default_rng(5)
    codes = np.clip(rng.standard_normal((6, 96)) * 100, -448, 448).astype(ml_dtypes.float8_e4m3fn)
    codes = codes.astype(np.float32)
    codes[np.arange(6), rng.integers(0, 96, 6)] = 448.0 * rng.choice([-1, 1], 6)
    x = jnp.asarray(codes * 2.0 ** rng.integers(-8, -2, (6, 1)), jnp.float32)
    qw = quantize_fp8(_w(6, (96, 40)))
    expected = np.asarray(x, np.float64) @ np.asarray(dequantize_fp8(qw), np.float64)
    np.testing.assert_allclose(np.asarray(fp8_matmul_reference(x, qw)), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("scale_shape", [(), (1,), (24,), (24, 1)])
def test_hf_weight_scale_shapes(scale_shape):
    rng = np.random.default_rng(0)
    weight = (rng.standard_normal((24, 40)) * 100).astype(ml_dtypes.float8_e4m3fn)  # [out, in]
    scale = rng.uniform(0.01, 0.02, scale_shape).astype(np.float32)
    qw = from_hf_fp8(weight, scale, np.float32(0.25))
    assert qw.q.shape == (24, 40) and qw.scale.shape == (24,)
    assert np.array_equal(np.asarray(qw.q).view(np.uint8), weight.view(np.uint8))  # [out, in] is q: no transpose
    expected = weight.astype(np.float32) * np.broadcast_to(scale.reshape(-1), (24,))[:, None]  # [out, in]
    np.testing.assert_array_equal(np.asarray(dequantize_fp8(qw)), expected.T)
    back = to_hf_fp8(qw)
    assert np.array_equal(back["weight"].view(np.uint8), weight.view(np.uint8))
    assert float(back["input_scale"]) == 0.25


def test_bad_hf_tensors_raise():
    w = np.zeros((8, 16), ml_dtypes.float8_e4m3fn)
    with pytest.raises(ValueError, match=r"weight_scale.shape=\(3,\)"):
        from_hf_fp8(w, np.ones((3,), np.float32))
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        from_hf_fp8(np.zeros((8, 16), np.float16), np.ones((8,), np.float32))
    with pytest.raises(ValueError, match=r"weight.shape=\(2, 8, 16\)"):
        from_hf_fp8(np.zeros((2, 8, 16), ml_dtypes.float8_e4m3fn), np.ones((8,), np.float32))
