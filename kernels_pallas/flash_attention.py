"""Flash attention for Hopper in Pallas Mosaic GPU: forward kernel, custom VJP glue, reference and benchmark.

Shapes: q [B, T, N, H]; k, v [B, T, K, H] with N % K == 0 (MHA, GQA, MQA); segment_ids [B, T] int32.
B batch, T tokens, N query heads, K kv heads, G = N // K query heads per kv head, H head dim.

One CTA computes a 128-row query tile of one (batch, head). It runs three warpgroups:
  producer   warpgroup 2: TMA-loads K/V blocks into a `num_stages`-deep ring of swizzled SMEM buffers, waiting
             on "consumed" barriers before it overwrites a slot;
  consumers  warpgroups 0 and 1 each own 64 query rows: S = Q K^T (wgmma), online softmax in base 2 (log2(e)
             folded into the scale), O += P V (wgmma with P in registers). A shared "schedule" barrier makes
             the two consumers take turns on the tensor cores, so one's softmax hides under the other's matmuls.
The KV loop visits only the blocks the tile can see (causal and sliding-window bounds) and applies the mask only
on blocks that need it (the diagonal, the window's edge, the ragged tail, or every block with segment ids).
T is padded up to the tile inside the wrapper; padded keys are masked, padded query rows are sliced off.

The backward kernels, and the mask/pipeline pieces both directions share, live in `flash_attention_bwd.py`.
This module does not know about models, positions or paging: the caller gives index-causal, equal-length q, k/v.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import time

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from kernels_pallas import flash_attention_bwd, ops
from kernels_pallas.flash_attention_bwd import (BLOCK_Q, LOG2E, NUM_CONSUMERS, TILE_Q, MaskSpec, interpret_params,
                                                kv_block_range, mma, pad_tokens, produce, scaled_logits,
                                                smem_transforms, three_loops, visible)

HEAD_DIMS = (64, 128, 256)
DTYPES = (jnp.bfloat16, jnp.float16)


# ----------------------------------------------------------------------------------------------------------------
# Tuning


@dataclasses.dataclass(frozen=True)
class TuningConfig:
    """Block sizes and pipeline depth. Forward: 128 query rows x `block_kv` keys per step. Backward: the dK/dV
    pass streams `bwd_block_q` query rows past 128 keys; the dQ pass streams `bwd_block_kv` keys past 128 rows."""
    block_kv: int = 128
    num_stages: int = 2
    schedule_barrier: bool = True
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

    @staticmethod
    def default(head_dim: int) -> TuningConfig:
        """Best forward of the H200 sweep in docs/kernels/flash_attention.md (b4 s8192, 32/8 heads)."""
        block_kv = {64: 256, 128: 128, 256: 64}[head_dim]
        return TuningConfig(block_kv=block_kv, num_stages=2)


# ----------------------------------------------------------------------------------------------------------------
# Forward kernel


def _forward_call(q, k, v, segment_ids, *, spec: MaskSpec, scale: float, softcap, config: TuningConfig, interpret):
    """q [B, Tp, N, H], k/v [B, Tp, K, H], segment_ids [B, Tp] or None (Tp a multiple of the tiles)."""
    B, Tp, N, H = q.shape
    K = k.shape[2]
    G = N // K
    dtype = q.dtype
    block_kv = config.block_kv
    stages = config.num_stages
    use_interpreter = interpret is not None
    transforms = smem_transforms(dtype)

    def kernel(q_ref, k_ref, v_ref, seg_ref, o_ref, lse_ref, q_smem, k_smem, v_smem, p_smem, qseg_smem, kvseg_smem,
               lse_smem, q_bar, qs_bar, k_full, v_full, s_full, k_consumed, v_consumed, schedule):
        # q_ref [B, Tp, N, H]; k_ref, v_ref [B, Tp, K, H]; seg_ref [B, Tp] int32 (or unused)
        # o_ref [B, Tp, N, H]; lse_ref [B, N, Tp] f32
        # q_smem [2, 64, H]: Q of each consumer, reused for its output; k_smem, v_smem [stages, block_kv, H]
        # p_smem [2, 64, block_kv]: P for the interpreter only; qseg_smem [2, 64]; kvseg_smem [stages, block_kv]
        # lse_smem [2, 64] f32
        head = lax.axis_index("heads")
        tile = lax.axis_index("q_tiles")
        batch = lax.axis_index("batch")
        wg = lax.axis_index("wg")
        kv_head = lax.div(head, G)
        q0 = tile * TILE_Q
        lo, a, c, hi = kv_block_range(spec, q0, TILE_Q, block_kv)

        def rendezvous():
            if config.schedule_barrier:
                plgpu.barrier_arrive(schedule)
                plgpu.barrier_wait(schedule)

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

            def step(i, carry, masked):
                acc, m, l = carry   # [64, H], [64], [64] f32 (m in base 2)
                slot = lax.rem(i - lo, stages)
                plgpu.barrier_wait(k_full.at[slot])

                def qk(acc_ref):
                    plgpu.wgmma(acc_ref, qo, k_smem.at[slot].transpose((1, 0)))
                    rendezvous()
                    return acc_ref[...]
                s = pl.run_scoped(qk, plgpu.ACC((BLOCK_Q, block_kv), jnp.float32))   # [64, block_kv]
                plgpu.barrier_arrive(k_consumed.at[slot])
                s, _ = scaled_logits(s, scale, softcap)
                if masked:
                    q_ids = row0 + plgpu.broadcasted_iota(jnp.int32, s.shape, 0, layout=plgpu.Layout.WGMMA)
                    kv_ids = i * block_kv + plgpu.broadcasted_iota(jnp.int32, s.shape, 1, layout=plgpu.Layout.WGMMA)
                    kv_seg = None
                    if spec.has_segments:
                        plgpu.barrier_wait(s_full.at[slot])
                        kv_seg = plgpu.load(kvseg_smem.at[slot], layout=plgpu.Layout.WGMMA.reduce(0))
                        kv_seg = lax.broadcast_in_dim(kv_seg, s.shape, [1])
                    ok = visible(spec, q_ids, kv_ids, q_seg, kv_seg)
                    if ok is not None:
                        s = jnp.where(ok, s, -jnp.inf)
                m_new = jnp.maximum(m, s.max(axis=1))
                m_use = m_new
                if masked:   # a row that has seen nothing yet has m = -inf; shift it by 0 instead
                    m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new)
                alpha = jnp.exp2(m - m_use)
                p = jnp.exp2(s - lax.broadcast_in_dim(m_use, s.shape, [0]))
                acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
                l = l * alpha + p.sum(axis=1)
                p16 = p.astype(dtype)
                if config.schedule_barrier:
                    plgpu.barrier_arrive(schedule)
                plgpu.barrier_wait(v_full.at[slot])
                if config.schedule_barrier:
                    plgpu.barrier_wait(schedule)
                acc = mma(acc, p16, v_smem.at[slot], p_smem.at[wg], use_interpreter)
                plgpu.barrier_arrive(v_consumed.at[slot])
                return acc, m_new, l

            acc = plgpu.layout_cast(jnp.zeros((BLOCK_Q, H), jnp.float32), plgpu.Layout.WGMMA)
            m = plgpu.layout_cast(jnp.full((BLOCK_Q,), -jnp.inf, jnp.float32), plgpu.Layout.WGMMA.reduce(1))
            l = plgpu.layout_cast(jnp.zeros((BLOCK_Q,), jnp.float32), plgpu.Layout.WGMMA.reduce(1))
            pl.when(wg == 1)(rendezvous)         # offset the consumers by half a step: ping-pong
            acc, m, l = three_loops(lo, a, c, hi, step, (acc, m, l))
            pl.when(wg == 0)(rendezvous)

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
            if spec.has_segments:   # the segment slot is read after QK, so it is freed together with V
                copies.append((lambda j: seg_ref.at[batch, pl.ds(j * block_kv, block_kv)], kvseg_smem, s_full,
                               v_consumed))
            produce(lo, hi, stages, copies)

    seg = segment_ids if segment_ids is not None else jnp.zeros((B, Tp), jnp.int32)
    scratch = [
        plgpu.SMEM((NUM_CONSUMERS, BLOCK_Q, H), dtype, transforms=transforms),
        plgpu.SMEM((stages, block_kv, H), dtype, transforms=transforms),
        plgpu.SMEM((stages, block_kv, H), dtype, transforms=transforms),
        plgpu.SMEM((NUM_CONSUMERS, BLOCK_Q, block_kv) if use_interpreter else (NUM_CONSUMERS, 8, 64), dtype),
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
        plgpu.Barrier(num_arrivals=NUM_CONSUMERS),                     # schedule (ping-pong)
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
    if segment_ids is not None and (segment_ids.shape != (B, T) or not jnp.issubdtype(segment_ids.dtype,
                                                                                     jnp.integer)):
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


def padded_length(T: int, config: TuningConfig) -> int:
    tile = max(TILE_Q, config.block_kv, config.bwd_block_q, config.bwd_block_kv)
    return pl.cdiv(T, tile) * tile


def mask_spec(T: int, opts: _Options, has_segments: bool) -> MaskSpec:
    return MaskSpec(opts.causal, opts.window, has_segments, T, padded_length(T, opts.config))


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
# Benchmark: python scripts/bench_kernels.py attention [--quick] [--out PATH]

PEAK_TFLOPS = 752.0         # measured bf16 GEMM ceiling (shared/GPU.md)
PEAK_TBPS = 4.14


def _time_ms(fn, *args, reps: int = 5, iters: int = 10) -> float:
    jax.block_until_ready(fn(*args))
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(iters):
            out = fn(*args)
        jax.block_until_ready(out)
        samples.append((time.perf_counter() - t0) / iters * 1e3)
    return sorted(samples)[len(samples) // 2]


def _attention_flops(B, S, N, H, causal):
    return 4 * B * S * S * N * H / (2 if causal else 1)


def _rel_err(x, ref):
    x, ref = jnp.asarray(x, jnp.float32), jnp.asarray(ref, jnp.float32)
    return float(jnp.linalg.norm(x - ref) / jnp.linalg.norm(ref))


def _save(results, out):
    out = out or os.path.join(os.environ.get("OUT", "benchmarks/results"), "attention.json")
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out, "w") as f:
        json.dump(results, f, indent=1)


def _check(B, T, N, K, H, **kw):
    """Forward, lse and gradients against the f32 reference on fresh random data; returns the worst rel error."""
    keys = jax.random.split(jax.random.key(T + N + H), 5)
    q = jax.random.normal(keys[0], (B, T, N, H), jnp.bfloat16)
    k = jax.random.normal(keys[1], (B, T, K, H), jnp.bfloat16)
    v = jax.random.normal(keys[2], (B, T, K, H), jnp.bfloat16)
    do = jax.random.normal(keys[3], (B, T, N, H), jnp.bfloat16)
    seg = jnp.sort(jax.random.randint(keys[4], (B, T), 0, 4), axis=1) if kw.pop("segments", False) else None

    def run(fn, q, k, v, do, seg):
        (o, lse), vjp = jax.vjp(lambda q, k, v: fn(q, k, v, segment_ids=seg, **kw), q, k, v)
        return (o, lse, *vjp((do, jnp.zeros_like(lse))))
    ref = jax.jit(functools.partial(run, flash_attention_reference))(q, k, v, do, seg)
    ours = jax.jit(lambda q, k, v, seg: flash_attention(q, k, v, segment_ids=seg, return_lse=True, **kw))(q, k, v, seg)
    print("  forward rel err o, lse:", [_rel_err(a, b) for a, b in zip(ours, ref)], flush=True)
    ours = jax.jit(functools.partial(run, functools.partial(flash_attention, return_lse=True)))(q, k, v, do, seg)
    return [_rel_err(a, b) for a, b in zip(ours, ref)]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="JSON path (default $OUT/attention.json or benchmarks/results)")
    parser.add_argument("--quick", action="store_true", help="only the b4 s8192 d128 shapes, no sweep")
    parser.add_argument("--no-check", action="store_true")
    parser.add_argument("--no-bwd", action="store_true")
    parser.add_argument("--watchdog", type=float, default=0, help="dump stacks and exit after this many seconds")
    args = parser.parse_args(argv)
    if args.watchdog:
        import faulthandler
        faulthandler.dump_traceback_later(args.watchdog, exit=True)
    results = {"device": str(jax.devices()[0]), "jax": jax.__version__, "checks": [], "runs": []}

    if not args.no_check:
        cases = [dict(B=2, T=1024, N=8, K=2, H=128, causal=True), dict(B=2, T=1024, N=8, K=2, H=128, causal=False),
                 dict(B=1, T=1000, N=4, K=1, H=64, causal=True, segments=True),
                 dict(B=1, T=777, N=4, K=4, H=128, causal=True, sliding_window=200, softcap=30.0),
                 dict(B=1, T=512, N=4, K=2, H=256, causal=True)]
        for case in cases:
            print(f"checking {case}", flush=True)
            try:
                errs = _check(**dict(case))
                ok = max(errs) < 2e-2
            except Exception as e:  # noqa: BLE001 - report and continue the sweep
                errs, ok = repr(e)[:300], False
            results["checks"].append({"case": {k: v for k, v in case.items()}, "rel_err o,lse,dq,dk,dv": errs,
                                      "ok": ok})
            print(f"check {case}: {errs} {'OK' if ok else 'FAIL'}", flush=True)

    shapes = [("b4 s8192 h32/8 d128", 4, 8192, 32, 8, 128)]
    if not args.quick:
        shapes += [("b1 s32768 h32/8 d128", 1, 32768, 32, 8, 128), ("b4 s8192 h32/8 d64", 4, 8192, 32, 8, 64),
                   ("b2 s8192 h32/8 d256", 2, 8192, 32, 8, 256)]
    sweep = {128: [TuningConfig(block_kv=128, num_stages=2), TuningConfig(block_kv=64, num_stages=4),
                   TuningConfig(block_kv=128, num_stages=2, bwd_block_kv=128)],
             64: [TuningConfig(block_kv=128, num_stages=2), TuningConfig(block_kv=256, num_stages=2)],
             256: [TuningConfig(block_kv=64, num_stages=2)]}
    for name, B, S, N, K, H in shapes:
        for causal in (True, False):
            if S > 8192 and not causal:
                continue
            keys = jax.random.split(jax.random.key(S + H + causal), 4)
            q = jax.random.normal(keys[0], (B, S, N, H), jnp.bfloat16)
            k = jax.random.normal(keys[1], (B, S, K, H), jnp.bfloat16)
            v = jax.random.normal(keys[2], (B, S, K, H), jnp.bfloat16)
            do = jax.random.normal(keys[3], (B, S, N, H), jnp.bfloat16)
            flops = _attention_flops(B, S, N, H, causal)
            impls = {}
            configs = sweep[H][:1] if args.quick or S > 8192 else sweep[H]
            for i, cfg in enumerate(configs):
                impls[f"pallas[{i}]"] = (functools.partial(flash_attention, causal=causal, config=cfg), cfg)
            impls["cudnn"] = (functools.partial(jax.nn.dot_product_attention, is_causal=causal,
                                                implementation="cudnn"), None)
            if S <= 8192:
                impls["xla"] = (functools.partial(jax.nn.dot_product_attention, is_causal=causal,
                                                  implementation="xla"), None)
            row = {"shape": name, "B": B, "S": S, "N": N, "K": K, "H": H, "causal": causal, "fwd_tflop": flops / 1e12}
            for label, (fn, cfg) in impls.items():
                entry = {"config": None if cfg is None else dataclasses.asdict(cfg)}
                try:
                    fwd = jax.jit(fn)
                    entry["fwd_ms"] = _time_ms(fwd, q, k, v)
                    entry["fwd_tflops"] = flops / entry["fwd_ms"] / 1e9
                    if not args.no_bwd and not label.startswith("xla"):
                        def fwd_bwd(q, k, v, do, fn=fn):
                            o, vjp = jax.vjp(fn, q, k, v)
                            return vjp(do)
                        entry["fwd_bwd_ms"] = _time_ms(jax.jit(fwd_bwd), q, k, v, do, reps=3, iters=5)
                        entry["fwd_bwd_tflops"] = 3.5 * flops / entry["fwd_bwd_ms"] / 1e9
                except Exception as e:  # noqa: BLE001
                    entry["error"] = repr(e)[:300]
                row[label] = entry
                print(f"{name} causal={causal} {label}: {entry}", flush=True)
            results["runs"].append(row)
            _save(results, args.out)
    _save(results, args.out)
    print("\n| shape | causal | impl | fwd ms | fwd TFLOP/s | % of 752 | vs cuDNN | fwd+bwd ms | fwd+bwd TFLOP/s | vs cuDNN |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in results["runs"]:
        base = row.get("cudnn", {})
        for label in [k for k in row if isinstance(row[k], dict)]:
            e = row[label]
            if "fwd_ms" not in e:
                print(f"| {row['shape']} | {row['causal']} | {label} | error | | | | | | |")
                continue
            ratio = e["fwd_tflops"] / base["fwd_tflops"] if "fwd_tflops" in base else float("nan")
            bwd = e.get("fwd_bwd_tflops")
            bratio = bwd / base["fwd_bwd_tflops"] if bwd and "fwd_bwd_tflops" in base else float("nan")
            print(f"| {row['shape']} | {row['causal']} | {label} | {e['fwd_ms']:.3f} | {e['fwd_tflops']:.0f} | "
                  f"{100 * e['fwd_tflops'] / PEAK_TFLOPS:.0f}% | {ratio:.2f} | {e.get('fwd_bwd_ms', float('nan')):.3f} | "
                  f"{bwd or float('nan'):.0f} | {bratio:.2f} |")
    return 0
