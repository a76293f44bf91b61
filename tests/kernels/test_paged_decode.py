"""The transposed decode kernel (`TuningConfig(decode_tiles=True)`, kernels_pallas/paged_decode.py) against the
plain-jnp reference: the Mosaic GPU interpreter on CPU at small shapes, the CUDA lowering on CPU at serving
shapes, and `gpu` tests at full size. Random inputs and random page permutations throughout."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels_pallas import paged_attention as pa
from kernels_pallas import paged_decode as pd
from tests.kernels.test_paged_attention import FP8_TOL, assert_close, make_batch, to_fp8


def tiles(block_kv=64, stages=2, splits=None, warpgroups=1):
    return pa.TuningConfig(block_kv, stages, num_splits=splits, decode_tiles=True, decode_warpgroups=warpgroups)


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


@pytest.mark.parametrize("warpgroups", [1, 2])
def test_multi_token_request_sliding_window_softcap_group_8(warpgroups):
    # a 3-token request is walked one token per pass; G = 8 fills the whole 8-column box
    batch = make_batch(42, q_lens=[1, 3, 1], seq_lens=[100, 70, 37], K=1, G=8, H=64, page_size=16)
    kw = dict(sliding_window=40, softcap=5.0, sm_scale=0.2)
    out = pa.ragged_paged_attention(*batch, config=tiles(splits=2, warpgroups=warpgroups), interpret=True, **kw)
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


def test_interleaved_stacked_cache_reads_the_named_layer():
    batch = make_batch(45, q_lens=[1, 1, 1], seq_lens=[30, 64, 90], K=2, G=4, H=128, page_size=16)
    q, k, v, *rest = batch
    other = jax.random.normal(jax.random.key(46), k.shape, k.dtype)
    kv = jnp.stack([other, -other, k, v])  # [2L, K, P, page, H]: layer 1 is (k, v)
    out = pa.ragged_paged_attention(q, kv, None, *rest, layer=jnp.int32(1), config=tiles(), interpret=True)
    assert_close(out, pa.paged_attention_reference(*batch))


@pytest.mark.parametrize("fp8,splits,warpgroups", [(True, 4, 1), (False, 1, 2), (True, 2, 2)])
def test_compact_splits_window_of_page_ids_and_16_bit_partials(fp8, splits, warpgroups):
    # 128-id rows (page 8) in 4 (sub-)splits: each pass copies a 64-id window; requests of 1, 300 and 1024 keys.
    # (bf16 partials with splits, one warpgroup: test_multi_token_request_... takes the f32 path.) One split of two
    # warpgroups: 2 sub-splits, a 96-id window each
    batch = make_batch(53, q_lens=[1, 1, 1], seq_lens=[1, 300, 1024], num_rows=4, extra_tokens=1, K=2, G=4, H=128,
                       page_size=8)
    config = pa.TuningConfig(64, 2, num_splits=splits, decode_tiles=True, compact_splits=True,
                             decode_warpgroups=warpgroups)
    assert pd.window_size(128, 8, 64, splits * warpgroups) == (96 if splits * warpgroups == 2 else 64)
    if fp8:
        fp8_batch, _, scales = to_fp8(batch, 54)
        out = pa.ragged_paged_attention(*fp8_batch, **scales, config=config, interpret=True)
        assert_close(out, reference_with_quantized_q(fp8_batch, scales), rows=3)
    else:
        out = pa.ragged_paged_attention(*batch, config=config, interpret=True)
        assert_close(out, pa.paged_attention_reference(*batch), rows=3)
    assert not np.asarray(out[3:], np.float32).any()


@pytest.mark.parametrize("fp8,splits,page_size,block_kv", [(False, 1, 16, 64), (False, 2, 32, 64),
                                                            (False, 3, 128, 64), (True, 1, 16, 64),
                                                            (True, 2, 64, 128)])
def test_two_warpgroups_merge_their_halves_of_a_split(fp8, splits, page_size, block_kv):
    """decode_warpgroups=2: each warpgroup walks half of its CTA's split, and warpgroup 0 merges the two through
    shared memory before the usual epilogue. Contexts of 1..40 keys leave the second warpgroup without a block (its
    lse is -inf); a 3-token and a 2-token request are several passes over the exchange buffers; 2 padding rows and
    2 padding tokens; page_size 128 with 64-key blocks reads page slices."""
    q_lens, seq_lens = [1, 3, 1, 2, 1], [1, 40, 23, 150, 300]
    batch = make_batch(56, q_lens=q_lens, seq_lens=seq_lens, num_rows=7, extra_tokens=2, K=2, G=4, H=128,
                       page_size=page_size)
    config = tiles(block_kv, 2, splits=splits, warpgroups=2)
    rows = sum(q_lens)
    if fp8:
        fp8_batch, orig, scales = to_fp8(batch, 57)
        out = pa.ragged_paged_attention(*fp8_batch, **scales, config=config, interpret=True)
        assert_close(out, reference_with_quantized_q(fp8_batch, scales), rows=rows)
        assert_close(out, pa.paged_attention_reference(*orig), rows=rows, tol=FP8_TOL)
    else:
        out = pa.ragged_paged_attention(*batch, config=config, interpret=True)
        assert_close(out, pa.paged_attention_reference(*batch), rows=rows)
    assert not np.asarray(out[rows:], np.float32).any()  # padding tokens come back as zeros


@pytest.mark.parametrize("fp8,splits", [(False, 1), (True, 2)])
def test_two_warpgroups_have_no_races(fp8, splits):
    """The interpreter's race detector over the two warpgroups: their own rings (more blocks than slots), and the
    exchange buffers refilled by warpgroup 1 once warpgroup 0 has read them, over a 4-token request's passes."""
    from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
    batch = make_batch(62, q_lens=[4, 1], seq_lens=[400, 30], K=2, G=4, H=128, page_size=16)
    kw = {}
    if fp8:
        batch, _, kw = to_fp8(batch, 63)
    out = pa.ragged_paged_attention(*batch, **kw, config=tiles(splits=splits, warpgroups=2),
                                    interpret=InterpretGPUParams(detect_races=True))
    assert not interpret_pallas_call.get_races().races_found
    expected = reference_with_quantized_q(batch, kw) if fp8 else pa.paged_attention_reference(*batch)
    assert_close(out, expected)


