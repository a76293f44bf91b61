"""The fp8 many-row GEMM (kernels_pallas/fp8_gemm.py) against the format's reference (ie_jax.quant.fp8).

In the Mosaic GPU interpreter at small shapes: rows that are not a multiple of the tile (padding rows must not reach
y), several K steps through a 2-slot ring, K split over CTAs, per-token and static input scales; its dispatch from
`ops.quant_matmul`, its argument checks, its CUDA lowering on CPU, and `gpu` checks at Llama-3-8B sizes.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels_pallas import fp8_gemm as fg


def make(seed, m, k, n):
    from ie_jax.quant.fp8 import quantize_fp8
    kx, kw = jax.random.split(jax.random.key(seed))
    x = jax.random.normal(kx, (m, k), jnp.bfloat16)
    return x, quantize_fp8(0.05 * jax.random.normal(kw, (k, n), jnp.float32))  # q [N, K]


def rel_err(out, expected):
    """Largest absolute error over the largest reference magnitude."""
    out, expected = np.asarray(out, np.float32), np.asarray(expected, np.float32)
    assert out.shape == expected.shape
    return np.abs(out - expected).max() / np.abs(expected).max()


# The interpreter deadlocks in a barrier wait on tile_n = 256 with K splits (quant_gemm's GEMM does the same under
# it), so the split case runs with tile_n = 128 here.
@pytest.mark.parametrize("label, m, static", [("128x64x2s3", 70, False), ("256x64x2", 70, False),
                                              ("256x64x2", 131, True)])
def test_matches_the_format_reference_cpu(label, m, static):
    from ie_jax.quant.fp8 import fp8_matmul_reference
    x, qw = make(m, m, 768, 256)
    if static:
        qw = qw.replace(input_scale=jnp.float32(float(jnp.abs(x).max()) / 400))
    out = fg.fp8_gemm(x, qw.q, qw.scale, qw.input_scale, config=fg.Fp8GemmConfig.parse(label), interpret=True,
                      out_dtype=jnp.float32)
    # The same e4m3 operands and f32 accumulation as the reference, stored in bf16 (2^-9 of a value) after both
    # scales; with splits each K range's partial is rounded to bf16 before the f32 sum.
    assert rel_err(out, fp8_matmul_reference(x, qw, jnp.float32)) < 8e-3
    dense = jnp.dot(x.astype(jnp.float32), jnp.swapaxes(qw.q.astype(jnp.float32) * qw.scale[:, None], 0, 1))
    assert rel_err(out, dense) < 6e-2  # the activations' quantization, against bf16 x on the same weights


def test_scales_land_on_their_rows_and_columns_cpu():
    """Token and channel scales 1..1000x apart: a scale applied to the wrong row or column would be far off."""
    from ie_jax.quant.fp8 import fp8_matmul_reference
    x, qw = make(7, 80, 256, 128)
    x = x * jnp.logspace(0, 3, 80, dtype=jnp.float32)[:, None].astype(jnp.bfloat16)
    qw = qw.replace(scale=qw.scale * jnp.logspace(3, 0, 128, dtype=jnp.float32))
    out = fg.fp8_gemm(x, qw.q, qw.scale, config=fg.Fp8GemmConfig(128, 64, 2), interpret=True,
                      out_dtype=jnp.float32)
    ref = np.asarray(fp8_matmul_reference(x, qw, jnp.float32))
    err = np.abs(np.asarray(out) - ref) / np.abs(ref).max(axis=1, keepdims=True)  # per row, against its own size
    assert err.max() < 8e-3


def test_dispatch_runs_the_gemm_above_decode_rows_cpu(monkeypatch):
    """ops.quant_matmul under the interpret backend sends Fp8Weights calls of more than 64 rows to the GEMM (leading
    axes flattened), decode-sized ones to the decode kernel; under auto the measured table decides."""
    from ie_jax.quant.fp8 import fp8_matmul_reference
    from kernels_pallas.ops import kernel_backend, quant_matmul
    calls = []
    gemm = fg.fp8_gemm
    monkeypatch.setattr(fg, "fp8_gemm", lambda x, *a, **kw: calls.append(x.shape) or gemm(x, *a, **kw))
    x, qw = make(9, 66, 256, 256)
    with kernel_backend("interpret"):
        out = quant_matmul(x.reshape(2, 33, 256), qw, out_dtype=jnp.float32)
    assert calls == [(66, 256)]
    assert out.shape == (2, 33, 256)
    assert rel_err(out.reshape(66, 256), fp8_matmul_reference(x, qw, jnp.float32)) < 8e-3
    assert fg.gemm_config(64, 4096, 4096) is None  # the decode kernel's rows


def test_config_follows_the_measurements():
    P = fg.Fp8GemmConfig.parse
    assert fg.gemm_config(100, 14336, 4096) == P("128x128x4s4") and fg.gemm_config(1024, 14336, 4096) == P("128x256x3")
    assert fg.gemm_config(256, 4096, 28672) == P("128x256x3") and fg.gemm_config(257, 4096, 28672) is None
    assert fg.gemm_config(200, 4096, 6144) == P("128x128x4") and fg.gemm_config(1025, 4096, 4096) is None
    assert fg.gemm_config(128, 4096, 4032) is None  # N not a multiple of the tile: XLA's dot


def test_rejects_bad_arguments():
    x, qw = make(1, 80, 256, 256)
    config = fg.Fp8GemmConfig(128, 64, 2)
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        fg.fp8_gemm(x, qw.q.astype(jnp.bfloat16), qw.scale, config=config)
    with pytest.raises(ValueError, match="disagree"):
        fg.fp8_gemm(x[:, :128], qw.q, qw.scale, config=config)
    with pytest.raises(ValueError, match="multiple"):
        fg.fp8_gemm(x, qw.q[:192], qw.scale[:192], config=config)
    with pytest.raises(ValueError, match="split"):
        fg.fp8_gemm(x, qw.q, qw.scale, config=fg.Fp8GemmConfig(128, 64, 2, splits=3))  # 2 K steps
    with pytest.raises(ValueError, match="scale.shape"):
        fg.fp8_gemm(x, qw.q, qw.scale[:128], config=config)
    with pytest.raises(ValueError, match="shared memory"):
        fg.Fp8GemmConfig(256, 128, 4)
    with pytest.raises(ValueError, match="accumulator"):
        fg.Fp8GemmConfig(256, 256, 2)
    assert fg.Fp8GemmConfig.parse("128x128x4s4") == fg.Fp8GemmConfig(128, 128, 4, 4)


@pytest.mark.parametrize("label", ["256x128x3", "128x256x3", "256x64x4", "128x128x4s4"])
def test_lowers_for_the_gpu_cpu(label):
    """The full Mosaic GPU lowering: warp-specialized pipeline, e4m3 wgmma from SMEM, scales on both axes."""
    S = jax.ShapeDtypeStruct
    config = fg.Fp8GemmConfig.parse(label)
    f = jax.jit(lambda x, q, s: fg._fp8_gemm(x, q, s, config=config, interpret=False))
    text = f.trace(S((300, 4096), jnp.bfloat16), S((4096, 4096), jnp.float8_e4m3fn), S((4096,), jnp.float32)).lower(
        lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text


@pytest.mark.gpu
@pytest.mark.parametrize("k, n", [(4096, 6144), (4096, 4096), (4096, 28672), (14336, 4096)])
@pytest.mark.parametrize("m", [128, 256, 1024])
def test_llama_shapes_gpu(m, k, n):
    from ie_jax.quant.fp8 import fp8_matmul_reference
    x, qw = make(m + k + n, m, k, n)
    for label in ("256x128x3", "128x128x4s4"):
        out = fg.fp8_gemm(x, qw.q, qw.scale, config=fg.Fp8GemmConfig.parse(label), out_dtype=jnp.float32)
        # Hopper's fp8 wgmma accumulates with fewer mantissa bits than f32, more so over a deep K: H100, down (K =
        # 14,336) unsplit 1.02e-2 of the largest output, the same as XLA's fp8 dot (cuBLASLt) at that shape;
        # split 4 ways 4.6e-3. A wrong tile or scale would be O(1).
        assert rel_err(out, fp8_matmul_reference(x, qw, jnp.float32)) < 2e-2, label
