"""Attention contexts: how a layer reads and writes K/V. One model `__call__` serves every caller through these.

  DenseCausal      training, `ie_jax.forward`, the no-cache reference. Tokens [B, S]; packed rows are kept apart
                   by segment ids (a query sees only keys of its own segment, and only earlier ones).
  ContiguousCache  the reference generate: a preallocated cache [L, B, S_max, K, H] per K and V. Each call writes
                   its new K/V at per-row offsets and attends over the whole row (valid slots only).
  (Paged           the engine: flat tokens over a paged cache; added with the engine.)

A context exposes `layer_caches()` (a pytree with a leading layer axis, or None) which the model scans over,
`attend(...)` for one layer, and `with_layer_caches(...)` to return the updated context. The context never knows
which model family calls it.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from kernels_pallas import ops


@struct.dataclass
class DenseCausal:
    segment_ids: jax.Array | None = None  # [B, S] int32; None = one segment per row

    def layer_caches(self):
        return None

    def with_layer_caches(self, caches):
        return self

    def attend(self, q, k, v, positions, cache, *, scale, sliding_window=None):
        """q [B, T, N, H], k/v [B, T, K, H] -> ([B, T, N, H], None)."""
        del positions  # index-causal: within a segment, positions increase with the index
        out = ops.attention(q, k, v, causal=True, q_segment_ids=self.segment_ids, scale=scale,
                            sliding_window=sliding_window)
        return out, None


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

    def layer_caches(self):
        return (self.k, self.v)

    def with_layer_caches(self, caches):
        return self.replace(k=caches[0], v=caches[1])

    def attend(self, q, k, v, positions, cache, *, scale, sliding_window=None):
        """Write k/v [B, T, K, H] at write_index, then attend q [B, T, N, H] at `positions` [B, T] to the row."""
        k_cache, v_cache = cache  # [B, S_max, K, H] each
        write = jax.vmap(lambda c, x, i: jax.lax.dynamic_update_slice_in_dim(c, x, i, axis=0))
        k_cache = write(k_cache, k.astype(k_cache.dtype), self.write_index)
        v_cache = write(v_cache, v.astype(v_cache.dtype), self.write_index)
        B, T = q.shape[:2]
        slots = jnp.arange(k_cache.shape[1])
        end = (self.write_index + T)[:, None]
        kv_valid = (slots[None] >= self.start[:, None]) & (slots[None] < end)  # [B, S_max]
        kv_positions = slots[None] - self.start[:, None]
        # Left-padding queries (negative positions) get segment 0, as do empty slots: they see only each other.
        q_segment = (positions >= 0).astype(jnp.int32)
        out = ops.attention(q, k_cache, v_cache, causal=True, q_segment_ids=q_segment,
                            kv_segment_ids=kv_valid.astype(jnp.int32), q_positions=positions,
                            kv_positions=kv_positions, scale=scale, sliding_window=sliding_window)
        return out, (k_cache, v_cache)
