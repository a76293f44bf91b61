"""The one switch between Pallas Mosaic-GPU kernels and their plain-jnp / XLA references.

Every op here has the same contract on every backend; only the implementation changes:
  reference  plain jnp (f32 upcast, no tiling): the oracle, and the path on CPU and non-Hopper GPUs
  pallas     the Mosaic-GPU kernel, compiled for sm_90a
  interpret  the same kernel body run by the Mosaic GPU interpreter on CPU (slow; tests only)
  auto       pallas on a Hopper GPU when the arguments fit the kernel, reference otherwise

Choose with the IE_JAX_KERNELS environment variable or the `kernel_backend(...)` context manager.
This module knows nothing about models: it sees arrays and masks.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import os

import jax
import jax.numpy as jnp

BACKENDS = ("auto", "reference", "pallas", "interpret")
_backend: contextvars.ContextVar[str | None] = contextvars.ContextVar("ie_jax_kernel_backend", default=None)


def current_backend() -> str:
    name = _backend.get() or os.environ.get("IE_JAX_KERNELS", "auto")
    if name not in BACKENDS:
        raise ValueError(f"IE_JAX_KERNELS={name!r}; expected one of {BACKENDS}")
    return name


@contextlib.contextmanager
def kernel_backend(name: str):
    """Force a backend inside a block: `with kernel_backend("reference"): ...`."""
    if name not in BACKENDS:
        raise ValueError(f"{name=}; expected one of {BACKENDS}")
    token = _backend.set(name)
    try:
        yield
    finally:
        _backend.reset(token)


@functools.cache
def is_hopper() -> bool:
    try:
        dev = jax.devices()[0]
    except RuntimeError:
        return False
    return dev.platform == "gpu" and getattr(dev, "compute_capability", "") in ("9.0", "9.0a")


# ----------------------------------------------------------------------------------------------------------------
# Dense attention


def attention_reference(q, k, v, *, causal=True, q_segment_ids=None, kv_segment_ids=None, q_positions=None,
                        kv_positions=None, scale=None, sliding_window=None, softcap=None):
    """Plain-jnp attention in f32. q [B, T, N, H]; k, v [B, S, K, H]; N % K == 0 (GQA). Returns [B, T, N, H].

    The mask is built from positions (default: the index, so T == S gives the usual causal triangle) and segment
    ids (default: one segment): query i sees key j iff seg_q[i] == seg_kv[j] and, if causal, pos_kv[j] <= pos_q[i]
    and, with a window W, pos_q[i] - pos_kv[j] < W. A query row that sees nothing returns zeros.
    """
    B, T, N, H = q.shape
    S, K = k.shape[1], k.shape[2]
    scale = H ** -0.5 if scale is None else scale
    qf = q.astype(jnp.float32).reshape(B, T, K, N // K, H)
    logits = jnp.einsum("btkgh,bskh->bkgts", qf, k.astype(jnp.float32)) * scale  # [B, K, G, T, S]
    if softcap is not None:
        logits = softcap * jnp.tanh(logits / softcap)
    mask = attention_mask(B, T, S, causal=causal, q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids,
                          q_positions=q_positions, kv_positions=kv_positions, sliding_window=sliding_window)
    logits = jnp.where(mask[:, None, None], logits, -jnp.inf)
    m = jnp.max(logits, axis=-1, keepdims=True)
    p = jnp.exp(logits - jnp.where(jnp.isfinite(m), m, 0.0))
    denom = jnp.sum(p, axis=-1, keepdims=True)
    p = p / jnp.where(denom == 0, 1.0, denom)
    out = jnp.einsum("bkgts,bskh->btkgh", p, v.astype(jnp.float32))
    return out.reshape(B, T, N, H).astype(q.dtype)


def attention_mask(B, T, S, *, causal, q_segment_ids=None, kv_segment_ids=None, q_positions=None,
                   kv_positions=None, sliding_window=None):
    """Boolean [B, T, S] mask; see `attention_reference`."""
    q_pos = jnp.broadcast_to(jnp.arange(T) if q_positions is None else q_positions, (B, T))
    kv_pos = jnp.broadcast_to(jnp.arange(S) if kv_positions is None else kv_positions, (B, S))
    mask = jnp.ones((B, T, S), bool)
    if q_segment_ids is not None or kv_segment_ids is not None:
        qs = q_segment_ids if q_segment_ids is not None else kv_segment_ids
        ks = kv_segment_ids if kv_segment_ids is not None else q_segment_ids
        mask &= qs[:, :, None] == ks[:, None, :]
    diff = q_pos[:, :, None] - kv_pos[:, None, :]
    if causal:
        mask &= diff >= 0
    if sliding_window is not None:
        mask &= diff < sliding_window
    return mask


def attention(q, k, v, *, causal=True, q_segment_ids=None, kv_segment_ids=None, q_positions=None,
              kv_positions=None, scale=None, sliding_window=None, softcap=None):
    """Dense attention, [B, T, N, H] x [B, S, K, H] -> [B, T, N, H]. Semantics of `attention_reference`.

    The flash kernel takes the training/prefill shape: T == S, index-causal (no explicit positions) and one set of
    segment ids shared by queries and keys. Anything else runs the reference.
    """
    backend = current_backend()
    fits_kernel = (q.shape[1] == k.shape[1] and q_positions is None and kv_positions is None
                   and (kv_segment_ids is None or kv_segment_ids is q_segment_ids))
    use_kernel = backend in ("pallas", "interpret") or (backend == "auto" and is_hopper())
    if use_kernel and fits_kernel:
        from kernels_pallas import flash_attention as fa
        return fa.flash_attention(q, k, v, causal=causal, segment_ids=q_segment_ids, sm_scale=scale,
                                  sliding_window=sliding_window, softcap=softcap,
                                  interpret=backend == "interpret")
    return attention_reference(q, k, v, causal=causal, q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids,
                               q_positions=q_positions, kv_positions=kv_positions, scale=scale,
                               sliding_window=sliding_window, softcap=softcap)



# ----------------------------------------------------------------------------------------------------------------
# Paged KV cache: [L, K, P, page_size, H] per K and V (all layers in one buffer, updated in place under donation)


def write_kv_reference(k_cache, v_cache, layer, k_new, v_new, slot_mapping, *, k_scale=None, v_scale=None):
    """Scatter k_new/v_new [T, K, H] into layer `layer` at slot_mapping [T] (-1: padding, written nowhere).

    v_cache None: k_cache is one interleaved buffer [2L, K, P, page_size, H] (layer l's K at 2l, V at 2l + 1),
    written by a single scatter; returns (buffer, None).
    An fp8 (float8_e4m3fn) cache stores x / scale, saturated to ±448; k_scale, v_scale [L, K] f32 (None = 1)."""
    from kernels_pallas.kv_cache import as_bytes, from_bytes, quantize
    page_size, num_pages = k_cache.shape[3], k_cache.shape[2]
    page = jnp.where(slot_mapping < 0, num_pages, slot_mapping // page_size)  # out of range -> dropped
    offset = slot_mapping % page_size

    def q8(cache, new, scale):  # fp8 scatters as bytes: no widened copy of the cache
        return as_bytes(quantize(new, cache.dtype, None if scale is None else scale[layer]))

    if v_cache is None:
        new = jnp.stack([q8(k_cache, k_new, k_scale), q8(k_cache, v_new, v_scale)], axis=1)  # [T, 2, K, H]
        entry = 2 * layer + jnp.arange(2)[None, :]  # [1, 2]: K's and V's entries of this layer
        # Advanced indices split by a slice put their dims first: the update is [T, 2, K, H].
        kv = as_bytes(k_cache).at[entry, :, page[:, None], offset[:, None]].set(new, mode="drop")
        return from_bytes(kv, k_cache.dtype), None

    def put(cache, new, scale):
        # Advanced indices split by a slice put their dims first: the update is [T, K, H].
        return from_bytes(as_bytes(cache).at[layer, :, page, offset].set(q8(cache, new, scale), mode="drop"),
                          cache.dtype)

    return put(k_cache, k_new, k_scale), put(v_cache, v_new, v_scale)


def paged_attention_reference(q, k_cache, v_cache, layer, page_table, query_start_loc, seq_lens, num_seqs, *,
                              scale=None, sliding_window=None, softcap=None, k_scale=None, v_scale=None):
    """Ragged attention over the paged cache in plain jnp (f32): q [T, N, H] -> [T, N, H].

    Token t of request r (qsl[r] <= t < qsl[r+1]) sits at position seq_lens[r] - q_len_r + (t - qsl[r]) and sees
    the cached positions <= its own (within the window). Each token gathers its request's pages: memory
    O(T * max_pages * page_size), fine for tests and decode, not for long prefill chunks (the kernel's job).
    An fp8 cache's values are multiplied by k_scale / v_scale [L, K] (None = 1). v_cache None: k_cache is the
    interleaved [2L, K, P, page_size, H] buffer of `write_kv_reference`.
    """
    T, N, H = q.shape
    K = k_cache.shape[1]
    k_src, v_src = (k_cache[2 * layer], k_cache[2 * layer + 1]) if v_cache is None else (k_cache[layer],
                                                                                          v_cache[layer])
    scale = H ** -0.5 if scale is None else scale
    tok = jnp.arange(T)
    req = jnp.clip(jnp.searchsorted(query_start_loc[1:], tok, side="right"), 0, page_table.shape[0] - 1)  # [T]
    q_len = query_start_loc[req + 1] - query_start_loc[req]
    pos = seq_lens[req] - q_len + tok - query_start_loc[req]  # [T]
    real = tok < query_start_loc[num_seqs]
    pages = page_table[req]  # [T, max_pages]
    k = k_src[:, pages].reshape(K, T, -1, H).astype(jnp.float32)  # [K, T, C, H]
    v = v_src[:, pages].reshape(K, T, -1, H).astype(jnp.float32)
    if k_scale is not None:
        k = k * k_scale[layer][:, None, None, None]
    if v_scale is not None:
        v = v * v_scale[layer][:, None, None, None]
    qf = q.astype(jnp.float32).reshape(T, K, N // K, H)
    logits = jnp.einsum("tkgh,ktch->tkgc", qf, k) * scale  # [T, K, G, C]
    if softcap is not None:
        logits = softcap * jnp.tanh(logits / softcap)
    c = jnp.arange(k.shape[2])[None]  # [1, C]
    mask = (c <= pos[:, None]) & real[:, None]
    if sliding_window is not None:
        mask &= pos[:, None] - c < sliding_window
    logits = jnp.where(mask[:, None, None], logits, -jnp.inf)
    m = jnp.max(logits, axis=-1, keepdims=True)
    p = jnp.exp(logits - jnp.where(jnp.isfinite(m), m, 0.0))
    p = p / jnp.maximum(jnp.sum(p, axis=-1, keepdims=True), 1e-30)
    out = jnp.einsum("tkgc,ktch->tkgh", p, v)
    return out.reshape(T, N, H).astype(q.dtype)


def write_kv(k_cache, v_cache, layer, k_new, v_new, slot_mapping, *, k_scale=None, v_scale=None):
    """Write this step's K/V of layer `layer` into the stacked caches (or, v_cache None, into the one interleaved
    buffer with a single scatter). Semantics of `write_kv_reference`.

    Every backend runs the same XLA scatter: it moves only T * K * H elements per cache and, with the caches
    donated (the engine's step), updates them in place (tests/kernels/test_kv_write.py reads the HLO).
    For an fp8 cache the quantization (x / scale, saturating cast) fuses into the scatter's operand.
    """
    return write_kv_reference(k_cache, v_cache, layer, k_new, v_new, slot_mapping, k_scale=k_scale,
                              v_scale=v_scale)


def paged_kernel_active() -> bool:
    """Whether `paged_attention` runs the Pallas kernel (backend pallas / interpret, or auto on Hopper)."""
    backend = current_backend()
    return backend in ("pallas", "interpret") or (backend == "auto" and is_hopper())


def paged_attention(q, k_cache, v_cache, layer, page_table, query_start_loc, seq_lens, num_seqs, *, scale=None,
                    sliding_window=None, softcap=None, k_scale=None, v_scale=None, decode_only=False):
    """Ragged paged attention (decode and prefill chunks mixed). Semantics of `paged_attention_reference`.

    The kernel reads layer `layer` of the stacked caches (v_cache None: of the interleaved buffer) in place.
    It takes head dim 64/128, pages that tile its
    kv blocks, 64 % (N // K) == 0 and a cache of q's 16-bit dtype or fp8 e4m3 with k_scale / v_scale [L, K]
    (`kernel_supports`); anything else, on any backend, runs the reference, as `attention` does.
    decode_only (static): every request has one query token: the kernel's decode tiles take the call.
    """
    backend = current_backend()
    if paged_kernel_active():
        from kernels_pallas import paged_attention as pa
        if pa.kernel_supports(q, k_cache):
            config = None
            if decode_only:  # IE_JAX_QUANT_Q_KERNEL=0: an fp8 cache's q quantized by XLA, not the Triton kernel
                config = pa.TuningConfig(decode_tiles=True,
                                         quantize_q_kernel=os.environ.get("IE_JAX_QUANT_Q_KERNEL", "1") != "0")
            return pa.ragged_paged_attention(q, k_cache, v_cache, page_table, query_start_loc, seq_lens, num_seqs,
                                             layer=layer, sm_scale=scale, sliding_window=sliding_window,
                                             softcap=softcap, k_scale=k_scale, v_scale=v_scale, config=config,
                                             interpret=backend == "interpret")
    return paged_attention_reference(q, k_cache, v_cache, layer, page_table, query_start_loc, seq_lens, num_seqs,
                                     scale=scale, sliding_window=sliding_window, softcap=softcap, k_scale=k_scale,
                                     v_scale=v_scale)


# ----------------------------------------------------------------------------------------------------------------
# Residual add + RMSNorm over split-K partials (decode steps)

ADD_NORM_MAX_TOKENS = 16  # tokens of a serving step up to which its residual adds fold into the norms


def add_norm_active() -> bool:
    """Whether decode-sized steps take the fused residual add + RMSNorm (kernels_pallas/add_norm.py): where the
    Pallas kernels run (backend pallas / interpret, or auto on Hopper), unless IE_JAX_FUSED_ADD_NORM=0."""
    return os.environ.get("IE_JAX_FUSED_ADD_NORM", "1") != "0" and paged_kernel_active()


def add_rmsnorm(x, partials, weight, extra=None, *, eps):
    """x [M, D], partials [S, M, D] f32, weight [D], extra [M, D] f32 or None -> (x + sum_s partials (+ extra), its
    RMSNorm), both in x's dtype. The kernel where it runs and takes the shapes, else the same arithmetic in jnp."""
    from kernels_pallas import add_norm
    add_norm.check_args(x, partials, weight, extra)
    backend = current_backend()
    if add_norm_active() and add_norm.supported(x.shape[-1], partials.shape[0]):
        return add_norm.add_rmsnorm(x, partials, weight, extra, eps=eps, interpret=backend == "interpret",
                                    num_warps=int(os.environ.get("IE_JAX_ADD_NORM_WARPS", add_norm.NUM_WARPS)))
    return add_norm.add_rmsnorm_reference(x, partials, weight, eps, extra)


# ----------------------------------------------------------------------------------------------------------------
# Rotary embedding + paged KV write in one kernel (prefill-sized steps; decode-sized ones opt-in)

ROPE_KV_MAX_TOKENS = 16  # tokens of a serving step up to which q/k's rope runs inside the KV write (opt-in)
ROPE_KV_SPLITS = 4  # K splits of the q/k/v projection whose partials the kernel sums (XLA's own choice at 4096)
# Steps of at least this many tokens (prefill chunks) take the kernel by default, on the projection's output as one
# partial: XLA's scatter of k and v (with k's rope) took 280 us a layer at 16,384 tokens on the H200, the kernel
# 124 us, and q's packing without the rope 85 us instead of 153 (docs/kernels/rope_kv.md). Smaller prefill steps
# were not measured; IE_JAX_ROPE_KV_PREFILL_TOKENS moves the threshold (0: never).
ROPE_KV_PREFILL_TOKENS = 8192


def rope_kv_splits(tokens: int) -> int:
    """The most split-K partials of a plain q/k/v projection the rope + KV write kernel may take for a step of
    `tokens`: ROPE_KV_SPLITS (IE_JAX_ROPE_KV_SPLITS) for decode-sized steps, 1 above them (partials in f32 cost
    more than they save once the GEMM is large)."""
    return int(os.environ.get("IE_JAX_ROPE_KV_SPLITS", ROPE_KV_SPLITS)) if _rope_kv_decode_sized(tokens) else 1


def _rope_kv_decode_sized(tokens: int) -> bool:
    return tokens <= int(os.environ.get("IE_JAX_ROPE_KV_MAX_TOKENS", ROPE_KV_MAX_TOKENS))


def rope_kv_active(parts, num_kv_heads, cache, dtype) -> bool:
    """Whether a step's rope and KV write take one kernel (kernels_pallas/rope_kv.py): parts [S, T, N + 2K, H]
    (an array or its ShapeDtypeStruct) on the interleaved cache, shapes the kernel takes, where the Pallas kernels
    run; for prefill-sized steps (T >= ROPE_KV_PREFILL_TOKENS, one partial) by default, for decode-sized ones
    (T <= ROPE_KV_MAX_TOKENS) when IE_JAX_FUSED_ROPE_KV=1: there the kernel (3.5 us) saved no time over XLA's two
    kernels on the H200 at batch 1."""
    from kernels_pallas import rope_kv
    S, T = parts.shape[:2]
    decode = os.environ.get("IE_JAX_FUSED_ROPE_KV", "0") == "1" and _rope_kv_decode_sized(T)
    threshold = int(os.environ.get("IE_JAX_ROPE_KV_PREFILL_TOKENS", ROPE_KV_PREFILL_TOKENS))
    prefill = S == 1 and 0 < threshold <= T
    return (decode or prefill) and paged_kernel_active() and rope_kv.supported(parts, num_kv_heads, cache, dtype)


def rope_write_kv(parts, num_kv_heads, positions, inv_freq, cache, layer, slot_mapping, *, dtype, k_scale=None,
                  v_scale=None):
    """parts [S, T, N + 2K, H]: q, k, v heads before rope as S partial sums (rounded to `dtype` once summed);
    positions [T] -> (rotated q [T, N, H], the interleaved cache with layer `layer`'s rotated k and v written at
    slot_mapping). The kernel where `rope_kv_active`, else jnp."""
    from kernels_pallas import rope_kv
    rope_kv.check_args(parts, num_kv_heads, positions, slot_mapping, cache)
    if rope_kv_active(parts, num_kv_heads, cache, dtype):
        return rope_kv.rope_write_kv(parts, positions, inv_freq, cache, layer, slot_mapping, k_scale, v_scale,
                                     num_kv_heads=num_kv_heads, dtype=dtype,
                                     interpret=current_backend() == "interpret",
                                     num_warps=int(os.environ.get("IE_JAX_ROPE_KV_WARPS", rope_kv.NUM_WARPS)))
    return rope_kv.rope_write_kv_reference(parts, num_kv_heads, positions, inv_freq, cache, layer, slot_mapping,
                                           k_scale, v_scale, dtype=dtype)


# ----------------------------------------------------------------------------------------------------------------
# Quantized matmul: x [..., K] @ W [K, N] with W in one of ie_jax.quant's formats (one matrix, no batch axes on W)


def quant_matmul(x, qw, *, out_dtype=None):
    """x [..., K] -> [..., N] in `out_dtype` (default x's dtype), for W held in the kernel's packed layout
    (quant_matmul.PackedInt8 / PackedInt4: what the quantized Linear holds), as Int8Weights, Int4Weights,
    Fp8Weights or NF4Array (one matrix). Semantics of the format's `*_matmul_reference` (dequantize, then an
    f32-accumulated dot; FP8 quantizes x too).

    On a Hopper GPU (backend auto / pallas), decode-sized calls (at most 64 rows of bf16 x) of int8 and int4
    (groups of a multiple of 128 rows; act-order gathers x) run the Pallas kernel where
    `quant_matmul.kernel_config` says it was measured faster than XLA (packed int4 also up to 128 rows, in 64-row
    chunks); above 64 rows the packed layouts run the many-row GEMM (quant_gemm.py) where `quant_gemm.gemm_config`
    says it measured faster; FP8 (q held [N, K], K-major) runs the fp8 decode kernel (`fp8_skinny_matmul`) where
    `fp8_matmul.fp8_kernel_config` says it was measured faster, above 64 rows the fp8 GEMM (fp8_gemm.py) where
    `fp8_gemm.gemm_config` says so, XLA's fp8 dot (cuBLASLt) elsewhere. Everything
    else, and every call on CPU, runs XLA's dequantize-then-dot (`packed_matmul_xla` on the packed layouts, the
    format reference otherwise).
    """
    from ie_jax.quant import fp8, int4, int8, nf4
    from kernels_pallas import fp8_matmul as f8
    from kernels_pallas import quant_matmul as qm
    backend = current_backend()
    on_hopper = backend in ("pallas", "interpret") or (backend == "auto" and is_hopper())
    if on_hopper and isinstance(qw, (qm.PackedInt8, qm.PackedInt4)) and x.dtype == jnp.bfloat16:
        from kernels_pallas import quant_gemm as qg
        rows = x.reshape(-1, x.shape[-1])  # [M, K]
        config = qg.gemm_config(qw, rows.shape[0])
        if config is not None:  # many rows: the warp-specialized GEMM where it measured faster
            y = qg.quant_gemm(rows, qw, config=config, interpret=backend == "interpret", out_dtype=out_dtype or x.dtype)
            return y.reshape(*x.shape[:-1], y.shape[-1])
    if on_hopper and isinstance(qw, (int8.Int8Weights, int4.Int4Weights, qm.PackedInt8, qm.PackedInt4)):
        rows = x.reshape(-1, x.shape[-1])  # [M, K]
        config = qm.kernel_config(qw, rows.shape[0], forced=backend != "auto")
        if config is not None and qm.kernel_supports(rows[:qm.MAX_M], qw, config):
            run = qm.quant_matmul if rows.shape[0] <= qm.MAX_M else qm.chunked_quant_matmul
            y = run(rows, qw, config=config, interpret=backend == "interpret", out_dtype=out_dtype or x.dtype)
            return y.reshape(*x.shape[:-1], y.shape[-1])
    if isinstance(qw, (qm.PackedInt8, qm.PackedInt4)):
        return qm.packed_matmul_xla(x, qw, out_dtype)
    if isinstance(qw, int8.Int8Weights):
        return int8.int8_matmul_reference(x, qw, out_dtype)
    if isinstance(qw, int4.Int4Weights):
        return int4.int4_matmul_reference(x, qw, out_dtype)
    if isinstance(qw, fp8.Fp8Weights):
        rows = x.reshape(-1, x.shape[-1])
        n, k = qw.q.shape[-2:]
        config = f8.fp8_kernel_config(rows.shape[0], k, n) if backend == "auto" else f8.FP8_CONFIG
        if on_hopper and config is not None and qw.q.ndim == 2 and f8.kernel_supports_fp8(rows, qw.q, qw.scale,
                                                                                          config):
            y = f8.fp8_skinny_matmul(rows, qw.q, qw.scale, qw.input_scale, config=config,
                                     interpret=backend == "interpret", out_dtype=out_dtype or x.dtype)
            return y.reshape(*x.shape[:-1], y.shape[-1])
        from kernels_pallas import fp8_gemm as fg
        gemm = fg.gemm_config(rows.shape[0], k, n) if backend == "auto" else fg.Fp8GemmConfig()
        if (on_hopper and gemm is not None and qw.q.ndim == 2 and rows.shape[0] >= fg.MIN_ROWS
                and fg.supports(k, n, gemm) and x.dtype == jnp.bfloat16):
            y = fg.fp8_gemm(rows, qw.q, qw.scale, qw.input_scale, config=gemm, interpret=backend == "interpret",
                            out_dtype=out_dtype or x.dtype)
            return y.reshape(*x.shape[:-1], y.shape[-1])
        if on_hopper and backend != "interpret" and f8.FP8_XLA_DOT and qw.q.ndim == 2:
            return f8.fp8_matmul(x, qw.q, qw.scale, qw.input_scale, out_dtype=out_dtype, n_major=True)
        return fp8.fp8_matmul_reference(x, qw, out_dtype)
    if isinstance(qw, nf4.NF4Array):
        y = jnp.dot(x, nf4.dequantize_nf4(qw, x.dtype), preferred_element_type=jnp.float32)
        return y.astype(out_dtype or x.dtype)
    raise ValueError(f"quant_matmul got weights of type {type(qw).__name__}; expected a format of ie_jax.quant")
