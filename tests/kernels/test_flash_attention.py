"""Flash attention kernel vs its f32 reference: forward, lse and gradients.

CPU tests run the real kernel bodies through the Mosaic GPU interpreter at small shapes; `gpu` tests compile
them for Hopper at full sizes. Tolerances suit bf16/fp16 operands with f32 accumulation: relative Frobenius error
of o and of each gradient <= 1e-2, max abs error of o <= 3e-2, lse (f32 softmax statistics) within 1e-3.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels_pallas import flash_attention as fa
from kernels_pallas import ops

REL_TOL = 1e-2
ABS_TOL_O = 3e-2
LSE_TOL = 1e-3


def _interp(detect_races=False):
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
    return InterpretGPUParams(detect_races=detect_races)


def _inputs(B, T, N, K, H, dtype=jnp.bfloat16, segments=False, seed=0):
    keys = jax.random.split(jax.random.key(seed), 5)
    q = jax.random.normal(keys[0], (B, T, N, H), dtype)
    k = jax.random.normal(keys[1], (B, T, K, H), dtype)
    v = jax.random.normal(keys[2], (B, T, K, H), dtype)
    seg = jnp.sort(jax.random.randint(keys[3], (B, T), 0, 3), axis=1).astype(jnp.int32) if segments else None
    return q, k, v, seg, keys[4]


def _rel(x, ref):
    x, ref = np.asarray(x, np.float32), np.asarray(ref, np.float32)
    return float(np.linalg.norm(x - ref) / np.linalg.norm(ref))


def _check_forward(B, T, N, K, H, dtype=jnp.bfloat16, segments=False, interpret=None, config=None, **kw):
    q, k, v, seg, _ = _inputs(B, T, N, K, H, dtype, segments)
    o, lse = fa.flash_attention(q, k, v, segment_ids=seg, return_lse=True, config=config,
                                interpret=interpret if interpret is not None else _interp(), **kw)
    expected_o, expected_lse = fa.flash_attention_reference(q, k, v, segment_ids=seg, **kw)
    assert o.shape == q.shape and o.dtype == q.dtype and lse.shape == (B, N, T)
    diff = np.abs(np.asarray(o, np.float32) - np.asarray(expected_o, np.float32))
    print(f"o: max diff {diff.max():.3g}, mean diff {diff.mean():.3g}")
    assert np.isfinite(np.asarray(o, np.float32)).all()
    assert diff.max() <= ABS_TOL_O and _rel(o, expected_o) <= REL_TOL
    np.testing.assert_allclose(np.asarray(lse), np.asarray(expected_lse), atol=LSE_TOL, rtol=LSE_TOL)


def _check_grads(B, T, N, K, H, dtype=jnp.bfloat16, segments=False, interpret=None, with_lse=False, config=None,
                 **kw):
    q, k, v, seg, key = _inputs(B, T, N, K, H, dtype, segments)
    do = jax.random.normal(key, (B, T, N, H), jnp.float32)
    dlse = jax.random.normal(jax.random.fold_in(key, 1), (B, N, T), jnp.float32)

    def loss(attn, q, k, v):
        o, lse = attn(q, k, v, segment_ids=seg, **kw)
        return jnp.sum(o.astype(jnp.float32) * do) + (jnp.sum(lse * dlse) if with_lse else 0.0)
    kernel = functools.partial(fa.flash_attention, return_lse=True, config=config,
                               interpret=interpret if interpret is not None else _interp())
    got = jax.grad(functools.partial(loss, kernel), argnums=(0, 1, 2))(q, k, v)
    expected = jax.grad(functools.partial(loss, fa.flash_attention_reference), argnums=(0, 1, 2))(q, k, v)
    for name, g, e in zip(("dq", "dk", "dv"), got, expected):
        assert g.shape == e.shape and g.dtype == e.dtype
        err = _rel(g, e)
        print(f"{name}: rel err {err:.3g}")
        assert np.isfinite(np.asarray(g, np.float32)).all() and err <= REL_TOL, (name, err)


# ---------------------------------------------------------------------------------------------------------------
# CPU: the interpreter


@pytest.mark.parametrize("case", [
    dict(B=2, T=256, N=2, K=2, H=64, causal=True),                                  # MHA, causal
    dict(B=1, T=128, N=4, K=1, H=128, causal=False),                                # GQA 4, non-causal
    dict(B=1, T=256, N=8, K=1, H=64, causal=True, segments=True,
         config=fa.TuningConfig(block_kv=64)),                                      # GQA 8, segments, 4 KV steps
    dict(B=1, T=128, N=2, K=1, H=256, causal=True, dtype=jnp.float16),               # head dim 256, fp16
    dict(B=2, T=200, N=2, K=1, H=64, causal=False, segments=True),                  # ragged length
    dict(B=1, T=192, N=2, K=1, H=64, causal=True, sliding_window=50),               # sliding window
    dict(B=1, T=256, N=2, K=1, H=64, causal=False, softcap=5.0, sm_scale=0.2),      # softcap, custom scale
], ids=["mha-causal", "gqa4-d128", "gqa8-seg", "d256-fp16", "ragged-seg", "window", "softcap"])
def test_forward_interpret(case):
    _check_forward(**case)


@pytest.mark.parametrize("case", [
    dict(B=1, T=128, N=2, K=1, H=64, causal=True, with_lse=True),
    dict(B=1, T=200, N=4, K=1, H=64, causal=False, segments=True, sliding_window=60),
    dict(B=1, T=128, N=2, K=2, H=64, causal=True, softcap=4.0),
    dict(B=1, T=128, N=2, K=1, H=256, causal=True),                                # reference-VJP fallback
], ids=["causal-lse", "seg-window-ragged", "softcap", "d256"])
def test_backward_interpret(case):
    _check_grads(**case)


def test_backward_interpret_d128_fp16():
    _check_grads(B=1, T=128, N=4, K=1, H=128, dtype=jnp.float16, causal=True)


@pytest.mark.parametrize("config", [
    fa.TuningConfig(schedule="handoff"),                              # pipelined, handoff
    fa.TuningConfig(schedule="rendezvous"),                           # pipelined, rendezvous
    fa.TuningConfig(block_kv=64, schedule="none"),                    # pipelined, no schedule
    fa.TuningConfig(pipeline=False, schedule="rendezvous"),           # one block per step
], ids=["pipe-handoff", "pipe-rendezvous", "pipe-none", "plain"])
def test_forward_schedules_reuse_slots(config):
    # 512 keys at 128 a block: more blocks than stages, so every slot is refilled while the other consumer runs
    # (a handoff/rendezvous order that deadlocks against the producer hangs here).
    _check_forward(B=1, T=512, N=2, K=1, H=64, causal=False, config=config)


def test_no_races():
    from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call
    cfg = fa.TuningConfig(block_kv=64, bwd_block_kv=64)      # more steps than pipeline stages: slots are reused
    _check_forward(B=1, T=256, N=2, K=1, H=64, causal=True, segments=True, config=cfg,
                   interpret=_interp(detect_races=True))
    assert not interpret_pallas_call.get_races().races_found
    _check_grads(B=1, T=256, N=2, K=1, H=64, causal=False, interpret=_interp(detect_races=True))
    assert not interpret_pallas_call.get_races().races_found


def test_ops_switch_runs_kernel():
    q, k, v, seg, _ = _inputs(1, 128, 2, 1, 64, segments=True)
    with ops.kernel_backend("interpret"):
        got = ops.attention(q, k, v, causal=True, q_segment_ids=seg, kv_segment_ids=seg)
    expected = ops.attention_reference(q, k, v, causal=True, q_segment_ids=seg, kv_segment_ids=seg)
    assert _rel(got, expected) <= REL_TOL


@pytest.mark.parametrize("kwargs, name", [
    (dict(H=96), "head dim"),
    (dict(dtype=jnp.float32), "dtype"),
    (dict(K=3, N=4), "kv heads"),
    (dict(sliding_window=0), "sliding_window"),
    (dict(softcap=-1.0), "softcap"),
])
def test_rejects_unsupported(kwargs, name):
    shape = dict(B=1, T=64, N=kwargs.pop("N", 2), K=kwargs.pop("K", 1), H=kwargs.pop("H", 64))
    q, k, v, _, _ = _inputs(**shape, dtype=kwargs.pop("dtype", jnp.bfloat16))
    with pytest.raises(ValueError, match=name.split()[0]):
        fa.flash_attention(q, k, v, interpret=True, **kwargs)


def test_tuning_config_validates():
    with pytest.raises(ValueError, match="block_kv"):
        fa.TuningConfig(block_kv=96)
    with pytest.raises(ValueError, match="num_stages"):
        fa.TuningConfig(num_stages=1)
    with pytest.raises(ValueError, match="schedule"):
        fa.TuningConfig(schedule="round-robin")
    with pytest.raises(ValueError, match="pipeline"):
        fa.TuningConfig(pipeline=False, schedule="handoff")


# ---------------------------------------------------------------------------------------------------------------
# GPU: compiled for Hopper, full sizes


@pytest.mark.gpu
@pytest.mark.parametrize("case", [
    dict(B=2, T=4096, N=32, K=8, H=128, causal=True),
    dict(B=2, T=4096, N=32, K=8, H=128, causal=False),
    dict(B=1, T=4096, N=16, K=2, H=64, causal=True, segments=True),
    dict(B=1, T=3000, N=8, K=1, H=128, causal=True, sliding_window=1024, softcap=30.0),
    dict(B=1, T=2048, N=8, K=8, H=256, causal=True, dtype=jnp.float16),
    dict(B=1, T=4096, N=8, K=2, H=128, causal=False, config=fa.TuningConfig(pipeline=False, schedule="rendezvous")),
], ids=["gqa-causal", "gqa-full", "d64-seg", "ragged-window-softcap", "d256-fp16", "plain"])
def test_gpu_forward_and_grads(case):
    _check_forward(**case, interpret=False)
    _check_grads(**case, interpret=False)
