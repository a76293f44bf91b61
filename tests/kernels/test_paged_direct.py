"""The direct path of ragged paged attention (steps of <= 16 tokens) and its in-kernel split merge.

With `merge_in_kernel` the splits of one (request, kv-head) run as one thread-block cluster and merge inside the
kernel; the default (False, the faster on the H200) merges with jnp after the kernel. Both are checked against the
reference on random batches with random page permutations, lengths 1 and max, prefill chunks walked in passes and
padding rows and tokens. CPU tests run the kernel body in the Mosaic GPU interpreter; `gpu` tests at serving sizes.
"""
import numpy as np
import pytest

from kernels_pallas import paged_attention as pa
from test_paged_attention import assert_close, make_batch, run_both, to_fp8


@pytest.mark.parametrize("merge_in_kernel", [True, False])
@pytest.mark.parametrize("q_lens,seq_lens,num_rows,extra,splits", [
    ([1, 9, 1], [90, 20, 128], 5, 3, 3),  # a 9-token chunk: two passes of 8 tokens; q's box clamped at its end
    ([1], [77], None, 0, 4), ([1, 1], [200, 3], 3, 6, None),  # T = 1: an 8-row q box; padding, default splits
    ([1, 1], [1, 64], None, 2, 1)])  # lengths 1 and the table's maximum, one split (no cluster)
def test_direct_path_small_batches(merge_in_kernel, q_lens, seq_lens, num_rows, extra, splits):
    """Work from qsl/seq_lens in the CTA, q and output in [T * N, H]; padding tokens come back as zeros (written
    by the kernel itself when the merge is fused)."""
    batch = make_batch(5, q_lens=q_lens, seq_lens=seq_lens, num_rows=num_rows, extra_tokens=extra)
    out, expected = run_both(batch, pa.TuningConfig(num_splits=splits, direct=True, merge_in_kernel=merge_in_kernel))
    assert_close(out, expected)
    assert not np.asarray(out[sum(q_lens):], np.float32).any()


def test_direct_path_page_ids_in_smem():
    """The page-table row copied into shared memory: a 9-token chunk in two passes (the row is copied per pass)."""
    batch = make_batch(9, q_lens=[1, 9, 1], seq_lens=[90, 20, 256], num_rows=5, extra_tokens=3, page_size=8)
    config = pa.TuningConfig(num_splits=3, direct=True)
    assert pa.ids_in_smem(config, batch[3].shape[1], fp8=False)  # 32 ids: the default copies them to SMEM
    out, expected = run_both(batch, config)
    assert_close(out, expected)


def test_direct_path_fp8_window_softcap():
    """fp8: the kernel applies v_scale in the cluster merge; sliding window and softcap on the direct path."""
    batch = make_batch(6, q_lens=[3, 1], seq_lens=[150, 70], num_rows=3, extra_tokens=2)
    fp8, _, scales = to_fp8(batch, 7)
    assert_close(*run_both(fp8, pa.TuningConfig(num_splits=2, direct=True, merge_in_kernel=True),
                             sliding_window=50, softcap=20.0, **scales))


def test_fused_merge_matches_the_jnp_merge():
    """The cluster merge and the jnp merge combine the same partial outputs; poisoned (NaN) rows would show."""
    batch = make_batch(8, q_lens=[1, 5, 1], seq_lens=[300, 40, 2], num_rows=4, extra_tokens=5)
    fused, plain = (pa.ragged_paged_attention(*batch, config=pa.TuningConfig(num_splits=4, direct=True,
                                                                            merge_in_kernel=m), interpret=True)
                    for m in (True, False))
    assert_close(fused, plain, tol=1e-2)
    assert_close(fused, pa.paged_attention_reference(*batch))


def test_cluster_merge_has_no_races():
    """The interpreter's race detector over the cluster protocol: partial rows stored by TMA, the cluster barrier,
    then one CTA's loads of every split's rows; two passes per request, so the barrier is reused."""
    from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
    batch = make_batch(9, q_lens=[9, 1], seq_lens=[200, 90], K=2)
    config = pa.TuningConfig(num_splits=3, direct=True, merge_in_kernel=True)
    out = pa.ragged_paged_attention(*batch, config=config, interpret=InterpretGPUParams(detect_races=True))
    assert not interpret_pallas_call.get_races().races_found
    assert_close(out, pa.paged_attention_reference(*batch))


def test_fuses_merge_rule():
    config = pa.TuningConfig(merge_in_kernel=True)
    assert pa.fuses_merge(8, 4, 128, config) and pa.fuses_merge(1, 4, 64, config)
    assert not pa.fuses_merge(16, 4, 128, config)  # more splits than a portable cluster
    assert not pa.fuses_merge(8, 1, 128, config)  # a kv-head's rows of a token too few for the merge's vectors
    assert not pa.fuses_merge(8, 4, 128, pa.TuningConfig())  # the cluster merge is off by default (not faster)
    assert pa.fuses_merge(1, 4, 128, pa.TuningConfig())  # one split: the kernel writes the output by default
    assert not pa.fuses_merge(1, 4, 128, pa.TuningConfig(merge_in_kernel=False))


def test_direct_path_forced_on_a_large_decode_step():
    """direct=True past 16 tokens (a decode step of 24 requests, one split: the kernel writes the output itself,
    the default at one split), and a request with 3 tokens walked in passes."""
    assert not pa.use_direct(24, 8, 24, pa.TuningConfig()) and pa.use_direct(24, 8, 24, pa.TuningConfig(direct=True))
    batch = make_batch(12, q_lens=[1] * 20 + [3], seq_lens=[70, 40, 1, 128] * 5 + [60], num_rows=22, extra_tokens=0)
    config = pa.TuningConfig(direct=True, num_splits=1)
    assert pa.fuses_merge(1, 4, batch[0].shape[-1], config)
    out, expected = run_both(batch, config)
    assert_close(out, expected)


@pytest.mark.gpu
@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("merge_in_kernel", [True, False])
@pytest.mark.parametrize("q_lens,seq_lens,num_rows,extra", [([1], [1000], 1, 7), ([1], [200], 1, 0),
                                                           ([1, 5, 1], [3000, 300, 17], 8, 5)])
def test_gpu_direct_small_batches(fp8, merge_in_kernel, q_lens, seq_lens, num_rows, extra):
    batch = make_batch(20, q_lens=q_lens, seq_lens=seq_lens, num_rows=num_rows, extra_tokens=extra, K=8, G=4, H=128)
    scales = {}
    if fp8:
        batch, _, scales = to_fp8(batch, 21)
    out = pa.ragged_paged_attention(*batch, **scales, config=pa.TuningConfig(merge_in_kernel=merge_in_kernel))
    assert_close(out, pa.paged_attention_reference(*batch, **scales))
    assert not np.asarray(out[sum(q_lens):], np.float32).any()


@pytest.mark.gpu
@pytest.mark.parametrize("splits", [8, 4])
def test_gpu_long_context_cluster_merge(splits):
    """ctx 32768 with the splits merged in a cluster; repeated calls (the engine calls once per layer) agree."""
    batch = make_batch(19, q_lens=[1], seq_lens=[32768], K=8, G=4, H=128)
    config = pa.TuningConfig(num_splits=splits, merge_in_kernel=True)
    out = pa.ragged_paged_attention(*batch, config=config)
    assert_close(out, pa.paged_attention_reference(*batch))
    for _ in range(3):
        np.testing.assert_array_equal(np.asarray(pa.ragged_paged_attention(*batch, config=config), np.float32),
                                      np.asarray(out, np.float32))