def test_decode_warpgroups_must_be_1_or_2():
    for bad in (0, 3):
        with pytest.raises(ValueError, match="decode_warpgroups"):
            tiles(warpgroups=bad)


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
            first, last = begin // page_size, min((begin + blocks * block_kv - 1) // page_size, (kv_hi - 1) // page_size)
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


def lower_for_the_gpu(fp8, splits, block_kv, stages, compact, warpgroups=1):
    T, N, K, H, P, page_size, R = 64, 32, 8, 128, 4096, 16, 64
    cache = jax.ShapeDtypeStruct((K, P, page_size, H), pa.FP8 if fp8 else jnp.bfloat16)
    i32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32)
    config = pa.TuningConfig(block_kv, stages, num_splits=splits, decode_tiles=True, compact_splits=compact,
                             decode_warpgroups=warpgroups)
    f = jax.jit(lambda *a: pa.ragged_paged_attention(*a, config=config))
    return f.trace(jax.ShapeDtypeStruct((T, N, H), jnp.bfloat16), cache, cache, i32(R, 256), i32(R + 1), i32(R),
                   i32()).lower(lowering_platforms=("cuda",))


@pytest.mark.parametrize("fp8,splits,block_kv,stages,compact,warpgroups", [
    (False, 1, 64, 2, False, 1), (False, 4, 128, 2, False, 1), (True, 1, 64, 3, False, 1), (True, 4, 64, 2, False, 1),
    (False, 4, 64, 2, True, 1), (True, 4, 64, 2, True, 1),
    (False, 1, 64, 2, False, 2), (False, 2, 64, 3, False, 2), (False, 1, 128, 1, False, 2), (True, 1, 64, 2, False, 2),
    (True, 2, 64, 2, True, 2)])
def test_lowers_for_the_gpu_cpu(fp8, splits, block_kv, stages, compact, warpgroups):
    """The Mosaic GPU lowering (transposed P and output stores, 8-column wgmmas, fp8 QK^T, the page-id window, two
    warpgroups and their exchange) at a serving shape."""
    lower_for_the_gpu(fp8, splits, block_kv, stages, compact, warpgroups)


def mosaic_modules(lowered):
    """The Mosaic GPU kernels' MLIR (text) inside a lowered computation."""
    from jax._src.interpreters import mlir
    from jax._src.lib.mlir import ir
    calls = []

    def walk(op):
        for region in op.regions:
            for block in region.blocks:
                for inner in block.operations:
                    if inner.name == "stablehlo.custom_call" and "mhlo.backend_config" in inner.attributes:
                        calls.append(inner)
                    walk(inner)

    walk(lowered.compiler_ir("stablehlo").operation)
    texts = []
    for call in calls:
        config = ir.DictAttr(call.attributes["mhlo.backend_config"])
        if "module" not in config:
            continue
        ctx = mlir.make_ir_context()
        ctx.allow_unregistered_dialects = True
        with ctx:
            texts.append(str(ir.Module.parse(ir.StringAttr(config["module"]).value_bytes)))
    return texts


