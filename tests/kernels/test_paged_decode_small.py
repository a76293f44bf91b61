"""Small-batch decode attention in one Triton-lowered kernel (kernels_pallas/paged_decode_small.py): the kernel in
the Pallas interpreter against the jnp reference (padding requests and tokens, a one-token context, contexts past
several key blocks, a sliding window, G = 4 and 8, bf16 and fp8 caches, the engine's interleaved stacked cache),
its Triton lowering at Llama-3-8B sizes (on CPU, for an H200 target), the ops switch, and a `gpu` check.
Random inputs throughout."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels_pallas import ops, paged_decode_small as pds
from kernels_pallas.kv_cache import FP8
from kernels_pallas.paged_reference import paged_attention_reference
from tests.kernels.test_paged_attention import assert_close, make_batch


def run(q, k, v, pt, qsl, sl, n, *, layer=0, scales=None, window=None, interpret=True, block_keys=64):
    """The kernel on a stacked cache [L, K, P, page_size, H] (or the interleaved one with v None)."""
    kv_index = jnp.array([2 * layer, 2 * layer + 1] if v is None else [layer, layer], jnp.int32)
    return pds.decode_attention(q, k, k if v is None else v, kv_index, pt, qsl, sl, n, scales,
                                scale=q.shape[-1] ** -0.5, sliding_window=window, interpret=interpret,
                                block_keys=block_keys)


@pytest.mark.parametrize("G,H,window,block_keys", [(4, 64, None, 64), (8, 128, None, 32), (4, 64, 40, 128)])
def test_kernel_matches_the_reference(G, H, window, block_keys):
    # three live requests (contexts of 1, 77 and 200 keys: one to four 64-key blocks), a padding request, and
    # padding tokens after the live ones
    q, k, v, pt, qsl, sl, n = make_batch(G, q_lens=[1, 1, 1], seq_lens=[1, 77, 200], num_rows=4, extra_tokens=3,
                                         K=16 // G, G=G, H=H)
    want = paged_attention_reference(q, k, v, pt, qsl, sl, n, sliding_window=window)
    got = run(q, k[None], v[None], pt, qsl, sl, n, window=window, block_keys=block_keys)
    assert got.shape == q.shape and got.dtype == q.dtype
    assert_close(got, want, rows=3)
    assert not np.asarray(got[3:], np.float32).any()  # padding tokens: zeros


def test_fp8_cache_and_the_interleaved_stacked_cache():
    q, k, v, pt, qsl, sl, n = make_batch(5, q_lens=[1, 1], seq_lens=[130, 33], K=2, G=8, H=64)
    L, layer = 3, 1
    k_scale = jax.random.uniform(jax.random.key(1), (L, 2), minval=0.05, maxval=0.2)
    v_scale = jax.random.uniform(jax.random.key(2), (L, 2), minval=0.05, maxval=0.2)
    k8 = (k.astype(jnp.float32) / k_scale[layer][:, None, None, None]).astype(FP8)
    v8 = (v.astype(jnp.float32) / v_scale[layer][:, None, None, None]).astype(FP8)
    noise = jax.random.normal(jax.random.key(3), (2 * L,) + k8.shape).astype(FP8)
    cache = noise.at[2 * layer].set(k8).at[2 * layer + 1].set(v8)  # other layers hold other values
    want = paged_attention_reference(q, cache, None, pt, qsl, sl, n, layer=layer, k_scale=k_scale, v_scale=v_scale)
    got = run(q, cache, None, pt, qsl, sl, n, layer=layer, scales=(k_scale[layer], v_scale[layer]))
    assert_close(got, want)
    bf16 = run(q, jnp.stack([k, v]), None, pt, qsl, sl, n)  # the same cache in bf16, interleaved, layer 0
    assert_close(bf16, paged_attention_reference(q, k, v, pt, qsl, sl, n))


def test_supported_shapes_and_errors():
    q = jnp.zeros((8, 32, 128), jnp.bfloat16)
    cache = jnp.zeros((4, 8, 10, 16, 128), jnp.bfloat16)
    pt = jnp.zeros((1, 10), jnp.int32)
    assert pds.supported(q, cache, pt)
    assert pds.supported(q, cache.astype(FP8), pt)
    assert not pds.supported(q, cache, pt, softcap=30.0)
    assert not pds.supported(q[:, :24], cache[:, :6], pt)  # N = 24 is not a multiple of 16
    assert not pds.supported(q[..., :96], cache[..., :96], pt)  # H = 96
    assert not pds.supported(q.astype(jnp.float32), cache.astype(jnp.float32), pt)
    with pytest.raises(ValueError, match="unsupported"):
        run(q[..., :96], cache[..., :96], None, pt, jnp.arange(2, dtype=jnp.int32), jnp.ones(1, jnp.int32),
            jnp.int32(1))
    with pytest.raises(ValueError, match="fp8 cache needs"):
        run(q, cache.astype(FP8), None, pt, jnp.arange(2, dtype=jnp.int32), jnp.ones(1, jnp.int32), jnp.int32(1))


def test_triton_lowering_at_llama_3_8b_sizes(monkeypatch):
    """Lowered for an H200 on CPU: 32 q-heads over 8 kv-heads, d128, an 8.6 GB interleaved cache (64-bit offsets),
    bf16 and fp8."""
    from jax._src.pallas.triton import gpu_info, pallas_call_registration
    h200 = gpu_info.get_gpu_info_from_version(gpu_info.GpuVersion.H200)
    monkeypatch.setattr(pallas_call_registration.gpu_info_lib, "get_gpu_info", lambda: h200)
    S = jax.ShapeDtypeStruct
    for dtype in (jnp.bfloat16, FP8):
        cache = S((64, 8, 4100, 16, 128), dtype)
        scales = (S((8,), jnp.float32), S((8,), jnp.float32)) if dtype == FP8 else None
        f = jax.jit(functools.partial(pds.decode_attention, scale=128 ** -0.5))
        text = f.trace(S((8, 32, 128), jnp.bfloat16), cache, cache, S((2,), jnp.int32), S((1, 40), jnp.int32),
                       S((2,), jnp.int32), S((1,), jnp.int32), S((), jnp.int32),
                       scales).lower(lowering_platforms=("cuda",)).as_text()
        assert "triton" in text.lower()


def test_ops_switch(monkeypatch):
    """ops.paged_attention(decode_only=True) takes the kernel under IE_JAX_DECODE_SMALL=1 and small shapes only;
    its output equals the decode tiles'."""
    q, k, v, pt, qsl, sl, n = make_batch(7, q_lens=[1, 1], seq_lens=[20, 47], K=2, G=8, H=128)
    calls, real = [], pds.decode_attention
    monkeypatch.setattr(pds, "decode_attention", lambda *a, **kw: (calls.append(1), real(*a, **kw))[1])
    with ops.kernel_backend("interpret"):
        tiles = ops.paged_attention(q, k[None], v[None], 0, pt, qsl, sl, n, decode_only=True)
        assert calls == []  # off by default
        monkeypatch.setenv("IE_JAX_DECODE_SMALL", "1")
        small = ops.paged_attention(q, k[None], v[None], 0, pt, qsl, sl, n, decode_only=True)
        assert calls == [1]
        ops.paged_attention(q, k[None], v[None], 0, pt, qsl, sl, n)  # not decode-only: the packed kernel
        assert calls == [1]
    np.testing.assert_allclose(np.asarray(small, np.float32), np.asarray(tiles, np.float32), atol=2e-2)
    long = jnp.zeros((1, pds.MAX_KEYS // 16 + 1), jnp.int32)
    assert not ops.decode_small_active(q, long, k[None])  # past MAX_KEYS: the decode tiles


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [jnp.bfloat16, FP8])
def test_gpu_engine_batch_one_shape(dtype):
    """The engine's batch-1 decode call on the H200: one live token in an 8-token step, 640-key page table, layer
    31 of an interleaved cache, against the reference."""
    q, k, v, pt, qsl, sl, n = make_batch(11, q_lens=[1], seq_lens=[389], num_rows=1, extra_tokens=7, K=8, G=4,
                                         H=128)
    pt = jnp.pad(pt, ((0, 0), (0, 40 - pt.shape[1])))
    cache = jax.random.normal(jax.random.key(0), (64,) + k.shape, jnp.float32).at[62].set(k).at[63].set(v)
    scales = {}
    if dtype == FP8:  # the reference dequantizes with the same [L, K] scales
        scales = dict(k_scale=jnp.full((32, 8), 0.5, jnp.float32), v_scale=jnp.full((32, 8), 0.25, jnp.float32))
        cache = cache / jnp.where(jnp.arange(64) % 2 == 0, 0.5, 0.25)[:, None, None, None, None]
    cache = cache.astype(dtype)
    got = run(q, cache, None, pt, qsl, sl, n, layer=31, interpret=False,
              scales=(scales["k_scale"][31], scales["v_scale"][31]) if scales else None)
    want = paged_attention_reference(q, cache, None, pt, qsl, sl, n, layer=31, **scales)
    assert_close(got, want, rows=1)
    assert not np.asarray(got[1:], np.float32).any()
