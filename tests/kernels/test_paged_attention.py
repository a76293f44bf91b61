"""Ragged paged attention against its reference (the KV-cache write: test_kv_write.py).

CPU tests run the real kernel body in the Mosaic GPU interpreter at small shapes; `gpu` tests compile it for the
device at serving sizes. Every comparison draws fresh random inputs and random (non-contiguous) page tables.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels_pallas import ops
from kernels_pallas import paged_attention as pa
from kernels_pallas.kv_cache import FP8_MAX

# e4m3 keeps 3 mantissa bits: rounding to nearest moves a value by at most 2^-4 of itself. Against the unquantized
# (bf16) reference the output carries two such roundings, K's (through the logits) and V's, so 2 * 2^-4 (the H200
# measured 6.7e-2 at serving sizes); against the dequantized cache only the kernel's own f16/f32 rounding remains
# (the bf16 tolerance).
FP8_TOL = 2 * 2.0 ** -4


def make_batch(seed, *, q_lens, seq_lens, num_rows=None, extra_tokens=0, K=2, G=4, H=64, page_size=16,
               dtype=jnp.bfloat16):
    """Random q and caches; requests get disjoint random pages. Rows past len(q_lens) are padding."""
    rng = np.random.default_rng(seed)
    n = len(q_lens)
    R = num_rows or n
    max_pages = max(-(-s // page_size) for s in seq_lens)
    P = R * max_pages + 3
    page_table = rng.permutation(P)[:R * max_pages].reshape(R, max_pages).astype(np.int32)
    qsl = np.zeros(R + 1, np.int32)
    qsl[1:n + 1] = np.cumsum(q_lens)
    qsl[n + 1:] = qsl[n]
    sl = np.zeros(R, np.int32)
    sl[:n] = seq_lens
    T = int(qsl[n]) + extra_tokens
    q = rng.standard_normal((T, K * G, H))
    k_pages = rng.standard_normal((K, P, page_size, H))
    v_pages = rng.standard_normal((K, P, page_size, H))
    return (jnp.asarray(q, dtype), jnp.asarray(k_pages, dtype), jnp.asarray(v_pages, dtype),
            jnp.asarray(page_table), jnp.asarray(qsl), jnp.asarray(sl), jnp.int32(n))


def assert_close(out, expected, rows=None, tol=2e-2):
    out = np.asarray(out, np.float32)
    expected = np.asarray(expected, np.float32)
    assert np.isfinite(out).all()
    if rows is not None:
        out, expected = out[:rows], expected[:rows]
    err = np.linalg.norm(out - expected) / np.linalg.norm(expected)
    diff = np.abs(out - expected)
    print(f"rel err {err:.2e}  max abs {diff.max():.2e}  mean abs {diff.mean():.2e}")
    assert err < tol, err


def to_fp8(batch, seed, spread=3.0):
    """(fp8 batch, the unquantized bf16 batch it came from, scales). The caches are scaled by `spread` and stored
    as x / scale with random per-kv-head scales, so values reach far into e4m3's normal range and its subnormals."""
    q, k_pages, v_pages, *rest = batch
    rng = np.random.default_rng(seed)
    # scales >= 0.05 keep spread * |x| / scale under 448 for |x| < 7 sigma: nothing saturates
    scales = [jnp.asarray(rng.uniform(0.05, 0.2, k_pages.shape[:-3]), jnp.float32) for _ in range(2)]  # [(L,) K]
    orig = [(x.astype(jnp.float32) * spread).astype(x.dtype) for x in (k_pages, v_pages)]
    fp8 = [jnp.clip(x.astype(jnp.float32) / s[..., None, None, None], -FP8_MAX, FP8_MAX).astype(pa.FP8)
           for x, s in zip(orig, scales)]
    return (q, *fp8, *rest), (q, *orig, *rest), dict(k_scale=scales[0], v_scale=scales[1])


def run_both(batch, config, **kw):
    expected = pa.paged_attention_reference(*batch, **kw)
    out = pa.ragged_paged_attention(*batch, config=config, interpret=True, **kw)
    return out, expected


