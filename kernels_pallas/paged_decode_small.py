"""Decode attention for a few requests at short context, one kernel (Pallas, Triton lowering): one program per
(token, kv-head) walks the token's whole context. No kv splits, so no merge kernel after it.

Why: in the engine's batch-1 decode step (Llama-3-8B, ~400 cached tokens, H200) attention costs ~7.8 µs a layer
for ~1.6 MB of keys and values: the decode tiles' Mosaic kernel at two splits (6.1 µs: 16 CTAs, each a chain of
TMA waits, wgmmas and a cross-warp softmax per 64-key block) and XLA's merge of the splits (1.7 µs). Here the loads
of a block are plain gathers that Triton pipelines across the loop (num_stages), and the 8 programs write the
final rows themselves. Not yet measured on the GPU: opt-in (`ops.decode_small_active`, IE_JAX_DECODE_SMALL=1).

Layout. The token's N query heads are read in blocks of ROWS = 16 (the smallest M of a Triton dot): program (t, kh)
loads the 16-row block holding its kv-head's G rows, runs S = q K^T and P V for all 16 (the other kv-heads' rows
are finite and never stored) and stores only its G rows. Keys come a block of BLOCK_KEYS at a time: the page ids of
the block from the request's page-table row, then the [pages, page_size, H] gather from the cache seen as
[entries * K * P, page_size, H] (a bitcast). Softmax in base 2, online over the blocks, in f32.

Decode-only steps: every live request has exactly one token, request r's at qsl[0] + r, at position
seq_lens[r] - 1. Tokens outside [qsl[0], qsl[0] + num_seqs) are padding and come back as zeros.
An fp8 (e4m3) cache: K and V are widened to q's dtype in registers (exact), k_scale folds into the scores'
multiplier and v_scale into the output.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from kernels_pallas.kv_cache import FP8

ROWS = 16  # query rows per program: a Triton dot's smallest M
BLOCK_KEYS = 64  # keys per loop step
NUM_WARPS = 4
NUM_STAGES = 2
MAX_KEYS = 4096  # page-table width (keys) up to which ops takes this kernel: one program walks the whole context
_LOG2E = math.log2(math.e)


def supported(q, k_pages, page_table, softcap=None, block_keys: int = BLOCK_KEYS) -> bool:
    """q [T, N, H] 16-bit; k_pages [entries, K, P, page_size, H] of q's dtype or e4m3; G = N / K dividing ROWS,
    N a multiple of ROWS, H 64 or 128, pages tiling the key block; no logit softcap."""
    T, N, H = q.shape
    _, K, _, page_size, Hk = k_pages.shape
    G = N // K if K and N % K == 0 else 0
    return (G > 0 and ROWS % G == 0 and N % ROWS == 0 and H == Hk and H in (64, 128)
            and block_keys % page_size == 0 and q.dtype in (jnp.bfloat16, jnp.float16)
            and k_pages.dtype in (q.dtype, FP8) and softcap is None and page_table.ndim == 2)


def _kernel(qsl_ref, n_ref, seq_lens_ref, kv_index_ref, pt_ref, scales_ref, q_ref, k_ref, v_ref, o_ref, *,
            group, num_kv_heads, num_pages, page_size, block_pages, scale, sliding_window, fp8):
    # q_ref, o_ref [ROWS, H]: the token's 16-row block holding this kv-head's G heads; pt_ref [R, max_pages];
    # k_ref, v_ref [entries * K * P, page_size, H]; scales_ref [2, K] f32 (fp8: k_scale, v_scale; else ones)
    t, kh = pl.program_id(0), pl.program_id(1)
    H = q_ref.shape[-1]
    block_keys = block_pages * page_size
    max_pages = pt_ref.shape[1]
    r = t - qsl_ref[0]
    real = (r >= 0) & (r < n_ref[0])
    row = lax.broadcasted_iota(jnp.int32, (ROWS, H), 0)
    mine = (row >= kh * group % ROWS) & (row < kh * group % ROWS + group)  # this kv-head's G rows of the block

    @pl.when(jnp.logical_not(real))
    def _():
        pltriton.store(o_ref, jnp.zeros((ROWS, H), o_ref.dtype), mask=mine)

    @pl.when(real)
    def _():
        rr = jnp.maximum(r, 0)
        seq_len = seq_lens_ref[rr]
        q_pos = seq_len - 1
        lo = 0 if sliding_window is None else jnp.maximum(q_pos - sliding_window + 1, 0)
        c = scale * _LOG2E * (scales_ref[0, kh] if fp8 else 1.0)
        q = q_ref[...]
        k_base = (kv_index_ref[0] * num_kv_heads + kh) * num_pages
        v_base = (kv_index_ref[1] * num_kv_heads + kh) * num_pages
        first_block = lo // block_keys

        def body(b, carry):
            acc, m_i, l_i = carry
            slots = b * block_pages + jnp.arange(block_pages, dtype=jnp.int32)
            pages = pltriton.load(pt_ref.at[rr, pl.ds(b * block_pages, block_pages)], mask=slots < max_pages,
                                  other=0)
            k = k_ref[k_base + pages].reshape(block_keys, H)
            v = v_ref[v_base + pages].reshape(block_keys, H)
            if fp8:
                k, v = k.astype(jnp.float32).astype(q.dtype), v.astype(jnp.float32).astype(q.dtype)
            s = pltriton.dot(q, k, trans_b=True) * c  # [ROWS, block_keys], base-2 exponents
            key = b * block_keys + lax.broadcasted_iota(jnp.int32, (ROWS, block_keys), 1)
            s = jnp.where((key <= q_pos) & (key >= lo), s, -jnp.inf)
            m_new = jnp.maximum(m_i, s.max(axis=1))
            m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
            alpha = jnp.exp2(m_i - m_safe)
            p = jnp.exp2(s - m_safe[:, None])
            l_i = l_i * alpha + p.sum(axis=1)
            acc = acc * alpha[:, None] + pltriton.dot(p.astype(q.dtype), v)
            return acc, m_new, l_i

        carry = (jnp.zeros((ROWS, H), jnp.float32), jnp.full((ROWS,), -jnp.inf, jnp.float32),
                 jnp.zeros((ROWS,), jnp.float32))
        acc, _, l_i = lax.fori_loop(first_block, pl.cdiv(seq_len, block_keys), body, carry)
        out = acc / jnp.where(l_i == 0.0, 1.0, l_i)[:, None]
        if fp8:
            out = out * scales_ref[1, kh]
        pltriton.store(o_ref, out.astype(o_ref.dtype), mask=mine)


@functools.partial(jax.jit, static_argnames=("scale", "sliding_window", "interpret", "block_keys", "num_warps",
                                             "num_stages"))
def decode_attention(q, k_pages, v_pages, kv_index, page_table, query_start_loc, seq_lens, num_seqs, scales=None, *,
                     scale: float, sliding_window: int | None = None, interpret: bool = False,
                     block_keys: int = BLOCK_KEYS, num_warps: int = NUM_WARPS, num_stages: int = NUM_STAGES):
    """q [T, N, H]; k_pages, v_pages [entries, K, P, page_size, H] (the same interleaved buffer in the engine) with
    kv_index [2] int32 naming this layer's K and V entries; page_table [R, max_pages]; query_start_loc [R + 1];
    seq_lens [R]; num_seqs []; scales (k_scale [K], v_scale [K]) for an fp8 cache -> [T, N, H] in q's dtype."""
    T, N, H = q.shape
    entries, K, P, page_size, _ = k_pages.shape
    if not supported(q, k_pages, page_table, block_keys=block_keys):
        raise ValueError(f"{q.shape=} {q.dtype=} {k_pages.shape=} {k_pages.dtype=}: unsupported (need N / K "
                         f"dividing {ROWS}, N a multiple of {ROWS}, H 64 or 128, pages tiling {block_keys} keys)")
    fp8 = k_pages.dtype == FP8
    if fp8 and scales is None:
        raise ValueError("an fp8 cache needs (k_scale, v_scale)")
    scale_arr = jnp.stack([jnp.asarray(s, jnp.float32) for s in scales]) if fp8 else jnp.ones((2, K), jnp.float32)
    flat = lambda x: x.reshape(entries * K * P, page_size, H)  # noqa: E731  (a bitcast)
    whole = lambda x: pl.BlockSpec(x.shape, lambda t, h: (0,) * x.ndim)  # noqa: E731
    block = pl.BlockSpec((None, ROWS, H), lambda t, h: (t, h * (N // K) // ROWS, 0))
    args = [query_start_loc, jnp.reshape(num_seqs, (1,)).astype(jnp.int32), seq_lens, kv_index, page_table, scale_arr,
            q, flat(k_pages), flat(v_pages)]
    params = {}
    if not interpret:
        params = dict(compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages))
    return pl.pallas_call(
        functools.partial(_kernel, group=N // K, num_kv_heads=K, num_pages=P, page_size=page_size,
                          block_pages=block_keys // page_size, scale=float(scale), sliding_window=sliding_window,
                          fp8=fp8),
        out_shape=jax.ShapeDtypeStruct((T, N, H), q.dtype),
        grid=(T, K),
        in_specs=[*map(whole, args[:6]), block, whole(args[7]), whole(args[8])],
        out_specs=block,
        interpret=interpret,
        **params,
    )(*args)
