"""Skinny-M matmul against its f32 reference.

CPU tests run the real kernel body in the Mosaic GPU interpreter at small shapes (several K splits, ring slots
reused more than once, M not a multiple of 8); `gpu` tests compile it at Llama-3-8B layer sizes. Inputs are fresh
random bf16 draws.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels_pallas import skinny_matmul as sm


def make_inputs(seed, m, k, n):
    kx, kw = jax.random.split(jax.random.key(seed))
    return jax.random.normal(kx, (m, k), jnp.bfloat16), jax.random.normal(kw, (k, n), jnp.bfloat16)


def assert_close(out, expected, tol=1e-2):
    out = np.asarray(out, np.float32)
    expected = np.asarray(expected, np.float32)
    assert out.shape == expected.shape
    diff = np.abs(out - expected)
    scale = np.abs(expected).max()
    print(f"max diff {diff.max():.3e} mean diff {diff.mean():.3e} (|expected| max {scale:.1f})")
    assert diff.max() <= tol * scale


# 6 K-steps per split with 4 slots: every slot is refilled; 2 splits x 2 column blocks of CTAs.
SMALL = sm.TuningConfig(block_n=64, block_k=64, num_stages=4, num_splits=2)


@pytest.mark.parametrize("m", [1, 7, 16, 64])
def test_matches_reference_cpu(m):
    x, w = make_inputs(m, m, 768, 128)
    assert_close(sm.skinny_matmul(x, w, config=SMALL, interpret=True), sm.skinny_matmul_reference(x, w))


@pytest.mark.parametrize("config", [
    sm.TuningConfig(block_n=128, block_k=128, num_stages=2, num_splits=1),  # more steps than slots, one split
    sm.TuningConfig(block_n=64, block_k=64, num_stages=8, num_splits=4),  # more slots than steps
    sm.TuningConfig(block_n=64, block_k=128, num_stages=3),  # default split choice
])
def test_configs_cpu(config):
    x, w = make_inputs(3, 5, 512, 256)
    assert_close(sm.skinny_matmul(x, w, config=config, interpret=True), sm.skinny_matmul_reference(x, w))


@pytest.mark.parametrize("config", [
    sm.TuningConfig(block_n=64, block_k=64, num_stages=4, num_splits=2, mma_depth=1),
    sm.TuningConfig(block_n=64, block_k=128, num_stages=2, num_splits=1, mma_depth=1),
])
def test_mma_depth_one_cpu(config):
    x, w = make_inputs(5, 9, 768, 128)
    assert_close(sm.skinny_matmul(x, w, config=config, interpret=True), sm.skinny_matmul_reference(x, w))


def test_tiled_weights_cpu():
    x, w = make_inputs(6, 16, 768, 128)
    tiled = sm.tile_weights(w, SMALL)
    assert tiled.shape == (2, 12, 64, 64)
    np.testing.assert_array_equal(np.asarray(sm.untile_weights(tiled)), np.asarray(w))
    np.testing.assert_array_equal(np.asarray(tiled[1, 3]), np.asarray(w[3 * 64:4 * 64, 64:128]))
    assert_close(sm.skinny_matmul(x, tiled, config=SMALL, interpret=True), sm.skinny_matmul_reference(x, w))
    with pytest.raises(ValueError, match="tiles of"):
        sm.skinny_matmul(x, sm.tile_weights(w, sm.TuningConfig(block_n=128, block_k=128)), config=SMALL)


def test_race_free_cpu():
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
    x, w = make_inputs(4, 16, 512, 128)
    out = sm.skinny_matmul(x, w, config=SMALL, interpret=InterpretGPUParams(detect_races=True))
    assert_close(out, sm.skinny_matmul_reference(x, w))


@pytest.mark.parametrize("mma_depth", [0, 1])
@pytest.mark.parametrize("m", [1, 13])
def test_two_consumer_warpgroups_cpu(m, mma_depth):
    """consumers=2: alternate K steps per warpgroup (4 per split over 2 slots each), partials summed in SMEM; no
    races between the rings' refills or on the SMEM hand-over."""
    from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
    x, w = make_inputs(m + 40, m, 1024, 128)
    config = sm.TuningConfig(block_n=64, block_k=64, num_stages=2, num_splits=2, mma_depth=mma_depth, consumers=2)
    out = sm.skinny_matmul(x, w, config=config, interpret=InterpretGPUParams(detect_races=True))
    assert not interpret_pallas_call.get_races().races_found
    assert_close(out, sm.skinny_matmul_reference(x, w))


@pytest.mark.parametrize("config", [sm.TuningConfig(num_stages=2, consumers=2),
                                    sm.TuningConfig(256, 64, num_stages=2, ctas_per_sm=1, mma_depth=1, consumers=2)])
def test_two_consumers_lower_for_the_gpu_cpu(config):
    """The Mosaic GPU lowering (two warpgroups, the SMEM hand-over's layouts) runs on CPU."""
    S = jax.ShapeDtypeStruct
    f = jax.jit(lambda x, w: sm._skinny_matmul(x, w, config=config, interpret=False))
    f.trace(S((16, 4096), jnp.bfloat16), S((4096, 6144), jnp.bfloat16)).lower(lowering_platforms=("cuda",))


@pytest.mark.parametrize("shape, message", [
    ((65, 256, 128), "must be in"),
    ((8, 200, 128), "multiple of"),
    ((8, 256, 100), "multiple of"),
])
def test_rejects_unsupported_shapes(shape, message):
    m, k, n = shape
    x, w = make_inputs(0, m, k, n)
    with pytest.raises(ValueError, match=message):
        sm.skinny_matmul(x, w, config=sm.TuningConfig(block_n=128, block_k=128))


def test_rejects_bad_config_and_dtype():
    with pytest.raises(ValueError, match="block_n"):
        sm.TuningConfig(block_n=96)
    with pytest.raises(ValueError, match="mma_depth"):
        sm.TuningConfig(mma_depth=2)
    with pytest.raises(ValueError, match="SMEM"):
        sm.TuningConfig(block_n=256, block_k=256, num_stages=8)
    x, w = make_inputs(0, 4, 256, 128)
    with pytest.raises(ValueError, match="bfloat16"):
        sm.skinny_matmul(x.astype(jnp.float32), w)


@pytest.mark.gpu
@pytest.mark.parametrize("k, n", list(sm.LLAMA3_8B_SHAPES.values()))
@pytest.mark.parametrize("m", [1, 16, 64])
def test_llama_shapes_gpu(m, k, n):
    x, w = make_inputs(m + k + n, m, k, n)
    assert_close(sm.skinny_matmul(x, w), sm.skinny_matmul_reference(x, w))


@pytest.mark.gpu
@pytest.mark.parametrize("config", [sm.TuningConfig(mma_depth=1), sm.TuningConfig(block_k=64, num_stages=6),
                                    sm.TuningConfig(256, 64, num_stages=2, ctas_per_sm=1, mma_depth=1, consumers=2),
                                    sm.TuningConfig(block_k=64, num_stages=3, mma_depth=1, consumers=2)])
def test_tiled_and_pipelined_gpu(config):
    x, w = make_inputs(11, 16, 4096, 4096)
    assert_close(sm.skinny_matmul(x, sm.tile_weights(w, config), config=config), sm.skinny_matmul_reference(x, w))
    assert_close(sm.skinny_matmul(x, w, config=config), sm.skinny_matmul_reference(x, w))
