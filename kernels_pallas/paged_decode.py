"""Decode tiles: paged attention for one query token at a time, computed transposed (Hopper, Pallas Mosaic GPU).

The packed kernel (paged_attention.py) puts a kv-head's q-heads on the rows of a 64-row wgmma tile. A decode
token fills G of those rows (4 for Llama-3), so every block of keys pays for a 64 x block_kv softmax of which
G / 64 is real. Here the tile is transposed: keys are the wgmma's M dimension and query heads its N = COLS = 8,

    S^T [block_kv, 8] = K [block_kv, H] . q^T [H, 8]        O^T [H, 8] += V^T [H, block_kv] . P^T [block_kv, 8]

so a thread holds 4 scores per 64-key block instead of 32, and the accumulator is 8 registers instead of 64.
For an fp8 (e4m3) cache both QK^T operands are fp8 (q quantized per token and kv-head, its scale applied to the
scores), so K is never converted; V is converted to f16 in shared memory while QK^T runs, because an 8-bit
wgmma operand must be K-major and V's rows are keys. P goes to shared memory through a transposed store.

Work: CTA (request, split) x kv-head, as on the packed kernel's direct path. q is read in its own [T * N, H]
order, one 8-row box per token holding the kv-head's G rows at column `(kh * G) % 8` (the other columns are
another kv-head's heads: computed, never stored). A request of several tokens is walked one token per pass, each
pass re-reading its keys: meant for decode. With one split the kernel writes the final [T * N, H] itself
(including the zeros of padding tokens); with several, f32 partials [S, T, K, H, 8] and their log-sum-exp go to
`merge_transposed`.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from kernels_pallas import quantize_q
from kernels_pallas.kv_cache import FP8
from kernels_pallas.paged_work import (DIRECT_MIN_SPLIT, PT_BOX, default_splits, ids_in_smem, kv_split, mask_block,
                                      merge)

COLS = 8  # wgmma N of QK^T: one token's 8 consecutive q-heads (G of them this kv-head's)
_LOG2E = math.log2(math.e)


def supported(q, k_pages, config) -> bool:
    """Shapes the decode-tile kernel takes: G divides 8 (a kv-head's heads sit inside one 8-row box), N a multiple
    of 8, H 64 or 128, blocks of 64 or 128 keys made of whole pages or page slices."""
    _, N, H = q.shape
    K, _, page_size, _ = k_pages.shape[-4:]
    group = N // K
    return (N % K == 0 and COLS % group == 0 and N % COLS == 0 and H in (64, 128) and page_size % 8 == 0
            and config.block_kv in (64, 128) and (config.block_kv % page_size == 0 or page_size % config.block_kv == 0)
            and (group * H) % 256 == 0  # the padding tokens' zeros: whole 128-thread vectors of 2
            and q.dtype in (jnp.bfloat16, jnp.float16) and k_pages.dtype in (q.dtype, FP8))


def window_size(max_pages, page_size, block_kv, num_splits):
    """Page ids a split may read (`kv_split`: at most one chunk of whole blocks, plus a page when blocks slice
    pages), plus up to 31 for aligning the window's start down to 32 ids, rounded up to 32 (the SMEM copy moves
    128-byte chunks)."""
    chunk = -(-(-(-max_pages * page_size // num_splits)) // block_kv) * block_kv
    pages = -(-chunk // page_size) + (1 if block_kv < page_size else 0)
    return -(-(pages + 31) // 32) * 32


# fp8 cache: q [T, N, H] times q_scale [K] (softmax scale x k_scale) in f32, quantized to e4m3 with one scale per
# (token, kv-head), amax / 448 -> (q8 [T * N, H], scales [T, K] f32). The jnp form (XLA: three small kernels) and
# the one-launch kernel (kernels_pallas/quantize_q.py, bit-identical) that `decode_attention` runs by default.
quantize_queries = quantize_q.quantize_queries_reference


def _kernel(qsl_ref, seq_lens_ref, num_seqs_ref, layer_ref, page_table_ref, q_ref, qs_ref, k_ref, v_ref,
            v_scale_ref, *refs, group, num_heads, page_size, block_kv, num_stages, num_splits, scale, sliding_window,
            softcap, pages_in_smem, pt_window):
    # qsl_ref [R + 1], seq_lens_ref [R], num_seqs_ref [1], layer_ref [2] (cache entries of this layer's K and V),
    # page_table_ref [R, max_pages] int32; q_ref [T * N, H] (q's dtype, or e4m3 for an fp8 cache); qs_ref [T, K]
    # f32 (fp8: q's per-token, per-kv-head scale; else [1, K], unused); k_ref, v_ref [L, K, P, page_size, H];
    # v_scale_ref [K] f32 (ones for a 16-bit cache, unused).
    # outputs, one split: out_ref [T * N, H]; several: o_ref [S, T, K, H, COLS] f32, lse_ref [S, T, K, 1, COLS]
    # scratch: q_smem [COLS, H]; k_smem, v_smem [stages, block_kv, H]; v16_smem [block_kv, H] (fp8 only);
    # p_smem [COLS, block_kv] (P^T, K-major for the PV wgmma); o_smem [COLS, H] (out dtype) or [H, COLS] f32;
    # lse_smem [block_kv, COLS] f32 (splits only); pt_smem [max_pages] + its barrier (pages_in_smem), or with
    # pt_window (> 0) only [pt_window] ids, each pass's window from its split's first page (32-aligned);
    # barriers q_bar, k_bar[stages], v_bar[stages]
    if num_splits == 1:
        out_ref, *refs = refs
        o_ref = lse_ref = None
    else:
        o_ref, lse_ref, *refs = refs
        out_ref = None
    fp8 = k_ref.dtype == FP8
    q_smem, k_smem, v_smem, *refs = refs
    if fp8:  # the epilogue's tiles share v16's bytes: v16 is dead once the last PV wgmma has been waited on
        (v16_smem, (o_smem, *lse)), p_smem, *refs = refs
    else:
        v16_smem, (p_smem, o_smem, *refs) = None, refs
        lse = [refs.pop(0)] if num_splits > 1 else []
    lse_smem = lse[0] if lse else None
    pt_smem, pt_bar = refs[:2] if pages_in_smem else (None, None)
    q_bar, k_bar, v_bar = refs[-3:]
    w = lax.axis_index("w")
    kh = lax.axis_index("kh")
    H = q_smem.shape[-1]
    T = q_ref.shape[0] // num_heads
    R = seq_lens_ref.shape[0]
    req, split = w // num_splits, lax.rem(w, num_splits)
    col0 = lax.rem(kh * group, COLS)  # this kv-head's first column in its token's 8-row box
    box0 = kh * group - col0
    k_layer = k_ref.at[layer_ref[0]]
    v_layer = v_ref.at[layer_ref[1]]

    if num_splits == 1:  # tokens outside [qsl[0], qsl[num_seqs]) belong to no request: zeros, CTA by CTA
        first, end = qsl_ref[0], qsl_ref[jnp.clip(num_seqs_ref[0], 0, R)]
        zeros = plgpu.layout_cast(jnp.zeros((group, H), out_ref.dtype), plgpu.Layout.WG_STRIDED((group, H), vec_size=2))

        @pl.loop(w, T, step=R * num_splits)
        def _(t):
            @pl.when((t < first) | (t >= end))
            def _():
                out_ref[pl.ds(t * num_heads + kh * group, group), :] = zeros

    def copy_ids(start):  # ids [start, start + pt_smem size) of the request's row -> SMEM
        for c0 in range(0, pt_smem.shape[0], PT_BOX):
            n = min(PT_BOX, pt_smem.shape[0] - c0)
            plgpu.copy_gmem_to_smem(page_table_ref.at[req, pl.ds(start + c0, n)], pt_smem.at[pl.ds(c0, n)], pt_bar)
        plgpu.barrier_wait(pt_bar)

    if pages_in_smem and not pt_window:  # the whole row, once
        copy_ids(0)

    q_start = qsl_ref[req]
    q_len = jnp.where(req < num_seqs_ref[0], jnp.maximum(qsl_ref[req + 1] - q_start, 0), 0)
    seq_len = seq_lens_ref[req]

    def run_token(tok):
        t = q_start + tok
        q_pos = seq_len - q_len + tok
        kv_begin, kv_end = kv_split(q_pos, q_pos + 1, split, num_splits=num_splits, page_size=page_size,
                                    block_kv=block_kv, sliding_window=sliding_window)
        num_blocks = pl.cdiv(jnp.maximum(kv_end - kv_begin, 0), block_kv)
        first_page = kv_begin // page_size
        last_page = q_pos // page_size
        pt_start = 0
        if pt_window:  # this pass's split only: ids [pt_start, pt_start + pt_window) hold all it reads
            pt_start = jnp.minimum(first_page // 32 * 32, page_table_ref.shape[1] - pt_window)
            copy_ids(pt_start)

        def page_ids(block):
            load = (lambda i: pt_smem[i - pt_start]) if pages_in_smem else (lambda i: page_table_ref[req, i])
            if block_kv >= page_size:
                first = first_page + block * (block_kv // page_size)
                return [load(jnp.minimum(first + p, last_page)) for p in range(block_kv // page_size)]
            return [load(jnp.minimum((kv_begin + block * block_kv) // page_size, last_page))]

        def issue(block, slot):
            pages = page_ids(block)
            if block_kv >= page_size:
                for p, page in enumerate(pages):
                    rows = pl.ds(p * page_size, page_size)
                    plgpu.copy_gmem_to_smem(k_layer.at[kh, page], k_smem.at[slot, rows], k_bar.at[slot])
                    plgpu.copy_gmem_to_smem(v_layer.at[kh, page], v_smem.at[slot, rows], v_bar.at[slot])
            else:
                rows = pl.ds(lax.rem(kv_begin + block * block_kv, page_size), block_kv)
                plgpu.copy_gmem_to_smem(k_layer.at[kh, pages[0], rows], k_smem.at[slot], k_bar.at[slot])
                plgpu.copy_gmem_to_smem(v_layer.at[kh, pages[0], rows], v_smem.at[slot], v_bar.at[slot])

        def refill(block, slot):
            pl.when(block + num_stages < num_blocks)(lambda: issue(block + num_stages, slot))

        plgpu.copy_gmem_to_smem(q_ref.at[pl.ds(t * num_heads + box0, COLS)], q_smem, q_bar)
        for s in range(num_stages):
            pl.when(s < num_blocks)(functools.partial(issue, s, s))
        plgpu.barrier_wait(q_bar)

        # scores -> base-2 exponents: s * c (fp8: the token's q scale folds in)
        c_raw = qs_ref[t, kh] if fp8 else jnp.float32(scale)
        c = c_raw * _LOG2E
        key = plgpu.broadcasted_iota(jnp.int32, (block_kv, COLS), 0, layout=plgpu.Layout.WGMMA)

        def body(block, carry):
            acc, m_i, l_acc = carry  # [H, COLS] f32, [COLS] (base-2 max), [block_kv, COLS] per-thread sums
            slot = lax.rem(block, num_stages)
            with jax.named_scope("wait_k"):  # named scopes: the regions a `profile_dir` trace records
                plgpu.barrier_wait(k_bar.at[slot])

            def qk(acc_ref):
                plgpu.wgmma(acc_ref, k_smem.at[slot], q_smem.T)
                if fp8:  # convert V while QK^T runs; the fp8 slot is then free to refill
                    with jax.named_scope("wait_v"):
                        plgpu.barrier_wait(v_bar.at[slot])
                    with jax.named_scope("convert_v"):
                        v16_smem[...] = plgpu.load(v_smem.at[slot], layout=plgpu.Layout.WGMMA_UPCAST_2X).astype(
                            v16_smem.dtype)
                with jax.named_scope("qk_wait"):
                    return acc_ref[...]

            s = pl.run_scoped(qk, plgpu.ACC((block_kv, COLS), jnp.float32))  # [block_kv, COLS]
            if fp8:
                with jax.named_scope("refill"):
                    refill(block, slot)
            with jax.named_scope("softmax"):
                cb = c
                if softcap is not None:
                    s = jnp.tanh(s * (c_raw / softcap)) * (softcap * _LOG2E)
                    cb = 1.0
                s = mask_block(s, kv_begin + block * block_kv, key, q_pos, q_pos, kv_end, block_kv=block_kv,
                               sliding_window=sliding_window)
                m_new = jnp.maximum(m_i, s.max(axis=0) * cb)
                m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
                alpha = jnp.exp2(m_i - m_safe)
                p = jnp.exp2(s * cb - lax.broadcast_in_dim(m_safe, s.shape, [1]))
                l_acc = l_acc * lax.broadcast_in_dim(alpha, s.shape, [1]) + p
                acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [1])
            with jax.named_scope("p_store"):
                p_smem.T[...] = p.astype(p_smem.dtype)
                if not fp8:
                    plgpu.barrier_wait(v_bar.at[slot])
                plgpu.commit_smem()  # P (and fp8's V copy) visible to the wgmma

            def pv(acc_ref):
                plgpu.wgmma(acc_ref, (v16_smem if fp8 else v_smem.at[slot]).T, p_smem.T)
                return acc_ref[...]

            with jax.named_scope("pv"):
                acc = acc + pl.run_scoped(pv, plgpu.ACC((H, COLS), jnp.float32))
            if not fp8:
                with jax.named_scope("refill"):
                    refill(block, slot)
            return acc, m_new, l_acc

        acc = plgpu.layout_cast(jnp.zeros((H, COLS), jnp.float32), plgpu.Layout.WGMMA)
        m_i = plgpu.layout_cast(jnp.full((COLS,), -jnp.inf, jnp.float32), plgpu.Layout.WGMMA.reduce(0))
        l_acc = plgpu.layout_cast(jnp.zeros((block_kv, COLS), jnp.float32), plgpu.Layout.WGMMA)
        acc, m_i, l_acc = lax.fori_loop(0, num_blocks, body, (acc, m_i, l_acc))

        l_i = l_acc.sum(axis=0)
        l_safe = jnp.where(l_i == 0.0, 1.0, l_i)
        o = acc / lax.broadcast_in_dim(l_safe, acc.shape, [1])  # [H, COLS]
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the previous pass's stores have read o_smem
        if num_splits == 1:
            o_smem.T[...] = (o * v_scale_ref[kh] if fp8 else o).astype(o_smem.dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(o_smem.at[pl.ds(col0, group)],
                                    out_ref.at[pl.ds(t * num_heads + kh * group, group)])
        else:
            o_smem[...] = o.astype(o_smem.dtype)
            lse = jnp.where(l_i == 0.0, -jnp.inf, m_i + jnp.log2(l_safe))
            lse_smem[...] = lax.broadcast_in_dim(lse, lse_smem.shape, [1])
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(o_smem, o_ref.at[split, t, kh])
            plgpu.copy_smem_to_gmem(lse_smem.at[pl.ds(0, 1)], lse_ref.at[split, t, kh])
        if fp8:  # the next pass converts V into these bytes
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)

    pl.loop(0, q_len)(run_token)
    plgpu.wait_smem_to_gmem(0)


def own_columns(x, group, *, select=False):
    """x [..., K, A, COLS] (a kv-head's tile: its G q-heads at columns (kh * G) % COLS, the rest another kv-head's)
    -> [..., K, A, G]. `select`: where G divides COLS and K, kv-head a * r + b (r = COLS / G) owns column block b,
    so elementwise selects between static slices pick them, with no index arrays (which `take_along_axis` builds
    as kernels of their own); else a gather of host-constant columns."""
    K, A = x.shape[-3:-1]
    r = COLS // group
    if select and COLS % group == 0 and K % r == 0:
        parts = x.reshape(*x.shape[:-3], K // r, r, A, r, group)  # [..., K / r, b, A, c, G]
        b = np.arange(r).reshape(r, 1, 1)  # host constant: each kv-head's place in its COLS-column box
        out = parts[..., 0, :]
        for c in range(1, r):
            out = jnp.where(b == c, parts[..., c, :], out)
        return out.reshape(*x.shape[:-3], K, A, group)
    # A host constant (no iota kernel). The gather fuses into the merge's reductions; static slices stacked
    # instead cost a concatenation kernel (H200: +1.3 us at b1 ctx32768).
    cols = (np.arange(K)[:, None] * group) % COLS + np.arange(group)[None, :]  # [K, G]
    return jnp.take_along_axis(x, cols.reshape((1,) * (x.ndim - 3) + (K, 1, group)), axis=-1)


def merge_transposed(o_t, lse_t, query_start_loc, seq_lens, num_seqs, *, group, v_scale, out_dtype,
                     select_columns=False):
    """The splits' partials o_t [S, T, K, H, COLS] and lse_t [S, T, K, 1, COLS] -> [T, N, H]: each kv-head's G
    columns (`own_columns`), then the common log-sum-exp merge."""
    S, T, K, H, _ = o_t.shape
    o = own_columns(o_t, group, select=select_columns)  # [S, T, K, H, G]
    lse = own_columns(lse_t, group, select=select_columns)[:, :, :, 0]  # [S, T, K, G]
    o = jnp.swapaxes(o, -1, -2).reshape(S, T * K * group, H)
    lse = lse.reshape(S, T * K * group, 1)
    return merge(o, lse, query_start_loc, seq_lens, num_seqs, T=T, group=group, v_scale=v_scale,
                 out_dtype=out_dtype).reshape(T, K * group, H)


def num_splits_for(R, K, max_kv_len):
    """Default kv splits: >= 256 keys each at the page table's full width, and at least 2 while the grid has fewer
    CTAs than an H200 has SMs; no floor of 8 as on the packed direct path (H200, one request in an 8-token step:
    256 keys 4.1 us at 2-4 splits vs 5.6 at 8; 1024 keys 7.2 at 4 vs 6.9 at 8; 32768 keys best at 32)."""
    splits = default_splits(R, K, max_kv_len, min_split_tokens=DIRECT_MIN_SPLIT)
    return max(splits, 2) if R * K < 132 else splits


def decode_attention(q, k_pages, v_pages, kv_index, page_table, query_start_loc, seq_lens, num_seqs, scales, *,
                     scale, sliding_window, softcap, config, interpret):
    """Traced inside `paged_attention._ragged_paged_attention` (same arguments, caches stacked [L', K, P, page, H]
    with kv_index [2] naming this layer's K and V entries; scales: ([K], [K]) f32 for an fp8 cache, else None)."""
    T, N, H = q.shape
    _, K, _, page_size, _ = k_pages.shape
    R, max_pages = page_table.shape
    num_splits = config.num_splits or num_splits_for(R, K, max_pages * page_size)
    group = N // K
    fp8 = k_pages.dtype == FP8
    if fp8:
        k_scale, v_scale = scales
        if config.quantize_q_kernel:
            q_in, q_scales = quantize_q.quantize_queries(q, K, scale * k_scale, interpret=bool(interpret))
        else:
            q_in, q_scales = quantize_queries(q, K, scale * k_scale)
    else:  # host constants, not broadcasts: no kernel runs to make them (the kernel reads neither for 16 bits)
        v_scale = np.ones((K,), np.float32)
        q_in, q_scales = q.reshape(T * N, H), np.ones((1, K), np.float32)
    pages_in_smem = ids_in_smem(config, max_pages, fp8)
    pt_window = window_size(max_pages, page_size, config.block_kv, num_splits) if config.compact_splits else 0
    pt_window = pt_window if pages_in_smem and num_splits > 1 and pt_window < max_pages else 0
    partial_dtype = q.dtype if config.compact_splits else jnp.float32
    bk, stages = config.block_kv, config.num_stages
    tiled = lambda cols, dt: (plgpu.TilingTransform((8, cols)), plgpu.SwizzleTransform(cols * jnp.dtype(dt).itemsize))
    cdt = jnp.float16 if fp8 else q.dtype  # the PV wgmma's type (fp8: V converted to f16, exact for e4m3)
    ring_t = tiled(H, FP8) if fp8 else tiled(64, q.dtype)
    p_type = plgpu.SMEM((COLS, bk), cdt, transforms=tiled(64, cdt))
    epilogue = (plgpu.SMEM((COLS, H), q.dtype) if num_splits == 1 else plgpu.SMEM((H, COLS), partial_dtype),
                *([] if num_splits == 1 else [plgpu.SMEM((bk, COLS), jnp.float32)]))
    # fp8: v16 and the epilogue's tiles in one union (fp8 64x2 compact: 57 -> 53 KiB, four CTAs per SM)
    middle = ([plgpu.RefUnion(plgpu.SMEM((bk, H), cdt, transforms=tiled(64, cdt)), epilogue), p_type] if fp8
              else [p_type, *epilogue])
    scratch = [
        plgpu.SMEM((COLS, H), q_in.dtype, transforms=ring_t),
        plgpu.SMEM((stages, bk, H), k_pages.dtype, transforms=ring_t),
        plgpu.SMEM((stages, bk, H), k_pages.dtype, transforms=ring_t),
        *middle,
        *([plgpu.SMEM((pt_window or max_pages,), jnp.int32),
           plgpu.Barrier(num_arrivals=-(-(pt_window or max_pages) // PT_BOX))] if pages_in_smem else []),
        plgpu.Barrier(num_arrivals=1),
        plgpu.Barrier(num_arrivals=max(1, bk // page_size), num_barriers=stages),
        plgpu.Barrier(num_arrivals=max(1, bk // page_size), num_barriers=stages),
    ]
    if num_splits == 1:
        out_type = jax.ShapeDtypeStruct((T * N, H), q.dtype)
    else:
        out_type = (jax.ShapeDtypeStruct((num_splits, T, K, H, COLS), partial_dtype),
                    jax.ShapeDtypeStruct((num_splits, T, K, 1, COLS), jnp.float32))
    kwargs = {}
    params = dict(lowering_semantics=plgpu.LoweringSemantics.Lane, approx_math=True)
    if config.profile_dir:  # a per-CTA trace of the named regions in SMEM (kernel_profile.summarize reads it)
        params.update(profile_space=512, profile_dir=config.profile_dir, profile_bounds_check=True)
    if interpret:
        from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
        kwargs["interpret"] = InterpretGPUParams() if interpret is True else interpret
    kernel = plgpu.kernel(
        functools.partial(_kernel, group=group, num_heads=N, page_size=page_size, block_kv=bk, num_stages=stages,
                          num_splits=num_splits, scale=scale, sliding_window=sliding_window, softcap=softcap,
                          pages_in_smem=pages_in_smem, pt_window=pt_window),
        out_type=out_type,
        scratch_types=scratch,
        grid=(R * num_splits, K),
        grid_names=("w", "kh"),
        compiler_params=plgpu.CompilerParams(**params),
        **kwargs,
    )
    out = kernel(query_start_loc, seq_lens, num_seqs.reshape(1), kv_index, page_table, q_in, q_scales, k_pages,
                 v_pages, v_scale)
    if num_splits == 1:
        return out.reshape(T, N, H)
    o_t, lse_t = out
    return merge_transposed(o_t, lse_t, query_start_loc, seq_lens, num_seqs, group=group,
                            v_scale=v_scale if fp8 else None, out_dtype=q.dtype, select_columns=config.select_columns)
