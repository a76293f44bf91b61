"""Benchmark inputs and timing for ragged paged attention (`python scripts/bench_kernels.py paged`).

The sweep itself, with its correctness checks and the same-run baseline, is `paged_attention.main`; this module
only builds the random cases (caches large enough that L2 never holds the KV) and times calls with CUPTI.
"""
from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp

from kernels_pallas.kv_cache import FP8


def bench_case(name, seq_lens, q_lens, *, N=32, K=8, H=128, page_size=16, rotations=2, layers=1, seed=0,
                fp8=False):
    """Random caches holding `rotations` disjoint page sets (timed round-robin so L2 never holds the KV).
    fp8: the caches in e4m3 with per-kv-head scales (`scales` holds them for the calls).

    layers > 1 builds the engine's stacked cache [L, K, P, page_size, H] with one page set per layer and times
    the calls round-robin over a traced layer index instead (each layer holds different data)."""
    rng = jax.random.key(seed)
    R = len(seq_lens)
    max_pages = -(-max(seq_lens) // page_size)
    rotations = 1 if layers > 1 else rotations
    P = rotations * R * max_pages
    kq, kk, kv, kp = jax.random.split(rng, 4)
    T = sum(q_lens)
    q = jax.random.normal(kq, (T, N, H), jnp.bfloat16)
    k_pages = jax.random.normal(kk, (K, P, page_size, H), jnp.bfloat16)
    v_pages = jax.random.normal(kv, (K, P, page_size, H), jnp.bfloat16)
    if layers > 1:  # an elementwise broadcast: no [L, ...] random-bits temporary
        shift = (jnp.arange(layers, dtype=jnp.float32) * 0.05).astype(jnp.bfloat16)[:, None, None, None, None]
        k_pages, v_pages = k_pages[None] + shift, v_pages[None] - shift
    scales = {}
    if fp8:  # stored x / 0.25 (values in e4m3's normal range), dequantized with the scales
        scales = dict(k_scale=jnp.full(k_pages.shape[:-3], 0.25, jnp.float32),
                      v_scale=jnp.full(k_pages.shape[:-3], 0.25, jnp.float32))
        k_pages, v_pages = (k_pages * 4).astype(FP8), (v_pages * 4).astype(FP8)
    perm = jax.random.permutation(kp, P).astype(jnp.int32).reshape(rotations, R, max_pages)
    qsl = jnp.asarray([0] + list(itertools.accumulate(q_lens)), jnp.int32)
    return dict(name=name, q=q, k_pages=k_pages, v_pages=v_pages, page_tables=perm, qsl=qsl, layers=layers,
                seq_lens=jnp.asarray(seq_lens, jnp.int32), num_seqs=jnp.int32(R), q_lens=q_lens, scales=scales,
                kv_bytes=sum(seq_lens) * K * H * 2 * k_pages.dtype.itemsize, decode=all(n == 1 for n in q_lens),
                flops=4 * sum(n * s for n, s in zip(q_lens, seq_lens)) * N * H)


def time_call(fn, case, q=None, iterations=10):
    """Median device time (µs) of one call and of its longest kernel, from CUPTI, over round-robin page tables
    (stacked cache: over layers). fn(q, k, v, page_table, layer) with layer None for a single-layer cache."""
    from jax.experimental.mosaic.gpu import profiler

    tables = case["page_tables"]
    L = case["layers"]
    n = L if L > 1 else tables.shape[0]

    def run_all(q, k, v, layer_ids):
        return [fn(q, k, v, tables[i % tables.shape[0]], layer_ids[i] if L > 1 else None) for i in range(n)]

    q = case["q"] if q is None else q
    _, timings = profiler.measure(jax.jit(run_all), iterations=iterations, aggregate=False)(
        q, case["k_pages"], case["v_pages"], jnp.arange(n, dtype=jnp.int32))  # traced layer ids
    totals = sorted(sum(t for _, t in it) / n for it in timings)
    longest = sorted(max(t for _, t in it) for it in timings)
    return totals[len(totals) // 2] * 1e3, longest[len(longest) // 2] * 1e3


def rel_err(out, expected):
    out, expected = out.astype(jnp.float32), expected.astype(jnp.float32)
    return float(jnp.linalg.norm(out - expected) / jnp.linalg.norm(expected))
