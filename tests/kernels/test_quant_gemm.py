"""The many-row weight-only GEMM (kernels_pallas/quant_gemm.py): the Mosaic GPU interpreter on CPU against the
packed weights' f32 reference, the GPU lowering of its configs, argument checks; full sizes on the GPU."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ie_jax.quant.int4 import quantize_int4
from ie_jax.quant.int8 import quantize_int8
from kernels_pallas import quant_gemm as qg
from kernels_pallas import quant_matmul as qm

SMALL = qg.GemmConfig(tile_n=128, tile_m=64)


def make(seed, m, k, n, fmt, group_size=128, act_order=False):
    kx, kw, kp = jax.random.split(jax.random.key(seed), 3)
    x = jax.random.normal(kx, (m, k), jnp.bfloat16)
    w = 0.05 * jax.random.normal(kw, (k, n), jnp.float32)
    if fmt == "int8":
        return x, qm.pack_int8(quantize_int8(w))
    perm = jax.random.permutation(kp, k) if act_order else None
    return x, qm.pack_int4(quantize_int4(w, group_size, perm=perm))


def rel_err(out, packed, x):
    expected = np.asarray(qm.quant_matmul_reference(x.astype(jnp.float32), packed))
    out = np.asarray(out, np.float32)
    assert out.shape == expected.shape
    return np.abs(out - expected).max() / np.abs(expected).max()


@pytest.mark.parametrize("tile_k", [128, 64])
@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_matches_the_reference_with_padded_rows_cpu(fmt, tile_k):
    """70 rows in 64-row tiles (the second tile mostly padding), 2 column blocks, 2 or 4 K steps over a 2-slot ring
    (tile_k 64: two steps per int4 group)."""
    x, packed = make(3, 70, 256, 256, fmt)
    out = qg.quant_gemm(x, packed, config=qg.GemmConfig(tile_n=128, tile_m=64, tile_k=tile_k), interpret=True)
    assert out.dtype == jnp.bfloat16
    assert rel_err(out, packed, x) < 1e-2


@pytest.mark.parametrize("fmt, tile_k, splits", [("int8", 128, 2), ("int4", 128, 4), ("int4", 64, 2)])
def test_split_k_matches_the_reference_cpu(fmt, tile_k, splits):
    """K cut into ranges run by separate CTAs (a third grid axis), their bf16 partials summed: 512 = 4 groups of
    128 rows (tile_k 64: 8 steps, 4 a split)."""
    x, packed = make(11, 70, 512, 256, fmt)
    config = qg.GemmConfig(tile_n=128, tile_m=64, tile_k=tile_k, splits=splits)
    out = qg.quant_gemm(x, packed, config=config, interpret=True)
    assert out.dtype == jnp.bfloat16 and rel_err(out, packed, x) < 1e-2
    whole = qg.quant_gemm(x, packed, config=qg.GemmConfig(tile_n=128, tile_m=64, tile_k=tile_k), interpret=True)
    assert rel_err(whole, packed, x) < 1e-2
    with pytest.raises(ValueError, match="whole"):  # a split must hold whole groups
        qg.quant_gemm(x, packed, config=qg.GemmConfig(tile_n=128, tile_m=64, tile_k=tile_k, splits=3),
                      interpret=True)


def test_int4_wide_groups_and_act_order_cpu():
    """Groups of 256 rows (one scale row for two steps) and act-order (x gathered by perm), 3 K steps."""
    x, packed = make(5, 64, 384 * 2, 128, "int4", group_size=256, act_order=True)
    out = qg.quant_gemm(x, packed, config=SMALL, interpret=True, out_dtype=jnp.float32)
    assert out.dtype == jnp.float32
    assert rel_err(out, packed, x) < 1e-2


@pytest.mark.parametrize("config", [qg.GemmConfig(), qg.GemmConfig(tile_n=256, tile_m=128),
                                    qg.GemmConfig(tile_m=128, num_stages=4),
                                    qg.GemmConfig(tile_m=128, num_stages=3, tile_k=64),
                                    qg.GemmConfig(tile_m=64, num_stages=4, splits=4)])
@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_lowers_for_the_gpu_cpu(fmt, config):
    """The full Mosaic GPU lowering (warp-specialized pipeline, register A operand, transposed output store)."""
    S = jax.ShapeDtypeStruct
    k, n = 4096, 4096
    groups = (k // 128, n)
    packed = (qm.PackedInt8(S((n, k), jnp.int8), S((n,), jnp.float32)) if fmt == "int8" else
              qm.PackedInt4(S((n, k), jnp.int4), S(groups, jnp.float16), S(groups, jnp.uint8), 128))
    f = jax.jit(lambda x, p: qg._quant_gemm(x, p, config=config, interpret=False))
    text = f.trace(S((300, k), jnp.bfloat16), packed).lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text


def test_rejects_bad_arguments():
    x, packed = make(0, 8, 256, 128, "int8")
    with pytest.raises(ValueError, match="multiples"):
        qg.quant_gemm(x, packed, config=qg.GemmConfig(tile_n=256, tile_m=128))  # N = 128
    x4, p4 = make(0, 8, 256, 256, "int4", group_size=64)
    with pytest.raises(ValueError, match="group_size"):
        qg.quant_gemm(x4, p4, config=SMALL)
    with pytest.raises(ValueError, match="bfloat16"):
        qg.quant_gemm(x4.astype(jnp.float32), make(0, 8, 256, 256, "int4")[1], config=SMALL)
    with pytest.raises(ValueError, match="shared memory"):
        qg.GemmConfig(tile_m=256, num_stages=3)
    with pytest.raises(ValueError, match="accumulator"):
        qg.GemmConfig(tile_n=256, tile_m=256)
    with pytest.raises(ValueError, match="tile_k"):
        qg.GemmConfig(tile_k=32)


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["int8", "int4"])
@pytest.mark.parametrize("k, n", list(qm.LLAMA3_8B_SHAPES.values()))
@pytest.mark.parametrize("m", [200, 4096])
def test_llama_shapes_gpu(fmt, m, k, n):
    x, packed = make(m + k + n, m, k, n, fmt)
    assert rel_err(qg.quant_gemm(x, packed), packed, x) < 1.5e-2


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["int8", "int4"])
@pytest.mark.parametrize("m, splits", [(128, 4), (256, 2)])
def test_split_k_llama_down_gpu(fmt, m, splits):
    k, n = qm.LLAMA3_8B_SHAPES["down"]
    x, packed = make(m + splits, m, k, n, fmt)
    config = qg.GemmConfig(tile_n=128, tile_m=min(m, 128), num_stages=4, splits=splits)
    assert rel_err(qg.quant_gemm(x, packed, config=config), packed, x) < 1.5e-2


def test_gemm_config_follows_the_measurements():
    """Wide weights (N >= 16384) above 64 rows, deep ones (K >= 8192) at 129..256 rows; others keep their path."""
    S = jax.ShapeDtypeStruct

    def packed(k, n, fmt="int4", group=128):
        if fmt == "int8":
            return qm.PackedInt8(S((n, k), jnp.int8), S((n,), jnp.float32))
        return qm.PackedInt4(S((n, k), jnp.int4), S((k // group, n), jnp.float16), S((k // group, n), jnp.uint8),
                             group, None)

    gate_up, down, qkv = packed(4096, 28672), packed(14336, 4096), packed(4096, 6144)
    assert qg.gemm_config(gate_up, 64) is None  # the decode kernel's rows
    assert qg.gemm_config(gate_up, 65) == qg.gemm_config(gate_up, 128) == qg.GemmConfig(256, 128, 2)
    assert qg.gemm_config(gate_up, 129) == qg.gemm_config(gate_up, 16384) == qg.GemmConfig(128, 256, 4, 64)
    assert qg.gemm_config(packed(4096, 28672, "int8"), 200) == qg.GemmConfig(128, 256, 4, 64)
    assert qg.gemm_config(down, 64) is None and qg.gemm_config(down, 257) is None
    assert qg.gemm_config(down, 65) == qg.gemm_config(down, 256) == qg.GemmConfig(128, 128, 4, splits=4)
    assert qg.gemm_config(qkv, 256) is None  # not measured
    assert qg.gemm_config(packed(4096, 28672, group=64), 256) is None  # groups under 128 rows: not this kernel
    assert qg.gemm_config(packed(4096, 28672 + 64), 256) is None  # N not a multiple of the tile


def test_ops_dispatches_many_rows_to_the_gemm_cpu(monkeypatch):
    """ops.quant_matmul (interpret backend) takes the GEMM where gemm_config names a config (here a small one
    for a small shape), with the numbers of the reference; elsewhere the other paths."""
    from kernels_pallas.ops import kernel_backend, quant_matmul
    calls = []
    monkeypatch.setattr(qg, "gemm_config", lambda p, m: SMALL if m > 64 else None)
    gemm = qg._quant_gemm
    monkeypatch.setattr(qg, "_quant_gemm", lambda x, *a, **kw: calls.append(x.shape) or gemm(x, *a, **kw))
    x, packed = make(9, 96, 256, 128, "int4")
    with kernel_backend("interpret"):
        out = quant_matmul(x.reshape(2, 48, 256), packed, out_dtype=jnp.float32)
    assert calls == [(96, 256)] and out.shape == (2, 48, 128)
    assert rel_err(out.reshape(96, 128), packed, x) < 1e-2
