"""NF4 (4-bit NormalFloat) with double quantization: the frozen-base format of QLoRA (Dettmers et al., 2023).

A weight is flattened and cut into blocks of `block_size` (64) values. Each block stores its absolute maximum and,
per value, the index (4 bits) of the nearest of 16 levels in `NF4_LEVELS` (quantiles of N(0, 1) scaled to [-1, 1],
with an exact zero). Two indices share a byte, the first in the high nibble.

Double quantization then compresses the per-block maxima: subtract their mean, cut them into groups of
`scale_block_size` (256) and store each as int8 with one f32 scale per group. Storage per value is then
4 + 8/64 + 32/(64*256) ≈ 4.127 bits.

    q = quantize_nf4(w)                      # w [..., in, out] -> NF4Array over the whole trailing matrix
    w_hat = dequantize_nf4(q, jnp.bfloat16)  # back to w.shape

The second-level int8 code here is a symmetric linear one (bitsandbytes uses an 8-bit dynamic float map); the
error bound in `max_abs_error` accounts for it. This module is pure jnp: it knows nothing of layers or LoRA, and
a fused dequantize-matmul kernel, where one exists, must match `dequantize_nf4` exactly.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

# The 16 NF4 levels as published with QLoRA (normal quantiles, asymmetric so that 0 is exact).
NF4_LEVELS = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
], np.float32)
_MIDPOINTS = (NF4_LEVELS[1:] + NF4_LEVELS[:-1]) / 2  # a value rounds to level i when it lies in (mid[i-1], mid[i]]
MAX_HALF_GAP = float(np.max(np.diff(NF4_LEVELS)) / 2)


@struct.dataclass
class NF4Array:
    """A matrix in NF4 + double quantization. Leading axes (e.g. a stacked layer axis) are batch axes."""
    codes: jax.Array  # [..., n/2] uint8: two level indices per byte
    absmax_q: jax.Array  # [..., nb_pad] int8: per-block maxima, second-level quantized (nb_pad % scale_block == 0)
    absmax_scale: jax.Array  # [..., nb_pad / scale_block] f32
    absmax_offset: jax.Array  # [...] f32: the mean of the block maxima
    shape: tuple[int, ...] = struct.field(pytree_node=False)  # the matrix shape (trailing axes)
    block_size: int = struct.field(pytree_node=False, default=64)
    scale_block_size: int = struct.field(pytree_node=False, default=256)


def _check(shape, block_size, scale_block_size):
    n = math.prod(shape)
    if block_size <= 0 or block_size % 2:
        raise ValueError(f"{block_size=} must be a positive even number")
    if scale_block_size <= 0:
        raise ValueError(f"{scale_block_size=} must be positive")
    if n % block_size:
        raise ValueError(f"a matrix of shape {shape} ({n} values) is not a whole number of {block_size=} blocks")
    return n


def quantize_nf4(w, *, block_size: int = 64, scale_block_size: int = 256, matrix_ndim: int = 2) -> NF4Array:
    """Quantize the trailing `matrix_ndim` axes of w; any leading axes are kept as batch axes."""
    w = jnp.asarray(w)
    lead, shape = w.shape[:w.ndim - matrix_ndim], tuple(w.shape[w.ndim - matrix_ndim:])
    n = _check(shape, block_size, scale_block_size)
    num_blocks = n // block_size
    nb_pad = -(-num_blocks // scale_block_size) * scale_block_size

    def one(m):  # one matrix -> its NF4 arrays
        blocks = m.astype(jnp.float32).reshape(num_blocks, block_size)  # [nb, bs]
        absmax = jnp.max(jnp.abs(blocks), axis=-1)  # [nb]
        normed = blocks / jnp.where(absmax == 0, 1.0, absmax)[:, None]
        idx = jnp.searchsorted(jnp.asarray(_MIDPOINTS), normed.reshape(-1), side="left").astype(jnp.uint8)
        codes = (idx[0::2] << 4) | idx[1::2]  # [n/2]
        # Double quantization of the block maxima (padded groups hold the mean: zero after the offset).
        offset = jnp.mean(absmax)
        centred = jnp.pad(absmax - offset, (0, nb_pad - num_blocks)).reshape(-1, scale_block_size)  # [g, sb]
        scale = jnp.max(jnp.abs(centred), axis=-1) / 127.0  # [g]
        safe = jnp.where(scale == 0, 1.0, scale)
        absmax_q = jnp.clip(jnp.round(centred / safe[:, None]), -127, 127).astype(jnp.int8).reshape(-1)
        return codes, absmax_q, scale, offset

    fn = one
    for _ in lead:
        fn = jax.vmap(fn)
    codes, absmax_q, scale, offset = fn(w)
    return NF4Array(codes, absmax_q, scale, offset, shape, block_size, scale_block_size)


def block_absmax(q: NF4Array) -> jax.Array:
    """The per-block maxima after double-quantization round trip: [..., num_blocks] f32."""
    num_blocks = math.prod(q.shape) // q.block_size
    groups = q.absmax_q.astype(jnp.float32).reshape(*q.absmax_q.shape[:-1], -1, q.scale_block_size)
    absmax = (groups * q.absmax_scale[..., None]).reshape(*q.absmax_q.shape[:-1], -1)
    return absmax[..., :num_blocks] + q.absmax_offset[..., None]


def dequantize_nf4(q: NF4Array, dtype=jnp.float32) -> jax.Array:
    """NF4Array -> dense [..., *q.shape] in `dtype` (levels times block maxima, computed in f32)."""
    lead = q.codes.shape[:-1]
    high, low = q.codes >> 4, q.codes & 0xF
    idx = jnp.stack([high, low], axis=-1).reshape(*lead, -1, q.block_size)  # [..., nb, bs]
    values = jnp.asarray(NF4_LEVELS)[idx] * block_absmax(q)[..., None]
    return values.reshape(*lead, *q.shape).astype(dtype)


def max_abs_error(w, q: NF4Array) -> jax.Array:
    """An upper bound on |w - dequantize_nf4(q)| per value, [..., *shape] f32.

    Rounding to the nearest level costs at most half the widest level gap times the block maximum; the int8 code
    of the maximum adds at most half its group scale (times |level| <= 1).
    """
    lead = q.codes.shape[:-1]
    blocks = jnp.asarray(w, jnp.float32).reshape(*lead, -1, q.block_size)
    true_absmax = jnp.max(jnp.abs(blocks), axis=-1, keepdims=True)  # [..., nb, 1]
    num_blocks = blocks.shape[-2]
    group_scale = jnp.repeat(q.absmax_scale, q.scale_block_size, axis=-1)[..., :num_blocks, None]
    bound = (true_absmax + group_scale / 2) * MAX_HALF_GAP + group_scale / 2
    return jnp.broadcast_to(bound, blocks.shape).reshape(*lead, *q.shape)


def nf4_bytes(q: NF4Array) -> int:
    """Bytes held on device by q's arrays."""
    return sum(int(a.size) * a.dtype.itemsize for a in (q.codes, q.absmax_q, q.absmax_scale, q.absmax_offset))
