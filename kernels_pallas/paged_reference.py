"""Plain-jnp oracle of ragged paged attention: gather each token's pages, then dense causal attention in f32.

The kernel (paged_attention.py) is tested against it; `ops.paged_attention` runs it where the kernel does not apply.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from kernels_pallas.kv_cache import FP8
from kernels_pallas.paged_work import check_args, kv_scales, request_lengths



def paged_attention_reference(q, k_pages, v_pages, page_table, query_start_loc, seq_lens, num_seqs, *, layer=None,
                              sm_scale=None, sliding_window=None, softcap=None, k_scale=None, v_scale=None):
    """Gathers each token's pages and runs dense causal attention in f32. Padding tokens return zeros.
    An fp8 cache is first dequantized (`x.astype(f32) * scale`, per kv-head)."""
    check_args(q, k_pages, v_pages, layer, page_table, query_start_loc, seq_lens, num_seqs, sliding_window,
                softcap, k_scale, v_scale)
    if k_pages.dtype == FP8:
        k_scale, v_scale = kv_scales(k_pages, k_scale, v_scale, v_pages)  # [K] or [L, K]
    if v_pages is None:  # interleaved [2L, ...]: K of layer l at 2l, V at 2l + 1
        k_pages, v_pages = k_pages[2 * layer], k_pages[2 * layer + 1]
        k_scale, v_scale = (None, None) if k_scale is None else (k_scale[layer], v_scale[layer])
    elif layer is not None:  # the oracle may slice: it is not on the serving path
        k_pages, v_pages = k_pages[layer], v_pages[layer]
        k_scale, v_scale = (None, None) if k_scale is None else (k_scale[layer], v_scale[layer])
    if k_pages.dtype == FP8:
        k_pages = k_pages.astype(jnp.float32) * k_scale[:, None, None, None]
        v_pages = v_pages.astype(jnp.float32) * v_scale[:, None, None, None]
    T, N, H = q.shape
    K, _, page_size, _ = k_pages.shape
    R, max_pages = page_table.shape
    G = N // K
    scale = H ** -0.5 if sm_scale is None else sm_scale
    num_seqs = jnp.asarray(num_seqs, jnp.int32).reshape(())
    live, q_lens = request_lengths(query_start_loc, seq_lens, num_seqs)
    end = query_start_loc[:-1] + q_lens
    t = jnp.arange(T)
    req = jnp.minimum(jnp.sum((t[:, None] >= end[None, :]) & live[None, :], axis=1), R - 1)  # [T]
    local = t - query_start_loc[req]
    real = (local >= 0) & (local < q_lens[req])
    pos = seq_lens[req] - q_lens[req] + local  # [T]
    kv_pos = jnp.arange(max_pages * page_size)  # [S]

    def one_token(args):
        qt, r, p, ok = args  # [N, H], (), (), ()
        pages = page_table[r]  # [max_pages]
        k = k_pages[:, pages].transpose(1, 2, 0, 3).reshape(-1, K, H).astype(jnp.float32)  # [S, K, H]
        v = v_pages[:, pages].transpose(1, 2, 0, 3).reshape(-1, K, H).astype(jnp.float32)
        logits = jnp.einsum("kgh,skh->kgs", qt.reshape(K, G, H).astype(jnp.float32), k) * scale
        if softcap is not None:
            logits = softcap * jnp.tanh(logits / softcap)
        mask = (kv_pos <= p) & ok
        if sliding_window is not None:
            mask &= kv_pos > p - sliding_window
        logits = jnp.where(mask, logits, -jnp.inf)
        m = jnp.max(logits, axis=-1, keepdims=True)
        w = jnp.where(mask, jnp.exp(logits - jnp.where(jnp.isfinite(m), m, 0.0)), 0.0)
        w = w / jnp.maximum(jnp.sum(w, axis=-1, keepdims=True), 1e-30)
        return jnp.einsum("kgs,skh->kgh", w, v).reshape(N, H)

    out = jax.lax.map(one_token, (q, req, pos, real), batch_size=min(T, 16))
    return jnp.where(real[:, None, None], out, 0).astype(q.dtype)
