"""Flash attention backward for Hopper in Pallas Mosaic GPU, and the pipeline and mask pieces both directions use.

With P = exp(S - lse) recomputed per block, dP = dO V^T, dS = P * (dP - delta), delta = rowsum(dO * O) - dlse:
  dK/dV pass  one CTA per (batch, kv head, 128 keys); each consumer warpgroup owns 64 keys and keeps dK, dV in
              registers while the producer streams query blocks (Q, dO, lse, delta) of all G query heads that
              share the kv head, so GQA needs no extra reduction. dV += P^T dO, dK += dS^T Q.
  dQ pass     one CTA per (batch, q head, 128 queries), streaming K/V blocks like the forward. dQ += dS K.
Softcap multiplies dS by 1 - tanh^2 of the capped logit. Head dim 256 would need 256 f32 accumulator registers
per thread for dK and dV, so it takes the reference VJP instead.

Shared with the forward (`flash_attention.py`): the static mask description, the visible-block ranges, the
three-loop masked/unmasked split, the TMA producer loop and the wgmma helpers. Padding: padded query rows get
lse = +inf (so P = 0) and padded keys are masked, so neither leaks into real gradients. This module knows no
public API: `flash_attention.py` validates arguments and owns the custom VJP.
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

LOG2E = math.log2(math.e)
BLOCK_Q = 64                # rows per consumer warpgroup (the wgmma M dimension)
NUM_CONSUMERS = 2
TILE_Q = BLOCK_Q * NUM_CONSUMERS
BLOCK = BLOCK_Q
TILE = TILE_Q
WGMMA = plgpu.Layout.WGMMA


# ----------------------------------------------------------------------------------------------------------------
# Pieces shared by the forward and backward kernels


@dataclasses.dataclass(frozen=True)
class MaskSpec:
    """Static description of who sees whom; shared by the forward and backward kernels."""
    causal: bool
    window: int | None
    has_segments: bool
    seq_len: int        # real T; keys at or past it are padding
    padded_len: int     # T rounded up to the tiles


def smem_transforms(dtype):
    """128-byte swizzle with (8, 64) tiles: the layout wgmma reads and TMA writes without bank conflicts."""
    del dtype
    return (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))


def kv_block_range(spec: MaskSpec, q0, q_rows: int, block_kv: int):
    """KV blocks [lo, hi) that query rows [q0, q0 + q_rows) can see, and the sub-range [a, c) needing no mask."""
    num_kv_blocks = pl.cdiv(spec.seq_len, block_kv)
    hi = jnp.int32(num_kv_blocks)
    lo = jnp.int32(0)
    c = jnp.int32(spec.seq_len // block_kv)             # a ragged last block is masked
    a = jnp.int32(0)
    if spec.causal:
        hi = jnp.minimum(hi, lax.div(q0 + q_rows + block_kv - 1, block_kv))
        c = jnp.minimum(c, lax.div(q0 + 1, block_kv))   # blocks whose last key <= the tile's first query
    if spec.window is not None:
        lo = jnp.maximum(lo, lax.div(jnp.maximum(q0 - spec.window + 1, 0), block_kv))
        a = jnp.maximum(a, lax.div(jnp.maximum(q0 + q_rows - spec.window, 0) + block_kv - 1, block_kv))
    lo = jnp.minimum(lo, hi)
    if spec.has_segments:
        a = c = hi
    a = jnp.clip(a, lo, hi)
    c = jnp.clip(c, a, hi)
    return lo, a, c, hi


def visible(spec: MaskSpec, q_ids, kv_ids, q_seg=None, kv_seg=None):
    """Boolean mask from broadcast query/key positions (and segment ids) in the same register layout."""
    ok = None

    def conj(a, b):
        return b if a is None else a & b

    if spec.causal:
        ok = conj(ok, kv_ids <= q_ids)
    if spec.window is not None:
        ok = conj(ok, q_ids - kv_ids < spec.window)
    if spec.seq_len < spec.padded_len:
        ok = conj(ok, kv_ids < spec.seq_len)
    if spec.has_segments:
        ok = conj(ok, q_seg == kv_seg)
    return ok


def three_loops(lo, a, c, hi, step_fn, carry):
    """Runs step_fn(i, carry, masked) for i in [lo, hi): masked on [lo, a) and [c, hi), unmasked on [a, c)."""
    carry = lax.fori_loop(lo, a, functools.partial(step_fn, masked=True), carry)
    carry = lax.fori_loop(a, c, functools.partial(step_fn, masked=False), carry)
    return lax.fori_loop(c, hi, functools.partial(step_fn, masked=True), carry)


def produce(lo, hi, num_stages: int, copies):
    """Producer loop: for step in [lo, hi) issue each TMA copy into ring slot (step - lo) % num_stages.

    copies: (src(step) -> GMEM ref, dst SMEM [stages, ...], full barriers [stages], consumed barriers [stages]).
    A slot is reused only after its consumers arrived on its consumed barrier. Copies may share a consumed
    barrier; each barrier is waited on once per step, since every wait advances the waiter's phase. Each copy
    waits only for its own barrier, in list order, so an early-freed buffer (K) refills before a late one (V).
    """
    distinct = []
    for *_, consumed in copies:
        if not any(consumed is d for d in distinct):
            distinct.append(consumed)

    @pl.loop(lo, hi)
    def _(step):
        i = step - lo
        slot = lax.rem(i, num_stages)
        waited = []
        for src, dst, full, consumed in copies:
            if not any(consumed is w for w in waited):
                waited.append(consumed)
                pl.when(i >= num_stages)(lambda consumed=consumed: plgpu.barrier_wait(consumed.at[slot]))
            plgpu.copy_gmem_to_smem(src(step), dst.at[slot], full.at[slot])

    # Drain: observe the consumption of the last slots, so every barrier phase is waited on before exit.
    @pl.loop(jnp.maximum(hi - lo - num_stages, 0), hi - lo)
    def _(i):
        for consumed in distinct:
            plgpu.barrier_wait(consumed.at[lax.rem(i, num_stages)])


def mma(acc, a, b_smem, a_smem, interpret: bool):
    """acc + a @ b on the tensor cores, a [64, X] in registers, b_smem [X, Y]; returns the new accumulator.

    Compiled, a stays in registers and accumulates in place (wgmma RS form). The CPU interpreter reads wgmma
    operands only from SMEM and has no rule for `run_state`, so there a goes through `a_smem` and the sum is
    formed in registers; everything else in the kernels runs the same on both paths.
    """
    if not interpret:
        def body(acc_ref):
            plgpu.wgmma(acc_ref, a, b_smem)
        return pl.run_state(body)(plgpu.ACC.init(acc))
    a_smem[...] = a
    plgpu.commit_smem()

    def body(acc_ref):
        plgpu.wgmma(acc_ref, a_smem, b_smem)
        return acc_ref[...]
    return acc + pl.run_scoped(body, plgpu.ACC(acc.shape, jnp.float32))


def mma_fresh(a_smem, b_smem, shape):
    """a_smem @ b_smem into a fresh f32 accumulator of `shape`; waits for the result."""
    def body(acc_ref):
        plgpu.wgmma(acc_ref, a_smem, b_smem)
        return acc_ref[...]
    return pl.run_scoped(body, plgpu.ACC(shape, jnp.float32))


def scaled_logits(s, scale: float, softcap: float | None):
    """Raw q.k -> logits in base 2 (times log2 e), and tanh(...) when softcapped (the backward needs it)."""
    if softcap is None:
        return s * (scale * LOG2E), None
    t = jnp.tanh(s * (scale / softcap))
    return t * (softcap * LOG2E), t


def interpret_params(interpret):
    if interpret is False or interpret is None:
        return None
    if interpret is True:
        from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
        return InterpretGPUParams()
    return interpret


def pad_tokens(x, Tp: int, value=0):
    """Pads axis 1 (tokens) of x up to Tp."""
    T = x.shape[1]
    if T == Tp:
        return x
    widths = [(0, 0)] * x.ndim
    widths[1] = (0, Tp - T)
    return jnp.pad(x, widths, constant_values=value)



# ----------------------------------------------------------------------------------------------------------------
# Backward


def backward(q, k, v, seg, o, lse, do, dlse, *, spec: MaskSpec, scale: float, softcap, config, interpret):
    """dq, dk, dv for q [B, T, N, H], k/v [B, T, K, H] given o, lse [B, N, T] and the cotangents do, dlse."""
    B, T, N, H = q.shape
    if H > 128:
        return _reference_vjp(q, k, v, seg, do, dlse, spec=spec, scale=scale, softcap=softcap)
    Tp = spec.padded_len
    delta = jnp.einsum("btnh,btnh->bnt", o.astype(jnp.float32), do.astype(jnp.float32))   # [B, N, T]
    if dlse is not None:
        delta = delta - dlse                              # d lse / d s = P, so it folds into delta
    lse2 = jnp.where(jnp.isfinite(lse), lse * LOG2E, jnp.inf)   # base 2; a row that saw nothing gets P = 0
    pad_stat = lambda x, value: jnp.pad(x, ((0, 0), (0, 0), (0, Tp - T)), constant_values=value)
    args = dict(q=pad_tokens(q, Tp), k=pad_tokens(k, Tp), v=pad_tokens(v, Tp),
                do=pad_tokens(do.astype(q.dtype), Tp), lse2=pad_stat(lse2, jnp.inf), delta=pad_stat(delta, 0.0),
                seg=jnp.zeros((B, Tp), jnp.int32) if seg is None else pad_tokens(seg, Tp, -1))
    common = dict(spec=spec, scale=scale, softcap=softcap, config=config, interpret=interpret)
    dq = _dq_call(**args, **common)
    dk, dv = _dkdv_call(**args, **common)
    return dq[:, :T], dk[:, :T], dv[:, :T]


def _reference_vjp(q, k, v, seg, do, dlse, *, spec: MaskSpec, scale: float, softcap):
    from kernels_pallas.flash_attention import flash_attention_reference

    def f(q, k, v):
        return flash_attention_reference(q, k, v, causal=spec.causal, segment_ids=seg, sm_scale=scale,
                                         sliding_window=spec.window, softcap=softcap)
    _, vjp = jax.vjp(f, q, k, v)
    return vjp((do, jnp.zeros(q.shape[:1] + (q.shape[2], q.shape[1]), jnp.float32) if dlse is None else dlse))


def _probabilities(s, lse_b, scale: float, softcap, ok):
    """P = exp2(logits2 - lse2) from raw q.k, zero where not visible; also tanh of the capped logit (or None)."""
    s2, t = scaled_logits(s, scale, softcap)
    p = jnp.exp2(s2 - lse_b)
    if ok is not None:
        p = jnp.where(ok, p, 0.0)
    return p, t


def _dq_call(q, k, v, do, lse2, delta, seg, *, spec, scale, softcap, config, interpret):
    B, Tp, N, H = q.shape
    G = N // k.shape[2]
    dtype = q.dtype
    block_kv = config.bwd_block_kv
    stages = config.bwd_num_stages
    use_interpreter = interpret is not None
    transforms = smem_transforms(dtype)

    def kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, seg_ref, dq_ref,
               q_smem, do_smem, k_smem, v_smem, ds_smem, qseg_smem, kvseg_smem, lse_smem, delta_smem,
               q_bar, do_bar, lse_bar, delta_bar, qs_bar, k_full, v_full, s_full, k_consumed, v_consumed):
        # q_ref, do_ref, dq_ref [B, Tp, N, H]; k_ref, v_ref [B, Tp, K, H]; lse_ref, delta_ref [B, N, Tp] f32
        # seg_ref [B, Tp] int32; q_smem, do_smem [2, 64, H]; k_smem, v_smem [stages, block_kv, H]
        # ds_smem [2, 64, block_kv] (interpreter only); qseg_smem, lse_smem, delta_smem [2, 64]
        # kvseg_smem [stages, block_kv]
        head = lax.axis_index("heads")
        tile = lax.axis_index("q_tiles")
        batch = lax.axis_index("batch")
        wg = lax.axis_index("wg")
        kv_head = lax.div(head, G)
        q0 = tile * TILE
        lo, a, c, hi = kv_block_range(spec, q0, TILE, block_kv)

        @pl.when(wg < 2)
        def _consumer():
            plgpu.set_max_registers(232, action="increase")
            row0 = q0 + wg * BLOCK
            rows = pl.ds(row0, BLOCK)
            plgpu.copy_gmem_to_smem(q_ref.at[batch, rows, head], q_smem.at[wg], q_bar.at[wg])
            plgpu.copy_gmem_to_smem(do_ref.at[batch, rows, head], do_smem.at[wg], do_bar.at[wg])
            plgpu.copy_gmem_to_smem(lse_ref.at[batch, head, rows], lse_smem.at[wg], lse_bar.at[wg])
            plgpu.copy_gmem_to_smem(delta_ref.at[batch, head, rows], delta_smem.at[wg], delta_bar.at[wg])
            if spec.has_segments:
                plgpu.copy_gmem_to_smem(seg_ref.at[batch, rows], qseg_smem.at[wg], qs_bar.at[wg])
                plgpu.barrier_wait(qs_bar.at[wg])
            for bar in (q_bar, do_bar, lse_bar, delta_bar):
                plgpu.barrier_wait(bar.at[wg])
            shape = (BLOCK, block_kv)
            row_vec = lambda ref: lax.broadcast_in_dim(plgpu.load(ref, layout=WGMMA.reduce(1)), shape, [0])
            lse_b = row_vec(lse_smem.at[wg])
            delta_b = row_vec(delta_smem.at[wg])
            q_seg = row_vec(qseg_smem.at[wg]) if spec.has_segments else None

            def step(i, dq, masked):
                slot = lax.rem(i - lo, stages)
                plgpu.barrier_wait(k_full.at[slot])
                s = mma_fresh(q_smem.at[wg], k_smem.at[slot].transpose((1, 0)), shape)    # [64, block_kv]
                ok = None
                if masked:
                    q_ids = row0 + plgpu.broadcasted_iota(jnp.int32, shape, 0, layout=WGMMA)
                    kv_ids = i * block_kv + plgpu.broadcasted_iota(jnp.int32, shape, 1, layout=WGMMA)
                    kv_seg = None
                    if spec.has_segments:
                        plgpu.barrier_wait(s_full.at[slot])
                        kv_seg = lax.broadcast_in_dim(
                            plgpu.load(kvseg_smem.at[slot], layout=WGMMA.reduce(0)), shape, [1])
                    ok = visible(spec, q_ids, kv_ids, q_seg, kv_seg)
                p, t = _probabilities(s, lse_b, scale, softcap, ok)
                plgpu.barrier_wait(v_full.at[slot])
                dp = mma_fresh(do_smem.at[wg], v_smem.at[slot].transpose((1, 0)), shape)   # [64, block_kv]
                plgpu.barrier_arrive(v_consumed.at[slot])
                ds = p * (dp - delta_b)
                if t is not None:
                    ds = ds * (1.0 - t * t)
                dq = mma(dq, ds.astype(dtype), k_smem.at[slot], ds_smem.at[wg], use_interpreter)
                plgpu.barrier_arrive(k_consumed.at[slot])
                return dq

            dq = plgpu.layout_cast(jnp.zeros((BLOCK, H), jnp.float32), WGMMA)
            dq = three_loops(lo, a, c, hi, step, dq)
            q_smem.at[wg][...] = (dq * scale).astype(dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(q_smem.at[wg], dq_ref.at[batch, rows, head])
            plgpu.wait_smem_to_gmem(0)

        @pl.when(wg == 2)
        def _producer():
            plgpu.set_max_registers(40, action="decrease")
            blk = lambda j: pl.ds(j * block_kv, block_kv)
            copies = [(lambda j: k_ref.at[batch, blk(j), kv_head], k_smem, k_full, k_consumed),
                      (lambda j: v_ref.at[batch, blk(j), kv_head], v_smem, v_full, v_consumed)]
            if spec.has_segments:
                copies.append((lambda j: seg_ref.at[batch, blk(j)], kvseg_smem, s_full, v_consumed))
            produce(lo, hi, stages, copies)

    per_wg = lambda shape, dt, **kw: plgpu.SMEM((2, *shape), dt, **kw)
    scratch = [
        per_wg((BLOCK, H), dtype, transforms=transforms),
        per_wg((BLOCK, H), dtype, transforms=transforms),
        plgpu.SMEM((stages, block_kv, H), dtype, transforms=transforms),
        plgpu.SMEM((stages, block_kv, H), dtype, transforms=transforms),
        per_wg((BLOCK, block_kv) if use_interpreter else (8, 64), dtype),
        per_wg((BLOCK,), jnp.int32),
        plgpu.SMEM((stages, block_kv), jnp.int32),
        per_wg((BLOCK,), jnp.float32),
        per_wg((BLOCK,), jnp.float32),
        *[plgpu.Barrier(num_barriers=2) for _ in range(5)],                        # q, do, lse, delta, q segments
        *[plgpu.Barrier(num_barriers=stages) for _ in range(3)],                   # k, v, kv segments full
        *[plgpu.Barrier(num_barriers=stages, num_arrivals=2) for _ in range(2)],   # k, v consumed
    ]
    return plgpu.kernel(
        kernel,
        out_type=jax.ShapeDtypeStruct(q.shape, dtype),
        scratch_types=scratch,
        grid=(N, Tp // TILE, B),
        grid_names=("heads", "q_tiles", "batch"),
        num_threads=3,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True, lowering_semantics=plgpu.LoweringSemantics.Lane),
        interpret=interpret,
    )(q, k, v, do, lse2, delta, seg)


def q_block_range(spec: MaskSpec, kv0, kv_rows: int, block_q: int):
    """Query blocks [lo, hi) that keys [kv0, kv0 + kv_rows) are seen by, and the sub-range [a, c) needing no mask."""
    hi = jnp.int32(pl.cdiv(spec.seq_len, block_q))       # blocks past the real length hold only padding
    lo = jnp.int32(0)
    a = jnp.int32(0)
    c = hi
    if spec.causal:
        lo = lax.div(kv0, block_q)
        a = lax.div(kv0 + kv_rows - 1 + block_q - 1, block_q)   # first query of the block >= the tile's last key
    if spec.window is not None:
        hi = jnp.minimum(hi, lax.div(kv0 + kv_rows + spec.window - 2, block_q) + 1)
        c = jnp.minimum(c, lax.div(kv0 + spec.window, block_q))  # last query - first key < window
    lo = jnp.minimum(lo, hi)
    if spec.has_segments:
        a = c = hi
    if spec.seq_len < spec.padded_len:                   # a tile holding padded keys masks every block
        partial = kv0 + kv_rows > spec.seq_len
        a = jnp.where(partial, hi, a)
    a = jnp.clip(a, lo, hi)
    c = jnp.clip(c, a, hi)
    return lo, a, c, hi


def _dkdv_call(q, k, v, do, lse2, delta, seg, *, spec, scale, softcap, config, interpret):
    B, Tp, N, H = q.shape
    K = k.shape[2]
    G = N // K
    dtype = q.dtype
    block_q = config.bwd_block_q
    stages = config.bwd_num_stages
    use_interpreter = interpret is not None
    transforms = smem_transforms(dtype)

    def kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, seg_ref, dk_ref, dv_ref,
               k_smem, v_smem, q_smem, do_smem, p_smem, kvseg_smem, qseg_smem, lse_smem, delta_smem,
               k_bar, v_bar, ks_bar, q_full, do_full, lse_full, delta_full, qs_full, consumed):
        # q_ref, do_ref [B, Tp, N, H]; k_ref, v_ref, dk_ref, dv_ref [B, Tp, K, H]; lse_ref, delta_ref [B, N, Tp]
        # seg_ref [B, Tp]; k_smem, v_smem [2, 64, H] (reused for dK, dV); q_smem, do_smem [stages, block_q, H]
        # p_smem [2, 64, block_q] (interpreter only); kvseg_smem [2, 64]; qseg_smem, lse_smem, delta_smem
        # [stages, block_q]
        kv_head = lax.axis_index("kv_heads")
        tile = lax.axis_index("kv_tiles")
        batch = lax.axis_index("batch")
        wg = lax.axis_index("wg")
        kv0 = tile * TILE
        lo, a, c, hi = q_block_range(spec, kv0, TILE, block_q)
        n = hi - lo                      # query blocks per query head; the loop runs G * n steps
        n_safe = jnp.maximum(n, 1)

        @pl.when(wg < 2)
        def _consumer():
            plgpu.set_max_registers(232, action="increase")
            row0 = kv0 + wg * BLOCK
            rows = pl.ds(row0, BLOCK)
            plgpu.copy_gmem_to_smem(k_ref.at[batch, rows, kv_head], k_smem.at[wg], k_bar.at[wg])
            plgpu.copy_gmem_to_smem(v_ref.at[batch, rows, kv_head], v_smem.at[wg], v_bar.at[wg])
            shape = (BLOCK, block_q)
            kv_seg = None
            if spec.has_segments:
                plgpu.copy_gmem_to_smem(seg_ref.at[batch, rows], kvseg_smem.at[wg], ks_bar.at[wg])
                plgpu.barrier_wait(ks_bar.at[wg])
                kv_seg = lax.broadcast_in_dim(plgpu.load(kvseg_smem.at[wg], layout=WGMMA.reduce(1)), shape, [0])
            plgpu.barrier_wait(k_bar.at[wg])
            plgpu.barrier_wait(v_bar.at[wg])
            col_vec = lambda ref: lax.broadcast_in_dim(plgpu.load(ref, layout=WGMMA.reduce(0)), shape, [1])

            def step(qb, carry, masked, g):
                dk, dv = carry                                   # [64, H] f32 each
                slot = lax.rem(g * n + qb - lo, stages)
                plgpu.barrier_wait(q_full.at[slot])
                plgpu.barrier_wait(lse_full.at[slot])
                s_t = mma_fresh(k_smem.at[wg], q_smem.at[slot].transpose((1, 0)), shape)   # [64 keys, block_q]
                ok = None
                if masked:
                    kv_ids = row0 + plgpu.broadcasted_iota(jnp.int32, shape, 0, layout=WGMMA)
                    q_ids = qb * block_q + plgpu.broadcasted_iota(jnp.int32, shape, 1, layout=WGMMA)
                    q_seg = None
                    if spec.has_segments:
                        plgpu.barrier_wait(qs_full.at[slot])
                        q_seg = col_vec(qseg_smem.at[slot])
                    ok = visible(spec, q_ids, kv_ids, q_seg, kv_seg)
                p_t, t = _probabilities(s_t, col_vec(lse_smem.at[slot]), scale, softcap, ok)
                plgpu.barrier_wait(do_full.at[slot])
                dv = mma(dv, p_t.astype(dtype), do_smem.at[slot], p_smem.at[wg], use_interpreter)
                dp_t = mma_fresh(v_smem.at[wg], do_smem.at[slot].transpose((1, 0)), shape)
                plgpu.barrier_wait(delta_full.at[slot])
                ds_t = p_t * (dp_t - col_vec(delta_smem.at[slot]))
                if t is not None:
                    ds_t = ds_t * (1.0 - t * t)
                dk = mma(dk, ds_t.astype(dtype), q_smem.at[slot], p_smem.at[wg], use_interpreter)
                plgpu.barrier_arrive(consumed.at[slot])
                return dk, dv

            zeros = plgpu.layout_cast(jnp.zeros((BLOCK, H), jnp.float32), WGMMA)

            def head_loop(g, carry):
                return three_loops(lo, a, c, hi, lambda qb, cr, masked: step(qb, cr, masked, g), carry)
            dk, dv = lax.fori_loop(0, G, head_loop, (zeros, zeros))
            k_smem.at[wg][...] = (dk * scale).astype(dtype)
            v_smem.at[wg][...] = dv.astype(dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(k_smem.at[wg], dk_ref.at[batch, rows, kv_head])
            plgpu.copy_smem_to_gmem(v_smem.at[wg], dv_ref.at[batch, rows, kv_head])
            plgpu.wait_smem_to_gmem(0)

        @pl.when(wg == 2)
        def _producer():
            plgpu.set_max_registers(40, action="decrease")

            def where(step):                 # flattened step -> (query head, query rows)
                g = lax.div(step, n_safe)
                qb = lo + lax.rem(step, n_safe)
                return kv_head * G + g, pl.ds(qb * block_q, block_q)

            def at_rows(ref):
                return lambda step: ref.at[batch, where(step)[1], where(step)[0]]

            def at_stat(ref):
                return lambda step: ref.at[batch, where(step)[0], where(step)[1]]
            copies = [(at_rows(q_ref), q_smem, q_full, consumed), (at_stat(lse_ref), lse_smem, lse_full, consumed),
                      (at_rows(do_ref), do_smem, do_full, consumed),
                      (at_stat(delta_ref), delta_smem, delta_full, consumed)]
            if spec.has_segments:
                copies.append((lambda step: seg_ref.at[batch, where(step)[1]], qseg_smem, qs_full, consumed))
            produce(0, G * n, stages, copies)

    per_wg = lambda shape, dt, **kw: plgpu.SMEM((2, *shape), dt, **kw)
    scratch = [
        per_wg((BLOCK, H), dtype, transforms=transforms),
        per_wg((BLOCK, H), dtype, transforms=transforms),
        plgpu.SMEM((stages, block_q, H), dtype, transforms=transforms),
        plgpu.SMEM((stages, block_q, H), dtype, transforms=transforms),
        per_wg((BLOCK, block_q) if use_interpreter else (8, 64), dtype),
        per_wg((BLOCK,), jnp.int32),
        plgpu.SMEM((stages, block_q), jnp.int32),
        plgpu.SMEM((stages, block_q), jnp.float32),
        plgpu.SMEM((stages, block_q), jnp.float32),
        *[plgpu.Barrier(num_barriers=2) for _ in range(3)],                        # k, v, kv segments
        *[plgpu.Barrier(num_barriers=stages) for _ in range(5)],                   # q, do, lse, delta, q segments
        plgpu.Barrier(num_barriers=stages, num_arrivals=2),                        # consumed
    ]
    kv_shape = jax.ShapeDtypeStruct(k.shape, dtype)
    return plgpu.kernel(
        kernel,
        out_type=(kv_shape, kv_shape),
        scratch_types=scratch,
        grid=(K, Tp // TILE, B),
        grid_names=("kv_heads", "kv_tiles", "batch"),
        num_threads=3,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True, lowering_semantics=plgpu.LoweringSemantics.Lane),
        interpret=interpret,
    )(q, k, v, do, lse2, delta, seg)
