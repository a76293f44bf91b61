"""Ragged paged attention for Hopper in Pallas Mosaic GPU: decode tokens and prefill chunks in one call.

Shapes (letters as everywhere in the project): T flat query tokens of R requests, N q-heads, K kv-heads,
G = N // K q-heads per kv-head, H head dim, P pages of `page_size` tokens.

The KV cache is `k_pages, v_pages [K, P, page_size, H]` for one layer, or the serving engine's stacked
`[L, K, P, page_size, H]` for all layers plus a traced `layer` index (see kv_cache.py). One kv-head's page is a
single contiguous `page_size * H` block, so every page is one dense TMA box; the layer only moves the box's
source, so the kernel never slices (copies) one layer out of the stacked buffer.

How the work is cut. The q-heads of a kv-head are packed as rows of the wgmma tile: row `i` of a request's
packed queries is token `i // G`, head `i % G`. A *tile* is 64 such rows of one request (16 tokens when G = 4; a
decode token is one tile with G real rows). Each CTA owns one (tile, kv split, kv-head): it streams its range of
pages through a ring of shared-memory slots with TMA, runs QK^T and PV on the tensor cores with an online
softmax, and stores exactly the tile's own rows of the normalised output (packed like q) and its log-sum-exp.
A plain-jnp epilogue merges the splits (flash-decoding) and unpacks rows back to `[T, N, H]` (the direct path can
merge inside the kernel instead, `merge_in_kernel`). The work list (which tile, which kv range) is built in jnp
from `query_start_loc`/`seq_lens` (paged_work.py), so the grid is static while the batch is ragged.

This module knows nothing about models, schedulers or how pages are allocated: it reads a page table.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from kernels_pallas import paged_decode
from kernels_pallas.kv_cache import FP8, write_kv, write_kv_reference  # noqa: F401  (re-exported)
from kernels_pallas.paged_config import TuningConfig
from kernels_pallas.paged_reference import paged_attention_reference  # noqa: F401  (re-exported)
from kernels_pallas.paged_work import (LSE_COLS, META, PT_BOX, PT_SMEM_MAX, ROWS, check_args,  # noqa: F401
                                      cluster_merge, default_splits, fuses_merge, ids_in_smem, kv_scales, kv_split,
                                      mask_block, merge, pack_queries, request_lengths, shapes_supported, use_direct,
                                      work_list,
                                      zero_padding_rows)

_LOG2E = math.log2(math.e)


# ----------------------------------------------------------------------------------------------------------------
# Kernel


def _kernel(work_ref, seq_lens_ref, num_seqs_ref, layer_ref, page_table_ref, q_ref, k_ref, v_ref, *refs,
            group, page_size, block_kv, num_stages, num_splits, scale, sliding_window, softcap, convert_wg,
            p_in_registers, convert_ahead, prefetch_pages, direct, num_heads, fused, pages_in_smem, q_in_registers,
            interpret):
    # work_ref        packed: [W, 8] int32 work items (GMEM, read as scalars; fields in paged_work.work_list)
    #                 direct: [R + 1] int32 query_start_loc; the CTA derives its item itself (direct_item)
    # seq_lens_ref    [R] int32, num_seqs_ref [1] int32 (read by the direct path only)
    # layer_ref       [2] int32          which entries of the stacked caches hold this layer's K and V
    # page_table_ref  [R, max_pages] int32
    # q_ref           [K, Tq, H]         packed queries, Tq >= T * G + ROWS; direct: [T * N, H] (q as given)
    # k_ref, v_ref    [L, K, P, page_size, H] (or one interleaved [2L, ...] buffer passed as both)
    # v_scale_ref     [K] f32            fused only: multiplies each kv-head's output (ones for a 16-bit cache)
    # o_ref           [S, K, Tq, H]      normalised output per split, packed rows like q_ref (q dtype);
    #                 direct: [S, T * N, H], rows in q's order; fused: f32, S > 1 only
    # lse_ref         [S, K, Tq, LSE_COLS] f32  base-2 log-sum-exp per packed row like o_ref (-inf where a row saw
    #                 no key), repeated LSE_COLS times so that a one-row TMA box spans 16+ bytes; S > 1 only;
    #                 fused: [S, T * N, H], repeated H times (the merge loads it in o's register layout)
    # out_ref         [T * N, H]         fused only: the final output in q's order and dtype
    # q_smem          [ROWS, H]          the tile's queries
    # k_smem, v_smem  [num_stages, block_kv, H]
    # p_smem          [ROWS, block_kv]   probabilities, the A operand of PV (None with p_in_registers)
    # o_smem          [ROWS, H]          the tile's output, untiled so that any row range can be stored
    # lse_smem        [ROWS, LSE_COLS] f32 (fused: [ROWS, H])
    # k16_smem, v16_smem [block_kv, H]  fp8 cache: k_smem/v_smem hold the fp8 pages and these the converted
    #                 block (q's dtype) that the wgmmas read; None for a 16-bit cache
    # buffers         a union: ((k_smem, v_smem, p_smem, k16_smem, v16_smem), (o_smem, lse_smem)), the loop's
    #                 buffers and the epilogue's, whose lifetimes do not overlap (every issued TMA is consumed)
    # merge_bar       fused with S > 1: the cluster barrier that publishes the splits' rows to the merging CTA
    # handoff         convert_wg only: barriers (k16_ready, v16_ready, k16_free, v16_free), one phase per block,
    #                 between the converting warpgroup (1) and the computing one (0)
    v_scale_ref, o_ref, lse_ref, out_ref, *refs = refs if fused else (None, *refs[:2], None, *refs[2:])
    if q_in_registers:  # q's SMEM is the first member of the union (read before the ring is filled)
        (q_smem, *buffers), q_bar, k_bar, v_bar, *handoff = refs
    else:
        q_smem, buffers, q_bar, k_bar, v_bar, *handoff = refs
    pt_smem, pt_bar = handoff[:2] if pages_in_smem else (None, None)
    handoff = handoff[2:] if pages_in_smem else handoff
    clustered = fused and num_splits > 1  # the splits of a (request, kv-head) form one cluster
    merge_bar = handoff.pop(0) if clustered else None
    w = lax.axis_index("w")
    kh = lax.axis_index("kh")
    head_dim = q_smem.shape[-1]
    (k_smem, v_smem, p_smem, k16_smem, v16_smem), (o_smem, lse_smem) = buffers
    fp8 = k16_smem is not None
    if convert_wg:
        k16_ready, v16_ready, k16_free, v16_free = handoff

    split = lax.axis_index("s") if clustered else lax.rem(w, num_splits)

    def run_tile(req, q_row0, q_pos0, kv_begin, kv_end, last_page, num_rows):
        # req: request; q_row0: first packed row in q_ref[kh] (direct: first row of q_ref, token-major);
        # q_pos0: position of the tile's first token; [kv_begin, kv_end): this split's keys (kv_begin
        # page-aligned); last_page: last page-table column the tile may touch; num_rows: rows of this tile that
        # belong to its request (direct: tokens)
        num_blocks = pl.cdiv(jnp.maximum(kv_end - kv_begin, 0), block_kv)
        first_page = kv_begin // page_size
        # direct: q's ROWS-row box starts at the tile's first token unless that runs past q's end; then it is
        # moved back and the tile's rows start `row_shift` rows into it
        row_shift = q_row0 - jnp.minimum(q_row0, q_ref.shape[0] - min(ROWS, q_ref.shape[0])) if direct else 0
        k_layer = k_ref.at[layer_ref[0]]  # [K, P, page_size, H]: a view, the TMA source moves by one layer
        v_layer = v_ref.at[layer_ref[1]]

        def page_ids(block):
            # The page-table entries of `block` (scalar loads from SMEM or GMEM, clamped to a valid column past the
            # end).
            load = (lambda i: pt_smem[i]) if pages_in_smem else (lambda i: page_table_ref[req, i])
            if block_kv >= page_size:  # whole pages
                first = first_page + block * (block_kv // page_size)
                return [load(jnp.minimum(first + p, last_page)) for p in range(block_kv // page_size)]
            return [load(jnp.minimum((kv_begin + block * block_kv) // page_size, last_page))]

        def issue(block, slot, pages=None):
            pages = page_ids(block) if pages is None else pages
            if block_kv >= page_size:
                for p, page in enumerate(pages):
                    rows = pl.ds(p * page_size, page_size)
                    plgpu.copy_gmem_to_smem(k_layer.at[kh, page], k_smem.at[slot, rows], k_bar.at[slot])
                    plgpu.copy_gmem_to_smem(v_layer.at[kh, page], v_smem.at[slot, rows], v_bar.at[slot])
            else:  # a slice of one page
                rows = pl.ds(lax.rem(kv_begin + block * block_kv, page_size), block_kv)
                plgpu.copy_gmem_to_smem(k_layer.at[kh, pages[0], rows], k_smem.at[slot], k_bar.at[slot])
                plgpu.copy_gmem_to_smem(v_layer.at[kh, pages[0], rows], v_smem.at[slot], v_bar.at[slot])

        def refill(block, slot, pages=None):
            @pl.when(block + num_stages < num_blocks)
            def _():
                issue(block + num_stages, slot, pages)

        def prefetch(block):
            # With prefetch_pages, the refill's page ids are loaded at the top of the block's step and used at its
            # end, so their GMEM latency overlaps the wgmmas instead of sitting in front of each TMA.
            with jax.named_scope("page_ids"):
                return page_ids(block + num_stages) if prefetch_pages else None

        def convert(src_smem, dst_smem):
            # fp8 -> 16 bits through registers. The 2x-upcast layout reads 8 fp8 bytes and writes 16 bytes per
            # thread access, with a bank-conflict-free plan for the swizzled buffers on both sides. The commit
            # makes the generic-proxy stores visible to the wgmma (async proxy) and, being a warpgroup barrier,
            # also means every thread is done reading the fp8 slot.
            dst_smem[...] = plgpu.load(src_smem, layout=plgpu.Layout.WGMMA_UPCAST_2X).astype(dst_smem.dtype)
            plgpu.commit_smem()

        def converting_warpgroup():  # only with convert_wg: TMA ring in, f16 block out, one block ahead
            for s in range(num_stages):
                pl.when(s < num_blocks)(functools.partial(issue, s, s))

            @pl.loop(0, num_blocks)
            def _(block):
                slot = lax.rem(block, num_stages)
                next_pages = prefetch(block)
                plgpu.barrier_wait(k_bar.at[slot])
                pl.when(block > 0)(lambda: plgpu.barrier_wait(k16_free))  # QK^T of the previous block is done
                convert(k_smem.at[slot], k16_smem)
                plgpu.barrier_arrive(k16_ready)
                plgpu.barrier_wait(v_bar.at[slot])
                pl.when(block > 0)(lambda: plgpu.barrier_wait(v16_free))  # PV of the previous block is done
                convert(v_smem.at[slot], v16_smem)
                plgpu.barrier_arrive(v16_ready)
                refill(block, slot, next_pages)

            @pl.when(num_blocks > 0)
            def _():  # observe the last block's handoff phases too: every phase of a barrier has a waiter
                plgpu.barrier_wait(k16_free)
                plgpu.barrier_wait(v16_free)

        def computing_warpgroup():
            if direct:  # ROWS rows of q [T * N, H] from the tile's first token on, all heads (see row_shift)
                box = min(ROWS, q_ref.shape[0])
                plgpu.copy_gmem_to_smem(q_ref.at[pl.ds(q_row0 - row_shift, box)],
                                        q_smem if box == ROWS else q_smem.at[pl.ds(0, box)], q_bar)
            else:
                plgpu.copy_gmem_to_smem(q_ref.at[kh, pl.ds(q_row0, ROWS)], q_smem, q_bar)
            if pages_in_smem:  # the request's page-table row, in boxes of PT_BOX ids
                for c0 in range(0, pt_smem.shape[0], PT_BOX):
                    ids = pl.ds(c0, min(PT_BOX, pt_smem.shape[0] - c0))
                    plgpu.copy_gmem_to_smem(page_table_ref.at[req, ids], pt_smem.at[ids], pt_bar)
                plgpu.barrier_wait(pt_bar)
            def fill_ring():
                if not convert_wg:
                    for s in range(num_stages):
                        pl.when(s < num_blocks)(functools.partial(issue, s, s))

            q_operand = q_smem
            if q_in_registers:  # q's SMEM belongs to the ring: read q first, then fill the ring
                plgpu.barrier_wait(q_bar)
                q_operand = plgpu.load(q_smem, layout=plgpu.Layout.WGMMA)
                plgpu.commit_smem()  # every thread holds its q rows before the TMAs overwrite them
                fill_ring()
            else:
                fill_ring()
                plgpu.barrier_wait(q_bar)
            row = plgpu.broadcasted_iota(jnp.int32, (ROWS, block_kv), 0, layout=plgpu.Layout.WGMMA)
            # direct: rows are (token, q-head) of all N heads; the other kv-heads' rows are computed and dropped
            row_pos = q_pos0 + ((row - row_shift) // num_heads if direct else row // group)
            col = plgpu.broadcasted_iota(jnp.int32, (ROWS, block_kv), 1, layout=plgpu.Layout.WGMMA)
            if convert_ahead:
                @pl.when(num_blocks > 0)
                def _():
                    plgpu.barrier_wait(k_bar.at[0])
                    convert(k_smem.at[0], k16_smem)

            def convert_next_k(block):  # while PV(block) runs; K16 is free since QK^T(block) completed
                if convert_ahead:
                    @pl.when(block + 1 < num_blocks)
                    def _():
                        next_slot = lax.rem(block + 1, num_stages)
                        plgpu.barrier_wait(k_bar.at[next_slot])
                        convert(k_smem.at[next_slot], k16_smem)

            def body(block, carry):
                acc, m_i, l_i = carry  # [ROWS, H] f32, [ROWS] f32 (base-2 max), [ROWS] f32
                slot = lax.rem(block, num_stages)
                next_pages = None if convert_wg else prefetch(block)
                with jax.named_scope("wait_k"):  # named scopes: the phases that `profile_dir` records
                    if convert_wg:
                        plgpu.barrier_wait(k16_ready)
                    elif not convert_ahead:
                        plgpu.barrier_wait(k_bar.at[slot])

                if convert_wg:
                    def qk(acc_ref):
                        plgpu.wgmma(acc_ref, q_operand, k16_smem.T)
                        return acc_ref[...]
                elif fp8:  # one warpgroup: convert K, start QK^T, convert V while it runs, then free the slot
                    if not convert_ahead:
                        convert(k_smem.at[slot], k16_smem)

                    def qk(acc_ref):
                        plgpu.wgmma(acc_ref, q_operand, k16_smem.T)
                        with jax.named_scope("wait_v"):
                            plgpu.barrier_wait(v_bar.at[slot])
                        with jax.named_scope("convert_v"):
                            convert(v_smem.at[slot], v16_smem)
                        with jax.named_scope("refill"):
                            refill(block, slot, next_pages)
                        with jax.named_scope("qk_wait"):
                            return acc_ref[...]
                else:
                    def qk(acc_ref):
                        plgpu.wgmma(acc_ref, q_operand, k_smem.at[slot].T)
                        with jax.named_scope("qk_wait"):
                            return acc_ref[...]

                s = pl.run_scoped(qk, plgpu.ACC((ROWS, block_kv), jnp.float32))  # [ROWS, block_kv]
                if convert_wg:
                    plgpu.barrier_arrive(k16_free)
                with jax.named_scope("softmax"):
                    # Scores stay unscaled until the exponent: max commutes with a positive scale, so
                    # p = 2^(s * c - m) is one FMA per score (m is the base-2 max, already times c).
                    c = scale * _LOG2E
                    if softcap is not None or c <= 0:
                        s = jnp.tanh(s * (scale / softcap)) * (softcap * _LOG2E) if softcap else s * c
                        c = 1.0
                    s = mask_block(s, kv_begin + block * block_kv, col, row_pos, q_pos0, kv_end, block_kv=block_kv,
                                   sliding_window=sliding_window)
                    m_new = jnp.maximum(m_i, s.max(axis=1) * c)
                    m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
                    alpha = jnp.exp2(m_i - m_safe)
                    p = jnp.exp2(s * c - lax.broadcast_in_dim(m_safe, s.shape, [0]))
                    l_i = l_i * alpha + p.sum(axis=1)
                    acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
                with jax.named_scope("wait_v"):
                    if convert_wg:
                        plgpu.barrier_wait(v16_ready)
                    elif not fp8:
                        plgpu.barrier_wait(v_bar.at[slot])
                v_block = v16_smem if fp8 else v_smem.at[slot]

                if p_in_registers:  # GPU only: register A operand, the accumulator carried into the wgmma
                    p16 = p.astype(q_smem.dtype)

                    def pv(acc_ref):
                        plgpu.wgmma(acc_ref, p16, v_block)
                        with jax.named_scope("convert_k"):
                            convert_next_k(block)
                    with jax.named_scope("pv"):
                        acc = pl.run_state(pv)(plgpu.ACC.init(acc))
                else:
                    p_smem[...] = p.astype(p_smem.dtype)
                    plgpu.commit_smem()

                    def pv(acc_ref):
                        plgpu.wgmma(acc_ref, p_smem, v_block)
                        convert_next_k(block)
                        return acc_ref[...]
                    acc = acc + pl.run_scoped(pv, plgpu.ACC((ROWS, head_dim), jnp.float32))
                if convert_wg:
                    plgpu.barrier_arrive(v16_free)
                elif not fp8:
                    with jax.named_scope("refill"):
                        refill(block, slot, next_pages)
                return acc, m_new, l_i

            acc = plgpu.layout_cast(jnp.zeros((ROWS, head_dim), jnp.float32), plgpu.Layout.WGMMA)
            m_i = plgpu.layout_cast(jnp.full((ROWS,), -jnp.inf, jnp.float32), plgpu.Layout.WGMMA.reduce(1))
            l_i = plgpu.layout_cast(jnp.zeros((ROWS,), jnp.float32), plgpu.Layout.WGMMA.reduce(1))
            acc, m_i, l_i = lax.fori_loop(0, num_blocks, body, (acc, m_i, l_i))

            l_safe = jnp.where(l_i == 0.0, 1.0, l_i)
            o = acc / lax.broadcast_in_dim(l_safe, acc.shape, [0])
            if fused and num_splits == 1:  # the final output: the fp8 cache's v_scale applies here
                o = o * v_scale_ref[kh]
            o_smem[...] = o.astype(o_smem.dtype)
            if num_splits > 1:
                lse = jnp.where(l_i == 0.0, -jnp.inf, m_i + jnp.log2(l_safe))  # [ROWS]
                lse_smem[...] = lax.broadcast_in_dim(lse, lse_smem.shape, [0])
            plgpu.commit_smem()
            if direct:  # each token's G rows of this kv-head go to their place in [T * N, H]
                dst_ref = out_ref if fused and num_splits == 1 else o_ref.at[split]
                for j in range(ROWS // num_heads):
                    @pl.when(j < num_rows)
                    def _(j=j):
                        src = pl.ds(row_shift + j * num_heads + kh * group, group)
                        dst = pl.ds(q_row0 + j * num_heads + kh * group, group)
                        plgpu.copy_smem_to_gmem(o_smem.at[src], dst_ref.at[dst])
                        if num_splits > 1:
                            plgpu.copy_smem_to_gmem(lse_smem.at[src], lse_ref.at[split, dst])
            # Store exactly `num_rows` rows (the next request's rows follow in o_ref): TMA boxes have static
            # sizes, so write the row count's binary digits, largest first.
            start = 0
            size = 0 if direct else ROWS
            while size >= 1:
                @pl.when((num_rows & size) != 0)
                def _(size=size, start=start):
                    rows = pl.ds(q_row0 + start, size)
                    plgpu.copy_smem_to_gmem(o_smem.at[pl.ds(start, size)], o_ref.at[split, kh, rows])
                    if num_splits > 1:
                        plgpu.copy_smem_to_gmem(lse_smem.at[pl.ds(start, size)], lse_ref.at[split, kh, rows])
                start = start + (num_rows & size)
                size //= 2
            plgpu.wait_smem_to_gmem(0)  # the writes done, not only the SMEM reads: the cluster merge reads them
            if clustered:
                cluster_merge(o_ref, lse_ref, out_ref, v_scale_ref[kh], merge_bar, split=split, kh=kh, row0=q_row0,
                              num_tokens=num_rows, num_heads=num_heads, group=group, interpret=interpret)

        if convert_wg:
            pl.when(lax.axis_index("wg") == 1)(converting_warpgroup)
            pl.when(lax.axis_index("wg") == 0)(computing_warpgroup)
        else:
            computing_warpgroup()

    if not direct:
        pl.when(work_ref[w, 0] > 0)(lambda: run_tile(*[work_ref[w, i] for i in range(1, META)]))
        return
    # direct: CTA (request, split) walks its request's tokens ROWS // N at a time (one pass for a decode token)
    tokens_per_tile = ROWS // num_heads
    req = w if clustered else w // num_splits
    if fused:  # one CTA per kv-head writes the zeros of padding tokens (the merge kernel did that before)
        pl.when((req == 0) & (split == 0))(lambda: zero_padding_rows(
            out_ref, work_ref, num_seqs_ref, kh=kh, group=group, num_heads=num_heads))
    q_start = work_ref[req]
    q_len = jnp.where(req < num_seqs_ref[0], jnp.maximum(work_ref[req + 1] - q_start, 0), 0)
    seq_len = seq_lens_ref[req]

    @pl.loop(0, pl.cdiv(q_len, tokens_per_tile))
    def _(sub):
        tok0 = sub * tokens_per_tile
        num_tokens = jnp.minimum(q_len - tok0, tokens_per_tile)
        q_pos0 = seq_len - q_len + tok0
        kv_hi = q_pos0 + num_tokens
        begin, end = kv_split(q_pos0, kv_hi, split, num_splits=num_splits, page_size=page_size, block_kv=block_kv,
                              sliding_window=sliding_window)
        run_tile(req, (q_start + tok0) * num_heads, q_pos0, begin, end, jnp.maximum(kv_hi - 1, 0) // page_size,
                 num_tokens)


def _call_kernel(work, seq_lens, num_seqs, layer, page_table, q_packed, k_pages, v_pages, v_scale, *, group, config,
                 num_work, num_splits, scale, sliding_window, softcap, interpret, direct, out_dtype):
    # v_scale [K] f32 or None: given exactly when the merge is fused into the kernel (direct path)
    _, K, P, page_size, H = k_pages.shape
    dtype = q_packed.dtype
    fp8 = k_pages.dtype == FP8
    convert_wg = fp8 and config.convert_wg
    convert_ahead = fp8 and not convert_wg and config.convert_ahead
    copies_per_slot = max(1, config.block_kv // page_size)
    max_pages = page_table.shape[1]
    pages_in_smem = ids_in_smem(config, max_pages, fp8)
    tiling = plgpu.TilingTransform((8, 64))
    swizzle = plgpu.SwizzleTransform(128)
    # P [ROWS, block_kv] and V [block_kv, H] meet in one wgmma and must share a swizzle; a 32-key block only
    # fills a 64-byte one.
    pv_transforms = (plgpu.TilingTransform((8, min(64, config.block_kv))),
                     plgpu.SwizzleTransform(min(128, 2 * config.block_kv)))
    ring = [plgpu.SMEM((config.num_stages, config.block_kv, H), k_pages.dtype, transforms=(tiling, swizzle)),
            plgpu.SMEM((config.num_stages, config.block_kv, H), v_pages.dtype, transforms=pv_transforms)]
    kv16 = [None, None]
    if fp8:  # fp8 rows are H bytes: one swizzle span of H bytes each; then 16-bit copies
        fp8_transforms = (plgpu.TilingTransform((8, H)), plgpu.SwizzleTransform(H))
        ring = [plgpu.SMEM((config.num_stages, config.block_kv, H), FP8, transforms=fp8_transforms)] * 2
        kv16 = [plgpu.SMEM((config.block_kv, H), dtype, transforms=(tiling, swizzle)),
                plgpu.SMEM((config.block_kv, H), dtype, transforms=pv_transforms)]
    p_type = None if config.p_in_registers else plgpu.SMEM((ROWS, config.block_kv), dtype, transforms=pv_transforms)
    body = functools.partial(
        _kernel, group=group, page_size=page_size, block_kv=config.block_kv, num_stages=config.num_stages,
        num_splits=num_splits, scale=scale, sliding_window=sliding_window, softcap=softcap, convert_wg=convert_wg,
        p_in_registers=config.p_in_registers, convert_ahead=convert_ahead, prefetch_pages=config.prefetch_pages,
        direct=direct, num_heads=K * group, fused=v_scale is not None, pages_in_smem=pages_in_smem,
        q_in_registers=config.q_in_registers, interpret=bool(interpret))
    rows = q_packed.shape[-2]  # packed: per kv-head; direct: T * N, all heads
    o_shape = (num_splits, rows, H) if direct else (num_splits, K, rows, H)
    o_dtype, lse_cols, epilogue_dtype = dtype, LSE_COLS, dtype
    kwargs, out_type, inputs, merge_bar = {}, [], [], []
    if v_scale is not None:  # fused: the final [T * N, H] out; with splits f32 partials, lse repeated H times
        inputs, out_type = [v_scale], [jax.ShapeDtypeStruct((rows, H), out_dtype)]
        if num_splits > 1:
            o_dtype, lse_cols, epilogue_dtype = jnp.float32, H, jnp.float32
            kwargs.update(cluster=(num_splits,), cluster_names=("s",))
            merge_bar = [plgpu.ClusterBarrier(collective_axes=("s",), num_arrivals=1)]
            num_work //= num_splits
        else:
            o_shape, epilogue_dtype = (1, 8, H), out_dtype  # the partials are not used
    q_type = plgpu.SMEM((ROWS, H), dtype, transforms=(tiling, swizzle))
    epilogue = (plgpu.SMEM((ROWS, H), epilogue_dtype), plgpu.SMEM((ROWS, lse_cols), jnp.float32))
    loop = (*ring, p_type, *kv16)
    params = dict(lowering_semantics=plgpu.LoweringSemantics.Lane, approx_math=True, reduction_scratch_bytes=0)
    if config.profile_dir:  # the trace lives in SMEM (8 KiB here, occupancy unchanged); it keeps the first ~500 regions
        params.update(profile_space=512, profile_dir=config.profile_dir, profile_bounds_check=True)
    if interpret:
        from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
        kwargs["interpret"] = InterpretGPUParams() if interpret is True else interpret
    if convert_wg:
        kwargs.update(num_threads=2, thread_name="wg")
    kernel = plgpu.kernel(
        body,
        out_type=(jax.ShapeDtypeStruct(o_shape, o_dtype),
                  jax.ShapeDtypeStruct((*o_shape[:-2], rows if num_splits > 1 else 1, lse_cols), jnp.float32),
                  *out_type),
        scratch_types=[
            *([plgpu.RefUnion(q_type, loop, epilogue)] if config.q_in_registers
              else [q_type, plgpu.RefUnion(loop, epilogue)]),
            plgpu.Barrier(num_arrivals=1),
            plgpu.Barrier(num_arrivals=copies_per_slot, num_barriers=config.num_stages),
            plgpu.Barrier(num_arrivals=copies_per_slot, num_barriers=config.num_stages),
            *([plgpu.SMEM((max_pages,), jnp.int32), plgpu.Barrier(num_arrivals=-(-max_pages // PT_BOX))]
              if pages_in_smem else []),
            *merge_bar,
            *([plgpu.Barrier(num_arrivals=1)] * 4 if convert_wg else []),  # k16/v16 ready, k16/v16 free
        ],
        grid=(num_work, K),
        grid_names=("w", "kh"),
        compiler_params=plgpu.CompilerParams(**params),
        **kwargs,
    )
    return kernel(work, seq_lens, num_seqs.reshape(1), layer, page_table, q_packed, k_pages, v_pages, *inputs)


# ----------------------------------------------------------------------------------------------------------------
# Public wrapper


def kernel_supports(q, k_pages, config=None) -> bool:
    """Whether the Mosaic kernel takes these shapes (otherwise use the reference). k_pages: one layer or stacked."""
    return shapes_supported(q, k_pages, config or TuningConfig())


def ragged_paged_attention(q, k_pages, v_pages, page_table, query_start_loc, seq_lens, num_seqs, *, layer=None,
                           sm_scale=None, sliding_window=None, softcap=None, k_scale=None, v_scale=None,
                           config=None, interpret=False):
    """Causal attention of flat ragged queries `q [T, N, H]` over a paged cache.

    An fp8 (e4m3) cache holds K / k_scale and V / v_scale, with f32 scales per kv-head (`[K]`, or `[L, K]` for a
    stacked cache; None = 1). The kernel fetches fp8 pages and turns them into f16 in shared memory (exact for
    e4m3) before the wgmmas, which then run in f16: q enters pre-multiplied by `sm_scale * k_scale` (clamped to
    f16's range) and v_scale multiplies the output.

    The cache is one layer `[K, P, page_size, H]` (layer=None), or all layers `[L, K, P, page_size, H]` with an
    int32 `layer` (may be traced, e.g. a layer-scan index) naming the one to read; the kernel indexes it in place.
    With v_pages=None, k_pages is one interleaved buffer `[2L, K, P, page_size, H]` holding layer l's K at 2l and
    its V at 2l + 1 (the engine's cache: one scatter writes a step's K and V); scales stay `[L, K]`.
    Request r owns queries `q[query_start_loc[r]:query_start_loc[r + 1]]`, the last tokens of its sequence of
    `seq_lens[r]` cached tokens (already written). Rows r >= num_seqs are padding. Returns `[T, N, H]`; tokens
    past `query_start_loc[num_seqs]` come back as zeros. A layer index outside [0, L) is undefined behaviour.
    """
    check_args(q, k_pages, v_pages, layer, page_table, query_start_loc, seq_lens, num_seqs, sliding_window,
                softcap, k_scale, v_scale)
    config = config or TuningConfig()
    if not kernel_supports(q, k_pages, config):
        raise ValueError(f"{q.shape=} {q.dtype=} {k_pages.shape=} {k_pages.dtype=} {config=}: unsupported by the "
                         f"kernel (need H in (64, 128), page_size and block_kv multiples of each other, 64 % G == 0, "
                         f"a 16-bit q and a cache of q's dtype or float8_e4m3fn, block_kv >= 64 for fp8)")
    for option in ("p_in_registers", "q_in_registers"):
        if getattr(config, option) and interpret:
            raise ValueError(f"{option}=True needs the GPU: the interpreter has no register A operand")
    if config.q_in_registers and config.convert_wg:
        raise ValueError("q_in_registers does not combine with convert_wg")
    if config.p_in_registers is None:
        config = dataclasses.replace(config, p_in_registers=not interpret)
    scales = kv_scales(k_pages, k_scale, v_scale, v_pages) if k_pages.dtype == FP8 else None
    if layer is None:  # one layer is the stacked case with L = 1 (a bitcast, no copy)
        k_pages, v_pages, layer = k_pages[None], v_pages[None], 0
        scales = None if scales is None else (scales[0][None], scales[1][None])
    layer = jnp.asarray(layer, jnp.int32).reshape(())
    if v_pages is None:  # the same buffer serves as both operands; K and V sit at different entries
        v_pages, kv_index = k_pages, jnp.stack([2 * layer, 2 * layer + 1])
    else:
        kv_index = jnp.stack([layer, layer])
    scales = None if scales is None else (scales[0][layer], scales[1][layer])  # [K] each
    return _ragged_paged_attention(q, k_pages, v_pages, kv_index, page_table,
                                   query_start_loc, seq_lens, jnp.asarray(num_seqs, jnp.int32).reshape(()),
                                   scales, sm_scale=sm_scale, sliding_window=sliding_window, softcap=softcap,
                                   config=config, interpret=interpret)


@functools.partial(jax.jit, static_argnames=("sm_scale", "sliding_window", "softcap", "config", "interpret"))
def _ragged_paged_attention(q, k_pages, v_pages, layer, page_table, query_start_loc, seq_lens, num_seqs, scales, *,
                            sm_scale, sliding_window, softcap, config, interpret):
    T, N, H = q.shape
    _, K, _, page_size, _ = k_pages.shape
    R, max_pages = page_table.shape
    group = N // K
    scale = H ** -0.5 if sm_scale is None else float(sm_scale)
    direct = use_direct(T, N, R, config)
    max_tiles = R if direct else max(1, min(T, T * group // ROWS + R))
    num_splits = config.num_splits or default_splits(max_tiles, K, max_pages * page_size, direct=direct)
    k_scale, v_scale = (None, None) if scales is None else scales  # [K]
    if config.decode_tiles and paged_decode.supported(q, k_pages, config):
        return paged_decode.decode_attention(
            q, k_pages, v_pages, layer, page_table, query_start_loc, seq_lens, num_seqs, scales, scale=scale,
            sliding_window=sliding_window, softcap=softcap, config=config, interpret=interpret)
    q_scale = None if scales is None else scale * k_scale
    if direct:  # the CTAs read qsl / seq_lens themselves and q in its own order: no work-list or packing kernels
        work, num_work = query_start_loc, R * num_splits
        q_packed = q.reshape(T * N, H) if q_scale is None else pack_queries(q, K, q_scale, token_major=True)
    else:
        work = work_list(query_start_loc, seq_lens, num_seqs, group=group, max_tiles=max_tiles,
                         num_splits=num_splits, page_size=page_size, block_kv=config.block_kv,
                         sliding_window=sliding_window)
        num_work = work.shape[0]
        q_packed = pack_queries(q, K, q_scale)
    fused = direct and fuses_merge(num_splits, group, H, config)  # then the kernel applies v_scale (ones: bf16)
    o_parts, lse_rows, *out = _call_kernel(
        work, seq_lens, num_seqs, layer, page_table, q_packed, k_pages, v_pages,
        (jnp.ones((K,), jnp.float32) if v_scale is None else v_scale) if fused else None,
        group=group, config=config, num_work=num_work, num_splits=num_splits, scale=scale if scales is None else 1.0,
        sliding_window=sliding_window, softcap=softcap, interpret=interpret, direct=direct, out_dtype=q.dtype)
    if fused:  # the kernel wrote the final output, padding tokens included
        return out[0].reshape(T, N, H)
    out = merge(o_parts, lse_rows, query_start_loc, seq_lens, num_seqs, T=T, group=group,
                v_scale=v_scale, out_dtype=q.dtype)
    return out.reshape(T, N, H)

