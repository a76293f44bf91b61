"""W4A16 format: error bounds, and the AutoAWQ GEMM / GPTQ layouts checked bit by bit against references written
from the format descriptions (python ints, explicit nibble positions, GPTQ's zero - 1), including act-order."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ie_jax.quant.int4 import (Int4Weights, awq_pack, awq_unpack, dequantize_int4, gptq_pack, gptq_unpack,
                               int4_matmul_reference, quantize_int4)
from kernels_pallas.ops import quant_matmul

# AutoAWQ GEMM: within each int32 (8 output columns), nibble position p (bits 4p..4p+3) holds column NIBBLE_COL[p].
NIBBLE_COL = [0, 2, 4, 6, 1, 3, 5, 7]


def _w(seed, shape, std=0.05):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32) * std


def _nibble(word: int, p: int) -> int:
    return (int(word) & 0xFFFFFFFF) >> (4 * p) & 0xF


def _random_words(rng, shape):
    return rng.integers(-2**31, 2**31, size=shape, dtype=np.int64).astype(np.int32)


@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_error_at_most_half_a_step_per_group(group_size):
    w = _w(group_size, (2, 256, 48))
    qw = quantize_int4(w, group_size)
    assert qw.q.dtype == jnp.uint8 and qw.q.shape == (2, 256, 48)
    assert qw.scales.shape == qw.zeros.shape == (2, 256 // group_size, 48) and qw.scales.dtype == jnp.float16
    assert int(qw.q.max()) <= 15 and int(qw.zeros.max()) <= 15
    err = np.abs(np.asarray(dequantize_int4(qw)) - np.asarray(w))  # [2, K, N]
    g = np.asarray(w).reshape(2, -1, group_size, 48)
    true_step = (np.maximum(g.max(2), 0) - np.minimum(g.min(2), 0)) / 15  # [2, K/G, N]
    bound = np.repeat(true_step, group_size, axis=1) * (0.5 + 16 * 2.0 ** -11)  # + the f16 rounding of the scale
    assert (err <= bound + 1e-9).all()
    assert err.max() > 0.25 * bound.max()  # the bound is not vacuous


def test_awq_word_bit_layout_by_hand():
    # columns 0..7 hold 1..8: nibble p holds column NIBBLE_COL[p], i.e. values 1,3,5,7,2,4,6,8 from bit 0 upwards
    q = jnp.arange(1, 9, dtype=jnp.uint8)[None, :].repeat(32, axis=0)  # [K=32, N=8]
    qw = Int4Weights(q, jnp.ones((1, 8), jnp.float16), jnp.full((1, 8), 9, jnp.uint8), 32)
    packed = awq_pack(qw)
    assert packed["qweight"].dtype == jnp.int32 and packed["qweight"].shape == (32, 1)
    assert int(packed["qweight"][0, 0]) & 0xFFFFFFFF == 0x86427531
    assert int(packed["qzeros"][0, 0]) & 0xFFFFFFFF == 0x99999999


def test_awq_unpack_matches_bit_level_reference():
    rng = np.random.default_rng(0)
    K, N, G = 64, 24, 32
    qweight, qzeros = _random_words(rng, (K, N // 8)), _random_words(rng, (K // G, N // 8))
    scales = rng.uniform(0.001, 0.01, (K // G, N)).astype(np.float16)
    expected = np.zeros((K, N))
    for k in range(K):
        for n in range(N):
            p = NIBBLE_COL.index(n % 8)
            q = _nibble(qweight[k, n // 8], p)
            z = _nibble(qzeros[k // G, n // 8], p)
            expected[k, n] = (q - z) * float(scales[k // G, n])
    qw = awq_unpack(qweight, qzeros, scales, G)
    np.testing.assert_array_equal(np.asarray(dequantize_int4(qw), np.float64), expected.astype(np.float32))
    again = awq_pack(qw)  # pack(unpack(words)) == words
    assert np.array_equal(np.asarray(again["qweight"]), qweight)
    assert np.array_equal(np.asarray(again["qzeros"]), qzeros)
    assert np.array_equal(np.asarray(again["scales"]), scales)


def _gptq_reference(qweight, qzeros, scales, g_idx):
    """GPTQ v1 from its description: qweight packs 8 rows per int32 (row 8r + i in nibble i), qzeros packs 8 columns
    (column 8c + i in nibble i) and stores zero - 1; row k uses group g_idx[k]."""
    K, N = 8 * qweight.shape[0], qweight.shape[1]
    w = np.zeros((K, N))
    for k in range(K):
        for n in range(N):
            q = _nibble(qweight[k // 8, n], k % 8)
            g = int(g_idx[k])
            z = _nibble(qzeros[g, n // 8], n % 8) + 1
            w[k, n] = float(scales[g, n]) * (q - z)
    return w


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_unpack_matches_bit_level_reference(act_order):
    rng = np.random.default_rng(1 + act_order)
    K, N, G = 64, 16, 16
    qweight, qzeros = _random_words(rng, (K // 8, N)), _random_words(rng, (K // G, N // 8))
    scales = rng.uniform(0.001, 0.01, (K // G, N)).astype(np.float16)
    g_idx = np.arange(K, dtype=np.int32) // G
    if act_order:  # GPTQ's desc_act: the i-th row in activation order goes to group i // G
        order = rng.permutation(K)
        g_idx = np.empty(K, np.int32)
        g_idx[order] = np.arange(K) // G
    qw = gptq_unpack(qweight, qzeros, scales, g_idx)
    assert (qw.perm is not None) == act_order
    expected = _gptq_reference(qweight, qzeros, scales, g_idx)
    np.testing.assert_array_equal(np.asarray(dequantize_int4(qw), np.float64), expected.astype(np.float32))
    x = jax.random.normal(jax.random.key(0), (3, K))
    np.testing.assert_allclose(np.asarray(int4_matmul_reference(x, qw)), np.asarray(x) @ expected, rtol=1e-5,
                               atol=1e-5)
    again = gptq_pack(qw)
    assert np.array_equal(np.asarray(again["qweight"]), qweight)
    assert np.array_equal(np.asarray(again["qzeros"]), qzeros)
    assert np.array_equal(np.asarray(again["g_idx"]), g_idx)


def test_act_order_quantization_round_trips_through_gptq():
    w = _w(5, (2, 128, 32))
    perm = jnp.stack([jax.random.permutation(jax.random.key(i), 128) for i in range(2)])
    qw = quantize_int4(w, 32, perm=perm)
    # groups are formed in permuted order, so the error bound holds group by group in that order
    err = np.abs(np.asarray(dequantize_int4(qw)) - np.asarray(w))
    assert err.max() <= float(jnp.max(qw.scales)) * 0.51
    back = gptq_unpack(**gptq_pack(qw))
    np.testing.assert_array_equal(np.asarray(dequantize_int4(back)), np.asarray(dequantize_int4(qw)))
    x = jax.random.normal(jax.random.key(6), (4, 128))
    dense = np.asarray(x) @ np.asarray(dequantize_int4(qw)[1])
    np.testing.assert_allclose(np.asarray(quant_matmul(x, jax.tree.map(lambda a: a[1], back))), dense,
                               rtol=1e-5, atol=1e-5)


def test_stacked_layers_batch():
    w = _w(7, (3, 64, 16))
    qw = quantize_int4(w, 32)
    packed = awq_pack(qw)
    assert packed["qweight"].shape == (3, 64, 2) and packed["qzeros"].shape == (3, 2, 2)
    for i in range(3):
        one = awq_pack(quantize_int4(w[i], 32))
        for k in one:
            assert np.array_equal(np.asarray(packed[k][i]), np.asarray(one[k]))
    back = awq_unpack(packed["qweight"], packed["qzeros"], packed["scales"], 32)
    assert np.array_equal(np.asarray(back.q), np.asarray(qw.q))


def test_bad_inputs_raise():
    w = _w(8, (96, 16))
    with pytest.raises(ValueError, match="group_size=64"):
        quantize_int4(w, 64)
    qw = quantize_int4(w, 32, perm=jnp.arange(96)[::-1])
    with pytest.raises(ValueError, match="AWQ"):
        awq_pack(qw)
    g = gptq_pack(quantize_int4(w, 32))
    with pytest.raises(ValueError, match="bits=8"):
        gptq_unpack(g["qweight"], g["qzeros"], g["scales"], g["g_idx"], bits=8)
    with pytest.raises(ValueError, match="unequal"):
        gptq_unpack(g["qweight"], g["qzeros"], g["scales"], jnp.zeros((96,), jnp.int32).at[0].set(2))
    with pytest.raises(ValueError, match="qzeros.shape"):
        awq_unpack(np.zeros((96, 2), np.int32), np.zeros((2, 2), np.int32), np.zeros((3, 16), np.float16), 32)
