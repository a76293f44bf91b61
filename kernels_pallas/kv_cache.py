"""The paged KV cache of one layer: its layout and the write of new tokens' K/V into it.

Layout: `k_pages, v_pages [K, P, page_size, H]`, kv-head major. One kv-head's page is one contiguous block of
`page_size * H` elements (4 KiB for page 16, d 128, bf16), so the attention kernel fetches each page with a single
dense TMA box and DRAM sees whole bursts. The token-major alternative `[P, page_size, K, H]` would turn every page
fetch into `page_size` strided rows of `H` elements.

`slot_mapping[t] = page * page_size + offset` names where token t's K/V go; -1 marks a padding token and writes
nothing. Under `jax.jit(..., donate_argnums=...)` on the caches the write is an in-place scatter: XLA reuses the
donated buffers and moves only `T * K * H` elements per cache.

This module does not allocate pages or know which request owns them; the block manager does.
"""
from __future__ import annotations

import jax.numpy as jnp


def _check(k_pages, v_pages, k_new, v_new, slot_mapping):
    if k_pages.ndim != 4 or k_pages.shape != v_pages.shape:
        raise ValueError(f"{k_pages.shape=} and {v_pages.shape=} must be equal [K, P, page_size, H]")
    K, _, _, H = k_pages.shape
    if k_new.ndim != 3 or k_new.shape != v_new.shape or k_new.shape[1:] != (K, H):
        raise ValueError(f"{k_new.shape=} and {v_new.shape=} must be equal [T, {K}, {H}]")
    if slot_mapping.shape != (k_new.shape[0],) or slot_mapping.dtype != jnp.int32:
        raise ValueError(f"{slot_mapping.shape=} {slot_mapping.dtype=} must be int32 [{k_new.shape[0]}]")


def write_kv(k_pages, v_pages, k_new, v_new, slot_mapping):
    """Writes `k_new, v_new [T, K, H]` into the caches at `slot_mapping [T]`; -1 slots write nothing.

    Returns the updated `(k_pages, v_pages)`. Slots outside the cache are dropped like -1.
    """
    _check(k_pages, v_pages, k_new, v_new, slot_mapping)
    K, P, page_size, H = k_pages.shape
    num_slots = P * page_size
    # Padding goes to an index past the end, which mode="drop" discards.
    slots = jnp.where((slot_mapping >= 0) & (slot_mapping < num_slots), slot_mapping, num_slots)

    def put(pages, new):
        flat = pages.reshape(K, num_slots, H)  # [K, P * page_size, H], a bitcast of the page layout
        flat = flat.at[:, slots].set(jnp.swapaxes(new, 0, 1).astype(pages.dtype), mode="drop",
                                     unique_indices=False)
        return flat.reshape(K, P, page_size, H)

    return put(k_pages, k_new), put(v_pages, v_new)


def write_kv_reference(k_pages, v_pages, k_new, v_new, slot_mapping):
    """The same write as a Python loop over tokens (the oracle for tests; slow)."""
    _check(k_pages, v_pages, k_new, v_new, slot_mapping)
    _, P, page_size, _ = k_pages.shape
    for t, slot in enumerate(slot_mapping.tolist()):
        if 0 <= slot < P * page_size:
            page, offset = divmod(slot, page_size)
            k_pages = k_pages.at[:, page, offset].set(k_new[t].astype(k_pages.dtype))
            v_pages = v_pages.at[:, page, offset].set(v_new[t].astype(v_pages.dtype))
    return k_pages, v_pages
