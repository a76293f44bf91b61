"""The ragged part of paged attention (mostly plain jnp): which CTA does what, and how its results come back.

A request's queries are packed as (token, q-head) rows, ROWS to a tile. `work_list` turns `query_start_loc` /
`seq_lens` into a fixed-size list of (tile, kv split) work items, so that the kernel's grid is static while the
batch is ragged; items past the batch's real tiles are marked invalid and do nothing. `merge` combines the
splits' outputs by their log-sum-exp (flash-decoding) and unpacks rows back to tokens. On the direct path (small
batches) the CTAs derive their items themselves with the same `kv_split`, and rows stay in q's order; there the
kernel can merge the splits itself (`merge_in_kernel`): `cluster_merge` and `zero_padding_rows` are the epilogue
pieces it then calls (in-kernel code, GMEM refs in and out). `check_args` holds the public boundary's checks,
shared by the kernel wrapper and the reference.

This module knows nothing about the kernel's pipeline (rings, wgmmas); it fixes the meaning of the work-item
fields and how the splits' results are combined.
"""
from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from kernels_pallas.kv_cache import FP8

ROWS = 64  # rows of a wgmma tile: (token, q-head) pairs of one request
DIRECT_MIN_SPLIT = 256  # keys per split at the least on the direct path, past its first 8 splits
META = 8  # int32 fields per work item, see `work_list`
LSE_COLS = 8  # a row's log-sum-exp is stored 8 times (32 bytes): TMA boxes need 16-byte rows


