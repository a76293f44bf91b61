"""The KV-cache write (kernels_pallas/kv_cache.py and ops.write_kv) against its reference: the page slots each
token lands in, padding slots (-1) untouched, fp8 quantization per kv-head, and in place under donation (checked in
the compiled HLO, and on the GPU by timing against a copy).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels_pallas import ops
from kernels_pallas import paged_attention as pa
from kernels_pallas.kv_cache import FP8_MAX, write_kv, write_kv_reference


def test_write_kv_matches_loop_and_skips_padding():
    rng = np.random.default_rng(7)
    K, P, page_size, H, T = 2, 6, 8, 16, 10
    k_pages = jnp.asarray(rng.standard_normal((K, P, page_size, H)), jnp.bfloat16)
    v_pages = jnp.asarray(rng.standard_normal((K, P, page_size, H)), jnp.bfloat16)
    k_new = jnp.asarray(rng.standard_normal((T, K, H)), jnp.bfloat16)
    v_new = jnp.asarray(rng.standard_normal((T, K, H)), jnp.bfloat16)
    slots = rng.permutation(P * page_size)[:T].astype(np.int32)
    slots[[2, 7]] = -1
    slot_mapping = jnp.asarray(slots)
    k_out, v_out = write_kv(k_pages, v_pages, k_new, v_new, slot_mapping)
    k_exp, v_exp = write_kv_reference(k_pages, v_pages, k_new, v_new, slot_mapping)
    np.testing.assert_array_equal(np.asarray(k_out, np.float32), np.asarray(k_exp, np.float32))
    np.testing.assert_array_equal(np.asarray(v_out, np.float32), np.asarray(v_exp, np.float32))
    untouched = np.ones(P * page_size, bool)
    untouched[slots[slots >= 0]] = False
    flat = np.asarray(k_out, np.float32).reshape(K, -1, H)
    np.testing.assert_array_equal(flat[:, untouched], np.asarray(k_pages, np.float32).reshape(K, -1, H)[:, untouched])


def test_write_kv_fp8_quantizes_per_head_and_saturates():
    rng = np.random.default_rng(15)
    K, P, page_size, H, T = 2, 6, 8, 16, 10
    k_pages = jnp.asarray(rng.standard_normal((K, P, page_size, H)), pa.FP8)
    v_pages = jnp.asarray(rng.standard_normal((K, P, page_size, H)), pa.FP8)
    k_new = jnp.asarray(rng.standard_normal((T, K, H)) * 30, jnp.bfloat16)  # some of k_new / 0.05 pass 448
    v_new = jnp.asarray(rng.standard_normal((T, K, H)), jnp.bfloat16)
    k_scale, v_scale = jnp.asarray([0.05, 2.0], jnp.float32), jnp.asarray([0.5, 0.01], jnp.float32)
    slots = rng.permutation(P * page_size)[:T].astype(np.int32)
    slots[4] = -1
    k_out, v_out = write_kv(k_pages, v_pages, k_new, v_new, jnp.asarray(slots), k_scale, v_scale)
    k_exp, v_exp = write_kv_reference(k_pages, v_pages, k_new, v_new, jnp.asarray(slots), k_scale, v_scale)
    np.testing.assert_array_equal(np.asarray(k_out, np.float32), np.asarray(k_exp, np.float32))
    np.testing.assert_array_equal(np.asarray(v_out, np.float32), np.asarray(v_exp, np.float32))
    stored = np.asarray(k_out, np.float32).reshape(K, -1, H)[:, slots[slots >= 0]]  # [K, T', H]
    assert np.isfinite(stored).all() and np.abs(stored).max() == FP8_MAX  # saturated, not NaN
    # dequantized values are within half an e4m3 step (2^-4 relative, or the subnormal step 2^-10) of the input
    x = np.swapaxes(np.asarray(k_new, np.float32)[slots >= 0], 0, 1) / np.asarray(k_scale)[:, None, None]
    fits = np.abs(x) <= FP8_MAX
    err = np.abs(stored - x)[fits]
    assert (err <= np.maximum(np.abs(x[fits]) * 2.0 ** -4, 2.0 ** -10)).all()


def test_write_kv_is_in_place_when_donated():
    K, P, page_size, H, T = 4, 512, 16, 64, 8
    cache = jax.ShapeDtypeStruct((K, P, page_size, H), jnp.bfloat16)
    new = jax.ShapeDtypeStruct((T, K, H), jnp.bfloat16)
    compiled = jax.jit(write_kv, donate_argnums=(0, 1)).lower(
        cache, cache, new, new, jax.ShapeDtypeStruct((T,), jnp.int32)).compile()
    hlo = compiled.as_text()
    full = f"bf16[{K},{P * page_size},{H}]", f"bf16[{K},{P},{page_size},{H}]"
    copies = [line for line in hlo.splitlines() if " copy(" in line and any(s in line for s in full)]
    assert not copies, copies
    assert "input_output_alias" in hlo or "may-alias" in hlo or "must-alias" in hlo


def test_ops_write_kv_interleaved_is_one_scatter_in_place_when_donated():
    """The engine's write into the interleaved buffer is a single scatter, in place under donation."""
    L, K, P, page_size, H, T = 4, 4, 256, 16, 64, 8
    cache = jax.ShapeDtypeStruct((2 * L, K, P, page_size, H), jnp.bfloat16)
    new = jax.ShapeDtypeStruct((T, K, H), jnp.bfloat16)
    step = jax.jit(lambda kv, layer, k, v, s: ops.write_kv(kv, None, layer, k, v, s)[0], donate_argnums=0)
    hlo = step.lower(cache, jax.ShapeDtypeStruct((), jnp.int32), new, new,
                     jax.ShapeDtypeStruct((T,), jnp.int32)).compile().as_text()
    full = f"bf16[{2 * L},{K},{P},{page_size},{H}]"
    assert sum(" scatter(" in line for line in hlo.splitlines()) == 1
    assert not [line for line in hlo.splitlines() if " copy(" in line and full in line.split("=")[1][:40]]


