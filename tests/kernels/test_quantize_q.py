"""fp8 quantization of the decode queries in one kernel (kernels_pallas/quantize_q.py): the kernel in the Pallas
interpreter against the jnp reference, bit for bit (q8's e4m3 bits and the f32 scales), an all-zero (token,
kv-head) block, the fallback for shapes the Triton blocks cannot take, the arguments' checks, the CUDA lowering
on CPU, and a `gpu` check at Llama-3-8B sizes. Random normal queries throughout."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.sharding import AbstractDevice, AbstractMesh, AxisType, use_abstract_mesh

from kernels_pallas import quantize_q
from kernels_pallas.kv_cache import FP8


def inputs(T, N, K, H, seed=0):
    kq, ks = jax.random.split(jax.random.key(seed))
    q = 3 * jax.random.normal(kq, (T, N, H), jnp.bfloat16)
    q_scale = jax.random.uniform(ks, (K,), jnp.float32, 0.05, 2.0)
    return q, q_scale


def bits(x):
    return np.asarray(lax.bitcast_convert_type(x, jnp.uint8))


def assert_same(got, want, T, N, H, K):
    (q8, s), (q8_ref, s_ref) = got, want
    assert q8.dtype == FP8 and q8.shape == (T * N, H) and s.dtype == jnp.float32 and s.shape == (T, K)
    np.testing.assert_array_equal(np.asarray(s), np.asarray(s_ref))
    np.testing.assert_array_equal(bits(q8), bits(q8_ref))


@pytest.mark.parametrize("T,N,K,H", [(1, 32, 8, 128), (8, 32, 8, 128), (3, 28, 4, 128), (5, 16, 2, 64)])
def test_kernel_matches_the_reference_bit_for_bit(T, N, K, H):
    q, q_scale = inputs(T, N, K, H, seed=T)
    assert quantize_q.supported(q, K) == ((N // K) & (N // K - 1) == 0)  # G = 7: the reference, as a fallback
    got = quantize_q.quantize_queries(q, K, q_scale, interpret=True)
    want = quantize_q.quantize_queries_reference(q, K, q_scale)
    assert_same(got, want, T, N, H, K)
    # the scales are amax / 448 of the scaled heads: every block has an element at ±448
    q8 = np.asarray(got[0], np.float32).reshape(T, K, -1)
    np.testing.assert_array_equal(np.abs(q8).max(-1), 448.0)


def test_an_all_zero_block_has_scale_one_and_zeros():
    T, N, K, H = 4, 32, 8, 128
    G = N // K
    q, q_scale = inputs(T, N, K, H)
    q = q.at[2, 3 * G:4 * G].set(0)  # token 2, kv-head 3
    got = quantize_q.quantize_queries(q, K, q_scale, interpret=True)
    assert_same(got, quantize_q.quantize_queries_reference(q, K, q_scale), T, N, H, K)
    q8, s = got
    assert s[2, 3] == 1.0 and np.all(np.delete(np.asarray(s), 2 * K + 3) != 1.0)
    assert not bits(q8).reshape(T, K, G * H)[2, 3].any()


def test_supported_shapes():
    q = jnp.zeros((2, 32, 128), jnp.bfloat16)
    assert quantize_q.supported(q, 8) and quantize_q.supported(q, 32) and quantize_q.supported(q, 1)
    assert not quantize_q.supported(jnp.zeros((2, 28, 128), jnp.bfloat16), 4)  # G = 7
    assert not quantize_q.supported(jnp.zeros((2, 32, 96), jnp.bfloat16), 8)  # H = 96
    assert not quantize_q.supported(q, 3) and not quantize_q.supported(jnp.zeros((32, 128)), 8)


def test_bad_arguments_are_named():
    q, q_scale = inputs(2, 32, 8, 128)
    with pytest.raises(ValueError, match=r"\[T, N, H\]"):
        quantize_q.quantize_queries(q[0], 8, q_scale, interpret=True)
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        quantize_q.quantize_queries(q, 3, q_scale[:3], interpret=True)
    with pytest.raises(ValueError, match="q_scale.shape"):
        quantize_q.quantize_queries(q, 8, q_scale[:4], interpret=True)


def test_lowers_for_the_gpu_cpu():
    """The Triton lowering (power-of-two blocks, the e4m3 store at compute capability 9.0) runs on CPU against an
    abstract H200."""
    S = jax.ShapeDtypeStruct
    gpu = AbstractDevice(device_kind="NVIDIA H200", num_cores=132, platform="gpu")
    f = jax.jit(lambda q, s: quantize_q.quantize_queries(q, 8, s))
    with use_abstract_mesh(AbstractMesh((1,), ("x",), (AxisType.Auto,), abstract_device=gpu)):
        text = f.trace(S((4, 32, 128), jnp.bfloat16), S((8,), jnp.float32)).lower(
            lowering_platforms=("cuda",)).as_text()
    assert "xla.gpu.triton" in text and "grid_x = 4" in text and "grid_y = 8" in text


@pytest.mark.gpu
@pytest.mark.parametrize("T", [1, 8, 64])
def test_gpu_kernel_at_llama_3_8b_sizes(T):
    q, q_scale = inputs(T, 32, 8, 128, seed=T)
    q8, s = quantize_q.quantize_queries(q, 8, q_scale)
    want = quantize_q.quantize_queries_reference(q, 8, q_scale)
    assert_same((q8, s), want, T, 32, 128, 8)  # Triton's division and e4m3 rounding are XLA's here
