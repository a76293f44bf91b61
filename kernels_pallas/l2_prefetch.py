"""Weights prefetched into L2 while a latency-bound kernel leaves HBM idle (Hopper TMA `cp.async.bulk.prefetch`).

At batch 1 a decode layer alternates bandwidth-bound GEMVs with short kernels that barely touch HBM (the rope and
KV write, attention over a few hundred keys, its split merge): ~15 µs a layer on the H200 in which the memory
system idles. The o projection that follows them is a 33.5 MB weight (Llama-3-8B), half of the 50 MB L2, and its
GEMV is too short to reach full bandwidth (ramp and tail). Prefetching it into L2 during those kernels moves its
bytes off the critical path.

A prefetch is fire-and-forget: a CTA issues a TMA prefetch of a [rows, cols] tile and goes on; nothing waits for
it, and nothing changes if it is dropped. Two ways to issue them:
- `issue(w_ref, cta, num_ctas)` inside another Mosaic GPU kernel (the decode tiles take a `prefetch` operand):
  CTA `cta` of `num_ctas` prefetches tiles cta, cta + num_ctas, ... No extra launch.
- `l2_prefetch(w, after)`: a kernel of its own that only issues them. It returns a zero int32 `token`; adding
  token[0] to an input of the work meant to overlap orders the prefetch before it (XLA keeps the kernel because
  its output is used), and passing `after` (any array) orders it after that array's producer.

The Mosaic GPU interpreter has no L2: with `interpret` nothing is issued.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

BOX_ROWS = 256  # TMA's largest box dimension
BOX_BYTES = 256  # a tile row: 128 bf16 values


def tile_shape(w) -> tuple[int, int] | None:
    """The [rows, cols] prefetch tile of a 2-D weight, or None where it does not tile the weight exactly."""
    if w.ndim != 2:
        return None
    rows, cols = min(BOX_ROWS, w.shape[0]), min(BOX_BYTES // w.dtype.itemsize, w.shape[1])
    if w.shape[0] % rows or w.shape[1] % cols or cols * w.dtype.itemsize % 16:
        return None
    return rows, cols


def num_tiles(w) -> int:
    rows, cols = tile_shape(w)
    return (w.shape[0] // rows) * (w.shape[1] // cols)


def share(w_shape, tile, cta, num_ctas: int):
    """CTA `cta`'s tiles of a [K, N] weight in [rows, cols] tiles: tiles cta, cta + num_ctas, ... in row-major
    order, as (tile row, tile column, valid) triples; past the last tile the row is clamped (a valid address) and
    valid is False. Works on Python ints and on traced values."""
    rows, cols = tile
    per_row, last_row = w_shape[1] // cols, w_shape[0] // rows - 1
    total = (last_row + 1) * per_row
    for i in range(-(-total // num_ctas)):
        t = cta + i * num_ctas
        yield jnp.minimum(t // per_row, last_row), t % per_row, t < total


def issue(w_ref, cta, num_ctas: int) -> None:
    """Inside a Mosaic GPU kernel (Lane semantics): CTA `cta` (traced, in [0, num_ctas)) prefetches its share of
    w_ref's tiles into L2."""
    rows, cols = tile_shape(w_ref)
    for r, c, valid in share(w_ref.shape, (rows, cols), cta, num_ctas):
        plgpu.async_prefetch(w_ref.at[pl.ds(r * rows, rows), pl.ds(c * cols, cols)], predicate=valid)


def _kernel(w_ref, after_ref, token_ref, *, num_ctas):
    del after_ref  # an ordering dependency only
    cta = jax.lax.axis_index("c")
    issue(w_ref, cta, num_ctas)

    @pl.when(cta == 0)
    def _():
        token_ref[...] = plgpu.layout_cast(jnp.zeros((128,), jnp.int32), plgpu.Layout.WG_STRIDED((128,), vec_size=1))


@functools.partial(jax.jit, static_argnames=("num_ctas",))
def l2_prefetch(w, after, *, num_ctas: int = 132):
    """Prefetch all of w [K, N] into L2 after `after` is computed. Returns token [128] int32, all zeros."""
    if tile_shape(w) is None:
        raise ValueError(f"{w.shape=} {w.dtype}: not a whole number of [{BOX_ROWS}, {BOX_BYTES} bytes] tiles")
    num_ctas = max(1, min(num_ctas, num_tiles(w)))
    kernel = plgpu.kernel(
        functools.partial(_kernel, num_ctas=num_ctas),
        out_type=jax.ShapeDtypeStruct((128,), jnp.int32),
        grid=(num_ctas,),
        grid_names=("c",),
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Lane),
    )
    return kernel(w, after)


def fits(w, l2_bytes: int = 50 * 2**20) -> bool:
    """Whether prefetching w is worth it: it tiles, and it fits in (an H100/H200's) L2 with room to spare."""
    return tile_shape(w) is not None and math.prod(w.shape) * w.dtype.itemsize <= 0.75 * l2_bytes
