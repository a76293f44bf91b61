"""The paged-attention kernels' tuning options (`TuningConfig`), shared by the packed kernel (paged_attention.py)
and the decode tiles (paged_decode.py), and the key of their compiled variants (a frozen, hashable dataclass)."""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class TuningConfig:
    """How one CTA walks its kv range.

    block_kv: kv tokens per pipeline step (a whole number of pages; 64 or 128 keeps wgmma's N dimension legal).
    num_stages: shared-memory slots in the TMA ring; more slots keep more bytes in flight.
    num_splits: kv splits per tile (flash-decoding); None: from the static shapes (`paged_work.default_splits`).
    convert_wg: fp8 cache only: a second warpgroup issues the TMAs and converts each fp8 block to f16 while the
        first runs the wgmmas and the softmax (False: one warpgroup does both, in turn).
    p_in_registers: P is the register A operand of the PV wgmma instead of going through shared memory. GPU only:
        the CPU interpreter cannot run a register A operand. None: on the GPU, not in the interpreter.
    convert_ahead: fp8 cache, one warpgroup: convert the next block's K while this block's PV runs (and V while
        QK^T runs), so that no conversion sits between two wgmmas.
    prefetch_pages: load the refill's page ids at the top of a step, not right before its TMAs (measured: no gain).
    pages_in_smem: each tile first copies its request's page-table row into shared memory (TMA, next to q's), so
        the refills read page ids from SMEM instead of GMEM. Needs a row of <= PT_SMEM_MAX ids, a multiple of 32;
        otherwise (and with convert_wg) the ids come from GMEM.
    q_in_registers: QK^T takes q as its register A operand; q's SMEM (16 KiB) then serves the ring, filled after
        q is read. GPU only, like p_in_registers; not with convert_wg (measured: no gain).
    direct: each CTA derives its (request, split) work from query_start_loc / seq_lens and reads q and writes
        its output in q's own [T * N, H] order, a tile being ROWS // N whole tokens with all N heads: no work-list
        and no packing kernels. Needs 64 % N == 0 and N % 8 == 0. None: for steps of <= 16 tokens (`use_direct`);
        True also pays for larger decode-only steps.
    merge_in_kernel: direct path: the kernel writes the final [T, N, H] itself, one kernel per call. With one split
        that is only where its rows go; with 2-8 splits the splits of a (request, kv-head) form one cluster, each
        stores its rows and lse, a cluster barrier publishes them and one CTA merges them
        (`paged_work.cluster_merge`). None (default): with one split only (measured faster on the H200); the
        cluster merge was not (docs/kernels/paged_attention.md). False: always merge with jnp after the kernel.
    profile_dir: GPU diagnostics: a per-warpgroup trace of the kernel's named phases (Mosaic GPU's profiler).
    decode_tiles: the transposed decode kernel (paged_decode.py): keys on the wgmma's M, one token's q-heads on its
        N = 8, a request's tokens one per pass (for decode-only calls); fp8 QK^T with q quantized per token and
        kv-head. Uses block_kv, num_stages, num_splits, pages_in_smem and profile_dir; shapes it does not take
        (`paged_decode.supported`) fall back to the packed kernel.
    compact_splits: decode tiles with kv splits: each pass copies only its split's window of page ids into SMEM
        (not the whole row) and stores 16-bit partials instead of f32, so that more CTAs fit per SM (fp8 64x2:
        ~64 -> ~55 KiB). H200, fp8 b1 ctx32768: 25.7-26.1 us against 26.0 without (docs/kernels/paged_attention.md).
    quantize_q_kernel: decode tiles with an fp8 cache: quantize q in one kernel (kernels_pallas/quantize_q.py)
        instead of XLA's three.
    select_columns: decode tiles with kv splits: the merge picks each kv-head's columns of the partials with
        elementwise selects between static slices (`paged_decode.own_columns`) instead of a gather whose index
        arrays XLA builds in kernels of their own (H100, fp8 b1 ctx32768: ~0.8 us of a 32.3 us call; not yet timed).
    """

    block_kv: int = 64
    num_stages: int = 2
    num_splits: int | None = None
    convert_wg: bool = False
    p_in_registers: bool | None = None
    convert_ahead: bool = True
    prefetch_pages: bool = False
    pages_in_smem: bool = True
    q_in_registers: bool = False
    direct: bool | None = None
    merge_in_kernel: bool | None = None
    profile_dir: str = ""
    decode_tiles: bool = False
    compact_splits: bool = False
    quantize_q_kernel: bool = True
    select_columns: bool = False

    def __post_init__(self):
        if self.block_kv not in (32, 64, 128, 256):
            raise ValueError(f"{self.block_kv=} must be 32, 64, 128 or 256")
        if not 1 <= self.num_stages <= 8:
            raise ValueError(f"{self.num_stages=} must be in [1, 8]")
        if self.num_splits is not None and not 1 <= self.num_splits <= 256:
            raise ValueError(f"{self.num_splits=} must be None or in [1, 256]")
