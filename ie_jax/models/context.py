"""Attention contexts: how a layer reads and writes K/V. One model `__call__` serves every caller through these.

  DenseCausal      training, `ie_jax.forward`, the no-cache reference. Tokens [B, S]; packed rows are kept apart
                   by segment ids (a query sees only keys of its own segment, and only earlier ones).
  ContiguousCache  the reference generate: a preallocated cache [L, B, S_max, K, H] per K and V. Each call writes
                   its new K/V at per-row offsets and attends over the whole row (valid slots only).
  Paged            the serving engine: flat tokens (B = 1, T tokens of R requests) over a paged cache
                   [L, K, pages, page_size, H] per K and V, addressed through slot_mapping and page_table.

A context hands the model its caches (`caches()`, all layers, or None), which ride in the layer scan's carry;
`attend(..., caches, layer)` updates layer `layer` in place and returns them; `with_caches` gives the updated
context back. The context never knows which model family calls it.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from kernels_pallas import ops


@struct.dataclass
class DenseCausal:
    segment_ids: jax.Array | None = None  # [B, S] int32; None = one segment per row
    lora_slots: jax.Array | None = None  # [B * S] int32: serving's LoRA slot per token (engine/lora.py); None: none

    def caches(self):
        return None

    def with_caches(self, caches):
        return self

    def attend(self, q, k, v, positions, caches, layer, *, scale, sliding_window=None):
        """q [B, T, N, H], k/v [B, T, K, H] -> ([B, T, N, H], None)."""
        del positions, layer  # index-causal: within a segment, positions increase with the index
        out = ops.attention(q, k, v, causal=True, q_segment_ids=self.segment_ids, scale=scale,
                            sliding_window=sliding_window)
        return out, caches


@struct.dataclass
class ContiguousCache:
    k: jax.Array  # [L, B, S_max, K, H]
    v: jax.Array  # [L, B, S_max, K, H]
    write_index: jax.Array  # [B] int32: cache slot of this call's first token, per row
    start: jax.Array  # [B] int32: first valid slot of each row (left padding); slot j holds position j - start

    @classmethod
    def allocate(cls, num_layers, batch, max_len, num_kv_heads, head_dim, dtype, *, start=None):
        shape = (num_layers, batch, max_len, num_kv_heads, head_dim)
        start = jnp.zeros((batch,), jnp.int32) if start is None else jnp.asarray(start, jnp.int32)
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((batch,), jnp.int32), start)

    def caches(self):
        return (self.k, self.v)

    def with_caches(self, caches):
        return self.replace(k=caches[0], v=caches[1])

    def attend(self, q, k, v, positions, caches, layer, *, scale, sliding_window=None):
        """Write k/v [B, T, K, H] at write_index, then attend q [B, T, N, H] at `positions` [B, T] to the row."""
        B, T = q.shape[:2]
        rows = jnp.arange(B)[:, None]  # [B, 1]
        slots = self.write_index[:, None] + jnp.arange(T)  # [B, T]
        k_all = caches[0].at[layer, rows, slots].set(k.astype(caches[0].dtype))
        v_all = caches[1].at[layer, rows, slots].set(v.astype(caches[1].dtype))
        S = k_all.shape[2]
        idx = jnp.arange(S)[None]  # [1, S]
        kv_valid = (idx >= self.start[:, None]) & (idx < (self.write_index + T)[:, None])  # [B, S]
        # Left-padding queries (negative positions) get segment 0, as do empty slots: they see only each other.
        out = ops.attention(q, k_all[layer], v_all[layer], causal=True,
                            q_segment_ids=(positions >= 0).astype(jnp.int32),
                            kv_segment_ids=kv_valid.astype(jnp.int32), q_positions=positions,
                            kv_positions=idx - self.start[:, None], scale=scale, sliding_window=sliding_window)
        return out, (k_all, v_all)


@struct.dataclass
class Paged:
    # [L, K, P, page_size, H] each, or (the engine) k the interleaved [2L, K, P, page_size, H] buffer holding layer
    # l's K at 2l and V at 2l + 1, and v None: one scatter then writes a step's K and V (one kernel, not two)
    k: jax.Array
    v: jax.Array | None
    slot_mapping: jax.Array  # [T] int32: page * page_size + offset for each new token's K/V; -1 = padding
    page_table: jax.Array  # [R, max_pages] int32
    query_start_loc: jax.Array  # [R + 1] int32: request r's tokens are [qsl[r], qsl[r+1])
    seq_lens: jax.Array  # [R] int32: tokens in the cache for r after this step's writes
    num_seqs: jax.Array  # [] int32: rows >= num_seqs are padding
    # fp8 (float8_e4m3fn) caches only: [L, K] f32 dequantization scales (stored = x / scale); None = 16-bit cache
    k_scale: jax.Array | None = None
    v_scale: jax.Array | None = None
    # [T] int32: the LoRA adapter slot of each token, -1 for the base model (engine/lora.py); None without adapters
    lora_slots: jax.Array | None = None
    # static: every request of the step has exactly one token (the engine's decode-only executables)
    decode_only: bool = struct.field(pytree_node=False, default=False)

    def caches(self):
        return (self.k, self.v)

    def with_caches(self, caches):
        return self.replace(k=caches[0], v=caches[1])

    def attend(self, q, k, v, positions, caches, layer, *, scale, sliding_window=None):
        """q [1, T, N, H], k/v [1, T, K, H] (flat tokens) -> ([1, T, N, H], updated caches)."""
        del positions  # implied by seq_lens and query_start_loc
        scales = dict(k_scale=self.k_scale, v_scale=self.v_scale)
        k_all, v_all = ops.write_kv(caches[0], caches[1], layer, k[0], v[0], self.slot_mapping, **scales)
        out = ops.paged_attention(q[0], k_all, v_all, layer, self.page_table, self.query_start_loc, self.seq_lens,
                                  self.num_seqs, scale=scale, sliding_window=sliding_window,
                                  decode_only=self.decode_only, **scales)
        return out[None], (k_all, v_all)

    def rope_in_write(self, parts, num_kv_heads, caches, dtype) -> bool:
        """Whether this step rotates q and k inside the KV write (`attend_rope`): parts [S, 1 * T, N + 2K, H] (or
        its shape), on the interleaved cache where the kernel runs and the step's size takes it (ops.rope_kv_active)."""
        return caches[1] is None and ops.rope_kv_active(parts, num_kv_heads, caches[0], dtype)

    def attend_rope(self, parts, num_kv_heads, positions, inv_freq, caches, layer, *, dtype, scale,
                    sliding_window=None):
        """`attend` from the q/k/v projection before rope, as split-K partials [S, T, N + 2K, H]: one kernel sums
        them (rounded to `dtype`), rotates q and k by positions [1, T] (inv_freq [H/2]) and writes k, v
        (ops.rope_write_kv); the rotated q then attends."""
        scales = dict(k_scale=self.k_scale, v_scale=self.v_scale)
        q, kv = ops.rope_write_kv(parts, num_kv_heads, positions[0], inv_freq, caches[0], layer, self.slot_mapping,
                                  dtype=dtype, **scales)
        out = ops.paged_attention(q, kv, None, layer, self.page_table, self.query_start_loc, self.seq_lens,
                                  self.num_seqs, scale=scale, sliding_window=sliding_window,
                                  decode_only=self.decode_only, **scales)
        return out[None], (kv, None)
