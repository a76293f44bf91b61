"""Flash attention for Hopper in Pallas Mosaic GPU: forward kernel, custom VJP glue and reference (the benchmark is
flash_bench.py).

Shapes: q [B, T, N, H]; k, v [B, T, K, H] with N % K == 0 (MHA, GQA, MQA); segment_ids [B, T] int32.
B batch, T tokens, N query heads, K kv heads, G = N // K query heads per kv head, H head dim.

One CTA computes a 128-row query tile of one (batch, head) with three warpgroups. The producer (warpgroup 2)
TMA-loads K/V blocks into a `num_stages`-deep ring of swizzled SMEM buffers, waiting on "consumed" barriers
before it overwrites a slot. Consumers 0 and 1 each own 64 query rows: S = Q K^T (wgmma), online softmax in base 2
(scale and log2(e) folded into one FMA), O += P V (wgmma, P in registers). Pipelined (d128/d256 default), a
consumer issues S_j and O += P_{j-1} V_{j-1} back to back and runs the softmax of S_j while the second product
is on the tensor cores. Optionally the consumers take turns issuing (`schedule`). The KV loop visits only the
blocks the tile can see (causal and window bounds) and masks only those that need it (diagonal, window edge,
ragged tail, or all with segment ids). T is padded up to the tile inside the wrapper; padded keys are masked,
padded query rows sliced off. Causal tiles launch longest first, so the last wave holds short tiles.

The backward kernels, and the mask/pipeline pieces both directions share, live in `flash_attention_bwd.py`.
This module does not know about models, positions or paging: the caller gives index-causal, equal-length q, k/v.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.ad_checkpoint import checkpoint_name
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from kernels_pallas import flash_attention_bwd, ops
from kernels_pallas.flash_attention_bwd import (BLOCK_Q, LOG2E, NUM_CONSUMERS, TILE_Q, MaskSpec, interpret_params,
                                                kv_block_range, mma, mma_fresh, pad_tokens, produce,
                                                scaled_logits, smem_transforms, three_loops, visible)

HEAD_DIMS = (64, 128, 256)
DTYPES = (jnp.bfloat16, jnp.float16)
SCHEDULES = ("handoff", "rendezvous", "none")


# ----------------------------------------------------------------------------------------------------------------
# Tuning


@dataclasses.dataclass(frozen=True)
class TuningConfig:
    """Block sizes, pipeline depth and issue order.

    Forward: 128 query rows x `block_kv` keys per step. `pipeline` overlaps each softmax with the next QK^T and
    the previous PV. `schedule`, how the two consumers share the tensor cores: "none", "handoff" (wait for the
    turn before issuing, pass it on right after; pipelined only) or "rendezvous" (both meet at a barrier after
    every issue and every softmax). Backward: the dK/dV pass streams `bwd_block_q` query rows past 128 keys;
    the dQ pass streams `bwd_block_kv` keys past 128 rows."""
    block_kv: int = 128
    num_stages: int = 2
    pipeline: bool = True
    schedule: str = "none"
    bwd_block_q: int = 64
    bwd_block_kv: int = 64
    bwd_num_stages: int = 2

    def __post_init__(self):
        for name in ("block_kv", "bwd_block_q", "bwd_block_kv"):
            value = getattr(self, name)
            if value not in (64, 128, 256):
                raise ValueError(f"{name}={value} must be 64, 128 or 256")
        for name in ("num_stages", "bwd_num_stages"):
            value = getattr(self, name)
            if not 2 <= value <= 4:
                raise ValueError(f"{name}={value} must be in [2, 4]")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule={self.schedule!r} must be one of {SCHEDULES}")
        if self.schedule == "handoff" and not self.pipeline:
            raise ValueError(f"schedule={self.schedule!r} needs pipeline=True")

    @staticmethod
    def default(head_dim: int) -> TuningConfig:
        """Best forward of the H200 sweeps in docs/kernels/flash_attention.md (b4 s8192, 32/8 heads)."""
        if head_dim == 64:   # a 256-key step halves the per-step overhead; S [64, 256] leaves no room to pipeline
            return TuningConfig(block_kv=256, pipeline=False, schedule="rendezvous")
        return TuningConfig(block_kv=128 if head_dim == 128 else 64)


# ----------------------------------------------------------------------------------------------------------------
# Forward kernel


def _forward_call(q, k, v, segment_ids, *, spec: MaskSpec, scale: float, softcap, config: TuningConfig, interpret):
    """q [B, Tp, N, H], k/v [B, Tp, K, H], segment_ids [B, Tp] or None (Tp a multiple of the tiles)."""
    B, Tp, N, H = q.shape
    G = N // k.shape[2]
    dtype = q.dtype
    block_kv, stages, schedule = config.block_kv, config.num_stages, config.schedule
    use_interpreter = interpret is not None
    transforms = smem_transforms(dtype)
    # exp2(s * fold - m): the scale and log2(e) ride in one FMA. Softcap applies its own scale inside tanh.
    fold = 1.0 if softcap is not None else scale * LOG2E

    def kernel(q_ref, k_ref, v_ref, seg_ref, o_ref, lse_ref, q_smem, k_smem, v_smem, p_smem, qseg_smem, kvseg_smem,
               lse_smem, q_bar, qs_bar, k_full, v_full, s_full, k_consumed, v_consumed, meet, turn):
        # q_ref [B, Tp, N, H]; k_ref, v_ref [B, Tp, K, H]; seg_ref [B, Tp] int32 (or unused)
        # o_ref [B, Tp, N, H]; lse_ref [B, N, Tp] f32
        # q_smem [2, 64, H]: Q of each consumer, reused for its output; k_smem, v_smem [stages, block_kv, H]
        # p_smem [2, 64, block_kv]: P for the interpreter only; qseg_smem [2, 64]; kvseg_smem [stages, block_kv]
        # lse_smem [2, 64] f32; meet: the rendezvous barrier; turn [2]: the handoff barriers, one per consumer
        head, tile, batch, wg = (lax.axis_index(name) for name in ("heads", "q_tiles", "batch", "wg"))
        if spec.causal:   # longest tiles first
            tile = Tp // TILE_Q - 1 - tile
        kv_head = lax.div(head, G)
        q0 = tile * TILE_Q
        lo, a, c, hi = kv_block_range(spec, q0, TILE_Q, block_kv)
        # Visit at least one block (masked: [lo, a) or [c, hi) holds it), so the pipelined loop can peel the
        # first block. Only a tile of padded rows sees nothing; its output is sliced off.
        lo = jnp.minimum(lo, hi - 1)

        def rendezvous():
            plgpu.barrier_arrive(meet)
            plgpu.barrier_wait(meet)

        def turn_wait(*ready, first=False):
            """Before this consumer issues wgmmas: wait for the `ready` barriers (data) and for its turn."""
            if schedule == "rendezvous" and not first:   # data waits inside: the other consumer may need us
                plgpu.barrier_arrive(meet)
            for barrier in ready:
                plgpu.barrier_wait(barrier)
            if schedule == "rendezvous" and not first:
                plgpu.barrier_wait(meet)
            elif schedule == "handoff":
                plgpu.barrier_wait(turn.at[wg])

        def turn_pass(last=False):
            """After this consumer issued its wgmmas: let the other one issue."""
            if schedule == "rendezvous" and not last:
                rendezvous()
            elif schedule == "handoff":
                plgpu.barrier_arrive(turn.at[1 - wg])

        @pl.when(wg < NUM_CONSUMERS)
        def _consumer():
            plgpu.set_max_registers(232, action="increase")
            qo = q_smem.at[wg]
            row0 = q0 + wg * BLOCK_Q
            plgpu.copy_gmem_to_smem(q_ref.at[batch, pl.ds(row0, BLOCK_Q), head], qo, q_bar.at[wg])
            if spec.has_segments:
                plgpu.copy_gmem_to_smem(seg_ref.at[batch, pl.ds(row0, BLOCK_Q)], qseg_smem.at[wg], qs_bar.at[wg])
            plgpu.barrier_wait(q_bar.at[wg])
            q_seg = None
            if spec.has_segments:
                plgpu.barrier_wait(qs_bar.at[wg])
                q_seg = plgpu.load(qseg_smem.at[wg], layout=plgpu.Layout.WGMMA.reduce(1))
                q_seg = lax.broadcast_in_dim(q_seg, (BLOCK_Q, block_kv), [0])

            def softmax(s, m, l, i, masked):
                """Raw q.k of KV block i, s [64, block_kv] -> p [64, block_kv] f32, new m and l, rescale alpha."""
                if softcap is not None:
                    s, _ = scaled_logits(s, scale, softcap)
                if masked:
                    q_ids = row0 + plgpu.broadcasted_iota(jnp.int32, s.shape, 0, layout=plgpu.Layout.WGMMA)
                    kv_ids = i * block_kv + plgpu.broadcasted_iota(jnp.int32, s.shape, 1, layout=plgpu.Layout.WGMMA)
                    kv_seg = None
                    if spec.has_segments:
                        slot = lax.rem(i - lo, stages)
                        plgpu.barrier_wait(s_full.at[slot])
                        kv_seg = plgpu.load(kvseg_smem.at[slot], layout=plgpu.Layout.WGMMA.reduce(0))
                        kv_seg = lax.broadcast_in_dim(kv_seg, s.shape, [1])
                    ok = visible(spec, q_ids, kv_ids, q_seg, kv_seg)
                    if ok is not None:
                        s = jnp.where(ok, s, -jnp.inf)
                s_max = s.max(axis=1)
                m_new = jnp.maximum(m, s_max if fold == 1.0 else s_max * fold)   # fold > 0 commutes with max
                m_use = m_new
                if masked:   # a row that has seen nothing yet has m = -inf; shift it by 0 instead
                    m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new)
                alpha = jnp.exp2(m - m_use)
                p = jnp.exp2(s * fold - lax.broadcast_in_dim(m_use, s.shape, [0]))
                l = l * alpha + p.sum(axis=1)
                return p, m_new, l, alpha

            def rescale(acc, alpha):   # [64, H] * [64]
                return acc * lax.broadcast_in_dim(alpha, acc.shape, [0])

            def plain(acc, m, l):
                """One block per step: S = Q K^T, wait, softmax, O += P V, wait."""
                def step(i, carry, masked):
                    acc, m, l = carry   # [64, H], [64], [64] f32 (m in base 2)
                    slot = lax.rem(i - lo, stages)
                    plgpu.barrier_wait(k_full.at[slot])

                    def qk(acc_ref):
                        plgpu.wgmma(acc_ref, qo, k_smem.at[slot].transpose((1, 0)))
                        turn_pass()
                        return acc_ref[...]
                    s = pl.run_scoped(qk, plgpu.ACC((BLOCK_Q, block_kv), jnp.float32))   # [64, block_kv]
                    plgpu.barrier_arrive(k_consumed.at[slot])
                    p, m, l, alpha = softmax(s, m, l, i, masked)
                    acc = rescale(acc, alpha)
                    p16 = p.astype(dtype)
                    turn_wait(v_full.at[slot])
                    acc = mma(acc, p16, v_smem.at[slot], p_smem.at[wg], use_interpreter)
                    plgpu.barrier_arrive(v_consumed.at[slot])
                    return acc, m, l
                return three_loops(lo, a, c, hi, step, (acc, m, l))

            def pipelined(acc, m, l, o_acc=None, s_acc=None):
                """S_j and P_{j-1} V_{j-1} in flight together; the softmax of S_j runs under the second.

                Compiled, O and S live in wgmma accumulators o_acc [64, H] and s_acc [64, block_kv] for the whole
                loop; interpreted (both None), O is the carried `acc` and each product completes at once.
                """
                def pv(acc, p16, pslot):   # O += P V (issued; completes before the interpreter returns)
                    if use_interpreter:
                        return mma(acc, p16, v_smem.at[pslot], p_smem.at[wg], True)
                    plgpu.wgmma(o_acc, p16, v_smem.at[pslot])
                    return acc

                def issue(j, prev, acc):
                    """Waits for K_j (and V_{j-1}), issues S_j (and O += P_{j-1} V_{j-1}); returns S_j."""
                    slot = lax.rem(j - lo, stages)
                    ready = [k_full.at[slot]]
                    if prev is not None:
                        p16, pslot = prev
                        ready.append(v_full.at[pslot])
                    turn_wait(*ready, first=prev is None)
                    if use_interpreter:
                        s = mma_fresh(qo, k_smem.at[slot].transpose((1, 0)), (BLOCK_Q, block_kv))
                    else:
                        s_acc[...] = plgpu.layout_cast(jnp.zeros((BLOCK_Q, block_kv), jnp.float32),
                                                       plgpu.Layout.WGMMA)
                        plgpu.wgmma(s_acc, qo, k_smem.at[slot].transpose((1, 0)))
                    if prev is not None:
                        acc = pv(acc, p16, pslot)
                    turn_pass()
                    if not use_interpreter:   # S_j was issued first, so it is done once one group remains
                        s = plgpu.wgmma_accumulator_load(s_acc, wait_n=0 if prev is None else 1)
                    plgpu.barrier_arrive(k_consumed.at[slot])
                    return s, acc

                def step(j, carry, masked):
                    acc, p16, m, l = carry   # acc [64, H] (interpreter) or None; p16 [64, block_kv] of block j-1
                    pslot = lax.rem(j - 1 - lo, stages)
                    s, acc = issue(j, (p16, pslot), acc)
                    p, m, l, alpha = softmax(s, m, l, j, masked)
                    if use_interpreter:
                        acc = rescale(acc, alpha)
                    else:   # reading the accumulator waits for P_{j-1} V_{j-1}
                        o_acc[...] = rescale(o_acc[...], alpha)
                    plgpu.barrier_arrive(v_consumed.at[pslot])
                    return acc, p.astype(dtype), m, l

                s, acc = issue(lo, None, acc)
                p, m, l, _ = softmax(s, m, l, lo, masked=True)   # O is still 0: nothing to rescale
                carry = (acc if use_interpreter else None, p.astype(dtype), m, l)
                a1 = jnp.maximum(a, lo + 1)
                acc, p16, m, l = three_loops(lo + 1, a1, jnp.maximum(c, a1), hi, step, carry)
                pslot = lax.rem(hi - 1 - lo, stages)
                turn_wait(v_full.at[pslot])
                acc = pv(acc, p16, pslot)
                turn_pass(last=True)
                if not use_interpreter:
                    acc = o_acc[...]
                plgpu.barrier_arrive(v_consumed.at[pslot])
                return acc, m, l

            acc = plgpu.layout_cast(jnp.zeros((BLOCK_Q, H), jnp.float32), plgpu.Layout.WGMMA)
            m = plgpu.layout_cast(jnp.full((BLOCK_Q,), -jnp.inf, jnp.float32), plgpu.Layout.WGMMA.reduce(1))
            l = plgpu.layout_cast(jnp.zeros((BLOCK_Q,), jnp.float32), plgpu.Layout.WGMMA.reduce(1))
            if schedule != "none":   # rendezvous: consumer 1 runs half a step late; handoff: consumer 0 goes first
                pl.when(wg == 1)(rendezvous if schedule == "rendezvous" else lambda: plgpu.barrier_arrive(turn.at[0]))
            if not config.pipeline:
                acc, m, l = plain(acc, m, l)
            elif use_interpreter:
                acc, m, l = pipelined(acc, m, l)
            else:
                acc, m, l = pl.run_scoped(lambda o_acc, s_acc: pipelined(None, m, l, o_acc, s_acc),
                                          plgpu.ACC((BLOCK_Q, H), jnp.float32),
                                          plgpu.ACC((BLOCK_Q, block_kv), jnp.float32))
            if schedule != "none":   # balance consumer 1's extra rendezvous / observe its last handoff
                pl.when(wg == 0)(rendezvous if schedule == "rendezvous" else lambda: plgpu.barrier_wait(turn.at[0]))

            l_safe = jnp.where(l == 0.0, 1.0, l)  # a row that sees nothing gives 0
            acc = acc * lax.broadcast_in_dim(1.0 / l_safe, acc.shape, [0])
            qo[...] = acc.astype(dtype)
            lse_smem.at[wg][...] = m * (1.0 / LOG2E) + jnp.log(l)   # natural log; -inf for an empty row
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(qo, o_ref.at[batch, pl.ds(row0, BLOCK_Q), head])
            plgpu.copy_smem_to_gmem(lse_smem.at[wg], lse_ref.at[batch, head, pl.ds(row0, BLOCK_Q)])
            plgpu.wait_smem_to_gmem(0)

        @pl.when(wg == NUM_CONSUMERS)
        def _producer():
            plgpu.set_max_registers(40, action="decrease")
            copies = [
                (lambda j: k_ref.at[batch, pl.ds(j * block_kv, block_kv), kv_head], k_smem, k_full, k_consumed),
                (lambda j: v_ref.at[batch, pl.ds(j * block_kv, block_kv), kv_head], v_smem, v_full, v_consumed),
            ]
            if spec.has_segments:   # the segment slot is read in the softmax, so it is freed together with V
                copies.append((lambda j: seg_ref.at[batch, pl.ds(j * block_kv, block_kv)], kvseg_smem, s_full,
                               v_consumed))
            produce(lo, hi, stages, copies)

    seg = segment_ids if segment_ids is not None else jnp.zeros((B, Tp), jnp.int32)
    scratch = [
        plgpu.SMEM((NUM_CONSUMERS, BLOCK_Q, H), dtype, transforms=transforms),
        plgpu.SMEM((stages, block_kv, H), dtype, transforms=transforms),
        plgpu.SMEM((stages, block_kv, H), dtype, transforms=transforms),
        plgpu.SMEM((NUM_CONSUMERS, BLOCK_Q, block_kv) if use_interpreter else (NUM_CONSUMERS, 8), dtype),
        plgpu.SMEM((NUM_CONSUMERS, BLOCK_Q), jnp.int32),
        plgpu.SMEM((stages, block_kv), jnp.int32),
        plgpu.SMEM((NUM_CONSUMERS, BLOCK_Q), jnp.float32),
        plgpu.Barrier(num_barriers=NUM_CONSUMERS),                     # q
        plgpu.Barrier(num_barriers=NUM_CONSUMERS),                     # q segments
        plgpu.Barrier(num_barriers=stages),                            # k full
        plgpu.Barrier(num_barriers=stages),                            # v full
        plgpu.Barrier(num_barriers=stages),                            # kv segments full
        plgpu.Barrier(num_barriers=stages, num_arrivals=NUM_CONSUMERS),
        plgpu.Barrier(num_barriers=stages, num_arrivals=NUM_CONSUMERS),
        plgpu.Barrier(num_arrivals=NUM_CONSUMERS),                     # rendezvous
        plgpu.Barrier(num_barriers=NUM_CONSUMERS),                     # handoff turns
    ]
    o, lse = plgpu.kernel(
        kernel,
        out_type=(jax.ShapeDtypeStruct(q.shape, dtype), jax.ShapeDtypeStruct((B, N, Tp), jnp.float32)),
        scratch_types=scratch,
        grid=(N, Tp // TILE_Q, B),
        grid_names=("heads", "q_tiles", "batch"),
        num_threads=NUM_CONSUMERS + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True, lowering_semantics=plgpu.LoweringSemantics.Lane),
        interpret=interpret,
    )(q, k, v, seg)
    return o, lse


# ----------------------------------------------------------------------------------------------------------------
# Public wrapper (differentiable)


@dataclasses.dataclass(frozen=True)
class _Options:
    causal: bool
    scale: float
    window: int | None
    softcap: float | None
    config: TuningConfig
    interpret: object        # None (compile) or InterpretGPUParams


def flash_attention(q, k, v, *, causal: bool = True, segment_ids=None, sm_scale: float | None = None,
                    sliding_window: int | None = None, softcap: float | None = None, return_lse: bool = False,
                    config: TuningConfig | None = None, interpret=False):
    """Attention of q [B, T, N, H] over k, v [B, T, K, H]: o [B, T, N, H] (and lse [B, N, T] f32 if asked).

    Semantics of `ops.attention_reference` with index positions and segment_ids [B, T] shared by queries and keys.
    `interpret` is False, True, or an InterpretGPUParams (e.g. with detect_races=True) to run on CPU.
    """
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"{q.shape=}, {k.shape=}, {v.shape=} must all be [B, T, heads, H]")
    B, T, N, H = q.shape
    if k.shape != v.shape or k.shape[0] != B or k.shape[1] != T or k.shape[3] != H:
        raise ValueError(f"{k.shape=} and {v.shape=} must be [B={B}, T={T}, K, H={H}]")
    if N % k.shape[2]:
        raise ValueError(f"num q heads {N=} must be a multiple of num kv heads {k.shape[2]}")
    if H not in HEAD_DIMS:
        raise ValueError(f"head dim {H=} must be one of {HEAD_DIMS}")
    if q.dtype not in map(jnp.dtype, DTYPES) or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"{q.dtype=}, {k.dtype=}, {v.dtype=} must all be bfloat16 or float16")
    if segment_ids is not None and (segment_ids.shape != (B, T) or segment_ids.dtype.kind not in "iu"):
        raise ValueError(f"{segment_ids.shape=} ({segment_ids.dtype}) must be integer [B={B}, T={T}]")
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"{sliding_window=} must be >= 1")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"{softcap=} must be > 0")
    config = TuningConfig.default(H) if config is None else config
    if not isinstance(config, TuningConfig):
        raise ValueError(f"{config=} must be a TuningConfig")
    scale = float(H ** -0.5 if sm_scale is None else sm_scale)
    opts = _Options(bool(causal), scale, sliding_window, None if softcap is None else float(softcap), config,
                    interpret_params(interpret))
    seg = None if segment_ids is None else segment_ids.astype(jnp.int32)
    o, lse = _flash(q, k, v, seg, opts)
    return (o, lse) if return_lse else o


def mask_spec(T: int, opts: _Options, has_segments: bool) -> MaskSpec:
    """T padded to a multiple of every tile of the forward and backward kernels."""
    tile = max(TILE_Q, opts.config.block_kv, opts.config.bwd_block_q, opts.config.bwd_block_kv)
    return MaskSpec(opts.causal, opts.window, has_segments, T, pl.cdiv(T, tile) * tile)


def _forward(q, k, v, seg, opts: _Options):
    T = q.shape[1]
    spec = mask_spec(T, opts, seg is not None)
    Tp = spec.padded_len
    seg_p = None if seg is None else pad_tokens(seg, Tp, -1)
    o, lse = _forward_call(pad_tokens(q, Tp), pad_tokens(k, Tp), pad_tokens(v, Tp), seg_p, spec=spec,
                           scale=opts.scale, softcap=opts.softcap, config=opts.config, interpret=opts.interpret)
    return o[:, :T], lse[:, :, :T]


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _flash(q, k, v, seg, opts: _Options):
    return _forward(q, k, v, seg, opts)


def _flash_fwd(q, k, v, seg, opts: _Options):
    o, lse = _forward(q, k, v, seg, opts)
    # Named so remat policies can keep them; otherwise jax.checkpoint reruns the forward kernel in the backward.
    o, lse = checkpoint_name(o, "flash_out"), checkpoint_name(lse, "flash_lse")
    return (o, lse), (q, k, v, seg, o, lse)


def _flash_bwd(opts: _Options, residuals, cotangents):
    q, k, v, seg, o, lse = residuals
    do, dlse = cotangents
    spec = mask_spec(q.shape[1], opts, seg is not None)
    dq, dk, dv = flash_attention_bwd.backward(q, k, v, seg, o, lse, do, dlse, spec=spec, scale=opts.scale,
                                              softcap=opts.softcap, config=opts.config, interpret=opts.interpret)
    return dq, dk, dv, None


_flash.defvjp(_flash_fwd, _flash_bwd)


# ----------------------------------------------------------------------------------------------------------------
# Reference


def flash_attention_reference(q, k, v, *, causal: bool = True, segment_ids=None, sm_scale: float | None = None,
                              sliding_window: int | None = None, softcap: float | None = None):
    """Plain-jnp f32 attention (no tiling): o [B, T, N, H] in q.dtype and natural-log lse [B, N, T] f32.

    Same mask and softcap as `ops.attention_reference`; a row that sees nothing gives o = 0 and lse = -inf.
    """
    B, T, N, H = q.shape
    K = k.shape[2]
    scale = H ** -0.5 if sm_scale is None else sm_scale
    qf = q.astype(jnp.float32).reshape(B, T, K, N // K, H)
    logits = jnp.einsum("btkgh,bskh->bkgts", qf, k.astype(jnp.float32)) * scale   # [B, K, G, T, S]
    if softcap is not None:
        logits = softcap * jnp.tanh(logits / softcap)
    mask = ops.attention_mask(B, T, T, causal=causal, q_segment_ids=segment_ids, kv_segment_ids=segment_ids,
                              sliding_window=sliding_window)
    logits = jnp.where(mask[:, None, None], logits, -jnp.inf)
    m = lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    e = jnp.exp(logits - m)
    denom = jnp.sum(e, axis=-1, keepdims=True)
    lse = (m + jnp.log(denom))[..., 0].reshape(B, N, T)
    p = e / jnp.where(denom == 0, 1.0, denom)
    out = jnp.einsum("bkgts,bskh->btkgh", p, v.astype(jnp.float32)).reshape(B, T, N, H)
    return out.astype(q.dtype), lse


# ----------------------------------------------------------------------------------------------------------------
# Benchmark: python scripts/bench_kernels.py attention [--quick | --sweep] [--out PATH]


def main(argv=()):
    """Checks the kernel against `flash_attention_reference`, times it against cuDNN (and XLA) in the same process
    and writes JSON (the sweep lives in flash_bench.py to keep this file about the kernel)."""
    from kernels_pallas import flash_bench
    return flash_bench.main(argv)