# ----------------------------------------------------------------------------------------------------------------
# The oracle itself


def test_reference_matches_dense_attention():
    """One request with identity pages is dense causal attention over the sequence's tail queries."""
    batch = make_batch(0, q_lens=[9], seq_lens=[40], page_size=8, dtype=jnp.float32)
    q, k_pages, v_pages, page_table, qsl, sl, n = batch
    K, _, _, H = k_pages.shape
    k = k_pages[:, page_table[0]].transpose(1, 2, 0, 3).reshape(1, -1, K, H)[:, :40]  # [1, S, K, H]
    v = v_pages[:, page_table[0]].transpose(1, 2, 0, 3).reshape(1, -1, K, H)[:, :40]
    expected = ops.attention_reference(q[None], k, v, q_positions=jnp.arange(31, 40)[None],
                                       kv_positions=jnp.arange(40)[None])[0]
    np.testing.assert_allclose(pa.paged_attention_reference(*batch), expected, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# Kernel (Mosaic GPU interpreter)


@pytest.mark.parametrize("page_size,block_kv,prefetch", [(16, 64, False), (32, 32, False), (64, 32, False),
                                                         (16, 64, True), (64, 32, True)])
def test_decode_batch(page_size, block_kv, prefetch):
    # lengths 1, a page multiple, non-multiples, and the table's maximum (a 4-page row: ids come from GMEM)
    seq_lens = [1, 2 * page_size, 3 * page_size - 5, 4 * page_size]
    batch = make_batch(page_size, q_lens=[1] * 4, seq_lens=seq_lens, page_size=page_size)
    config = pa.TuningConfig(block_kv=block_kv, num_stages=2, num_splits=1, prefetch_pages=prefetch, direct=False)
    out, expected = run_both(batch, config)
    assert_close(out, expected)


def test_mixed_decode_and_prefill_with_splits():
    # prefill chunks of 20 and 17 tokens (several 64-row tiles with G = 4), a 1-token prompt and decodes
    # (one split is covered by the decode and stacked-cache tests)
    batch = make_batch(1, q_lens=[1, 20, 1, 17, 1], seq_lens=[90, 20, 1, 77, 128])
    out, expected = run_both(batch, pa.TuningConfig(block_kv=64, num_stages=2, num_splits=3, direct=False))
    assert_close(out, expected)


@pytest.mark.parametrize("num_splits", [1, 2])
def test_padding_rows_and_tokens_do_not_touch_real_rows(num_splits):
    real = dict(q_lens=[3, 1, 6], seq_lens=[50, 33, 6], K=1)
    clean = make_batch(2, **real)
    padded = make_batch(2, **real, num_rows=6, extra_tokens=5)
    # same real data; padding rows point at garbage lengths and pages
    q = jnp.concatenate([clean[0], jax.random.normal(jax.random.key(3), (5,) + clean[0].shape[1:], clean[0].dtype)])
    seq_lens = padded[5].at[3:].set(jnp.asarray([7, 1000, 3], jnp.int32))
    qsl = padded[4].at[4:].set(jnp.asarray([12, 14, 15], jnp.int32))
    page_table = jnp.concatenate([clean[3], jnp.full((3, clean[3].shape[1]), 10_000, jnp.int32)])
    padded = (q, clean[1], clean[2], page_table, qsl, seq_lens, jnp.int32(3))
    config = pa.TuningConfig(block_kv=64, num_stages=2, num_splits=num_splits, direct=False)
    out_clean = pa.ragged_paged_attention(*clean, config=config, interpret=True)
    out_padded = pa.ragged_paged_attention(*padded, config=config, interpret=True)
    T = clean[0].shape[0]
    assert np.isfinite(np.asarray(out_padded, np.float32)).all()
    np.testing.assert_array_equal(np.asarray(out_padded[:T], np.float32), np.asarray(out_clean, np.float32))
    assert not np.asarray(out_padded[T:], np.float32).any()  # padding tokens come back as zeros
    assert_close(out_clean, pa.paged_attention_reference(*clean))


@pytest.mark.parametrize("block_kv,splits", [(64, 1), (32, 3)])
def test_page_ids_in_smem(block_kv, splits):
    """A 32-page row copied into SMEM per tile: decodes, a prefill chunk, splits, random page order."""
    batch = make_batch(11, q_lens=[1, 12, 1, 1], seq_lens=[256, 40, 1, 130], page_size=8)
    config = pa.TuningConfig(block_kv=block_kv, num_stages=2, num_splits=splits, direct=False)
    assert pa.ids_in_smem(config, batch[3].shape[1], fp8=False)  # the default takes this row
    assert not pa.ids_in_smem(config, 12, fp8=False)  # a row the GPU copy cannot move: ids from GMEM
    out, expected = run_both(batch, config)
    assert_close(out, expected)


def test_sliding_window_and_softcap():
    batch = make_batch(4, q_lens=[1, 12, 1], seq_lens=[100, 70, 37])
    config = pa.TuningConfig(block_kv=32, num_stages=3, num_splits=2, direct=False)
    out, expected = run_both(batch, config, sliding_window=24, softcap=5.0)
    assert_close(out, expected)


def test_gqa_group_8_head_dim_128():
    batch = make_batch(5, q_lens=[1, 9, 1], seq_lens=[100, 90, 1], K=1, G=8, H=128, page_size=32)
    config = pa.TuningConfig(block_kv=64, num_stages=2, num_splits=2, direct=False)
    out, expected = run_both(batch, config, sm_scale=0.1)
    assert_close(out, expected)


@pytest.mark.parametrize("page_size,stages", [(16, 2), (64, 3)])
def test_fp8_decode_batch(page_size, stages):
    seq_lens = [1, 2 * page_size, 3 * page_size - 5, 4 * page_size]
    batch = make_batch(20 + page_size, q_lens=[1] * 4, seq_lens=seq_lens, page_size=page_size, H=128)
    fp8, orig, scales = to_fp8(batch, 21)
    out = pa.ragged_paged_attention(*fp8, **scales, config=pa.TuningConfig(64, stages, num_splits=1, direct=False),
                                    interpret=True)
    assert_close(out, pa.paged_attention_reference(*fp8, **scales))
    assert_close(out, pa.paged_attention_reference(*orig), tol=FP8_TOL)


@pytest.mark.parametrize("convert_wg,convert_ahead", [(False, False), (False, True), (True, False)])
def test_fp8_mixed_decode_and_prefill_with_splits_window_softcap(convert_wg, convert_ahead):
    batch = make_batch(22, q_lens=[1, 20, 1, 17, 1], seq_lens=[90, 20, 1, 77, 128])
    fp8, orig, scales = to_fp8(batch, 23)
    kw = dict(sliding_window=50, softcap=4.0, sm_scale=0.3)
    config = pa.TuningConfig(64, 3, num_splits=3, convert_wg=convert_wg, convert_ahead=convert_ahead, direct=False)
    out = pa.ragged_paged_attention(*fp8, **scales, **kw, config=config, interpret=True)
    assert_close(out, pa.paged_attention_reference(*fp8, **scales, **kw))
    assert_close(out, pa.paged_attention_reference(*orig, **kw), tol=FP8_TOL)


@pytest.mark.parametrize("convert_wg,convert_ahead,prefetch", [(False, False, False), (False, True, True),
                                                                (True, False, True)])
def test_fp8_pipeline_has_no_races(convert_wg, convert_ahead, prefetch):
    """One warpgroup converting and computing in turn (the next K during PV, or not), or a converting warpgroup
    handing f16 blocks to the computing one through barriers: more blocks than ring slots, so every slot and
    handoff buffer is reused."""
    from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
    batch = make_batch(26, q_lens=[1, 9, 1], seq_lens=[300, 200, 1], K=1, H=128)
    fp8, _, scales = to_fp8(batch, 27)
    config = pa.TuningConfig(64, 2, num_splits=1, convert_wg=convert_wg, convert_ahead=convert_ahead,
                             prefetch_pages=prefetch, direct=False)
    out = pa.ragged_paged_attention(*fp8, **scales, config=config, interpret=InterpretGPUParams(detect_races=True))
    assert not interpret_pallas_call.get_races().races_found
    assert_close(out, pa.paged_attention_reference(*fp8, **scales))


def test_fp8_scales_are_applied_per_kv_head():
    """Rescaling the stored values and the scales together must not change the result; rescaling only the
    stored values must (so a kernel that ignored the scales could not pass)."""
    batch = make_batch(24, q_lens=[1, 6], seq_lens=[40, 30], K=2)
    fp8, _, scales = to_fp8(batch, 25, spread=1.0)
    q, k8, v8, *rest = fp8
    half = lambda x: (x.astype(jnp.float32) / 2).astype(pa.FP8)  # exact: a power of two, no underflow at spread 1
    config = pa.TuningConfig(64, 2, num_splits=1, direct=False)
    out = pa.ragged_paged_attention(*fp8, **scales, config=config, interpret=True)
    out_rescaled = pa.ragged_paged_attention(q, half(k8), half(v8), *rest, k_scale=2 * scales["k_scale"],
                                             v_scale=2 * scales["v_scale"], config=config, interpret=True)
    assert_close(out_rescaled, out, tol=1e-2)
    out_wrong = pa.ragged_paged_attention(q, half(k8), half(v8), *rest, **scales, config=config, interpret=True)
    assert not np.allclose(np.asarray(out_wrong, np.float32), np.asarray(out, np.float32), atol=1e-2)


def make_stacked(seed, num_layers, **kw):
    """A batch whose caches are [L, K, P, page_size, H], each layer drawn separately (same page table)."""
    layers = [make_batch(seed + 100 * i, **kw) for i in range(num_layers)]
    q, _, _, page_table, qsl, sl, n = layers[0]
    k_cache = jnp.stack([b[1] for b in layers])
    v_cache = jnp.stack([b[2] for b in layers])
    return q, k_cache, v_cache, page_table, qsl, sl, n


def test_stacked_cache_reads_the_named_layer():
    """The kernel indexes a traced layer of the stacked cache itself; first and last layer against the oracle."""
    L = 3
    q, k_cache, v_cache, page_table, qsl, sl, n = make_stacked(10, L, q_lens=[1, 9, 1], seq_lens=[70, 40, 33], K=1)
    config = pa.TuningConfig(block_kv=64, num_stages=2, num_splits=1, direct=False)

    @jax.jit
    def kernel(layer):
        return pa.ragged_paged_attention(q, k_cache, v_cache, page_table, qsl, sl, n, layer=layer, config=config,
                                         interpret=True)

    outs = []
    for layer in (0, L - 1):
        expected = ops.paged_attention_reference(q, k_cache, v_cache, jnp.int32(layer), page_table, qsl, sl, n)
        outs.append(kernel(jnp.int32(layer)))
        assert_close(outs[-1], expected)
    # the layers hold different data, so reading the wrong one could not pass
    assert not np.allclose(np.asarray(outs[0], np.float32), np.asarray(outs[1], np.float32), atol=0.05)


def test_ops_paged_attention_backends_agree():
    """ops.paged_attention: the interpreter (kernel body) and the reference give the same result, mid-stack."""
    q, k_cache, v_cache, page_table, qsl, sl, n = make_stacked(11, 3, q_lens=[1, 6, 1], seq_lens=[50, 30, 17],
                                                               num_rows=4, K=1)
    args = (q, k_cache, v_cache, jnp.int32(1), page_table, qsl, sl, n)
    kw = dict(scale=0.2, softcap=8.0)
    with ops.kernel_backend("reference"):
        expected = ops.paged_attention(*args, **kw)
    with ops.kernel_backend("interpret"):
        out = ops.paged_attention(*args, **kw)
        # shapes the kernel does not take (f32) fall back to the reference on every backend
        as_f32 = [a.astype(jnp.float32) if a.dtype == jnp.bfloat16 else a for a in args]
        fallback = ops.paged_attention(*as_f32, **kw)
    assert_close(out, expected)
    np.testing.assert_allclose(fallback, ops.paged_attention_reference(*as_f32, **kw), rtol=1e-6, atol=1e-6)


def test_ops_fp8_stacked_write_then_attend_backends_agree():
    """The engine's fp8 pattern through ops: quantize-and-write this step's K/V into a mid layer of a stacked fp8
    cache, then attend; the interpreter and the reference agree, and both stay within e4m3's rounding of the
    same computation on a bf16 cache."""
    L, page_size = 3, 16
    batch = make_stacked(30, L, q_lens=[1, 6, 1], seq_lens=[50, 30, 17], num_rows=4, K=2, H=128)
    fp8, orig, scales = to_fp8(batch, 31)
    q = fp8[0]
    T = q.shape[0]
    rng = np.random.default_rng(32)
    k_new = jnp.asarray(rng.standard_normal((T, 2, 128)) * 3, jnp.bfloat16)
    v_new = jnp.asarray(rng.standard_normal((T, 2, 128)) * 3, jnp.bfloat16)
    qsl, sl, pt = np.asarray(batch[4]), np.asarray(batch[5]), np.asarray(batch[3])
    slots = np.full(T, -1, np.int32)
    for r in range(3):
        pos = np.arange(sl[r] - (qsl[r + 1] - qsl[r]), sl[r])
        slots[qsl[r]:qsl[r + 1]] = pt[r, pos // page_size] * page_size + pos % page_size
    layer, slots = jnp.int32(1), jnp.asarray(slots)

    def step(k_cache, v_cache, **sc):
        kc, vc = ops.write_kv(k_cache, v_cache, layer, k_new, v_new, slots, **sc)
        return ops.paged_attention(q, kc, vc, layer, *batch[3:], scale=0.1, **sc)

    with ops.kernel_backend("reference"):
        expected = step(*fp8[1:3], **scales)
        unquantized = step(*orig[1:3])
    with ops.kernel_backend("interpret"):
        out = step(*fp8[1:3], **scales)
    assert_close(out, expected)
    assert_close(out, unquantized, tol=FP8_TOL)


def test_bad_arguments_raise():
    batch = make_batch(6, q_lens=[1], seq_lens=[5])
    with pytest.raises(ValueError, match="block_kv"):
        pa.TuningConfig(block_kv=48, direct=False)
    with pytest.raises(ValueError, match="sliding_window"):
        pa.ragged_paged_attention(*batch, sliding_window=0)
    with pytest.raises(ValueError, match="query_start_loc"):
        pa.ragged_paged_attention(*batch[:4], batch[4][:1], *batch[5:])
    with pytest.raises(ValueError, match="unsupported"):
        pa.ragged_paged_attention(batch[0].astype(jnp.float32), *batch[1:])
    with pytest.raises(ValueError, match="layer"):  # a stacked cache needs its layer, a single layer takes none
        pa.ragged_paged_attention(batch[0], batch[1][None], batch[2][None], *batch[3:])
    with pytest.raises(ValueError, match="layer"):
        pa.ragged_paged_attention(*batch, layer=0)
    fp8, _, scales = to_fp8(batch, 6)
    with pytest.raises(ValueError, match="k_scale"):  # scales belong to an fp8 cache
        pa.ragged_paged_attention(*batch, k_scale=scales["k_scale"])
    with pytest.raises(ValueError, match="v_scale.shape"):
        pa.ragged_paged_attention(*fp8, v_scale=scales["v_scale"][None])
    with pytest.raises(ValueError, match="unsupported"):  # fp8 converts 64-row tiles
        pa.ragged_paged_attention(*fp8, config=pa.TuningConfig(block_kv=32, direct=False))
    with pytest.raises(ValueError, match="p_in_registers"):
        pa.ragged_paged_attention(*batch, config=pa.TuningConfig(p_in_registers=True), interpret=True)


@pytest.mark.parametrize("fp8,config", [
    (False, pa.TuningConfig()), (False, pa.TuningConfig(p_in_registers=True)), (True, pa.TuningConfig()),
    (True, pa.TuningConfig(convert_wg=True)), (True, pa.TuningConfig(64, 3, convert_wg=True, p_in_registers=True)),
    (True, pa.TuningConfig(64, 4, p_in_registers=True)), (True, pa.TuningConfig(convert_ahead=False)),
    (False, pa.TuningConfig(prefetch_pages=True)), (True, pa.TuningConfig(64, 3, prefetch_pages=True)),
    (False, pa.TuningConfig(direct=True)), (True, pa.TuningConfig(direct=True)),
    (True, pa.TuningConfig(direct=True, convert_wg=True)), (False, pa.TuningConfig(direct=True, merge_in_kernel=True)),
    (True, pa.TuningConfig(direct=True, merge_in_kernel=True)), (False, pa.TuningConfig(pages_in_smem=True)),
    (True, pa.TuningConfig(pages_in_smem=True)), (False, pa.TuningConfig(direct=True, pages_in_smem=True)),
    (False, pa.TuningConfig(64, 3, q_in_registers=True)), (False, pa.TuningConfig(direct=True, q_in_registers=True)),
    (False, pa.TuningConfig(pages_in_smem=False))])
def test_lowers_for_the_gpu_cpu(fp8, config):
    """The full Mosaic GPU lowering (layouts, register A operands, warpgroup handoff, SMEM budget) runs on CPU
    at a serving shape; the register-A paths are otherwise only checked by the gpu tests."""
    T, N, K, H, P, page_size, R = 64, 32, 8, 128, 4096, 16, 64
    if config.direct:  # the engine's batch-1 step: an 8-token bucket, one request
        T, R = 8, 1
    cache = jax.ShapeDtypeStruct((K, P, page_size, H), pa.FP8 if fp8 else jnp.bfloat16)
    i32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32)
    f = jax.jit(lambda *a: pa.ragged_paged_attention(*a, config=config))
    f.trace(jax.ShapeDtypeStruct((T, N, H), jnp.bfloat16), cache, cache, i32(R, 64), i32(R + 1), i32(R),
            i32()).lower(lowering_platforms=("cuda",))


def interleave(k_cache, v_cache):
    """[L, ...] K and V caches as the engine's one [2L, ...] buffer: layer l's K at 2l, its V at 2l + 1."""
    return jnp.stack([k_cache, v_cache], axis=1).reshape(-1, *k_cache.shape[1:])


@pytest.mark.parametrize("fp8", [False, True])
def test_interleaved_cache_write_then_attend_matches_separate_caches(fp8):
    """The engine's interleaved K/V buffer (v_cache=None): one scatter writes what the two separate writes do, into
    entries 2l and 2l + 1 only, and the attention that follows (reference and interpreted kernel, direct and
    packed paths) equals the one over separate caches."""
    L, page_size = 3, 16
    batch = make_stacked(40, L, q_lens=[1, 6, 1], seq_lens=[50, 30, 17], num_rows=4, K=2, H=128)
    scales = {}
    if fp8:
        batch, _, scales = to_fp8(batch, 41)
    q, k_cache, v_cache, page_table, qsl, sl, n = batch
    T = q.shape[0]
    rng = np.random.default_rng(42)
    k_new, v_new = (jnp.asarray(rng.standard_normal((T, 2, 128)) * 3, jnp.bfloat16) for _ in range(2))
    slots = np.full(T, -1, np.int32)
    qsl_, sl_, pt = np.asarray(qsl), np.asarray(sl), np.asarray(page_table)
    for r in range(3):
        pos = np.arange(sl_[r] - (qsl_[r + 1] - qsl_[r]), sl_[r])
        slots[qsl_[r]:qsl_[r + 1]] = pt[r, pos // page_size] * page_size + pos % page_size
    layer, slots = jnp.int32(1), jnp.asarray(slots)

    kc, vc = ops.write_kv(k_cache, v_cache, layer, k_new, v_new, slots, **scales)
    kv, none = ops.write_kv(interleave(k_cache, v_cache), None, layer, k_new, v_new, slots, **scales)
    assert none is None
    as_f32 = lambda x: np.asarray(x.astype(jnp.float32))  # noqa: E731
    np.testing.assert_array_equal(as_f32(kv), as_f32(interleave(kc, vc)))
    assert not np.array_equal(as_f32(kc[1]), as_f32(k_cache[1]))  # the write did change layer 1

    with ops.kernel_backend("reference"):
        sep = ops.paged_attention(q, kc, vc, layer, page_table, qsl, sl, n, scale=0.1, **scales)
        inter = ops.paged_attention(q, kv, None, layer, page_table, qsl, sl, n, scale=0.1, **scales)
    np.testing.assert_array_equal(as_f32(inter), as_f32(sep))
    assert np.abs(as_f32(sep)[:int(qsl_[3])]).max() > 0
    # the interpreted kernel on the interleaved buffer against the reference on separate caches (the direct path
    # only for bf16: the CPU suite's time)
    configs = [pa.TuningConfig(direct=False, num_splits=2)] + ([] if fp8 else [None])
    for config in configs:
        with ops.kernel_backend("interpret"):
            if config is None:
                out = ops.paged_attention(q, kv, None, layer, page_table, qsl, sl, n, scale=0.1, **scales)
            else:
                out = pa.ragged_paged_attention(q, kv, None, page_table, qsl, sl, n, layer=layer, sm_scale=0.1,
                                                config=config, interpret=True, **scales)
        assert_close(out, sep, rows=int(qsl_[3]))


# ----------------------------------------------------------------------------------------------------------------
# Device (full size)


@pytest.mark.gpu
@pytest.mark.parametrize("page_size,config", [(16, None), (32, None), (64, None),
                                              (16, pa.TuningConfig(64, 3)), (16, pa.TuningConfig(p_in_registers=False)),
                                              (16, pa.TuningConfig(prefetch_pages=True)),
                                              (16, pa.TuningConfig(pages_in_smem=True))])
def test_gpu_serving_sizes(page_size, config):
    q_lens = [1] * 30 + [512, 100]
    seq_lens = [int(x) for x in np.random.default_rng(8).integers(1, 4096, 30)] + [2048, 4096]
    batch = make_batch(8, q_lens=q_lens, seq_lens=seq_lens, num_rows=40, extra_tokens=7, K=8, G=4, H=128,
                       page_size=page_size)
    out = pa.ragged_paged_attention(*batch, config=config)
    expected = pa.paged_attention_reference(*batch)
    assert_close(out, expected, rows=sum(q_lens))


@pytest.mark.gpu
@pytest.mark.parametrize("page_size,config", [
    (16, pa.TuningConfig(64, 2)), (64, pa.TuningConfig(64, 2)), (16, pa.TuningConfig(64, 4)),
    (16, pa.TuningConfig(64, 2, convert_ahead=False, p_in_registers=False)),
    (64, pa.TuningConfig(64, 3, convert_wg=True)), (16, pa.TuningConfig(64, 2, prefetch_pages=True)),
    (16, pa.TuningConfig(64, 2, convert_wg=True, prefetch_pages=True)), (16, pa.TuningConfig(pages_in_smem=True))])
def test_gpu_fp8_serving_sizes(page_size, config):
    q_lens = [1] * 30 + [512, 100]
    seq_lens = [int(x) for x in np.random.default_rng(16).integers(1, 4096, 30)] + [2048, 4096]
    batch = make_batch(16, q_lens=q_lens, seq_lens=seq_lens, num_rows=40, extra_tokens=7, K=8, G=4, H=128,
                       page_size=page_size)
    fp8, orig, scales = to_fp8(batch, 17)
    rows = sum(q_lens)
    out = pa.ragged_paged_attention(*fp8, **scales, config=config)
    assert_close(out, pa.paged_attention_reference(*fp8, **scales), rows=rows)
    assert_close(out, pa.paged_attention_reference(*orig), rows=rows, tol=FP8_TOL)


@pytest.mark.gpu
def test_gpu_fp8_long_context_split():
    fp8, _, scales = to_fp8(make_batch(18, q_lens=[1], seq_lens=[32768], K=8, G=4, H=128), 19)
    assert_close(pa.ragged_paged_attention(*fp8, **scales), pa.paged_attention_reference(*fp8, **scales))


@pytest.mark.gpu
def test_gpu_long_context_split():
    batch = make_batch(9, q_lens=[1], seq_lens=[32768], K=8, G=4, H=128)
    assert_close(pa.ragged_paged_attention(*batch), pa.paged_attention_reference(*batch))


@pytest.mark.gpu
def test_gpu_layer_scan_updates_the_stacked_cache_in_place():
    """The engine's pattern: a scan over layers that writes then attends on a donated [L, ...] cache. The compiled
    step must hold no full-size copy of the cache, and every layer's output must match the reference backend."""
    L, page_size = 4, 16
    batch = make_stacked(13, L, q_lens=[1] * 6 + [40], seq_lens=[300, 17, 1, 64, 900, 129, 200], num_rows=8,
                         extra_tokens=3, K=8, G=4, H=128, page_size=page_size)
    q, k_cache, v_cache, page_table, qsl, sl, n = batch
    T = q.shape[0]
    rng = np.random.default_rng(14)
    slots = np.full(T, -1, np.int32)  # each real token's own slot, at its position in its request's pages
    qsl_np, sl_np, pt_np = np.asarray(qsl), np.asarray(sl), np.asarray(page_table)
    for r in range(int(n)):
        pos = np.arange(sl_np[r] - (qsl_np[r + 1] - qsl_np[r]), sl_np[r])
        slots[qsl_np[r]:qsl_np[r + 1]] = pt_np[r, pos // page_size] * page_size + pos % page_size
    q_all = jnp.asarray(rng.standard_normal((L,) + q.shape), q.dtype)  # [L, T, N, H]
    k_new = jnp.asarray(rng.standard_normal((L, T, 8, 128)), q.dtype)  # [L, T, K, H]
    v_new = jnp.asarray(rng.standard_normal((L, T, 8, 128)), q.dtype)

    def make_step():  # a fresh function per backend: the backend is read at trace time
        def step(k_cache, v_cache, q_all, k_new, v_new, slot_mapping):
            def layer_body(caches, xs):
                layer, q, k, v = xs
                kc, vc = ops.write_kv(*caches, layer, k, v, slot_mapping)
                out = ops.paged_attention(q, kc, vc, layer, page_table, qsl, sl, n, scale=0.1)
                return (kc, vc), out
            caches, outs = jax.lax.scan(layer_body, (k_cache, v_cache), (jnp.arange(L), q_all, k_new, v_new))
            return caches, outs
        return jax.jit(step, donate_argnums=(0, 1))

    args = (q_all, k_new, v_new, jnp.asarray(slots))
    results = {}
    for backend in ("pallas", "reference"):
        with ops.kernel_backend(backend):
            step = make_step()
            compiled = step.lower(k_cache, v_cache, *args).compile()
            caches, outs = step(jnp.copy(k_cache), jnp.copy(v_cache), *args)
        results[backend] = (caches, outs)
        if backend == "pallas":
            hlo = compiled.as_text()
            full = "bf16[" + ",".join(map(str, k_cache.shape)) + "]"
            copies = [line for line in hlo.splitlines()
                      if (" copy(" in line or "copy-start(" in line) and full in line.split("=")[1][:60]]
            assert not copies, copies
    rows = int(qsl[n])
    for layer in range(L):
        assert_close(results["pallas"][1][layer], results["reference"][1][layer], rows=rows)
    np.testing.assert_array_equal(np.asarray(results["pallas"][0][0], np.float32),
                                  np.asarray(results["reference"][0][0], np.float32))
