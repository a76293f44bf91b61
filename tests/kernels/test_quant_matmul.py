"""Weight-only quantized skinny matmul (W8A16, W4A16) against the formats' own references.

CPU tests run the kernel body in the Mosaic GPU interpreter at small shapes (several K splits, ring slots refilled,
M not a multiple of 8), on the packed layouts and on the formats' own arrays, and check the CUDA lowering (layouts,
SMEM) without a GPU; `gpu` tests compile it at Llama-3-8B layer sizes. Also the XLA paths on the packed layouts
(dequantize-then-dot, fp8 dot) and the measured dispatch table. Weights are random normal draws quantized by
ie_jax.quant.
"""
import dataclasses

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


def small(fmt):
    """3 K steps per split over 2 slots (refills); int8 also with 64-column blocks (int4's zero rows need 128)."""
    return qm.TuningConfig(block_n=64 if fmt == "int8" else 128, num_stages=2, num_splits=2)


@pytest.mark.parametrize("fmt", ["int8", "int4"])
@pytest.mark.parametrize("m", [1, 5, 16])
def test_matches_the_format_reference_cpu(fmt, m):
    x, qw, packed, reference = make(m, m, 768, 128, fmt)
    out = qm.quant_matmul(x, packed, config=small(fmt), interpret=True)
    # Against the packed reference: the same math (bf16-rounded dequantized weights aside).
    assert rel_err(out, qm.quant_matmul_reference(x, packed)) < 1e-2
    # Against the format's own reference on the unpacked weights: the packing loses nothing.
    assert rel_err(out, reference(x, qw)) < 1.5e-2


@pytest.mark.parametrize("fmt", ["int8", "int4"])
@pytest.mark.parametrize("m, consumers", [(1, 1), (13, 1), (13, 2)])
def test_reads_the_format_layout_in_place_cpu(fmt, m, consumers):
    """Int8Weights / Int4Weights ([K, N], the quantized Linear's arrays) go in unpacked."""
    x, qw, _, reference = make(m + 3, m, 1024, 128, fmt)
    config = qm.TuningConfig(num_stages=2, num_splits=2, consumers=consumers)
    out = qm.quant_matmul(x, qw, config=config, interpret=True)
    assert rel_err(out, reference(x, qw)) < 1.5e-2


@pytest.mark.parametrize("fmt, options", [("int4", {}), ("int4", {"consumers": 2}), ("int8", {"consumers": 2}),
                                          ("int4", {"int4_scale_after": True}),
                                          ("int4", {"consumers": 2, "int4_scale_after": True})])
def test_race_free_cpu(fmt, options):
    """Every ring slot refilled while in use elsewhere; with two warpgroups, the partial handed over in SMEM."""
    from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
    x, qw, packed, reference = make(9, 8, 1024, 128, fmt)
    config = dataclasses.replace(small(fmt), **options)
    out = qm.quant_matmul(x, packed, config=config, interpret=InterpretGPUParams(detect_races=True))
    assert not interpret_pallas_call.get_races().races_found
    assert rel_err(out, reference(x, qw)) < 1.5e-2


@pytest.mark.parametrize("fmt", ["int8", "int4"])
@pytest.mark.parametrize("m", [1, 13])
def test_two_consumer_warpgroups_cpu(fmt, m):
    """consumers=2: alternate K steps per warpgroup (4 per split over 2 slots each), partials summed in SMEM."""
    x, qw, packed, reference = make(m + 20, m, 2048, 128, fmt)
    config = dataclasses.replace(small(fmt), consumers=2)
    out = qm.quant_matmul(x, packed, config=config, interpret=True)
    assert rel_err(out, qm.quant_matmul_reference(x, packed)) < 1e-2
    assert rel_err(out, reference(x, qw)) < 1.5e-2


@pytest.mark.parametrize("consumers", [1, 2])
@pytest.mark.parametrize("m", [1, 16])
def test_int4_scale_after_the_dot_cpu(consumers, m):
    """int4_scale_after: the dot on raw q - 8, then scale and zero point per row on the f32 step product; closer
    to the f32 reference than the bf16-rounded weights (no bf16 rounding of (q + 8 - zero) * scale)."""
    x, qw, packed, reference = make(m + 30, m, 1024, 128, "int4")
    config = qm.TuningConfig(num_stages=2, num_splits=2, consumers=consumers, int4_scale_after=True)
    out = qm.quant_matmul(x, packed, config=config, out_dtype=jnp.float32, interpret=True)
    expected = jnp.dot(x.astype(jnp.float32), qm.dequantize_packed(packed))
    assert rel_err(out, expected) < 1e-5
    assert rel_err(out.astype(jnp.bfloat16), reference(x, qw)) < 1.5e-2


