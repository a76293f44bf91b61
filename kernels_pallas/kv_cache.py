"""The paged KV cache of one layer: its layout and the write of new tokens' K/V into it.

Layout: `k_pages, v_pages [K, P, page_size, H]`, kv-head major. One kv-head's page is one contiguous block of
`page_size * H` elements (4 KiB for page 16, d 128, bf16), so the attention kernel fetches each page with a single
dense TMA box and DRAM sees whole bursts. The token-major alternative `[P, page_size, K, H]` would turn every page
fetch into `page_size` strided rows of `H` elements.

`slot_mapping[t] = page * page_size + offset` names where token t's K/V go; -1 marks a padding token and writes
nothing. Under `jax.jit(..., donate_argnums=...)` on the caches the write is an in-place scatter: XLA reuses the
donated buffers and moves only `T * K * H` elements per cache.

An fp8 (float8_e4m3fn) cache stores `x / scale` with one f32 scale per kv-head (`quantize`): values past e4m3's
±448 saturate instead of becoming NaN. Readers multiply by the same scale.

This module does not allocate pages or know which request owns them; the block manager does.
"""
from __future__ import annotations

import jax.numpy as jnp
from jax import lax

FP8 = jnp.float8_e4m3fn
FP8_MAX = 448.0  # largest finite e4m3fn value


def quantize(x, dtype, scale=None):
    """x [..., K, H] into the cache's dtype. For fp8: x / scale [K] (None = 1), saturated to ±448, rounded to
    nearest. Other dtypes: a plain cast (scale must be None)."""
    if dtype != FP8:
        assert scale is None, "scales belong to an fp8 cache"
        return x.astype(dtype)
    x = x.astype(jnp.float32)
    if scale is not None:
        x = x / jnp.asarray(scale, jnp.float32)[:, None]
    return jnp.clip(x, -FP8_MAX, FP8_MAX).astype(FP8)


def as_bytes(x):
    """fp8 arrays viewed as uint8 (a bitcast), others unchanged. XLA scatters integers natively, while an f8
    scatter may be widened through a full-size f16 copy of the cache (the CPU backend does)."""
    return lax.bitcast_convert_type(x, jnp.uint8) if x.dtype == FP8 else x


def from_bytes(x, dtype):
    return lax.bitcast_convert_type(x, FP8) if dtype == FP8 else x


def _check(k_pages, v_pages, k_new, v_new, slot_mapping):
    if k_pages.ndim != 4 or k_pages.shape != v_pages.shape:
        raise ValueError(f"{k_pages.shape=} and {v_pages.shape=} must be equal [K, P, page_size, H]")
    K, _, _, H = k_pages.shape
    if k_new.ndim != 3 or k_new.shape != v_new.shape or k_new.shape[1:] != (K, H):
        raise ValueError(f"{k_new.shape=} and {v_new.shape=} must be equal [T, {K}, {H}]")
    if slot_mapping.shape != (k_new.shape[0],) or slot_mapping.dtype != jnp.int32:
        raise ValueError(f"{slot_mapping.shape=} {slot_mapping.dtype=} must be int32 [{k_new.shape[0]}]")


def write_kv(k_pages, v_pages, k_new, v_new, slot_mapping, k_scale=None, v_scale=None):
    """Writes `k_new, v_new [T, K, H]` into the caches at `slot_mapping [T]`; -1 slots write nothing.

    Returns the updated `(k_pages, v_pages)`. Slots outside the cache are dropped like -1. An fp8 cache takes
    optional per-kv-head scales `k_scale, v_scale [K]` (see `quantize`).
    """
    _check(k_pages, v_pages, k_new, v_new, slot_mapping)
    K, P, page_size, H = k_pages.shape
    num_slots = P * page_size
    # Padding goes to an index past the end, which mode="drop" discards.
    slots = jnp.where((slot_mapping >= 0) & (slot_mapping < num_slots), slot_mapping, num_slots)

    def put(pages, new, scale):
        flat = as_bytes(pages).reshape(K, num_slots, H)  # [K, P * page_size, H], a bitcast of the page layout
        new = as_bytes(jnp.swapaxes(quantize(new, pages.dtype, scale), 0, 1))  # [K, T, H]
        flat = flat.at[:, slots].set(new, mode="drop", unique_indices=False)
        return from_bytes(flat.reshape(K, P, page_size, H), pages.dtype)

    return put(k_pages, k_new, k_scale), put(v_pages, v_new, v_scale)


def write_kv_reference(k_pages, v_pages, k_new, v_new, slot_mapping, k_scale=None, v_scale=None):
    """The same write as a Python loop over tokens (the oracle for tests; slow)."""
    _check(k_pages, v_pages, k_new, v_new, slot_mapping)
    _, P, page_size, _ = k_pages.shape
    for t, slot in enumerate(slot_mapping.tolist()):
        if 0 <= slot < P * page_size:
            page, offset = divmod(slot, page_size)
            k_pages = k_pages.at[:, page, offset].set(quantize(k_new[t], k_pages.dtype, k_scale))
            v_pages = v_pages.at[:, page, offset].set(quantize(v_new[t], v_pages.dtype, v_scale))
    return k_pages, v_pages
