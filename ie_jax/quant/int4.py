"""W4A16: 4-bit weights in groups of `group_size` input rows, each group with an f16 scale and a 4-bit zero point.

    qw = quantize_int4(w, group_size=128)   # w [..., K, N] -> Int4Weights (asymmetric round-to-nearest)
    w_hat = dequantize_int4(qw, dtype)      # (q - zero) * scale, [..., K, N]
    y = int4_matmul_reference(x, qw)        # x [..., K] -> [..., N]

Internal layout (what the model holds; a kernel that wants another packing repacks in one place, at load time):
  q       uint8 [..., K, N]    one value 0..15 per byte (unpacked: easy to slice, shard and dequantize)
  scales  f16   [..., K/G, N]
  zeros   uint8 [..., K/G, N]  0..15 (GPTQ checkpoints can also give 16, see below)
  perm    int32 [..., K] | None  act-order: row i of q is row perm[i] of the weight, groups are contiguous in q's
                                 order, and y = x[..., perm] @ dequantize_sorted(qw)
Quantization includes 0 in every group's range, so the zero point is always in [0, 15] and no value is clipped:
|w - w_hat| <= scale / 2 (plus the f16 rounding of the scale, a relative 2^-11 of the range).

Checkpoint layouts (both pack eight 4-bit values into an int32, lowest nibble first):
  AutoAWQ "GEMM"  qweight int32 [K, N/8] packed along N; inside each group of 8 columns, nibble i holds column
                  AWQ_ORDER[i] = (0, 2, 4, 6, 1, 3, 5, 7)[i]; qzeros int32 [K/G, N/8] packed the same way;
                  scales f16 [K/G, N]. w = (q - zero) * scale.
  GPTQ (v1)       qweight int32 [K/8, N] packed along K (nibble i of row r is weight row 8r + i); qzeros int32
                  [K/G, N/8] packed along N in plain order, holding zero - 1 (readers add the 1 back, so a stored
                  15 means 16); scales f16 [K/G, N]; g_idx int32 [K]: weight row k uses group g_idx[k]. With
                  act-order (desc_act) g_idx is not sorted: we sort the rows by group (a stable argsort, kept as
                  `perm`) so that groups are contiguous again, and gather x instead.
Everything batches over leading axes (stacked layers [L, K, N]). The pack/unpack functions run on concrete arrays
at load/save time; `gptq_unpack` inspects g_idx on the host. This module knows nothing about layers or files.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble i of an AWQ int32 holds column AWQ_ORDER[i] of its 8 columns
AWQ_REVERSE_ORDER = tuple(int(i) for i in np.argsort(AWQ_ORDER))  # column j sits in nibble AWQ_REVERSE_ORDER[j]
INT4_MAX = 15


@struct.dataclass
class Int4Weights:
    q: jax.Array  # [..., K, N] uint8, 0..15
    scales: jax.Array  # [..., K/G, N] f16
    zeros: jax.Array  # [..., K/G, N] uint8
    group_size: int = struct.field(pytree_node=False)
    perm: jax.Array | None = None  # [..., K] int32, act-order row permutation (see module docstring)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.q.shape)


def _check_groups(K: int, group_size: int) -> None:
    if group_size <= 0 or K % group_size:
        raise ValueError(f"{group_size=} must be a positive divisor of the input dimension K={K}")


def quantize_int4(w, group_size: int = 128, *, perm=None, scale_dtype=jnp.float16) -> Int4Weights:
    """Asymmetric round-to-nearest in groups of `group_size` rows of w [..., K, N].

    `perm` [..., K] (optional) groups the rows in that order instead (act-order): row i of the result is w's row
    perm[i], as GPTQ with desc_act produces.
    """
    w = jnp.asarray(w, jnp.float32)
    if w.ndim < 2:
        raise ValueError(f"w.shape={w.shape}: expected [..., K, N]")
    *lead, K, N = w.shape
    _check_groups(K, group_size)
    if perm is not None:
        perm = jnp.broadcast_to(jnp.asarray(perm, jnp.int32), (*lead, K))
        w = jnp.take_along_axis(w, perm[..., None], axis=-2)
    g = w.reshape(*lead, K // group_size, group_size, N)  # [..., K/G, G, N]
    hi = jnp.maximum(jnp.max(g, axis=-2), 0.0)  # [..., K/G, N]
    lo = jnp.minimum(jnp.min(g, axis=-2), 0.0)
    scales = ((hi - lo) / INT4_MAX).astype(scale_dtype)
    scales = jnp.where(scales == 0, jnp.ones_like(scales), scales)  # an all-zero group (or f16 underflow)
    s = scales.astype(jnp.float32)
    zeros = jnp.clip(jnp.round(-lo / s), 0, INT4_MAX)
    q = jnp.clip(jnp.round(g / s[..., None, :]) + zeros[..., None, :], 0, INT4_MAX)
    return Int4Weights(q.reshape(*lead, K, N).astype(jnp.uint8), scales, zeros.astype(jnp.uint8), group_size, perm)


def dequantize_sorted(qw: Int4Weights, dtype=jnp.float32) -> jax.Array:
    """(q - zero) * scale in q's own row order (act-order rows stay permuted): [..., K, N] in `dtype`."""
    *lead, K, N = qw.q.shape
    g = qw.q.reshape(*lead, K // qw.group_size, qw.group_size, N).astype(jnp.float32)
    w = (g - qw.zeros[..., None, :].astype(jnp.float32)) * qw.scales[..., None, :].astype(jnp.float32)
    return w.reshape(*lead, K, N).astype(dtype)


def dequantize_int4(qw: Int4Weights, dtype=jnp.float32) -> jax.Array:
    """The weight [..., K, N] in its original row order."""
    w = dequantize_sorted(qw, dtype)
    if qw.perm is None:
        return w
    inverse = jnp.argsort(qw.perm, axis=-1)  # weight row k is q's row inverse[k]
    return jnp.take_along_axis(w, inverse[..., None], axis=-2)


def int4_matmul_reference(x, qw: Int4Weights, out_dtype=None) -> jax.Array:
    """x [..., K] @ W -> [..., N] for one matrix (no batch axes on qw): dequantize to x's dtype, f32 accumulation."""
    if qw.perm is not None:
        x = jnp.take(x, qw.perm, axis=-1)
    y = jnp.dot(x, dequantize_sorted(qw, x.dtype), preferred_element_type=jnp.float32)
    return y.astype(out_dtype or x.dtype)


# ----------------------------------------------------------------------------------------------------------------
# Nibble packing


def _pack_last(v, order=None):
    """[..., 8M] values 0..15 -> int32 [..., M]; nibble i of word m holds v[..., 8m + order[i]]."""
    v = jnp.asarray(v).astype(jnp.uint32)
    v = v.reshape(*v.shape[:-1], -1, 8)
    if order is not None:
        v = v[..., list(order)]
    word = jnp.zeros(v.shape[:-1], jnp.uint32)
    for i in range(8):
        word = word | (v[..., i] << (4 * i))
    return jax.lax.bitcast_convert_type(word, jnp.int32)


def _unpack_last(packed, order=None):
    """int32 [..., M] -> uint8 [..., 8M], the inverse of `_pack_last` with the same order."""
    word = jax.lax.bitcast_convert_type(jnp.asarray(packed, jnp.int32), jnp.uint32)
    nibbles = jnp.stack([(word >> (4 * i)) & 0xF for i in range(8)], axis=-1)  # [..., M, 8] in nibble order
    if order is not None:
        nibbles = nibbles[..., [order.index(j) for j in range(8)]]  # column j sits in nibble order.index(j)
    return nibbles.reshape(*word.shape[:-1], -1).astype(jnp.uint8)


def _pack_rows(v):
    """[..., 8R, N] -> int32 [..., R, N]; nibble i of word (r, n) holds row 8r + i (GPTQ's qweight)."""
    v = jnp.swapaxes(jnp.asarray(v), -1, -2)  # [..., N, 8R]
    return jnp.swapaxes(_pack_last(v), -1, -2)


def _unpack_rows(packed):
    return jnp.swapaxes(_unpack_last(jnp.swapaxes(jnp.asarray(packed), -1, -2)), -1, -2)


def _check_packed(name, shape, expected):
    if tuple(shape) != tuple(expected):
        raise ValueError(f"{name}.shape={tuple(shape)} does not match the expected {tuple(expected)}")


def awq_pack(qw: Int4Weights) -> dict[str, jax.Array]:
    """Int4Weights -> AutoAWQ GEMM tensors {qweight [..., K, N/8], qzeros [..., K/G, N/8], scales f16}."""
    if qw.perm is not None:
        raise ValueError("act-order (perm) weights cannot be written in the AWQ layout, whose groups are "
                         "contiguous rows; save them in the GPTQ layout")
    N = qw.q.shape[-1]
    if N % 8:
        raise ValueError(f"the output dimension N={N} must be a multiple of 8 to pack AWQ int32 words")
    if int(jnp.max(qw.zeros)) > INT4_MAX:
        raise ValueError(f"zero points up to {int(jnp.max(qw.zeros))} do not fit AWQ's 4-bit zeros")
    return {"qweight": _pack_last(qw.q, AWQ_ORDER), "qzeros": _pack_last(qw.zeros, AWQ_ORDER),
            "scales": jnp.asarray(qw.scales, jnp.float16)}


def awq_unpack(qweight, qzeros, scales, group_size: int) -> Int4Weights:
    """AutoAWQ GEMM tensors -> Int4Weights (see the module docstring for the layout)."""
    *lead, K, M = qweight.shape
    N = 8 * M
    _check_groups(K, group_size)
    _check_packed("qzeros", qzeros.shape, (*lead, K // group_size, M))
    _check_packed("scales", scales.shape, (*lead, K // group_size, N))
    return Int4Weights(_unpack_last(qweight, AWQ_ORDER), jnp.asarray(scales, jnp.float16),
                       _unpack_last(qzeros, AWQ_ORDER), group_size)


def gptq_pack(qw: Int4Weights) -> dict[str, jax.Array]:
    """Int4Weights -> GPTQ v1 tensors {qweight [..., K/8, N], qzeros [..., K/G, N/8], scales, g_idx [..., K]}."""
    *lead, K, N = qw.q.shape
    if K % 8 or N % 8:
        raise ValueError(f"K={K} and N={N} must be multiples of 8 to pack GPTQ int32 words")
    zmin, zmax = int(jnp.min(qw.zeros)), int(jnp.max(qw.zeros))
    if zmin < 1 or zmax > 16:
        raise ValueError(f"zero points span [{zmin}, {zmax}]; GPTQ stores zero - 1 in 4 bits, so they must lie in "
                         f"[1, 16]")
    q = jnp.asarray(qw.q)
    g_idx = jnp.broadcast_to(jnp.arange(K, dtype=jnp.int32) // qw.group_size, (*lead, K))
    if qw.perm is not None:
        inverse = jnp.argsort(qw.perm, axis=-1).astype(jnp.int32)  # weight row k is q's row inverse[k]
        q = jnp.take_along_axis(q, inverse[..., None], axis=-2)
        g_idx = inverse // qw.group_size
    return {"qweight": _pack_rows(q), "qzeros": _pack_last(qw.zeros.astype(jnp.int32) - 1),
            "scales": jnp.asarray(qw.scales, jnp.float16), "g_idx": g_idx.astype(jnp.int32)}


def gptq_unpack(qweight, qzeros, scales, g_idx=None, bits: int = 4) -> Int4Weights:
    """GPTQ v1 tensors -> Int4Weights. A g_idx that is not `arange(K) // G` (act-order) gives a `perm`.

    Each group must hold exactly G rows (GPTQ's act-order assigns the i-th row in activation order to group
    i // G), so sorting rows by g_idx makes groups contiguous again.
    """
    if bits != 4:
        raise ValueError(f"GPTQ bits={bits} is not supported; only 4-bit checkpoints load")
    *lead, R, N = qweight.shape
    K = 8 * R
    num_groups = scales.shape[-2]
    if num_groups <= 0 or K % num_groups:
        raise ValueError(f"scales.shape={tuple(scales.shape)}: {num_groups} groups do not divide K={K} rows")
    group_size = K // num_groups
    _check_packed("qzeros", qzeros.shape, (*lead, num_groups, N // 8))
    _check_packed("scales", scales.shape, (*lead, num_groups, N))
    q = _unpack_rows(qweight)
    zeros = (_unpack_last(qzeros).astype(jnp.int32) + 1).astype(jnp.uint8)
    perm = None
    if g_idx is not None:
        g = np.asarray(g_idx).astype(np.int64)
        _check_packed("g_idx", g.shape, (*lead, K))
        contiguous = np.arange(K) // group_size
        if not np.array_equal(g, np.broadcast_to(contiguous, g.shape)):
            order = np.argsort(g, axis=-1, kind="stable")
            if not np.array_equal(np.take_along_axis(g, order, axis=-1), np.broadcast_to(contiguous, g.shape)):
                raise ValueError(f"g_idx assigns unequal numbers of rows to groups (expected {group_size} each); "
                                 f"such checkpoints are not supported")
            perm = jnp.asarray(order, jnp.int32)
            q = jnp.take_along_axis(q, perm[..., None], axis=-2)
    return Int4Weights(q, jnp.asarray(scales, jnp.float16), zeros, group_size, perm)
