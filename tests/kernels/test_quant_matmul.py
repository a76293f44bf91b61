"""Weight-only quantized skinny matmul (W8A16, W4A16) against the formats' own references.

CPU tests run the kernel body in the Mosaic GPU interpreter at small shapes (several K splits, ring slots refilled,
M not a multiple of 8) and check the CUDA lowering (layouts, SMEM) without a GPU; `gpu` tests compile it at
Llama-3-8B layer sizes. Weights are random normal draws quantized by ie_jax.quant.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ie_jax.quant.int4 import int4_matmul_reference, quantize_int4
from ie_jax.quant.int8 import int8_matmul_reference, quantize_int8
from kernels_pallas import quant_matmul as qm


def make(seed, m, k, n, fmt):
    kx, kw = jax.random.split(jax.random.key(seed))
    x = jax.random.normal(kx, (m, k), jnp.bfloat16)
    w = 0.05 * jax.random.normal(kw, (k, n), jnp.float32)
    if fmt == "int8":
        qw = quantize_int8(w)
        return x, qw, qm.pack_int8(qw), int8_matmul_reference
    qw = quantize_int4(w, group_size=128)
    return x, qw, qm.pack_int4(qw), int4_matmul_reference


def rel_err(out, expected):
    out, expected = np.asarray(out, np.float32), np.asarray(expected, np.float32)
    assert out.shape == expected.shape
    return np.abs(out - expected).max() / np.abs(expected).max()


SMALL = qm.TuningConfig(block_n=64, num_stages=2, num_splits=2)  # 2 K steps per split over 2 slots: refills


@pytest.mark.parametrize("fmt", ["int8", "int4"])
@pytest.mark.parametrize("m", [1, 5, 16])
def test_matches_the_format_reference_cpu(fmt, m):
    x, qw, packed, reference = make(m, m, 768, 128, fmt)
    out = qm.quant_matmul(x, packed, config=SMALL, interpret=True)
    # Against the packed reference: the same math (bf16-rounded dequantized weights aside).
    assert rel_err(out, qm.quant_matmul_reference(x, packed)) < 1e-2
    # Against the format's own reference on the unpacked weights: the packing loses nothing.
    assert rel_err(out, reference(x, qw)) < 1.5e-2


def test_race_free_cpu():
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
    x, qw, packed, reference = make(9, 8, 512, 128, "int4")
    out = qm.quant_matmul(x, packed, config=SMALL, interpret=InterpretGPUParams(detect_races=True))
    assert rel_err(out, reference(x, qw)) < 1.5e-2


def test_int4_packing_pairs_columns_j_and_j_plus_64():
    x, qw, packed, _ = make(0, 1, 256, 8, "int4")
    q = np.asarray(qw.q)  # [K, N] 0..15
    byte = np.asarray(packed.q)  # [N, K/2]
    for n in range(8):
        for tile in range(2):
            for j in (0, 17, 63):
                k = tile * 128 + j
                assert byte[n, tile * 64 + j] == q[k, n] | (q[k + 64, n] << 4)
    zeros, scales = np.asarray(qw.zeros, np.float32), np.asarray(qw.scales, np.float32)
    np.testing.assert_allclose(np.asarray(packed.bias), -zeros * scales, rtol=1e-6)


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_lowers_for_the_gpu_cpu(fmt):
    """The full Mosaic GPU lowering (layouts, 8-bit arithmetic rules, SMEM budget) runs on CPU."""
    k, n = 4096, 4096
    q = jax.ShapeDtypeStruct((n, k) if fmt == "int8" else (n, k // 2), jnp.int8 if fmt == "int8" else jnp.uint8)
    if fmt == "int8":
        packed = qm.PackedInt8(q, jax.ShapeDtypeStruct((n,), jnp.float32))
    else:
        groups = jax.ShapeDtypeStruct((k // 128, n), jnp.float32)
        packed = qm.PackedInt4(q, groups, groups)
    x = jax.ShapeDtypeStruct((16, k), jnp.bfloat16)
    f = jax.jit(lambda x, p: qm._quant_matmul(x, p, config=qm.TuningConfig(), interpret=False))
    f.trace(x, packed).lower(lowering_platforms=("cuda",))


def test_rejects_bad_arguments():
    x, qw, packed, _ = make(0, 4, 256, 128, "int8")
    with pytest.raises(ValueError, match="rows of x"):
        qm.quant_matmul(jnp.zeros((65, 256), jnp.bfloat16), packed)
    with pytest.raises(ValueError, match="bfloat16"):
        qm.quant_matmul(x.astype(jnp.float32), packed)
    with pytest.raises(ValueError, match="disagree"):
        qm.quant_matmul(jnp.zeros((4, 384), jnp.bfloat16), packed)
    with pytest.raises(ValueError, match="PackedInt8"):
        qm.quant_matmul(x, qw)
    with pytest.raises(ValueError, match="group_size"):
        qm.pack_int4(quantize_int4(jnp.ones((256, 128)), group_size=64))
    with pytest.raises(ValueError, match="block_n"):
        qm.TuningConfig(block_n=256)


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["int8", "int4"])
@pytest.mark.parametrize("k, n", list(qm.LLAMA3_8B_SHAPES.values()))
@pytest.mark.parametrize("m", [1, 16, 64])
def test_llama_shapes_gpu(fmt, m, k, n):
    x, qw, packed, reference = make(m + k + n, m, k, n, fmt)
    assert rel_err(qm.quant_matmul(x, packed), reference(x, qw)) < 1.5e-2