def default_splits(num_tiles, num_kv_heads, max_kv_len, target_ctas=264, min_split_tokens=512, direct=False):
    """Enough kv splits that the grid covers ~2 CTAs per SM of an H200 (132 SMs), never splits under 512 keys.

    direct (small batches, latency bound): splits of DIRECT_MIN_SPLIT keys, and up to 8 splits whatever the
    length, as long as the grid stays within target_ctas (H200: batch 1 at ctx 256 and 1024 was fastest at 8)."""
    want = -(-target_ctas // max(num_tiles * num_kv_heads, 1))
    cap = max(1, max_kv_len // (DIRECT_MIN_SPLIT if direct else min_split_tokens))
    splits = 1
    while splits * 2 <= min(want, max(cap, 8 if direct else 1)):
        splits *= 2
    return splits


def scales_shape(k_pages, v_pages):
    """The shape of one dequantization scale array: [K] (one layer), [L, K] (stacked) or, for an interleaved cache
    (v_pages None: K of layer l at 2l, V at 2l + 1), [L, K] with L half the leading dim."""
    shape = k_pages.shape[:-3]
    return (shape[0] // 2, *shape[1:]) if v_pages is None else shape


def kv_scales(k_pages, k_scale, v_scale, v_pages=0):
    """The dequantization scales as f32 arrays of the cache's [K] or [L, K]: ones where not given. v_pages None:
    the cache is interleaved (`scales_shape`)."""
    ones = jnp.ones(scales_shape(k_pages, v_pages), jnp.float32)
    return (ones if k_scale is None else jnp.asarray(k_scale, jnp.float32),
            ones if v_scale is None else jnp.asarray(v_scale, jnp.float32))


def use_direct(T, N, R, config) -> bool:
    """Whether the call takes the direct path: as configured, else for at most DIRECT_MAX_TOKENS tokens.

    A caller that knows every request of the step has one token (decode) gains by forcing it (`direct=True`): no
    work list, no packing (H200: b256 ctx192 66.6 instead of 71.8 us, b64 ctx4096 252.8 instead of 256.7). It is
    not the default past 16 tokens because the static shapes cannot tell decode from prefill: the engine pads
    mixed steps of <= max_num_seqs tokens to T == R too, and a chunk of n tokens is walked in n * N / ROWS passes
    that each re-read its KV."""
    supported = ROWS % N == 0 and N % 8 == 0
    if config.direct is None:
        return supported and T <= DIRECT_MAX_TOKENS
    return config.direct and supported


DIRECT_MAX_TOKENS = 16  # engine buckets of 8 and 16 tokens (batch 1 to 16 decode)
MAX_CLUSTER = 8  # CTAs per cluster that every Hopper part runs (the portable limit)


PT_SMEM_MAX = 2048  # page ids (8 KiB) a tile may copy into shared memory (TuningConfig.pages_in_smem)
PT_BOX = 256  # TMA box limit per dimension


def ids_in_smem(config, max_pages, fp8) -> bool:
    """Whether the page-table row goes to SMEM (`pages_in_smem`). The GPU lowering of that 1-D copy moves whole
    128-byte chunks across the warpgroup, so the row must be a multiple of 32 ids."""
    return (config.pages_in_smem and not (fp8 and config.convert_wg) and max_pages <= PT_SMEM_MAX
            and max_pages % 32 == 0)


def fuses_merge(num_splits, group, H, config) -> bool:
    """Whether the direct path merges its splits inside the kernel: at most a cluster of splits, and a kv-head's G
    rows of a token fill whole 128-thread vectors of the merge's registers."""
    if config.merge_in_kernel is False or (group * H) % 256:
        return False
    return num_splits == 1 or (config.merge_in_kernel and num_splits <= MAX_CLUSTER)


def shapes_supported(q, k_pages, config) -> bool:
    """`paged_attention.kernel_supports` with its config given."""
    _, N, H = q.shape
    K, _, page_size, _ = k_pages.shape[-4:]
    group = N // K
    blocks_fit_pages = config.block_kv % page_size == 0 or page_size % config.block_kv == 0
    return (H in (64, 128) and page_size % 8 == 0 and blocks_fit_pages and N % K == 0 and ROWS % group == 0
            and q.dtype in (jnp.bfloat16, jnp.float16) and k_pages.dtype in (q.dtype, FP8)
            and (k_pages.dtype != FP8 or config.block_kv % ROWS == 0)  # fp8: converted in 64-row tiles
            and (not config.direct or (ROWS % N == 0 and N % 8 == 0)))


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
    begin, end = kv_split(q_pos0[:, None], kv_hi[:, None], jnp.arange(num_splits)[None, :], num_splits=num_splits,
                          page_size=page_size, block_kv=block_kv, sliding_window=sliding_window)  # [max_tiles, S]
    bcast = lambda x: jnp.broadcast_to(x[:, None], begin.shape)
    meta = jnp.stack([
        bcast(valid.astype(jnp.int32)), bcast(req), bcast(query_start_loc[req] * group + local * ROWS),
        bcast(q_pos0), begin, end, bcast(jnp.maximum(kv_hi - 1, 0) // page_size),
        bcast(jnp.clip(q_len * group - local * ROWS, 0, ROWS)),
    ], axis=-1)
    return meta.reshape(max_tiles * num_splits, META).astype(jnp.int32)


def kv_split(q_pos0, kv_hi, split, *, num_splits, page_size, block_kv, sliding_window):
    """Keys [begin, end) of kv split `split` of a tile whose first token sits at q_pos0 and whose keys end at kv_hi
    (exclusive). Whole blocks per split; begin page-aligned. Takes jnp arrays (broadcast) or kernel scalars."""
    kv_lo = 0
    if sliding_window is not None:
        kv_lo = jnp.maximum(q_pos0 - sliding_window + 1, 0) // page_size * page_size
    chunk = (jnp.maximum(kv_hi - kv_lo, 0) + num_splits - 1) // num_splits
    chunk = (chunk + block_kv - 1) // block_kv * block_kv
    begin = kv_lo + split * chunk
    return begin, jnp.minimum(begin + chunk, kv_hi)


def mask_block(s, key0, key_iota, q_pos, first_q_pos, kv_end, *, block_kv, sliding_window):
    """In-kernel: one key block's scores with keys past a query's position, the split's end or the sliding window
    set to -inf. key_iota: each score's key offset in the block; q_pos: each score's query position (or one scalar);
    first_q_pos: the tile's first query. Without a window, only blocks that reach past first_q_pos or kv_end are
    masked (a lax.cond on a scalar; in decode, the last block of each split)."""
    def masked(s):
        kv_pos = key0 + key_iota
        mask = (kv_pos <= q_pos) & (kv_pos < kv_end)
        if sliding_window is not None:
            mask &= kv_pos > q_pos - sliding_window
        return jnp.where(mask, s, -jnp.inf)

    if sliding_window is not None:
        return masked(s)
    return lax.cond(key0 + block_kv <= jnp.minimum(first_q_pos + 1, kv_end), lambda s: s, masked, s)


F16_MAX = 65504.0


def pack_queries(q, num_kv_heads, q_scale=None, token_major=False):
    """q [T, N, H] -> [K, Tq, H]: row i of kv-head k is token i // G, head k * G + i % G. The tail pads the last
    tile and keeps the row count a multiple of the TMA tiling. token_major (the direct path, fp8 only): q's own
    order, [T * N, H], only scaled.

    q_scale [K] (fp8 cache): the softmax scale times each kv-head's k_scale, applied here in f32; the rows then go
    to f16 (clamped to its range), the wgmma type of an fp8 cache, whose e4m3 values f16 holds exactly.
    """
    T, N, H = q.shape
    K, group = num_kv_heads, N // num_kv_heads
    if token_major:
        q_scaled = q.reshape(T, K, group, H).astype(jnp.float32) * q_scale[:, None, None]
        return jnp.clip(q_scaled, -F16_MAX, F16_MAX).astype(jnp.float16).reshape(T * N, H)
    q_packed = jnp.swapaxes(q.reshape(T, K, group, H), 0, 1)  # [K, T, G, H]
    if q_scale is not None:
        q_packed = q_packed.astype(jnp.float32) * q_scale[:, None, None, None]
        q_packed = jnp.clip(q_packed, -F16_MAX, F16_MAX).astype(jnp.float16)
    q_packed = q_packed.reshape(K, T * group, H)
    return jnp.pad(q_packed, ((0, 0), (0, ROWS + (-T * group) % ROWS), (0, 0)))


UNROLLED_MERGE = 8  # splits merged by elementwise ops over static slices rather than reductions


def merge(o_parts, lse_rows, query_start_loc, seq_lens, num_seqs, *, T, group, v_scale=None, out_dtype=None):
    """Log-sum-exp merge of the kv splits, back to tokens: o_parts [S, K, Tq, H] and lse_rows [S, K, Tq, LSE_COLS]
    (both packed rows; lse unused when S == 1), or the direct path's [S, T * N, H] and [S, T * N, LSE_COLS] (q's
    row order) -> [T, K, G, H] of out_dtype (default o_parts'). v_scale [K] (fp8 cache) multiplies each kv-head's
    output. Tokens outside the live requests [qsl[0], qsl[num_seqs]) (qsl is non-decreasing) come back as zeros:
    the kernel never wrote their rows."""
    S, H = o_parts.shape[0], o_parts.shape[-1]
    t = np.arange(T, dtype=np.int32)  # a host constant: jnp.arange became its own iota kernel (H200: 0.6 us)
    real = (t >= query_start_loc[0]) & (t < query_start_loc[jnp.clip(num_seqs, 0, seq_lens.shape[0])])  # [T]
    if o_parts.ndim == 3:  # direct: already token-major
        K = o_parts.shape[1] // (T * group)
        o = o_parts.reshape(S, T, K, group, H)
        lse = lse_rows[..., 0].reshape(S, T, K, group) if S > 1 else None
    else:
        K = o_parts.shape[1]
        o = jnp.swapaxes(o_parts[:, :, :T * group].reshape(S, K, T, group, H), 1, 2)  # [S, T, K, G, H]
        lse = jnp.swapaxes(lse_rows[:, :, :T * group, 0].reshape(S, K, T, group), 1, 2) if S > 1 else None
    if S == 1:
        out = o[0]
    else:
        lse = jnp.where(real[:, None, None], lse, 0.0)  # rows of padding tokens hold garbage
        # Over the splits: for a few, elementwise over static slices (XLA fuses the whole merge into one loop
        # kernel); for many, reductions (each its own kernel). Never a batched matmul.
        if S <= UNROLLED_MERGE:
            over_splits = lambda op, _, x: functools.reduce(op, [x[s] for s in range(S)])  # noqa: E731
        else:
            over_splits = lambda _, reduce, x: reduce(x, axis=0)  # noqa: E731
        m = over_splits(jnp.maximum, jnp.max, lse)
        wts = jnp.exp2(lse - jnp.where(jnp.isfinite(m), m, 0.0))  # [S, T, K, G], -inf -> 0
        den = over_splits(jnp.add, jnp.sum, wts)
        num = over_splits(jnp.add, jnp.sum, wts[..., None] * o.astype(jnp.float32))
        out = num / jnp.where(den == 0, 1.0, den)[..., None]  # [T, K, G, H]
    if v_scale is not None:
        out = out.astype(jnp.float32) * v_scale[:, None, None]
    return jnp.where(real[:, None, None, None], out, 0).astype(out_dtype or o_parts.dtype)


def check_args(q, k_pages, v_pages, layer, page_table, query_start_loc, seq_lens, num_seqs, sliding_window,
               softcap, k_scale=None, v_scale=None):
    """The public boundary's checks (kernel wrapper and reference): ValueError naming the offending value."""
    if q.ndim != 3:
        raise ValueError(f"{q.shape=} must be [T, N, H]")
    if v_pages is None:  # interleaved: [2L, K, P, page_size, H], K of layer l at 2l and V at 2l + 1
        if k_pages.ndim != 5 or k_pages.shape[0] % 2 or layer is None:
            raise ValueError(f"an interleaved cache (v_pages=None) is [2L, K, P, page_size, H] with a layer index; "
                             f"got {k_pages.shape=}, {layer=}")
    elif k_pages.ndim not in (4, 5) or k_pages.shape != v_pages.shape:
        raise ValueError(f"{k_pages.shape=} and {v_pages.shape=} must be equal [K, P, page_size, H] or "
                         f"[L, K, P, page_size, H]")
    if (k_pages.ndim == 5) != (layer is not None):
        raise ValueError(f"{layer=} must be given exactly when the cache is stacked [L, K, P, page_size, H] "
                         f"({k_pages.shape=})")
    if layer is not None and (jnp.shape(layer) not in ((), (1,)) or not jnp.issubdtype(jnp.result_type(layer),
                                                                                      jnp.integer)):
        raise ValueError(f"{jnp.shape(layer)=} {jnp.result_type(layer)=} must be an integer scalar")
    T, N, H = q.shape
    K, _, _, Hk = k_pages.shape[-4:]
    if Hk != H:
        raise ValueError(f"{k_pages.shape=} head dim must equal {q.shape=} head dim")
    if N % K:
        raise ValueError(f"{q.shape=} q-heads must be a multiple of {k_pages.shape=} kv-heads")
    if page_table.ndim != 2 or page_table.dtype != jnp.int32:
        raise ValueError(f"{page_table.shape=} {page_table.dtype=} must be int32 [R, max_pages]")
    R = page_table.shape[0]
    if query_start_loc.shape != (R + 1,) or seq_lens.shape != (R,):
        raise ValueError(f"{query_start_loc.shape=} must be [{R + 1}] and {seq_lens.shape=} must be [{R}]")
    if jnp.shape(num_seqs) not in ((), (1,)):
        raise ValueError(f"{jnp.shape(num_seqs)=} must be a scalar")
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"{sliding_window=} must be None or >= 1")
    if softcap is not None and softcap <= 0:
        raise ValueError(f"{softcap=} must be None or > 0")
    want = scales_shape(k_pages, v_pages)  # [K] or [L, K]
    for name, scale in (("k_scale", k_scale), ("v_scale", v_scale)):
        if scale is None:
            continue
        if k_pages.dtype != FP8:
            raise ValueError(f"{name} is for an fp8 cache; {k_pages.dtype=}")
        if jnp.shape(scale) != want:
            raise ValueError(f"{name}.shape={jnp.shape(scale)} must be {want} (per layer and kv-head)")


# ----------------------------------------------------------------------------------------------------------------
# In-kernel merge (direct path): called from the kernel body, after each pass's rows are stored


def _fence_gpu():
    """`fence.acq_rel.gpu` in every thread: orders this thread's global accesses before (after) the cluster
    barrier's arrive (wait), whose own release/acquire is only CTA-scoped. Also a proxy fence, since the partial
    rows were written by TMA (the async proxy) and are read by ordinary loads."""
    from jax.experimental.mosaic.gpu import utils as mgpu_utils

    @plgpu.inline_mgpu()
    def _(ctx):
        del ctx
        mgpu_utils.inline_ptx("fence.proxy.async.global;\n\tfence.acq_rel.gpu;", has_side_effects=True)


def _strided(shape):
    return plgpu.Layout.WG_STRIDED(shape, vec_size=2)  # f32 partials: 2 x 4 bytes per thread and access


def cluster_merge(o_parts_ref, lse_ref, out_ref, v_scale, barrier, *, split, kh, row0, num_tokens, num_heads, group,
                  interpret):
    """The splits of one (request, kv-head) are one cluster. Each has stored its rows of this pass; after the
    cluster barrier, token j is merged by split j % S: its G rows of every split are loaded from GMEM (L2),
    weighted by 2^(lse_s - max lse) and written to out_ref in out_ref's dtype (times the fp8 cache's v_scale).

    o_parts_ref [S, T * N, H] f32 (normalised per split), lse_ref [S, T * N, H] f32 (each row's base-2 lse repeated
    over H, so that it loads in o's register layout), out_ref [T * N, H]; row0: first q row of the pass (token-major,
    all N heads); num_tokens: real tokens of the pass. Every CTA of the cluster arrives and waits once per pass:
    a CTA must not exit while peers may still arrive on its barrier.

    Ordering: the rows were written by TMA and waited for (`wait_smem_to_gmem(0)`, writes complete); a GPU-scope
    fence before the arrive and after the wait makes them visible to the merging CTA's loads. The interpreter runs
    the cluster's CTAs as threads over one memory, where the barrier alone orders them (no fence needed)."""
    S, H = o_parts_ref.shape[0], o_parts_ref.shape[-1]
    if not interpret:
        _fence_gpu()
    plgpu.barrier_arrive(barrier)
    plgpu.barrier_wait(barrier)
    if not interpret:
        _fence_gpu()
    layout = _strided((group, H))
    for j in range(ROWS // num_heads):
        @pl.when((j < num_tokens) & (split == j % S))
        def _(j=j):
            rows = pl.ds(row0 + j * num_heads + kh * group, group)
            lse = [plgpu.load(lse_ref.at[s, rows], layout=layout) for s in range(S)]  # S x [G, H]
            m = lse[0]
            for x in lse[1:]:
                m = jnp.maximum(m, x)
            m = jnp.where(m == -jnp.inf, 0.0, m)  # a row no split saw: all weights 0, output 0
            num = den = None
            for s in range(S):
                w = jnp.exp2(lse[s] - m)
                o = plgpu.load(o_parts_ref.at[s, rows], layout=layout)
                num, den = (w * o, w) if s == 0 else (num + w * o, den + w)
            out = num / jnp.where(den == 0.0, 1.0, den) * v_scale
            out_ref[rows, :] = out.astype(out_ref.dtype)


def zero_padding_rows(out_ref, qsl_ref, num_seqs_ref, *, kh, group, num_heads):
    """Writes zeros into kv-head kh's rows of every token outside [qsl[0], qsl[num_seqs]) (padding tokens, which
    no CTA computes). out_ref [T * N, H]; qsl_ref [R + 1] int32 and num_seqs_ref [1] int32 in GMEM."""
    H = out_ref.shape[-1]
    R = qsl_ref.shape[0] - 1
    first, end = qsl_ref[0], qsl_ref[jnp.clip(num_seqs_ref[0], 0, R)]
    zeros = plgpu.layout_cast(jnp.zeros((group, H), out_ref.dtype), _strided((group, H)))
    for t in range(out_ref.shape[0] // num_heads):
        @pl.when((t < first) | (t >= end))
        def _(t=t):
            out_ref[pl.ds(t * num_heads + kh * group, group), :] = zeros
