"""The ragged part of paged attention in plain jnp: which CTA does what, and how its results come back.

A request's queries are packed as (token, q-head) rows, ROWS to a tile. `work_list` turns `query_start_loc` /
`seq_lens` into a fixed-size list of (tile, kv split) work items, so that the kernel's grid is static while the
batch is ragged; items past the batch's real tiles are marked invalid and do nothing. `merge` combines the
splits' outputs by their log-sum-exp (flash-decoding) and unpacks rows back to tokens.

This module knows nothing about the kernel's pipeline; it only fixes the meaning of the work-item fields.
"""
from __future__ import annotations

import jax.numpy as jnp

ROWS = 64  # rows of a wgmma tile: (token, q-head) pairs of one request
META = 8  # int32 fields per work item, see `work_list`
LSE_COLS = 8  # a row's log-sum-exp is stored 8 times (32 bytes): TMA boxes need 16-byte rows


def default_splits(num_tiles, num_kv_heads, max_kv_len, target_ctas=264, min_split_tokens=512):
    """Enough kv splits that the grid covers ~2 CTAs per SM of an H200 (132 SMs), never splits under 512 keys."""
    want = -(-target_ctas // max(num_tiles * num_kv_heads, 1))
    cap = max(1, max_kv_len // min_split_tokens)
    splits = 1
    while splits * 2 <= min(want, cap):
        splits *= 2
    return splits


def request_lengths(query_start_loc, seq_lens, num_seqs):
    R = seq_lens.shape[0]
    live = jnp.arange(R) < num_seqs
    q_lens = jnp.where(live, query_start_loc[1:] - query_start_loc[:-1], 0)  # [R]
    return live, jnp.maximum(q_lens, 0)


def work_list(query_start_loc, seq_lens, num_seqs, *, group, max_tiles, num_splits, page_size, block_kv,
               sliding_window):
    """Per (tile, split) work item: [valid, req, q_row0, q_pos0, kv_begin, kv_end, last_page, num_rows]
    -> [W, META], with W = max_tiles * num_splits (split-minor)."""
    R = seq_lens.shape[0]
    _, q_lens = request_lengths(query_start_loc, seq_lens, num_seqs)
    tiles = -(-(q_lens * group) // ROWS)  # [R]
    tile_end = jnp.cumsum(tiles)
    tile_start = tile_end - tiles
    i = jnp.arange(max_tiles)
    # one compare-and-count fusion; the default binary search is a while loop of small kernels on the GPU
    req = jnp.minimum(jnp.searchsorted(tile_end, i, side="right", method="compare_all"), R - 1)  # [max_tiles]
    valid = i < tile_end[-1]
    local = i - tile_start[req]
    q_len, seq_len = q_lens[req], seq_lens[req]
    first_tok = local * (ROWS // group)
    last_tok = jnp.minimum(q_len, first_tok + ROWS // group) - 1
    q_pos0 = seq_len - q_len + first_tok
    kv_hi = seq_len - q_len + last_tok + 1
    kv_lo = jnp.zeros_like(kv_hi)
    if sliding_window is not None:
        kv_lo = jnp.maximum(q_pos0 - sliding_window + 1, 0) // page_size * page_size
    chunk = -(-jnp.maximum(kv_hi - kv_lo, 0) // num_splits)
    chunk = -(-chunk // block_kv) * block_kv
    s = jnp.arange(num_splits)
    begin = kv_lo[:, None] + s[None, :] * chunk[:, None]  # [max_tiles, S]
    end = jnp.minimum(begin + chunk[:, None], kv_hi[:, None])
    bcast = lambda x: jnp.broadcast_to(x[:, None], begin.shape)
    meta = jnp.stack([
        bcast(valid.astype(jnp.int32)), bcast(req), bcast(query_start_loc[req] * group + local * ROWS),
        bcast(q_pos0), begin, end, bcast(jnp.maximum(kv_hi - 1, 0) // page_size),
        bcast(jnp.clip(q_len * group - local * ROWS, 0, ROWS)),
    ], axis=-1)
    return meta.reshape(max_tiles * num_splits, META).astype(jnp.int32)


F16_MAX = 65504.0


def pack_queries(q, num_kv_heads, q_scale=None):
    """q [T, N, H] -> [K, Tq, H]: row i of kv-head k is token i // G, head k * G + i % G. The tail pads the last
    tile and keeps the row count a multiple of the TMA tiling.

    q_scale [K] (fp8 cache): the softmax scale times each kv-head's k_scale, applied here in f32; the rows then go
    to f16 (clamped to its range), the wgmma type of an fp8 cache, whose e4m3 values f16 holds exactly.
    """
    T, N, H = q.shape
    K, group = num_kv_heads, N // num_kv_heads
    q_packed = jnp.swapaxes(q.reshape(T, K, group, H), 0, 1)  # [K, T, G, H]
    if q_scale is not None:
        q_packed = q_packed.astype(jnp.float32) * q_scale[:, None, None, None]
        q_packed = jnp.clip(q_packed, -F16_MAX, F16_MAX).astype(jnp.float16)
    q_packed = q_packed.reshape(K, T * group, H)
    return jnp.pad(q_packed, ((0, 0), (0, ROWS + (-T * group) % ROWS), (0, 0)))


def merge(o_parts, lse_rows, query_start_loc, seq_lens, num_seqs, *, T, group, v_scale=None, out_dtype=None):
    """Log-sum-exp merge of the kv splits, back to tokens: o_parts [S, K, Tq, H] and lse_rows [S, K, Tq, LSE_COLS]
    (both packed rows; lse unused when S == 1) -> [T, K, G, H] of out_dtype (default o_parts'). v_scale [K] (fp8
    cache) multiplies each kv-head's output. Tokens outside the live requests [qsl[0], qsl[num_seqs]) (qsl is
    non-decreasing) come back as zeros: the kernel never wrote their rows."""
    S, K, _, H = o_parts.shape
    t = jnp.arange(T)
    real = (t >= query_start_loc[0]) & (t < query_start_loc[jnp.clip(num_seqs, 0, seq_lens.shape[0])])  # [T]
    o = o_parts[:, :, :T * group].reshape(S, K, T, group, H)
    if S == 1:
        merged = o[0]
    else:
        lse = lse_rows[:, :, :T * group, 0].reshape(S, K, T, group)
        lse = jnp.where(real[:, None], lse, 0.0)  # rows of padding tokens hold garbage
        m = jnp.max(lse, axis=0)
        wts = jnp.exp2(lse - jnp.where(jnp.isfinite(m), m, 0.0))  # -inf -> 0
        den = jnp.sum(wts, axis=0)
        num = jnp.einsum("sktg,sktgh->ktgh", wts, o.astype(jnp.float32))
        merged = num / jnp.where(den == 0, 1.0, den)[..., None]
    out = jnp.swapaxes(merged, 0, 1)  # [T, K, G, H]
    if v_scale is not None:
        out = out.astype(jnp.float32) * v_scale[:, None, None]
    return jnp.where(real[:, None, None, None], out, 0).astype(out_dtype or o_parts.dtype)