def test_int4_scale_after_takes_wide_groups_and_act_order_cpu():
    kx, kw, kp = jax.random.split(jax.random.key(12), 3)
    x = jax.random.normal(kx, (3, 1024), jnp.bfloat16)
    qw = quantize_int4(0.05 * jax.random.normal(kw, (1024, 128), jnp.float32), 256,
                       perm=jax.random.permutation(kp, 1024))
    config = qm.TuningConfig(num_stages=2, num_splits=2, consumers=2, int4_scale_after=True)
    out = qm.quant_matmul(x, qm.pack_int4(qw), config=config, interpret=True)
    assert rel_err(out, int4_matmul_reference(x, qw)) < 1.5e-2


def test_split_count_keeps_whole_steps_per_warpgroup():
    for k, n in qm.LLAMA3_8B_SHAPES.values():
        for config in (qm.TuningConfig(consumers=2, ctas_per_sm=8, min_k_steps=4),
                       qm.TuningConfig(consumers=2, num_stages=3, ctas_per_sm=3)):
            steps = k // 128 // config.splits_for(k, n)
            assert steps % 2 == 0 and steps >= 2, (k, n, config)
    # o (32 steps, 32 column blocks, room for 33 splits): one warpgroup takes 32 splits of one step, two take 16
    assert qm.TuningConfig(ctas_per_sm=8).splits_for(4096, 4096) == 32
    assert qm.TuningConfig(ctas_per_sm=8, consumers=2).splits_for(4096, 4096) == 16
    with pytest.raises(ValueError, match="consumers"):
        qm.TuningConfig(consumers=3)
    x, _, packed, _ = make(0, 4, 384, 128, "int8")  # 3 steps: no split gives both warpgroups whole steps
    with pytest.raises(ValueError, match="consumers"):
        qm.quant_matmul(x, packed, config=qm.TuningConfig(consumers=2))


def test_int4_packing_is_signed_transposed_and_lossless():
    _, qw, packed, _ = make(0, 1, 256, 8, "int4")
    q = np.asarray(qw.q, np.int32)  # [K, N] 0..15
    assert packed.q.dtype == jnp.int4 and packed.q.shape == (8, 256) and packed.shape == (256, 8)
    np.testing.assert_array_equal(np.asarray(packed.q.astype(jnp.int32)), q.T - 8)
    back = qm.unpack_int4(packed)  # the format's own arrays, bit for bit
    for name in ("q", "scales", "zeros"):
        a, b = np.asarray(getattr(back, name)), np.asarray(getattr(qw, name))
        assert a.dtype == b.dtype and np.array_equal(a, b), name
    from ie_jax.quant.int4 import dequantize_int4
    np.testing.assert_array_equal(np.asarray(qm.dequantize_packed(packed)), np.asarray(dequantize_int4(qw)))


def test_packing_batches_over_stacked_layers_and_keeps_act_order():
    w = 0.05 * jax.random.normal(jax.random.key(1), (3, 256, 16), jnp.float32)  # [L, K, N]
    perm = jax.random.permutation(jax.random.key(2), 256)
    qw = quantize_int4(w, 64, perm=perm)
    packed = qm.pack_int4(qw)
    assert packed.q.shape == (3, 16, 256) and packed.perm.shape == (3, 256) and packed.group_size == 64
    back = qm.unpack_int4(packed)
    assert all(np.array_equal(np.asarray(getattr(back, f)), np.asarray(getattr(qw, f))) for f in ("q", "perm"))
    q8 = quantize_int8(w)
    assert np.array_equal(np.asarray(qm.unpack_int8(qm.pack_int8(q8)).q), np.asarray(q8.q))