def test_ops_write_kv_stacked_matches_loop():
    rng = np.random.default_rng(12)
    L, K, P, page_size, H, T = 3, 2, 5, 8, 16, 7
    k_cache = jnp.asarray(rng.standard_normal((L, K, P, page_size, H)), jnp.bfloat16)
    v_cache = jnp.asarray(rng.standard_normal((L, K, P, page_size, H)), jnp.bfloat16)
    k_new = jnp.asarray(rng.standard_normal((T, K, H)), jnp.bfloat16)
    v_new = jnp.asarray(rng.standard_normal((T, K, H)), jnp.bfloat16)
    slots = rng.permutation(P * page_size)[:T].astype(np.int32)
    slots[3] = -1
    k_out, v_out = jax.jit(ops.write_kv)(k_cache, v_cache, jnp.int32(L - 1), k_new, v_new, jnp.asarray(slots))
    k_exp, v_exp = write_kv_reference(k_cache[L - 1], v_cache[L - 1], k_new, v_new, jnp.asarray(slots))
    np.testing.assert_array_equal(np.asarray(k_out[L - 1], np.float32), np.asarray(k_exp, np.float32))
    np.testing.assert_array_equal(np.asarray(v_out[L - 1], np.float32), np.asarray(v_exp, np.float32))
    np.testing.assert_array_equal(np.asarray(k_out[:L - 1], np.float32), np.asarray(k_cache[:L - 1], np.float32))