@pytest.mark.parametrize("fp8", [False, True])
def test_two_warpgroups_reduce_in_separate_scratch_cpu(fp8):
    """Mosaic GPU puts a cross-warp reduction's scratch at the SMEM offset in use where it is traced, the same for
    every warpgroup, so two warpgroups reducing at once would race on the GPU (the interpreter cannot show it).
    The kernel traces warpgroup 1 inside REDUCTION_SCRATCH more bytes: its reductions' scratch views must lie
    REDUCTION_SCRATCH bytes past warpgroup 0's."""
    import re
    [text] = mosaic_modules(lower_for_the_gpu(fp8, 1, 64, 2, False, warpgroups=2))
    # a view's offset is the index constant printed right before it
    views = re.findall(r'\{value = (\d+) : index\} : \(\) -> index\n\s*%\d+ = "stable_mosaic_gpu.memref.view"'
                       rf'[^\n]*-> memref<{pd.REDUCTION_SCRATCH // 4}xf32,', text)
    offsets = sorted({int(v) for v in views})
    assert len(offsets) == 2 and offsets[1] - offsets[0] == pd.REDUCTION_SCRATCH, offsets


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
@pytest.mark.parametrize("fp8,page_size,config", [(False, 16, tiles(splits=1, warpgroups=2)),
                                                  (False, 32, tiles(64, 3, splits=2, warpgroups=2)),
                                                  (False, 64, tiles(128, 1, splits=1, warpgroups=2)),
                                                  (True, 16, tiles(splits=1, warpgroups=2)),
                                                  (True, 64, tiles(64, 3, splits=4, warpgroups=2))])
def test_gpu_two_warpgroups_serving_sizes(fp8, page_size, config):
    seq_lens = [int(x) for x in np.random.default_rng(58).integers(1, 4096, 60)] + [4096]
    batch = make_batch(58, q_lens=[1] * 61, seq_lens=seq_lens, num_rows=64, extra_tokens=3, K=8, G=4, H=128,
                       page_size=page_size)
    if fp8:
        fp8_batch, orig, scales = to_fp8(batch, 59)
        out = pa.ragged_paged_attention(*fp8_batch, **scales, config=config)
        assert_close(out, reference_with_quantized_q(fp8_batch, scales), rows=61)
        assert_close(out, pa.paged_attention_reference(*orig), rows=61, tol=FP8_TOL)
    else:
        out = pa.ragged_paged_attention(*batch, config=config)
        assert_close(out, pa.paged_attention_reference(*batch), rows=61)
    assert not np.asarray(out[61:], np.float32).any()


@pytest.mark.gpu
@pytest.mark.parametrize("fp8,warpgroups", [(False, 2), (True, 2)])
def test_gpu_batch_1_two_warpgroups_one_split(fp8, warpgroups):
    # the engine's batch-1 decode step with decode_warpgroups=2 and one split: no merge kernel
    batch = make_batch(60, q_lens=[1], seq_lens=[3000], num_rows=1, extra_tokens=7, K=8, G=4, H=128, page_size=16)
    config = tiles(splits=1, warpgroups=warpgroups)
    if fp8:
        fp8_batch, _, scales = to_fp8(batch, 61)
        out = pa.ragged_paged_attention(*fp8_batch, **scales, config=config)
        assert_close(out, reference_with_quantized_q(fp8_batch, scales), rows=1)
    else:
        out = pa.ragged_paged_attention(*batch, config=config)
        assert_close(out, pa.paged_attention_reference(*batch), rows=1)
    assert not np.asarray(out[1:], np.float32).any()


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


def test_ops_decode_config_two_warpgroups_halve_the_default_splits(monkeypatch):
    """IE_JAX_DECODE_WARPGROUPS=2: decode steps of <= 16 tokens get two warpgroups on half the default kv splits (the
    batch-1 step's two splits become one, merged in the CTA); larger steps and the default keep one warpgroup."""
    from kernels_pallas import ops, paged_decode
    cache = jax.ShapeDtypeStruct((64, 8, 100, 16, 128), jnp.bfloat16)
    q8, q32 = jnp.zeros((8, 32, 128), jnp.bfloat16), jnp.zeros((32, 32, 128), jnp.bfloat16)
    b1, b4 = jnp.zeros((1, 40), jnp.int32), jnp.zeros((4, 256), jnp.int32)
    monkeypatch.delenv("IE_JAX_DECODE_WARPGROUPS", raising=False)
    assert ops.decode_config(q8, cache, b1).decode_warpgroups == 1
    monkeypatch.setenv("IE_JAX_DECODE_WARPGROUPS", "2")
    cfg = ops.decode_config(q8, cache, b1)
    assert paged_decode.num_splits_for(1, 8, 640) == 2
    assert (cfg.decode_tiles, cfg.decode_warpgroups, cfg.num_splits) == (True, 2, 1)
    cfg = ops.decode_config(q8, cache, b4)
    assert cfg.num_splits == max(1, paged_decode.num_splits_for(4, 8, 4096) // 2)
    assert ops.decode_config(q32, cache, b4).decode_warpgroups == 1