@pytest.mark.parametrize("fmt", ["int8", "int4"])
@pytest.mark.parametrize("m", [3, 100])
def test_xla_path_on_packed_layout_matches_the_format_reference(fmt, m):
    """The same arithmetic as the format's reference (the weight transposed): equal up to the dot's summation."""
    x, qw, packed, reference = make(m + 7, m, 256, 128, fmt)
    np.testing.assert_allclose(np.asarray(qm.packed_matmul_xla(x, packed, jnp.float32)),
                               np.asarray(reference(x, qw, jnp.float32)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_chunked_kernel_covers_rows_beyond_the_kernel_cpu(fmt):
    """M above MAX_M in chunks of `rows` (here 8 rows, so 21 rows are three calls, the last one short)."""
    x, qw, packed, reference = make(43, 21, 768, 128, fmt)
    out = qm.chunked_quant_matmul(x, packed, config=small(fmt), rows=8, interpret=True)
    assert out.shape == (21, 128)
    assert rel_err(out, qm.quant_matmul_reference(x, packed)) < 1e-2
    assert rel_err(out[16:], qm.quant_matmul(x[16:], packed, config=small(fmt), interpret=True)) == 0


@pytest.mark.parametrize("group_size, act_order", [(32, True), (64, False), (256, True)])
def test_xla_path_takes_any_group_size_and_act_order(group_size, act_order):
    kx, kw, kp = jax.random.split(jax.random.key(group_size), 3)
    x = jax.random.normal(kx, (2, 5, 256), jnp.float32)
    perm = jax.random.permutation(kp, 256) if act_order else None
    qw = quantize_int4(0.05 * jax.random.normal(kw, (256, 64), jnp.float32), group_size, perm=perm)
    np.testing.assert_allclose(np.asarray(qm.packed_matmul_xla(x, qm.pack_int4(qw))),
                               np.asarray(int4_matmul_reference(x, qw)), rtol=1e-5, atol=1e-5)


def test_kernel_takes_wide_groups_and_act_order_cpu():
    """Groups of 256 rows (one scale/zero row per two pipeline steps) and an act-order permutation (x gathered)."""
    kx, kw, kp = jax.random.split(jax.random.key(11), 3)
    x = jax.random.normal(kx, (3, 1024), jnp.bfloat16)
    qw = quantize_int4(0.05 * jax.random.normal(kw, (1024, 128), jnp.float32), 256,
                       perm=jax.random.permutation(kp, 1024))
    out = qm.quant_matmul(x, qm.pack_int4(qw), config=qm.TuningConfig(num_stages=2, num_splits=2), interpret=True)
    assert rel_err(out, int4_matmul_reference(x, qw)) < 1.5e-2


@pytest.mark.parametrize("layout", ["packed", "packed-smem", "format", "packed-2wg", "packed-2wg-after"])
@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_lowers_for_the_gpu_cpu(fmt, layout):
    """The full Mosaic GPU lowering (layouts, 8-bit arithmetic rules, SMEM budget) runs on CPU."""
    from ie_jax.quant.int4 import Int4Weights
    from ie_jax.quant.int8 import Int8Weights
    k, n = 4096, 4096
    S = jax.ShapeDtypeStruct
    groups = (k // 128, n)
    if layout == "format":
        packed = (Int8Weights(S((k, n), jnp.int8), S((n,), jnp.float32)) if fmt == "int8" else
                  Int4Weights(S((k, n), jnp.uint8), S(groups, jnp.float16), S(groups, jnp.uint8), 128))
    elif fmt == "int8":
        packed = qm.PackedInt8(S((n, k), jnp.int8), S((n,), jnp.float32))
    else:
        packed = qm.PackedInt4(S((n, k), jnp.int4), S(groups, jnp.float16), S(groups, jnp.uint8), 128)
    config = qm.TuningConfig(a_in_registers=layout != "packed-smem", consumers=2 if "2wg" in layout else 1,
                             int4_scale_after=layout.endswith("after"))
    f = jax.jit(lambda x, p: qm._quant_matmul(x, p, config=config, interpret=False))
    text = f.trace(S((16, k), jnp.bfloat16), packed).lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text


def test_rejects_bad_arguments():
    x, qw, packed, _ = make(0, 4, 256, 128, "int8")
    with pytest.raises(ValueError, match="rows of x"):
        qm.quant_matmul(jnp.zeros((65, 256), jnp.bfloat16), packed)
    with pytest.raises(ValueError, match="bfloat16"):
        qm.quant_matmul(x.astype(jnp.float32), packed)
    with pytest.raises(ValueError, match="disagree"):
        qm.quant_matmul(jnp.zeros((4, 384), jnp.bfloat16), packed)
    with pytest.raises(ValueError, match="PackedInt8"):
        qm.quant_matmul(x, {"q": qw.q})
    with pytest.raises(ValueError, match="group_size=64"):
        qm.quant_matmul(x, quantize_int4(jnp.ones((256, 128)), group_size=64))
    with pytest.raises(ValueError, match="group_size=64"):
        qm.quant_matmul(x, qm.pack_int4(quantize_int4(jnp.ones((256, 128)), group_size=64)))
    for w in (quantize_int4(jnp.ones((256, 128))), qm.pack_int4(quantize_int4(jnp.ones((256, 128))))):
        with pytest.raises(ValueError, match="zero-point rows"):  # a 64-byte TMA box misaligns the ring on the GPU
            qm.quant_matmul(x, w, config=qm.TuningConfig(block_n=64))
    with pytest.raises(ValueError, match="block_n"):
        qm.TuningConfig(block_n=256)
    with pytest.raises(ValueError, match="min_k_steps"):
        qm.TuningConfig(min_k_steps=0)


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["int8", "int4"])
@pytest.mark.parametrize("k, n", list(qm.LLAMA3_8B_SHAPES.values()))
@pytest.mark.parametrize("m", [1, 16, 64])
def test_llama_shapes_gpu(fmt, m, k, n):
    x, qw, packed, reference = make(m + k + n, m, k, n, fmt)
    assert rel_err(qm.quant_matmul(x, packed), reference(x, qw)) < 1.5e-2
    assert rel_err(qm.quant_matmul(x, qw), reference(x, qw)) < 1.5e-2  # the format layout, read in place


@pytest.mark.gpu
@pytest.mark.parametrize("k, n", list(qm.LLAMA3_8B_SHAPES.values()))
def test_int4_chunks_llama_shapes_gpu(k, n):
    """What ops.quant_matmul runs for packed int4 at 65..128 rows (the bench's rel_err was 3.4-3.7e-3 there)."""
    x, qw, packed, reference = make(k + n, 100, k, n, "int4")
    config = qm.kernel_config(packed, 100)
    assert rel_err(qm.chunked_quant_matmul(x, packed, config=config), reference(x, qw)) < 1.5e-2


@pytest.mark.gpu
@pytest.mark.parametrize("fmt, options", [
    ("int8", dict(consumers=2, num_stages=3, ctas_per_sm=3)),
    ("int4", dict(consumers=2, num_stages=2, ctas_per_sm=4, min_k_steps=4)),
    ("int4", dict(int4_scale_after=True, num_stages=3, ctas_per_sm=8, min_k_steps=4)),
    ("int4", dict(consumers=2, int4_scale_after=True, num_stages=2, ctas_per_sm=4, min_k_steps=4))])
@pytest.mark.parametrize("k, n", list(qm.LLAMA3_8B_SHAPES.values()))
@pytest.mark.parametrize("m", [1, 16])
def test_two_warpgroups_and_scale_after_llama_shapes_gpu(fmt, options, m, k, n):
    """The register A operand, two consumer warpgroups and the scale after the dot compiled, on random data."""
    x, qw, packed, reference = make(m + k + n + 1, m, k, n, fmt)
    out = qm.quant_matmul(x, packed, config=qm.TuningConfig(**options))
    assert rel_err(out, qm.quant_matmul_reference(x, packed)) < 1e-2
    assert rel_err(out, reference(x, qw)) < 1.5e-2


def test_dispatch_chunks_int4_above_the_kernels_rows_cpu(monkeypatch):
    """ops.quant_matmul (interpret backend) runs packed int4 at 65..128 rows as 64-row kernel chunks, and XLA's
    path above that; the numbers match the reference either way."""
    from kernels_pallas.ops import kernel_backend, quant_matmul
    calls = []
    kernel = qm._quant_matmul
    monkeypatch.setattr(qm, "_quant_matmul", lambda x, *a, **kw: calls.append(x.shape[0]) or kernel(x, *a, **kw))
    x, _, packed, _ = make(47, 130, 256, 128, "int4")
    with kernel_backend("interpret"):
        chunked = quant_matmul(x[:100].reshape(4, 25, 256), packed, out_dtype=jnp.float32)
        assert calls == [64, 36]
        xla = quant_matmul(x, packed, out_dtype=jnp.float32)  # 130 rows: XLA's path
        assert calls == [64, 36]
    expected = qm.quant_matmul_reference(x.astype(jnp.float32), packed)
    assert rel_err(chunked.reshape(100, 128), expected[:100]) < 1e-2
    assert rel_err(xla, expected) < 1e-2


def test_kernel_config_follows_the_measurements():
    _, q8, p8, _ = make(1, 1, 256, 128, "int8")
    _, q4, p4, _ = make(1, 1, 256, 128, "int4")
    assert qm.kernel_config(p8, 16) is not None and qm.kernel_config(p8, 17) is None
    assert qm.kernel_config(p4, 64) is not None and qm.kernel_config(p4, 65) is not None  # 64-row chunks
    assert qm.kernel_config(p4, 128) is not None and qm.kernel_config(p4, 129) is None
    assert qm.kernel_config(p8, 65, forced=True) is None  # int8 above 64 rows: XLA's fused int8 dot
    assert qm.kernel_config(q4, 1) is not None
    assert qm.kernel_config(q8, 1) is None  # XLA's int8 dot measured as fast: stays on XLA
    assert qm.kernel_config(q8, 1, forced=True) is not None and qm.kernel_config(q8, 65, forced=True) is None
    assert qm.kernel_config({"q": q8.q}, 1, forced=True) is None
