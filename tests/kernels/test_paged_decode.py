"""The transposed decode kernel (`TuningConfig(decode_tiles=True)`, kernels_pallas/paged_decode.py) against the
plain-jnp reference: the Mosaic GPU interpreter on CPU at small shapes, the CUDA lowering on CPU at serving
shapes, and `gpu` tests at full size. Random inputs and random page permutations throughout."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AbstractDevice, AbstractMesh, AxisType, use_abstract_mesh

from kernels_pallas import paged_attention as pa
from kernels_pallas import paged_decode as pd
from tests.kernels.test_paged_attention import FP8_TOL, assert_close, make_batch, to_fp8


def tiles(block_kv=64, stages=2, splits=None):
    return pa.TuningConfig(block_kv, stages, num_splits=splits, decode_tiles=True)


def reference_with_quantized_q(batch, scales, sm_scale=None, **kw):
    """The fp8 path's exact semantics: q times sm_scale * k_scale, quantized per (token, kv-head) to e4m3 as the
    kernel's wrapper does, then the reference on the dequantized values (scale already applied)."""
    q, k_pages = batch[0], batch[1]
    T, N, H = q.shape
    K = k_pages.shape[-4]
    scale = H ** -0.5 if sm_scale is None else sm_scale
    q8, qs = pd.quantize_queries(q, K, scale * scales["k_scale"])
    qd = (q8.astype(jnp.float32).reshape(T, K, N // K, H) * qs[:, :, None, None]).reshape(T, N, H)
    return pa.paged_attention_reference(qd, *batch[1:], sm_scale=1.0, v_scale=scales["v_scale"], **kw)


@pytest.mark.parametrize("page_size,splits", [(16, 1), (32, 2)])
def test_decode_batch_with_padding(page_size, splits):
    # lengths 1, a page multiple, a non-multiple, and the table's maximum; 2 padding rows and 3 padding tokens
    seq_lens = [1, 2 * page_size, 3 * page_size - 5, 4 * page_size]
    batch = make_batch(40 + page_size, q_lens=[1] * 4, seq_lens=seq_lens, num_rows=6, extra_tokens=3, K=2, G=4,
                       H=128, page_size=page_size)
    out = pa.ragged_paged_attention(*batch, config=tiles(splits=splits), interpret=True)
    assert_close(out, pa.paged_attention_reference(*batch), rows=4)
    assert not np.asarray(out[4:], np.float32).any()  # padding tokens come back as zeros


def test_multi_token_request_sliding_window_softcap_group_8():
    # a 3-token request is walked one token per pass; G = 8 fills the whole 8-column box
    batch = make_batch(42, q_lens=[1, 3, 1], seq_lens=[100, 70, 37], K=1, G=8, H=64, page_size=16)
    kw = dict(sliding_window=40, softcap=5.0, sm_scale=0.2)
    out = pa.ragged_paged_attention(*batch, config=tiles(splits=2), interpret=True, **kw)
    assert_close(out, pa.paged_attention_reference(*batch, **kw))


@pytest.mark.parametrize("splits", [1])  # fp8 with splits: test_compact_splits_window_of_page_ids_and_16_bit_partials
def test_fp8_decode_quantizes_q_per_token_and_kv_head(splits):
    batch = make_batch(43, q_lens=[1, 1, 1, 1], seq_lens=[1, 64, 70, 200], num_rows=5, extra_tokens=2, K=2, G=4,
                       H=128, page_size=16)
    fp8, orig, scales = to_fp8(batch, 44)
    out = pa.ragged_paged_attention(*fp8, **scales, config=tiles(splits=splits), interpret=True)
    assert_close(out, reference_with_quantized_q(fp8, scales), rows=4)  # the kernel's own arithmetic
    assert_close(out, pa.paged_attention_reference(*orig), rows=4, tol=FP8_TOL)  # e4m3 K, V and q together
    assert not np.asarray(out[4:], np.float32).any()


@pytest.mark.parametrize("splits", [1, 2])
def test_fp8_multi_token_passes_with_the_epilogue_in_v16s_bytes(splits):
    # fp8: the epilogue's o/lse tiles share v16's bytes, so pass t + 1 may convert V only after pass t's stores
    # have read them. The interpreter completes TMA stores at once, so that ordering is checked on the GPU
    # (test_gpu_fp8_multi_token_passes); here: the values, with the race detector on the rest
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
    batch = make_batch(61, q_lens=[3, 1, 2], seq_lens=[150, 64, 90], num_rows=4, extra_tokens=1, K=2, G=4, H=128,
                       page_size=16)
    fp8, _, scales = to_fp8(batch, 62)
    out = pa.ragged_paged_attention(*fp8, **scales, config=tiles(splits=splits),
                                    interpret=InterpretGPUParams(detect_races=True))
    assert_close(out, reference_with_quantized_q(fp8, scales), rows=6)


def test_fp8_q_quantization_kernel_and_xla_give_the_same_output():
    batch = make_batch(59, q_lens=[1, 1, 1], seq_lens=[5, 64, 150], num_rows=4, extra_tokens=1, K=2, G=4, H=128,
                       page_size=16)
    fp8, _, scales = to_fp8(batch, 60)
    outs = [pa.ragged_paged_attention(*fp8, **scales, interpret=True, config=pa.TuningConfig(
        decode_tiles=True, quantize_q_kernel=k)) for k in (True, False)]
    np.testing.assert_array_equal(np.asarray(outs[0], np.float32), np.asarray(outs[1], np.float32))
    assert_close(outs[0], reference_with_quantized_q(fp8, scales), rows=3)


def test_interleaved_stacked_cache_reads_the_named_layer():
    batch = make_batch(45, q_lens=[1, 1, 1], seq_lens=[30, 64, 90], K=2, G=4, H=128, page_size=16)
    q, k, v, *rest = batch
    other = jax.random.normal(jax.random.key(46), k.shape, k.dtype)
    kv = jnp.stack([other, -other, k, v])  # [2L, K, P, page, H]: layer 1 is (k, v)
    out = pa.ragged_paged_attention(q, kv, None, *rest, layer=jnp.int32(1), config=tiles(), interpret=True)
    assert_close(out, pa.paged_attention_reference(*batch))


@pytest.mark.parametrize("fp8", [True])  # bf16 partials with splits: test_multi_token_request_... (f32 path)
def test_compact_splits_window_of_page_ids_and_16_bit_partials(fp8):
    # 128-id rows (page 8) in 4 splits: each pass copies a 64-id window; requests of 1, 300 and 1024 keys
    batch = make_batch(53, q_lens=[1, 1, 1], seq_lens=[1, 300, 1024], num_rows=4, extra_tokens=1, K=2, G=4, H=128,
                       page_size=8)
    config = pa.TuningConfig(64, 2, num_splits=4, decode_tiles=True, compact_splits=True)
    assert pd.window_size(128, 8, 64, 4) == 64
    if fp8:
        fp8_batch, _, scales = to_fp8(batch, 54)
        out = pa.ragged_paged_attention(*fp8_batch, **scales, config=config, interpret=True)
        assert_close(out, reference_with_quantized_q(fp8_batch, scales), rows=3)
    else:
        out = pa.ragged_paged_attention(*batch, config=config, interpret=True)
        assert_close(out, pa.paged_attention_reference(*batch), rows=3)
    assert not np.asarray(out[3:], np.float32).any()


@pytest.mark.parametrize("K,G", [(8, 4), (4, 2), (2, 8), (3, 4), (6, 1)])
def test_own_columns_select_equals_the_gather(K, G):
    """Each kv-head's G columns of the partials, by selects between static slices or by the gather: the same values
    (G = 8 has one box per head; K = 3 with G = 4 does not fill whole boxes and keeps the gather)."""
    rng = np.random.default_rng(K * 10 + G)
    for shape in ((3, 2, K, 16, pd.COLS), (3, 2, K, 1, pd.COLS)):  # o_t, lse_t
        x = jnp.asarray(rng.standard_normal(shape), jnp.float32)
        got = pd.own_columns(x, G, select=True)
        want = pd.own_columns(x, G, select=False)
        assert got.shape == want.shape == shape[:-1] + (G,)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
        for kh in range(K):  # and both are the columns the layout says
            start = (kh * G) % pd.COLS
            np.testing.assert_array_equal(np.asarray(got[:, :, kh]), np.asarray(x[:, :, kh, :, start:start + G]))


def test_decode_with_selected_columns_matches_the_reference():
    batch = make_batch(57, q_lens=[1, 1], seq_lens=[37, 700], num_rows=3, extra_tokens=1, K=2, G=4, H=128,
                       page_size=16)
    config = pa.TuningConfig(64, 2, num_splits=4, decode_tiles=True, select_columns=True)
    out = pa.ragged_paged_attention(*batch, config=config, interpret=True)
    assert_close(out, pa.paged_attention_reference(*batch), rows=2)
    base = pa.ragged_paged_attention(*batch, config=pa.TuningConfig(64, 2, num_splits=4, decode_tiles=True),
                                     interpret=True)
    np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(base, np.float32))


def test_window_holds_every_page_a_split_reads():
    """For any length and split, the pages `kv_split` hands a split lie in the 32-aligned window the kernel copies."""
    from kernels_pallas.paged_work import kv_split
    rng = np.random.default_rng(55)
    for _ in range(60):
        page_size = int(rng.choice([8, 16, 32, 64, 128]))
        block_kv = int(rng.choice([64, 128]))
        max_pages = 32 * int(rng.integers(1, 64))
        splits = int(rng.integers(2, 65))
        window = pd.window_size(max_pages, page_size, block_kv, splits)
        if window >= max_pages:
            continue
        kv_hi = int(rng.integers(1, max_pages * page_size + 1))
        for split in range(splits):
            begin, end = kv_split(kv_hi - 1, kv_hi, split, num_splits=splits, page_size=page_size,
                                  block_kv=block_kv, sliding_window=None)
            if end <= begin:
                continue
            blocks = -(-(end - begin) // block_kv)
            first = begin // page_size
            last = min((begin + blocks * block_kv - 1) // page_size, (kv_hi - 1) // page_size)
            start = min(first // 32 * 32, max_pages - window)
            assert start <= first and last < start + window, (page_size, block_kv, max_pages, splits, kv_hi, split)


def test_unsupported_shapes_fall_back_to_the_packed_kernel():
    batch = make_batch(47, q_lens=[1, 1], seq_lens=[20, 33], K=1, G=16, H=64)  # G = 16 does not fit the 8 columns
    assert not pd.supported(batch[0], batch[1], tiles())
    assert pd.supported(*make_batch(47, q_lens=[1], seq_lens=[20], K=2, G=8, H=64)[:2], tiles())
    calls = []
    real = pd.decode_attention
    pd.decode_attention = lambda *a, **kw: calls.append(1)  # must not be reached
    try:
        out = pa.ragged_paged_attention(*batch, config=tiles(), interpret=True)
    finally:
        pd.decode_attention = real
    assert not calls
    assert_close(out, pa.paged_attention_reference(*batch))


@pytest.mark.parametrize("fp8,splits,block_kv,stages,compact", [(False, 1, 64, 2, False), (False, 4, 128, 2, False),
                                                                (True, 1, 64, 3, False), (True, 4, 64, 2, False),
                                                                (False, 4, 64, 2, True), (True, 4, 64, 2, True)])
def test_lowers_for_the_gpu_cpu(fp8, splits, block_kv, stages, compact):
    """The Mosaic GPU lowering (transposed P and output stores, 8-column wgmmas, fp8 QK^T, the page-id window)
    at a serving shape."""
    T, N, K, H, P, page_size, R = 64, 32, 8, 128, 4096, 16, 64
    cache = jax.ShapeDtypeStruct((K, P, page_size, H), pa.FP8 if fp8 else jnp.bfloat16)
    i32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32)
    config = pa.TuningConfig(block_kv, stages, num_splits=splits, decode_tiles=True, compact_splits=compact)
    f = jax.jit(lambda *a: pa.ragged_paged_attention(*a, config=config))
    # an abstract H200: the fp8 path's q quantization is a Triton kernel, whose lowering asks for a GPU
    gpu = AbstractDevice(device_kind="NVIDIA H200", num_cores=132, platform="gpu")
    with use_abstract_mesh(AbstractMesh((1,), ("x",), (AxisType.Auto,), abstract_device=gpu)):
        f.trace(jax.ShapeDtypeStruct((T, N, H), jnp.bfloat16), cache, cache, i32(R, 256), i32(R + 1), i32(R),
                i32()).lower(lowering_platforms=("cuda",))


# ----------------------------------------------------------------------------------------------------------------
# Device (full size)


@pytest.mark.gpu
@pytest.mark.parametrize("page_size,config", [(16, tiles()), (32, tiles(64, 3)), (64, tiles(128, 2)),
                                              (16, tiles(splits=4))])
def test_gpu_decode_serving_sizes(page_size, config):
    seq_lens = [int(x) for x in np.random.default_rng(48).integers(1, 4096, 60)] + [4096]
    batch = make_batch(48, q_lens=[1] * 61, seq_lens=seq_lens, num_rows=64, extra_tokens=3, K=8, G=4, H=128,
                       page_size=page_size)
    out = pa.ragged_paged_attention(*batch, config=config)
    assert_close(out, pa.paged_attention_reference(*batch), rows=61)
    assert not np.asarray(out[61:], np.float32).any()


@pytest.mark.gpu
@pytest.mark.parametrize("page_size,config", [(16, tiles()), (64, tiles(64, 3)), (16, tiles(splits=4))])
def test_gpu_fp8_decode_serving_sizes(page_size, config):
    seq_lens = [int(x) for x in np.random.default_rng(49).integers(1, 4096, 60)] + [4096]
    batch = make_batch(49, q_lens=[1] * 61, seq_lens=seq_lens, num_rows=64, extra_tokens=3, K=8, G=4, H=128,
                       page_size=page_size)
    fp8, orig, scales = to_fp8(batch, 50)
    out = pa.ragged_paged_attention(*fp8, **scales, config=config)
    assert_close(out, reference_with_quantized_q(fp8, scales), rows=61)
    assert_close(out, pa.paged_attention_reference(*orig), rows=61, tol=FP8_TOL)


@pytest.mark.gpu
@pytest.mark.parametrize("splits", [1, 4])
def test_gpu_fp8_multi_token_passes(splits):
    q_lens = [int(x) for x in np.random.default_rng(63).integers(1, 5, 32)]
    seq_lens = [int(x) for x in np.random.default_rng(64).integers(5, 2048, 32)]
    batch = make_batch(65, q_lens=q_lens, seq_lens=seq_lens, K=8, G=4, H=128, page_size=16)
    fp8, _, scales = to_fp8(batch, 66)
    out = pa.ragged_paged_attention(*fp8, **scales, config=tiles(splits=splits))
    assert_close(out, reference_with_quantized_q(fp8, scales))


@pytest.mark.gpu
@pytest.mark.parametrize("fp8,compact", [(False, False), (True, False), (False, True), (True, True)])
def test_gpu_long_context_splits(fp8, compact):
    batch = make_batch(51, q_lens=[1], seq_lens=[32768], K=8, G=4, H=128)
    config = pa.TuningConfig(decode_tiles=True, compact_splits=compact)
    if fp8:
        fp8_batch, _, scales = to_fp8(batch, 52)
        out = pa.ragged_paged_attention(*fp8_batch, **scales, config=config)
        assert_close(out, reference_with_quantized_q(fp8_batch, scales))
    else:
        assert_close(pa.ragged_paged_attention(*batch, config=config), pa.paged_attention_reference(*batch))