@pytest.mark.parametrize("donate", [True, False])
def test_ops_write_kv_stacked_is_in_place_when_donated(donate):
    """The engine's write (traced layer, stacked cache) compiles to an in-place scatter under donation; without
    donation the same HLO must show the full-size copies, so the check can fail. (The fp8 write's check runs on
    the GPU: the CPU backend widens every f8 or byte-viewed scatter through a full-size pass.)"""
    L, K, P, page_size, H, T = 4, 4, 256, 16, 64, 8
    cache = jax.ShapeDtypeStruct((L, K, P, page_size, H), jnp.bfloat16)
    new = jax.ShapeDtypeStruct((T, K, H), jnp.bfloat16)
    i32 = jax.ShapeDtypeStruct((), jnp.int32)
    step = jax.jit(ops.write_kv, donate_argnums=(0, 1) if donate else ())
    hlo = step.lower(cache, cache, i32, new, new, jax.ShapeDtypeStruct((T,), jnp.int32)).compile().as_text()
    full = f"bf16[{L},{K},{P},{page_size},{H}]"
    copies = [line for line in hlo.splitlines() if " copy(" in line and full in line.split("=")[1][:40]]
    if donate:
        assert not copies, copies
        assert "input_output_alias" in hlo or "may-alias" in hlo or "must-alias" in hlo
    else:
        assert len(copies) == 2, copies




# ----------------------------------------------------------------------------------------------------------------
# Device (full size)


def full_size_passes(hlo, shape):
    """Entry instructions that produce a whole cache of `shape` other than the scatter itself (in place) and
    free views: each such line is a pass over the whole cache."""
    dims = "[" + ",".join(map(str, shape)) + "]"
    entry = hlo[hlo.index("ENTRY"):]
    free = (" parameter(", " bitcast(", " tuple(", " get-tuple-element(")
    return [line.strip()[:160] for line in entry.splitlines()
            if "=" in line and dims in line.split("=")[1][:40] and not any(f in line for f in free)
            and "scatter" not in line]


@pytest.mark.gpu
@pytest.mark.xfail(reason="H200, 2026-11-23: no full-size pass in the HLO, yet a donated step took 345 us against "
                          "246 us for a plain copy of one cache (the direct f8 scatter: 351 us); cause not found yet")
def test_gpu_fp8_write_kv_is_in_place_when_donated():
    """On the device the fp8 write (quantize + byte scatter) must not pass over the whole cache: checked in the
    compiled HLO and by timing against a plain copy of one cache. The direct f8 scatter is reported beside it."""
    import time
    L, K, P, page_size, H, T = 4, 8, 8192, 16, 128, 64
    shape = (L, K, P, page_size, H)
    k_cache = jnp.zeros(shape, pa.FP8)
    v_cache = jnp.zeros(shape, pa.FP8)
    new = jnp.asarray(np.random.default_rng(40).standard_normal((T, K, H)), jnp.bfloat16)
    slots = jnp.asarray(np.random.default_rng(41).permutation(P * page_size)[:T].astype(np.int32))
    scale = jnp.full((L, K), 0.5, jnp.float32)

    def direct(kc, vc, layer, k, v, s):  # for the record: the f8 scatter without the byte view
        kq = jnp.clip(k / 0.5, -FP8_MAX, FP8_MAX).astype(pa.FP8)
        page, off = s // page_size, s % page_size
        return kc.at[layer, :, page, off].set(kq, mode="drop"), vc.at[layer, :, page, off].set(kq, mode="drop")

    timings = {}
    for name, fn in (("ops", lambda *a: ops.write_kv(*a, k_scale=scale, v_scale=scale)), ("direct", direct),
                     ("copy", lambda kc, vc, *_: (kc + 0, vc))):
        step = jax.jit(fn, donate_argnums=(0, 1))
        hlo = step.lower(k_cache, v_cache, jnp.int32(2), new, new, slots).compile().as_text()
        passes = full_size_passes(hlo, shape)
        for _ in range(3):
            k_cache, v_cache = step(k_cache, v_cache, jnp.int32(2), new, new, slots)
        jax.block_until_ready(k_cache)
        t0 = time.perf_counter()
        for _ in range(20):
            k_cache, v_cache = step(k_cache, v_cache, jnp.int32(2), new, new, slots)
        jax.block_until_ready(k_cache)
        timings[name] = (time.perf_counter() - t0) / 20 * 1e6
        print(f"write_kv {name}: {timings[name]:.1f} us/step, full-size passes {passes}")
        if name == "ops":
            assert not passes, passes
    assert timings["ops"] < timings["copy"] / 4, timings
