"""W8A16 format: error bound, matmul reference, batching over a stacked layer axis, dispatch through ops."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ie_jax.quant.int8 import dequantize_int8, int8_matmul_reference, quantize_int8
from kernels_pallas.ops import quant_matmul


def _w(seed, shape):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32) * 0.05


def test_error_is_at_most_half_a_step_per_channel():
    w = _w(0, (96, 40)).at[:, 3].set(0.0)  # one all-zero column
    qw = quantize_int8(w)
    assert qw.q.dtype == jnp.int8 and qw.scale.shape == (40,) and qw.scale.dtype == jnp.float32
    err = np.abs(np.asarray(dequantize_int8(qw)) - np.asarray(w))
    step = np.asarray(np.abs(w).max(axis=0) / 127)
    assert (err <= step / 2 * (1 + 1e-6) + 1e-12).all()
    assert np.abs(np.asarray(qw.q)).max() == 127  # the largest value of each column uses the full range
    assert (np.asarray(qw.q[:, 3]) == 0).all() and float(qw.scale[3]) == 1.0


def test_matmul_reference_matches_dense_dot_of_dequantized():
    w, x = _w(1, (64, 48)), jax.random.normal(jax.random.key(2), (3, 5, 64))
    qw = quantize_int8(w)
    expected = np.asarray(x) @ np.asarray(dequantize_int8(qw))
    got = int8_matmul_reference(x, qw)
    assert got.shape == (3, 5, 48)
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(quant_matmul(x, qw)), np.asarray(got), rtol=0, atol=0)
    bf = quant_matmul(x.astype(jnp.bfloat16), qw, out_dtype=jnp.float32)
    assert bf.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(bf), expected, rtol=2e-2, atol=2e-2)


def test_leading_axes_are_batch_axes():
    w = _w(3, (3, 32, 16))
    qw = quantize_int8(w)
    for i in range(3):
        one = quantize_int8(w[i])
        assert np.array_equal(np.asarray(qw.q[i]), np.asarray(one.q))
        assert np.array_equal(np.asarray(qw.scale[i]), np.asarray(one.scale))


def test_bad_input_raises():
    with pytest.raises(ValueError, match="expected"):
        quantize_int8(jnp.ones((8,)))
    with pytest.raises(ValueError, match="Int8Weights|type"):
        quant_matmul(jnp.ones((2, 4)), jnp.ones((4, 4)))
