"""Rope of q/k plus the paged KV write in one kernel (kernels_pallas/rope_kv.py): the kernel in the Pallas
interpreter against the jnp reference (bf16 and fp8 caches, padding slots), the reference against the model's own
rope, the model's serving path that uses it against its plain path, and a `gpu` check at Llama-3-8B sizes on a
cache past 4 GiB (64-bit offsets). Random inputs throughout."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ie_jax.config import ModelConfig
from ie_jax.models.context import Paged
from ie_jax.models.layers import apply_rope
from ie_jax.models.llama import LlamaForCausalLM, fuse_projections
from kernels_pallas import ops, rope_kv
from kernels_pallas.kv_cache import FP8


def inv_freq(H, theta=10000.0):
    return (1.0 / theta ** (np.arange(0, H, 2) / H)).astype(np.float32)


def step(T, N, K, H, L, P, page_size, cache_dtype, seed=0, splits=4):
    """(parts [S, T, N + 2K, H] f32 (S = 1: bf16), positions, slots with one padding token, a random interleaved
    cache)"""
    ks = jax.random.split(jax.random.key(seed), 6)
    dtype = jnp.bfloat16 if splits == 1 else jnp.float32
    qkv = jax.random.normal(ks[0], (splits, T, N + 2 * K, H), dtype) / splits
    positions = jax.random.randint(ks[3], (T,), 0, 8000)
    slots = jax.random.permutation(ks[4], P * page_size)[:T].astype(jnp.int32)
    slots = slots.at[T // 2].set(-1)  # one padding token: writes nothing
    cache = jax.random.normal(ks[5], (2 * L, K, P, page_size, H), jnp.float32).astype(cache_dtype)
    return qkv, positions, slots, cache


def f32(x):
    return np.asarray(x, np.float32)


@pytest.mark.parametrize("cache_dtype,splits", [(jnp.bfloat16, 4), (FP8, 4), (jnp.bfloat16, 1), (FP8, 1)])
def test_kernel_matches_the_reference(cache_dtype, splits):
    T, N, K, H, L, P, page_size = 5, 8, 2, 64, 3, 7, 16
    qkv, positions, slots, cache = step(T, N, K, H, L, P, page_size, cache_dtype, splits=splits)
    scales = {}
    if cache_dtype == FP8:
        scales = dict(k_scale=jax.random.uniform(jax.random.key(7), (L, K), minval=0.25, maxval=2.0),
                      v_scale=jax.random.uniform(jax.random.key(8), (L, K), minval=0.25, maxval=2.0))
    got_q, got_cache = rope_kv.rope_write_kv(qkv, positions, inv_freq(H), cache, jnp.int32(1), slots,
                                             num_kv_heads=K, dtype=jnp.bfloat16, interpret=True, **scales)
    want_q, want_cache = rope_kv.rope_write_kv_reference(qkv, K, positions, inv_freq(H), cache, jnp.int32(1), slots,
                                                         dtype=jnp.bfloat16, **scales)
    assert got_q.shape == (T, N, H) and got_q.dtype == jnp.bfloat16 and got_cache.dtype == cache.dtype and got_cache.shape == cache.shape
    np.testing.assert_allclose(f32(got_q), f32(want_q), rtol=1e-2, atol=1e-5)
    np.testing.assert_array_equal(f32(got_cache), f32(want_cache))
    # what was written: layer 1 only, at the non-padding slots; everything else is untouched
    written = f32(got_cache) != f32(cache)
    assert written[2:4].any() and not written[:2].any() and not written[4:].any()
    pages, offsets = np.divmod(np.asarray(slots), page_size)
    kept = np.asarray(slots) >= 0
    assert written[2:4][:, :, pages[kept], offsets[kept]].any(axis=(0, 1, 3)).all()


def test_reference_rope_is_the_models_rope():
    x = jax.random.normal(jax.random.key(2), (6, 4, 128), jnp.float32)
    positions = jax.random.randint(jax.random.key(3), (6,), 0, 4096)
    want = apply_rope(x[None], positions[None], inv_freq(128))[0]
    np.testing.assert_allclose(np.asarray(rope_kv.rope_reference(x, positions, inv_freq(128))), np.asarray(want),
                               rtol=1e-5, atol=1e-5)


def test_supported_shapes_and_bad_arguments():
    qkv, positions, slots, cache = step(4, 8, 2, 64, 2, 5, 16, jnp.bfloat16)
    bf16 = jnp.bfloat16
    assert rope_kv.supported(qkv, 2, cache, bf16) and rope_kv.supported(qkv[:1], 2, cache, bf16)
    assert not rope_kv.supported(qkv[:3], 2, cache, bf16)  # S = 3: not a power of two
    assert not rope_kv.supported(qkv[:, :, 2:], 2, cache, bf16)  # G = 3
    assert not rope_kv.supported(qkv, 2, cache, jnp.float32)  # a 32-bit model
    assert not rope_kv.supported(qkv, 2, cache[0], bf16)  # the stacked (not interleaved) layout
    run = lambda qkv, slots, K=2, **kw: rope_kv.rope_write_kv(qkv, positions, inv_freq(64), cache, jnp.int32(0),
                                                              slots, num_kv_heads=K, interpret=True, **kw)
    with pytest.raises(ValueError, match="multiple of K"):
        run(qkv[:, :, 1:], slots)
    with pytest.raises(ValueError, match=r"\[S, T, N \+ 2K, H\]"):
        run(qkv[0], slots)
    with pytest.raises(ValueError, match="interleaved"):
        run(qkv, slots, K=3)
    with pytest.raises(ValueError, match="int32"):
        run(qkv, slots[:3])
    with pytest.raises(ValueError, match="fp8"):
        run(qkv, slots, k_scale=jnp.ones((2, 2)))


def test_serving_step_rotates_inside_the_kv_write_and_matches_the_plain_path(monkeypatch):
    """A decode-sized serving step with the kernels on: every layer's rope and KV write are one call, and the
    logits and the written cache equal the plain path's. Past ROPE_KV_MAX_TOKENS the plain path runs, until
    ROPE_KV_PREFILL_TOKENS, from which the kernel runs by default on one partial."""
    cfg = ModelConfig(model_type="llama", vocab_size=263, hidden_size=256, num_layers=2, num_heads=8, num_kv_heads=2,
                      head_dim=64, intermediate_size=512, max_position_embeddings=512)
    model = LlamaForCausalLM(cfg, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    fuse_projections(model)
    monkeypatch.setenv("IE_JAX_FUSED_ADD_NORM", "0")  # this test is about the rope and the write
    monkeypatch.setenv("IE_JAX_ROPE_KV_SPLITS", "8")  # capped to what K = 256 divides into slabs of >= 128
    # attention itself through the jnp reference (the Mosaic GPU interpreter is slow and tested elsewhere)
    monkeypatch.setattr(ops, "paged_attention", lambda *a, decode_only=False, **kw:
                        ops.paged_attention_reference(*a, **kw))
    calls = []
    real = rope_kv.rope_write_kv
    monkeypatch.setattr(rope_kv, "rope_write_kv", lambda *a, **kw: calls.append(a[0].shape) or real(*a, **kw))
    page_size, P = 16, 12

    def run(T, fused):
        if fused is None:
            monkeypatch.delenv("IE_JAX_FUSED_ROPE_KV", raising=False)
        else:
            monkeypatch.setenv("IE_JAX_FUSED_ROPE_KV", "1" if fused else "0")
        ids = jax.random.randint(jax.random.key(T), (1, T), 0, cfg.vocab_size)
        # T one-token requests, each with a few earlier tokens of its own already in the cache
        seq_lens = jnp.arange(T, dtype=jnp.int32) % 5 + 2
        page_table = jnp.arange(T * 2, dtype=jnp.int32).reshape(T, 2) % P
        positions = seq_lens - 1
        slots = page_table[:, 0] * page_size + positions
        slots = slots.at[T - 1].set(-1)  # a padding row
        cache = jax.random.normal(jax.random.key(9), (2 * cfg.num_layers, 2, P, page_size, 64), jnp.bfloat16)
        ctx = Paged(cache, None, slots, page_table, jnp.arange(T + 1, dtype=jnp.int32), seq_lens,
                    jnp.int32(T - 1), decode_only=True)
        with ops.kernel_backend("interpret"):
            logits, ctx = model(ids, positions[None], ctx)
        return f32(logits), f32(ctx.k)

    plain, fused = run(8, False), run(8, True)
    # the scanned layer body is traced once; K = 256 takes 2 splits of the q/k/v projection, not the default 4
    assert calls and set(calls) == {(2, 8, 12, 64)}
    np.testing.assert_allclose(fused[0][:, :7], plain[0][:, :7], rtol=2e-2, atol=2e-2)
    np.testing.assert_array_equal(np.abs(fused[1] - plain[1]) <= 2e-2 * (1 + np.abs(plain[1])), True)
    calls.clear()
    run(32, True)
    assert calls == []  # past ROPE_KV_MAX_TOKENS: the plain path
    run(8, None)
    assert calls == []  # off unless IE_JAX_FUSED_ROPE_KV=1 (it does not pay on the H200)
    # Prefill-sized steps take it by default, on the projection's output as one partial (threshold 32 here)
    monkeypatch.setenv("IE_JAX_ROPE_KV_PREFILL_TOKENS", "0")  # never: the plain path
    plain = run(32, None)
    assert calls == []
    monkeypatch.setenv("IE_JAX_ROPE_KV_PREFILL_TOKENS", "32")
    fused = run(32, None)
    assert set(calls) == {(1, 32, 12, 64)}
    np.testing.assert_allclose(fused[0][:, :31], plain[0][:, :31], rtol=2e-2, atol=2e-2)
    np.testing.assert_array_equal(np.abs(fused[1] - plain[1]) <= 2e-2 * (1 + np.abs(plain[1])), True)
    calls.clear()
    run(16, None)
    assert calls == []  # under the threshold


@pytest.mark.gpu
@pytest.mark.parametrize("cache_dtype", [jnp.bfloat16, FP8])
def test_gpu_kernel_at_llama_3_8b_sizes(cache_dtype):
    """T = 8 tokens, 32 q-heads over 8 kv-heads, layer 31 of 32, a cache of 8.6 GB (bf16) whose last pages are
    written: the offsets need 64 bits."""
    T, N, K, H, L, P, page_size = 8, 32, 8, 128, 32, 4100, 16
    qkv, positions, slots, _ = step(T, N, K, H, L, 4, page_size, cache_dtype, seed=1)  # 4 partials
    slots = jnp.where(slots >= 0, (P - 4) * page_size + slots, -1)
    cache = jnp.zeros((2 * L, K, P, page_size, H), cache_dtype)
    scales = {}
    if cache_dtype == FP8:
        scales = dict(k_scale=jnp.full((L, K), 0.5, jnp.float32), v_scale=jnp.full((L, K), 2.0, jnp.float32))
    got_q, got = rope_kv.rope_write_kv(qkv, positions, inv_freq(H, 500000.0), cache, jnp.int32(L - 1), slots,
                                       num_kv_heads=K, dtype=jnp.bfloat16, **scales)
    small = jnp.zeros((2, K, 4, page_size, H), cache_dtype)  # the last layer's last 4 pages, written alone
    local = jnp.where(slots >= 0, slots - (P - 4) * page_size, -1)
    want_q, want = rope_kv.rope_write_kv_reference(qkv, K, positions, inv_freq(H, 500000.0), small, jnp.int32(0),
                                                   local, dtype=jnp.bfloat16,
                                                   **{n: s[-1:] for n, s in scales.items()})
    np.testing.assert_allclose(f32(got_q), f32(want_q), rtol=1e-2, atol=1e-2)
    np.testing.assert_allclose(f32(got[-2:, :, P - 4:]), f32(want), rtol=2e-2, atol=2e-2)
    assert f32(want).any()
    assert not bool(jnp.any(got[:-2] != 0)) and not bool(jnp.any(got[-2:, :, :P - 4] != 0))  # nothing else written
