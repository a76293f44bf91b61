"""FP8 W8A8 matmul (kernels_pallas/fp8_matmul.py) against the format's reference (ie_jax.quant.fp8).

XLA's fp8 dot on both weight layouts and as `ops.quant_matmul` dispatches it; the decode kernel in the Mosaic GPU
interpreter at small shapes (ring slots refilled with a wgmma in flight, M not a multiple of 8, static input
scales), its dispatch and measured config table, its CUDA lowering on CPU, and `gpu` checks at Llama-3-8B sizes.
Weights are random normal draws quantized by ie_jax.quant.fp8.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels_pallas import fp8_matmul as f8
from kernels_pallas import quant_matmul as qm


def rel_err(out, expected):
    """Largest absolute error over the largest reference magnitude."""
    out, expected = np.asarray(out, np.float32), np.asarray(expected, np.float32)
    assert out.shape == expected.shape
    return np.abs(out - expected).max() / np.abs(expected).max()


@pytest.mark.parametrize("n_major", [False, True])
def test_fp8_matmul_matches_the_format_reference(n_major):
    from ie_jax.quant.fp8 import fp8_matmul_reference, quantize_fp8
    kx, kw = jax.random.split(jax.random.key(3))
    x = jax.random.normal(kx, (5, 256), jnp.bfloat16)
    qw = quantize_fp8(0.05 * jax.random.normal(kw, (256, 64), jnp.float32))  # q [N, K]
    q = qw.q if n_major else qw.q.T
    out = f8.fp8_matmul(x, q, qw.scale, n_major=n_major, out_dtype=jnp.float32)
    assert rel_err(out, fp8_matmul_reference(x, qw, jnp.float32)) < 1e-5


def test_fp8_dispatch_runs_the_k_major_dot_on_the_formats_layout():
    """ops.quant_matmul hands Fp8Weights' q [N, K] to XLA's fp8 dot as is (backend pallas forces the Hopper path,
    which XLA also runs on CPU); static input scales included."""
    from ie_jax.quant.fp8 import fp8_matmul_reference, quantize_fp8
    from kernels_pallas.ops import kernel_backend, quant_matmul
    kx, kw = jax.random.split(jax.random.key(4))
    x = jax.random.normal(kx, (2, 3, 256), jnp.bfloat16)
    qw = quantize_fp8(0.05 * jax.random.normal(kw, (256, 96), jnp.float32))
    assert f8.FP8_XLA_DOT
    for w in (qw, qw.replace(input_scale=jnp.float32(0.02))):
        with kernel_backend("pallas"):
            hlo = jax.jit(lambda x, w: quant_matmul(x, w, out_dtype=jnp.float32)).lower(x, w).as_text()
            out = quant_matmul(x, w, out_dtype=jnp.float32)
        dots = [line for line in hlo.splitlines() if "stablehlo.dot_general" in line]
        assert len(dots) == 1 and "contracting_dims = [2] x [1]" in dots[0], dots
        assert "tensor<96x256xf8E4M3FN>) -> tensor<2x3x96xf32>" in dots[0], dots  # e4m3 q [N, K], not upcast
        assert "transpose" not in hlo
        assert out.shape == (2, 3, 96)
        assert rel_err(out, fp8_matmul_reference(x, w, jnp.float32)) < 1e-5


def make_fp8(seed, m, k, n):
    from ie_jax.quant.fp8 import quantize_fp8
    kx, kw = jax.random.split(jax.random.key(seed))
    x = jax.random.normal(kx, (m, k), jnp.bfloat16)
    return x, quantize_fp8(0.05 * jax.random.normal(kw, (k, n), jnp.float32))  # q [N, K]


@pytest.mark.parametrize("m, static", [(1, False), (11, False), (11, True)])
def test_fp8_kernel_matches_the_format_reference_cpu(m, static):
    """The fp8 decode kernel (e4m3 x e4m3 wgmma on the TMA tiles) in the interpreter: 3 K steps per split over
    2 slots, so slots are refilled while the previous wgmma may still be in flight; M not a multiple of 8."""
    from ie_jax.quant.fp8 import fp8_matmul_reference
    x, qw = make_fp8(m + 20, m, 768, 256)
    if static:
        qw = qw.replace(input_scale=jnp.float32(float(jnp.abs(x).max()) / 400))
    config = qm.TuningConfig(num_stages=2, num_splits=2)
    out = f8.fp8_skinny_matmul(x, qw.q, qw.scale, qw.input_scale, config=config, interpret=True,
                               out_dtype=jnp.float32)
    # The same quantized operands and f32 accumulation as the reference: only the summation order differs.
    assert rel_err(out, fp8_matmul_reference(x, qw, jnp.float32)) < 1e-5
    dense = jnp.dot(x.astype(jnp.float32), jnp.swapaxes(qw.q.astype(jnp.float32) * qw.scale[:, None], 0, 1))
    assert rel_err(out, dense) < 6e-2  # the activations' quantization, against bf16 x on the same weights


def test_fp8_dispatch_runs_the_kernel_for_decode_rows_cpu(monkeypatch):
    """ops.quant_matmul under the interpret backend sends decode-sized Fp8Weights calls to the kernel (leading
    axes flattened) and larger ones to the reference."""
    from ie_jax.quant.fp8 import fp8_matmul_reference
    from kernels_pallas.ops import kernel_backend, quant_matmul
    calls = []
    kernel = f8.fp8_skinny_matmul
    monkeypatch.setattr(f8, "fp8_skinny_matmul", lambda x, *a, **kw: calls.append(x.shape) or kernel(x, *a, **kw))
    x, qw = make_fp8(5, 6, 256, 128)
    with kernel_backend("interpret"):
        out = quant_matmul(x.reshape(2, 3, 256), qw, out_dtype=jnp.float32)
        big = quant_matmul(jnp.tile(x, (11, 1)), qw, out_dtype=jnp.float32)  # 66 rows: above the kernel's 64
    assert calls == [(6, 256)]
    assert out.shape == (2, 3, 128)
    assert rel_err(out.reshape(6, 128), fp8_matmul_reference(x, qw, jnp.float32)) < 1e-5
    assert rel_err(big[:6], fp8_matmul_reference(x, qw, jnp.float32)) < 1e-5


def test_fp8_kernel_rejects_bad_arguments():
    x, qw = make_fp8(1, 4, 256, 128)
    with pytest.raises(ValueError, match="rows of x"):
        f8.fp8_skinny_matmul(jnp.zeros((65, 256), jnp.bfloat16), qw.q, qw.scale)
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        f8.fp8_skinny_matmul(x, qw.q.astype(jnp.bfloat16), qw.scale)
    with pytest.raises(ValueError, match="disagree"):
        f8.fp8_skinny_matmul(jnp.zeros((4, 384), jnp.bfloat16), qw.q, qw.scale)
    with pytest.raises(ValueError, match="multiples"):
        f8.fp8_skinny_matmul(x, qw.q[:96], qw.scale[:96])
    with pytest.raises(ValueError, match="num_stages"):
        f8.fp8_skinny_matmul(x, qw.q, qw.scale, config=qm.TuningConfig(num_stages=1))


@pytest.mark.parametrize("k, n", [(4096, 6144), (14336, 4096)])
def test_fp8_kernel_lowers_for_the_gpu_cpu(k, n):
    S = jax.ShapeDtypeStruct
    f = jax.jit(lambda x, q, s: f8._fp8_skinny_matmul(x, q, s, config=f8.FP8_CONFIG, interpret=False))
    f.trace(S((16, k), jnp.bfloat16), S((n, k), jnp.float8_e4m3fn), S((n,), jnp.float32)).lower(
        lowering_platforms=("cuda",))


@pytest.mark.gpu
@pytest.mark.parametrize("k, n", list(qm.LLAMA3_8B_SHAPES.values()))
@pytest.mark.parametrize("m", [1, 16, 64])
def test_fp8_kernel_llama_shapes_gpu(m, k, n):
    from ie_jax.quant.fp8 import fp8_matmul_reference
    x, qw = make_fp8(m + k + n, m, k, n)
    out = f8.fp8_skinny_matmul(x, qw.q, qw.scale, out_dtype=jnp.float32)
    # Hopper's fp8 wgmma accumulates with fewer mantissa bits than f32: the error is the accumulation's, against
    # the exact f32 sum of the same e4m3 products. H200, 2026-12-03: 3.5e-4 (o) to 3.9e-3 (gate_up, M = 64) of
    # the largest output; a wrong tile or scale would be O(1).
    err = rel_err(out, fp8_matmul_reference(x, qw, jnp.float32))
    print(f"fp8 kernel M={m} K={k} N={n}: max rel err {err:.2e}")
    assert err < 6e-3


def test_fp8_kernel_config_follows_the_measurements():
    assert f8.fp8_kernel_config(1, 4096, 28672) == f8.FP8_CONFIG and f8.fp8_kernel_config(16, 14336, 4096)
    assert f8.fp8_kernel_config(64, 4096, 28672) is None  # XLA's fp8 dot measured faster there
    assert f8.fp8_kernel_config(64, 14336, 4096) is not None and f8.fp8_kernel_config(65, 4096, 4096) is None
