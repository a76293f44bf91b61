"""Residual add + RMSNorm over a GEMM's split-K partials, one kernel (Pallas, Triton lowering), for decode steps.

At batch 1 a decode layer is ~13 kernels, and past the GEMMs each costs ~1.8 µs on the H200 whatever its size
(latency, not bytes). XLA splits the o projection's K eight ways, and the f32 partials are summed into the
residual by a kernel of their own, because a reduction producer with two consumers (the norm, the next residual
add) is not fused. Here the projection is written as an explicit split-K batched dot (`split_k_partials`: S
independent [M, K/S] @ [K/S, N] products, the same work XLA's own split-K does) and one kernel takes its
partials: x_new = x + sum_s partials[s] and y = RMSNorm(x_new), both stored. One kernel instead of two.

An optional `extra` [M, D] f32 is one more term of the sum: a LoRA adapter's low-rank update of the same
projection (engine/lora.py), so that an adapted layer keeps this path.

Each program owns one row (a token): it sums the S partial rows in f32, adds the residual, rounds to x's dtype
(the residual stream's dtype, as `x + h` would), and normalises that rounded row exactly as
`ie_jax.models.layers.RMSNorm` does.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl


NUM_WARPS = 32  # per row (program): the fastest of 4-32 on the H200; IE_JAX_ADD_NORM_WARPS overrides


def split_k_partials(x, w, num_splits: int):
    """x [M, K] @ w [K, N] as num_splits partial products [S, M, N] f32 (K split into S contiguous slabs;
    the reshape of w is a bitcast). Their sum over S is the product."""
    M, K = x.shape
    N = w.shape[1]
    if K % num_splits:
        raise ValueError(f"{K=} must be a multiple of {num_splits=}")
    return jnp.einsum("msk,skn->smn", x.reshape(M, num_splits, K // num_splits),
                      w.astype(x.dtype).reshape(num_splits, K // num_splits, N), preferred_element_type=jnp.float32)


def num_splits(k: int, cap: int) -> int:
    """The most K splits (16, 8, 4 or 2, at most `cap`) that cut k into slabs of a multiple of 128; 0 if none."""
    return next((s for s in (16, 8, 4, 2) if s <= cap and k % (s * 128) == 0), 0)


def add_rmsnorm_reference(x, partials, weight, eps, extra=None):
    """(x + sum_s partials[s] (+ extra) in f32, rounded to x's dtype; RMSNorm of it with `weight`), as the model
    computes."""
    h = partials.sum(axis=0) if extra is None else partials.sum(axis=0) + extra
    x_new = (x.astype(jnp.float32) + h).astype(x.dtype)
    x32 = x_new.astype(jnp.float32)
    y = x32 * lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return x_new, weight.astype(x.dtype) * y.astype(x.dtype)


def _kernel(p_ref, x_ref, w_ref, *refs, num_splits, eps):
    # one row: p_ref [S, D] f32, x_ref [D], w_ref [D], e_ref [D] f32 (with `extra` only); outputs [D] in x's dtype
    *e_ref, x_out_ref, y_out_ref = refs
    acc = x_ref[...].astype(jnp.float32)
    for s in range(num_splits):
        acc += p_ref[s, :]
    if e_ref:
        acc += e_ref[0][...]
    x_new = acc.astype(x_out_ref.dtype)
    x_out_ref[...] = x_new
    x32 = x_new.astype(jnp.float32)
    r = lax.rsqrt(jnp.mean(x32 * x32) + eps)
    y_out_ref[...] = w_ref[...].astype(y_out_ref.dtype) * (x32 * r).astype(y_out_ref.dtype)


def supported(hidden: int, num_splits: int) -> bool:
    """Shapes the kernel takes: a power-of-two row (Triton blocks) of 128 to 16384, up to 16 partials."""
    return hidden & (hidden - 1) == 0 and 128 <= hidden <= 16384 and 1 <= num_splits <= 16


def check_args(x, partials, weight, extra=None):
    if x.ndim != 2 or partials.ndim != 3 or partials.shape[1:] != x.shape or weight.shape != x.shape[-1:]:
        raise ValueError(f"{x.shape=} [M, D], {partials.shape=} [S, M, D] and {weight.shape=} [D] do not match")
    if extra is not None and extra.shape != x.shape:
        raise ValueError(f"{extra.shape=} must be x's {x.shape} [M, D]")
    if partials.dtype != jnp.float32 or (extra is not None and extra.dtype != jnp.float32):
        raise ValueError(f"{partials.dtype=} (and extra's) must be float32")


@functools.partial(jax.jit, static_argnames=("eps", "interpret", "num_warps"))
def add_rmsnorm(x, partials, weight, extra=None, *, eps: float, interpret: bool = False,
                num_warps: int = NUM_WARPS):
    """x [M, D] (the residual stream), partials [S, M, D] f32, weight [D], extra [M, D] f32 or None -> (x_new, y),
    both [M, D] in x's dtype: x_new = x + sum_s partials[s] (+ extra), y = RMSNorm(x_new) * weight. One program
    per row."""
    check_args(x, partials, weight, extra)
    S, M, D = partials.shape
    kernel = functools.partial(_kernel, num_splits=S, eps=eps)
    row = pl.BlockSpec((None, D), lambda m: (m, 0))
    params = {}
    if not interpret:
        from jax.experimental.pallas import triton as pltriton
        params = dict(compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=1))
    return pl.pallas_call(
        kernel,
        out_shape=(jax.ShapeDtypeStruct((M, D), x.dtype), jax.ShapeDtypeStruct((M, D), x.dtype)),
        grid=(M,),
        in_specs=[pl.BlockSpec((S, None, D), lambda m: (0, m, 0)), row, pl.BlockSpec((D,), lambda m: (0,))]
        + ([] if extra is None else [row]),
        out_specs=(row, row),
        interpret=interpret,
        **params,
    )(partials, x, weight, *([] if extra is None else [extra]))
